"""Every version-sensitive TVM import of tvmquant, in one place.

TVM 0.27 renamed much (``relax.TensorType``, ``tvm.ir.GenericConst`` constants, ``tvm.runtime.tensor``,
``tvm.s_tir.meta_schedule``, dict targets, the ``tvm_ffi`` package). Code elsewhere imports these names from here,
so that a TVM upgrade touches one file (``tvmquant/schedules/`` keeps its own, listed at the top of each module).

Two parts. The runtime part needs TVM's runtime library only (``TVM_USE_RUNTIME_LIB=1``, as on a deployment or
GPU measurement host): :mod:`tvmquant.deploy`, :mod:`tvmquant.cuda_binaries` and :mod:`tvmquant.remote` use it
there. The compiler part (Relax) is defined whenever TVM's compiler library is loaded (``RUNTIME_ONLY`` false).
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm.runtime.vm
import tvm_ffi
from tvm_ffi import structural_equal, structural_hash

# --------------------------------------------------------------------------------------------------------------
# Runtime part
#: True when this process runs on TVM's runtime library alone (no compiler: no Relax, no passes).
RUNTIME_ONLY: bool = bool(tvm.base._RUNTIME_ONLY)

VirtualMachine = tvm.runtime.vm.VirtualMachine
register_global_func = tvm_ffi.register_global_func


def get_global_func(name: str):
    """The global FFI function ``name``, or None if nothing registered it."""
    return tvm_ffi.get_global_func(name, True)


def to_tensor(array, device=None):
    """A TVM runtime tensor holding ``array``."""
    return tvm.runtime.tensor(np.ascontiguousarray(array), device or tvm.cpu())


def tensor_view(array: np.ndarray):
    """A TVM tensor sharing ``array``'s memory (C-contiguous, 4-byte aligned at least; no copy)."""
    return tvm_ffi.from_dlpack(array, require_alignment=4, require_contiguous=True)


def load_runtime_library(target_name: str) -> bool:
    """Load one of TVM's runtime sidecar libraries (``"tvm_runtime_cuda"``) from beside ``libtvm_runtime``.

    Returns False when the system cannot load it (e.g. no CUDA driver for the CUDA sidecar).
    """
    from pathlib import Path

    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS[target_name] = load_lib_ctypes(
            package="tvm", target_name=target_name, extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError):
        return False
    return True


def nvcc():
    """TVM's ``nvcc`` driver module (``compile_cuda``); ImportError on a runtime-only TVM without it."""
    from tvm.support import nvcc as module

    return module


def register_ffi_error(cls: type) -> type:
    """Let the exception type ``cls`` cross TVM's FFI as itself; returns ``cls`` (usable as a class decorator).

    An exception raised in Python code that TVM calls (a pass inside ``tvm.transform.Sequential``) comes back
    out of the FFI rebuilt as ``cls(message)`` when its type is registered, and as a RuntimeError otherwise.
    Only for exception types built from their message alone.
    """
    tvm_ffi.register_error(f"{cls.__module__}.{cls.__qualname__}", cls)
    return cls


def python_pass_instance(pass_obj):
    """The instance of the Python class behind a ``tvm.transform.module_pass``-decorated pass object."""
    return pass_obj._inst  # set by tvm.ir.transform._wrap_class_module_pass


def versions() -> dict:
    """The versions of tvmquant, TVM, numpy and Python, as artifacts and libraries record them."""
    import platform

    from . import __version__

    return {
        "tvmquant": __version__,
        "tvm": tvm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


class _FastStackInspect:
    """``inspect`` for TVMScript's ``T.prim_func``, whose ``inspect.stack()`` reads each frame's source.

    ``T.prim_func`` takes the caller's stack for two things: closure variables (``frame.f_locals``) and whether
    a class decorator called it (``code_context`` of the frame two up; without it, "no", right for every
    function tvmquant parses). ``inspect.stack()`` also looks up each frame's source file, scanning every
    loaded module for frames of frozen importlib code: 0.2 s a call during an import, 1.7 s for the eight
    kernels :mod:`tvmquant.schedules.intrinsics` parses when it is imported. This stack has the same frames.
    """

    def __getattr__(self, name):
        import inspect

        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1):
        import inspect
        import sys

        frame, frames = sys._getframe(1), []
        while frame is not None:
            code = frame.f_code
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
            frame = frame.f_back
        return frames


