"""x86 targets: which INT8 instructions a CPU has, and the blocking constants of the VNNI kernels."""

from __future__ import annotations

import warnings
from typing import Literal

import tvm

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.target import codegen as _llvm_codegen

from ...target import host_mcpu, x86_target

#: Output channels per block: the lanes of one ``vpdpbusd`` (16 x int32).
OC_BLOCK = 16


#: Input channels reduced per lane by one ``vpdpbusd``.
IC_QUAD = 4


#: Input-channel block of the blocked data layout when the channel count allows it.
IC_BLOCK = 16


Int8Isa = Literal["amx", "vnni", "avx512", "avx2", "generic"]


def _target_features(target: tvm.target.Target) -> frozenset[str]:
    return frozenset(str(f) for f in _llvm_codegen.llvm_get_cpu_features(target))


def int8_isa(target: tvm.target.Target | None = None) -> Int8Isa:
    """The best INT8 dot-product instruction set an LLVM target enables.

    Parameters
    ----------
    target : tvm.target.Target, optional
        Defaults to :func:`x86_target` for the host.

    Returns
    -------
    {"amx", "vnni", "avx512", "avx2", "generic"}
        ``"amx"`` means AMX-INT8 *and* AVX512-VNNI (GEMMs large enough for tiles run on AMX,
        :mod:`tvmquant.schedules.x86.amx`; the others on VNNI), ``"avx512"`` means AVX-512BW without VNNI
        (``dot_16x4_avx512``).
    """
    target = x86_target() if target is None else target
    if target.kind.name != "llvm":
        return "generic"
    features = _target_features(target)
    if "avx512vnni" in features:
        return "amx" if "amx-int8" in features else "vnni"
    if "avx512bw" in features:
        return "avx512"
    if "avx2" in features:
        return "avx2"
    return "generic"


def _warn_if_not_runnable_here(target: tvm.target.Target) -> None:
    """Warn when ``target`` enables instruction-set features the host lacks (the module would SIGILL)."""
    if target.kind.name != "llvm":
        return
    host = _target_features(tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()}))
    # Only ISA extensions matter; tuning flags such as "prefer-256-bit" differ between CPUs harmlessly.
    isa_prefixes = (
        "avx",
        "amx",
        "sse",
        "fma",
        "f16c",
        "bmi",
        "vpclmul",
        "gfni",
        "vaes",
        "movdir",
        "serialize",
    )
    missing = sorted(f for f in _target_features(target) - host if f.startswith(isa_prefixes))
    if missing:
        warnings.warn(
            f"target mcpu={target.attrs.get('mcpu')} enables {', '.join(missing)}, which this CPU "
            f"({host_mcpu()}) lacks: modules built for it crash here with SIGILL, and tuning measures "
            "nothing. Use x86_target() for the host, or tune on the deployment CPU.",
            stacklevel=3,
        )
