"""Targets: the host CPU, named x86 CPUs, CUDA GPUs; one place that turns what a user writes into a Target.

Below every stage (calibration, the schedules, compile, bench, tune all take their targets from here), so the
host target and its core count are decided once: LLVM's detected ``mcpu`` and the physical cores this process
may run on (:func:`tvmquant.threads.default_num_threads`).
"""

from __future__ import annotations

import functools
import json

import tvm
from tvm.target import codegen

from .threads import default_num_threads


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the host, as the kernel reports them.

    Parameters
    ----------
    cpuinfo : str
        Path of the ``cpuinfo`` file (a parameter so tests can feed a fixture).

    Returns
    -------
    frozenset of str
        Flags of the first processor, e.g. ``{"avx512f", "avx512_vnni", "amx_int8", ...}``; empty when the
        file is missing (not Linux).

    Examples
    --------
    >>> "avx512_vnni" in cpu_flags()  # doctest: +SKIP
    True
    """
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


#: The instruction-set features INT8 code generation depends on: LLVM's name -> the kernel's ``/proc/cpuinfo`` flag.
_INT8_ISA_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
    "amx-fp16": "amx_fp16",
}

#: CPUs :func:`host_mcpu` may name instead of LLVM's guess, most capable first.
_KNOWN_CPUS = (
    "graniterapids",
    "emeraldrapids",
    "sapphirerapids",
    "znver5",
    "znver4",
    "icelake-server",
    "cascadelake",
    "skylake-avx512",
    "znver3",
    "haswell",
)


def _int8_isa(mcpu: str) -> frozenset[str]:
    features = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))}
    return frozenset(features & _INT8_ISA_FLAGS.keys())


@functools.lru_cache(maxsize=8)
def host_mcpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The LLVM name of the host CPU (``"znver4"``, ``"sapphirerapids"``, ...).

    LLVM names the CPU from its family and model numbers. Some hypervisors report a model that does not match
    the features they pass through (an Intel Xeon with AMX-INT8 that calls itself model 167, which LLVM names
    ``"rocketlake"``: no AMX). When the kernel's flags show INT8 features (:data:`_INT8_ISA_FLAGS`) that LLVM's
    name lacks, the answer is the most capable known CPU whose INT8 features the host has all of.

    Parameters
    ----------
    cpuinfo : str
        Path of the ``cpuinfo`` file (a parameter so tests can feed a fixture).
    """
    detected = str(codegen.llvm_get_system_cpu())
    flags = cpu_flags(cpuinfo)
    if not flags:
        return detected
    host_isa = frozenset(name for name, flag in _INT8_ISA_FLAGS.items() if flag in flags)
    detected_isa = _int8_isa(detected) if codegen.llvm_is_valid_cpu(detected, "x86_64") else frozenset()
    if host_isa <= detected_isa:
        return detected
    for mcpu in _KNOWN_CPUS:
        isa = _int8_isa(mcpu)
        if isa <= host_isa and len(isa) > len(detected_isa):
            return mcpu
    return detected


def target_has_amx(target) -> bool:
    """Whether an LLVM target enables AMX-INT8 (``mcpu`` sapphirerapids or later, or ``+amx-int8`` in
    ``mattr``): its INT8 GEMMs may run on AMX tiles, and the CPU that runs them needs ``amx_int8``."""
    if target is None or target.kind.name != "llvm":
        return False
    features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    return {"amx-int8", "amx-tile"} <= features


#: LLVM feature change for CPUs with AMX-INT8: full 512-bit vectors. LLVM's tuning for Sapphire/Emerald Rapids
#: splits 16-lane vectors into two 256-bit halves (``prefer-256-bit``); the requantize epilogues of the AMX
#: kernels ran 9-12% faster end to end on ResNet-50-style without it (emeraldrapids, 1 and 2 threads).
WIDE_VECTORS = "-prefer-256-bit"


def _default_mattr(mcpu: str | None) -> list[str] | None:
    if not mcpu:
        return None
    return [WIDE_VECTORS] if "amx-int8" in _int8_isa(mcpu) else None