def fast_tvmscript_parsing() -> None:
    """Have ``T.prim_func`` take the caller's frames without reading their source (see ``_FastStackInspect``)."""
    try:
        from tvm.tirx.script.parser import entry
    except ImportError:  # pragma: no cover  (another TVM layout: parsing stays as it is)
        return
    if getattr(entry, "inspect", None) is not None and not isinstance(entry.inspect, _FastStackInspect):
        entry.inspect = _FastStackInspect()


def vectorizable_nearbyint() -> None:
    """Let TVM's ``VectorizeLoop`` vectorize ``tirx.nearbyint`` (round half to even, what ``topi.round`` and so
    every requantize epilogue uses).

    TVM 0.27 marks ``tirx.round`` vectorizable but not ``tirx.nearbyint``, so a vectorized loop holding one is
    scalarized whole: a requantize epilogue went from one 16-lane ``vrndscaleps`` to sixteen scalar ones plus
    byte-wise stores. LLVM lowers both forms to ``llvm.nearbyint`` (the same instruction, rounding by MXCSR);
    C-like backends (CUDA) print a vector call lane by lane."""
    op = tvm.ir.Op.get("tirx.nearbyint")
    if op.get_attr("TVectorizable") is None:  # (has_attr says whether any op has the attribute)
        op.set_attr("TVectorizable", True)


# --------------------------------------------------------------------------------------------------------------
# Compiler part
if not RUNTIME_ONLY:
    fast_tvmscript_parsing()
    vectorizable_nearbyint()
    from tvm import relax
    from tvm.ir import GenericConst, StringImm
    from tvm.relax.expr_functor import PyExprMutator, mutator

    TensorType = relax.TensorType
    Var = relax.Var
    Call = relax.Call
    Tuple = relax.Tuple
    Function = relax.Function
    BlockBuilder = relax.BlockBuilder
    Constant = GenericConst

__all__ = [
    "RUNTIME_ONLY",
    "VirtualMachine",
    "register_global_func",
    "get_global_func",
    "to_tensor",
    "tensor_view",
    "load_runtime_library",
    "nvcc",
    "register_ffi_error",
    "python_pass_instance",
    "versions",
    "structural_equal",
    "structural_hash",
    "TensorType",
    "Var",
    "Call",
    "Tuple",
    "Function",
    "BlockBuilder",
    "Constant",
    "StringImm",
    "PyExprMutator",
    "mutator",
    "const",
    "is_const",
    "const_value",
    "op_name",
    "tensor_shape",
    "tensor_dtype",
    "tvm",
    "relax",
]


def const(value, dtype: str | None = None):
    """A Relax constant from a numpy array or scalar."""
    array = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
    return relax.const(array, str(array.dtype))


def is_const(expr) -> bool:
    """True for a tensor constant."""
    return isinstance(expr, GenericConst) and hasattr(expr.value, "numpy")


def const_value(expr) -> np.ndarray:
    """The numpy value of a tensor constant."""
    return expr.value.numpy()


def op_name(expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call of a Relax op, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def tensor_shape(expr) -> tuple | None:
    """The static shape of a tensor-typed expression (ints, or None for symbolic dims), or None."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = getattr(ty.shape, "values", None)
    if shape is None:
        return None
    return tuple(int(v.value) if isinstance(getattr(v, "value", None), int) else None for v in shape)


def tensor_dtype(expr) -> str | None:
    """The dtype string of a tensor-typed expression, or None."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType):
        return None
    return str(ty.dtype)
