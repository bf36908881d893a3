"""CUDA targets: the default tag, whether this machine has nvcc or a GPU, and nvcc on CUDA source."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Literal

import tvm

from ...cuda_binaries import nvcc_arch

Int8Kind = Literal["wmma", "dp4a", "wmma_fp16"]


#: vector lengths for cooperative shared-memory loads (int8x8 / int8x16 broadcasts miscompile, see above)
VECTOR_LOAD_LENS = (1, 2, 3, 4)


def cuda_target(tag: str = "nvidia/nvidia-h100") -> tvm.target.Target:
    """The CUDA target for ``tag``, with the thread and shared-memory limits meta-schedule needs.

    Example: ``cuda_target()`` is an H100 (``sm_90a``); a bare ``{"kind": "cuda"}`` lacks
    ``max_threads_per_block`` and is refused by meta-schedule.
    """
    return tvm.target.Target(tag)


@contextlib.contextmanager
def nvcc_compile_mode():
    """Within the block, TVM compiles CUDA with the installed ``nvcc`` (``TVM_CUDA_COMPILE_MODE=nvcc``) where a
    driver is present, unless the user chose a mode; the environment is restored afterwards."""
    if "TVM_CUDA_COMPILE_MODE" in os.environ:
        yield
        return
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        yield
    finally:
        os.environ.pop("TVM_CUDA_COMPILE_MODE", None)


def have_nvcc() -> bool:
    """True when ``nvcc`` is on PATH."""
    return shutil.which("nvcc") is not None


def have_gpu() -> bool:
    """True when a CUDA device is present (False, not an error, without a driver)."""
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no CUDA runtime in this build of TVM
        return False


def compile_cuda_source(source: str, target: tvm.target.Target, target_format: str = "ptx") -> bytes:
    """Compile CUDA source with the installed ``nvcc`` to ``"ptx"`` or ``"cubin"`` for ``target``'s arch."""
    from tvm.support import nvcc

    with target:
        return bytes(nvcc.compile_cuda(source, target_format=target_format, arch=nvcc_arch(target), compiler="nvcc"))


def cuda_source(lib) -> str:
    """The CUDA source of a module built by ``tvm.compile`` / ``relax.build`` (its CUDA device modules, at
    any depth of the import tree)."""
    from ...cuda_binaries import cuda_modules

    return "".join(module.inspect_source("") for module in cuda_modules(getattr(lib, "mod", lib)))