def x86_target(
    mcpu: str | None = None, num_cores: int | None = None, mattr: list[str] | None = None
) -> tvm.target.Target:
    """An LLVM target for an x86 CPU.

    Parameters
    ----------
    mcpu : str, optional
        LLVM CPU name. ``None`` (the default) means the host CPU (:func:`host_mcpu`). Name another CPU only to
        cross-compile: a module built for a CPU with features the host lacks dies with SIGILL here (for
        example ``"sapphirerapids"`` on an AMD Zen 4 host: LLVM emits the VEX-encoded AVX-VNNI
        ``{vex} vpdpbusd``, which Zen 4 does not have). Useful values: ``"sapphirerapids"``/``"znver4"``/
        ``"cascadelake"`` (VNNI), ``"skylake-avx512"`` (AVX-512 without VNNI), ``"haswell"`` (AVX2).
    num_cores : int, optional
        Threads the compiled kernels and meta-schedule use; defaults to the physical cores this process may run
        on (:func:`tvmquant.threads.default_num_threads`, the rule TVM's thread pool is given too).
    mattr : list of str, optional
        LLVM feature changes, e.g. ``["-amx-int8", "-amx-tile"]`` (a Sapphire Rapids without its AMX kernels:
        VNNI only) or ``["+amx-int8", "+amx-tile"]``. Defaults to :data:`WIDE_VECTORS` on CPUs with AMX-INT8,
        to nothing elsewhere.

    Returns
    -------
    tvm.target.Target

    Examples
    --------
    >>> x86_target("sapphirerapids", num_cores=2)  # doctest: +SKIP
    llvm -keys=cpu -mcpu=sapphirerapids -num-cores=2
    """
    if mcpu is None:
        mcpu = host_mcpu()
    if not codegen.llvm_is_valid_cpu(mcpu, "x86_64"):
        raise ValueError(
            f"x86_target: LLVM does not know the CPU {mcpu!r}; try 'znver4', 'sapphirerapids', "
            "'cascadelake', 'skylake-avx512' or 'haswell'"
        )
    if num_cores is None:
        num_cores = default_num_threads()
    spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": int(num_cores)}
    if mattr is None:
        mattr = _default_mattr(mcpu)
    if mattr:
        spec["mattr"] = list(mattr)
    return tvm.target.Target(spec)


#: LLVM optimisation level of the graphs tvmquant runs itself (calibration, the summary's SQNR, AutoSkip, bias
#: correction): ``-O2`` generates their code 2-3x faster than TVM's default ``-O3`` (ResNet-50-style 2.3 ->
#: 0.8 s, MobileNetV2 1.6 -> 0.7 s on the AMX Xeon) and they ran as fast (145 against 166 ms, 29 against 27 ms
#: per batch of 4). Libraries for deployment keep ``-O3``.
HOST_GRAPH_OPT_LEVEL = 2


def host_target(num_cores: int | None = None, opt_level: int | None = None) -> tvm.target.Target:
    """The LLVM target of the CPU this process runs on: the detected ``mcpu`` (:func:`host_mcpu`), the physical
    cores, and :data:`WIDE_VECTORS` on a CPU with AMX-INT8.

    A host LLVM cannot name (``"generic"``) gets a target without ``mcpu``. ``opt_level`` sets LLVM's
    optimisation level (TVM's default: 3).
    """
    mcpu = host_mcpu()
    spec: dict = {"kind": "llvm", "num-cores": int(num_cores or default_num_threads())}
    if opt_level is not None:
        spec["opt-level"] = int(opt_level)
    if mcpu and mcpu != "generic":
        spec["mcpu"] = mcpu
        mattr = _default_mattr(mcpu)
        if mattr:
            spec["mattr"] = mattr
    return tvm.target.Target(spec)


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
        made = tvm.target.Target(target)
    except Exception as err:  # TVM raises its own error types
        detail = str(err).strip().splitlines()
        raise ValueError(
            f"target {target!r} is not understood ({detail[-1] if detail else type(err).__name__}); {_TARGET_HELP}"
        ) from None
    mcpu = str(made.attrs.get("mcpu", "")) if made.kind.name == "llvm" else ""
    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, str(made.attrs.get("mtriple", "")) or "x86_64"):
        # LLVM would only print "'...' is not a recognized processor" and build for a generic CPU.
        raise ValueError(
            f"target {target!r}: LLVM does not know the CPU {mcpu!r} (this CPU is {host_mcpu()!r}); use an LLVM "
            "CPU name such as 'sapphirerapids', 'emeraldrapids', 'graniterapids', 'znver4', 'cascadelake' or "
            "'haswell'"
        )
    return made


def target_json(target) -> str:
    """``target`` as one line of JSON that ``--target`` (and :func:`as_target`) take back."""
    return json.dumps(json.loads(str(as_target(target))))
