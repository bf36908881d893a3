"""Functions that run inside meta-schedule's builder worker processes.

Kept in a module of its own, importing nothing but TVM, because every builder batch starts fresh worker
processes that import whatever module a pickled function lives in.

Why not meta-schedule's ``default_build``: it imports ``tvm.s_tir.tensor_intrin``, which parses every
TVMScript intrinsic (CUDA alone takes ~17 s) in *every* fresh worker, so each batch pays ~25 s before it
compiles anything on a 2-core machine. Candidates reach the builder already tensorized (the intrinsic's
implementation is inlined by the search process), so the registry is not needed to compile them.
"""

from __future__ import annotations


def build_candidate(mod, target, _params):
    """Compile one measure candidate (``default_build`` minus the intrinsic-registry import).

    Parameters
    ----------
    mod : tvm.IRModule
        The scheduled candidate.
    target : tvm.target.Target
    _params : dict or None
        Unused (meta-schedule passes None for TIR tasks).

    Returns
    -------
    tvm.runtime.Module
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def runner_initializer() -> None:
    """Initializer of meta-schedule's runner workers: request the AMX tile state (a no-op without AMX), so
    that measuring an AMX candidate does not die with SIGILL."""
    from ..threads import request_amx_permission

    request_amx_permission()
