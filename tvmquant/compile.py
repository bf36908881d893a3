"""Compile a (quantized) Relax module for a target, applying a tuning database when one is given."""

from __future__ import annotations

import tvm

from ._compat import cpu_target


def host_target(num_cores: int | None = None):
    """An LLVM target for the CPU this process runs on (``mcpu`` detected by LLVM, all its cores)."""
    import os

    mcpu = tvm.target.codegen.llvm_get_system_cpu()
    return cpu_target(mcpu if mcpu and mcpu != "generic" else None, num_cores or os.cpu_count())


#: What a CUDA target needs besides its arch (meta-schedule and dlight read these); the values of every
#: NVIDIA tag in TVM 0.27 since Volta.
_CUDA_DEFAULTS = {
    "max_num_threads": 1024,
    "max_threads_per_block": 1024,
    "thread_warp_size": 32,
    "max_shared_memory_per_block": 49152,
    "registers_per_block": 65536,
}

_TARGET_HELP = (
    "give 'llvm' (this CPU), a tag such as 'nvidia/nvidia-h100', or a JSON dict such as "
    '\'{"kind": "llvm", "mcpu": "sapphirerapids"}\' or \'{"kind": "cuda", "arch": "sm_90a"}\''
)


def as_target(target):
    """A ``tvm.target.Target`` from a Target, a dict, a tag (``"nvidia/nvidia-h100"``) or ``None`` (host).

    A CUDA target must say its GPU: a tag, or a dict with ``arch`` (TVM would otherwise pick ``sm_50``, which
    today's nvcc refuses); missing thread and shared-memory limits are filled in.
    """
    if target is None:
        return host_target()
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        if target in ("llvm", "cpu", "host"):
            return host_target()
        if target.startswith("{"):
            import json

            try:
                target = json.loads(target)
            except json.JSONDecodeError as err:
                raise ValueError(f"target {target!r} is not valid JSON ({err}); {_TARGET_HELP}") from None
        elif target in ("cuda", "nvidia", "gpu"):
            raise ValueError(f"target {target!r} does not say which GPU to compile for; {_TARGET_HELP}")
    if isinstance(target, dict):
        if target.get("kind") == "cuda":
            if "arch" not in target and "tag" not in target:
                raise ValueError(f"CUDA target {target!r} has no 'arch'; {_TARGET_HELP}")
            target = {**_CUDA_DEFAULTS, **{k: v for k, v in target.items() if k != "tag" or v}}
        return _target_or_error(target)
    if isinstance(target, str):
        return _target_or_error(target)
    raise TypeError(f"target must be a tvm Target, dict, str or None, got {type(target).__name__}")


def _target_or_error(target):
    try:
        return tvm.target.Target(target)
    except Exception as err:  # TVM raises its own error types
        detail = str(err).strip().splitlines()
        raise ValueError(
            f"target {target!r} is not understood ({detail[-1] if detail else type(err).__name__}); {_TARGET_HELP}"
        ) from None


def target_json(target) -> str:
    """``target`` as one line of JSON that ``--target`` (and :func:`as_target`) take back."""
    import json

    return json.dumps(json.loads(str(as_target(target))))


def build(mod: tvm.IRModule, target=None, db=None):
    """Compile ``mod`` into a Relax VM executable, through the target's INT8 pipeline.

    With or without a tuning database the kernels are the same kind: on x86, blocked layouts with VNNI-
    tensorized default schedules; on CUDA, NHWC with WMMA/dp4a default schedules. A database only swaps in
    the better schedules it holds.

    Parameters
    ----------
    mod : tvm.IRModule
    target : see :func:`as_target`
    db : str or os.PathLike, optional
        A meta-schedule database directory written by ``tvmquant tune``.
    """
    from .schedules import build_with_database

    return build_with_database(mod, as_target(target), db)
