"""Every version-sensitive TVM import of tvmquant, in one place.

TVM 0.27 renamed much (``relax.TensorType``, ``tvm.ir.GenericConst`` constants, ``tvm.runtime.tensor``,
``tvm.s_tir.meta_schedule``, dict targets). Code elsewhere imports these names from here, so that a TVM
upgrade touches one file.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst, StringImm
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm_ffi import structural_equal, structural_hash

TensorType = relax.TensorType
Var = relax.Var
Call = relax.Call
Tuple = relax.Tuple
Function = relax.Function
BlockBuilder = relax.BlockBuilder
VirtualMachine = relax.VirtualMachine
Constant = GenericConst

__all__ = [
    "TensorType",
    "Var",
    "Call",
    "Tuple",
    "Function",
    "BlockBuilder",
    "VirtualMachine",
    "Constant",
    "StringImm",
    "PyExprMutator",
    "mutator",
    "structural_equal",
    "structural_hash",
    "const",
    "is_const",
    "const_value",
    "to_tensor",
    "op_name",
    "tensor_shape",
    "tensor_dtype",
    "versions",
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


def to_tensor(array, device=None):
    """A TVM runtime tensor holding ``array``."""
    return tvm.runtime.tensor(np.ascontiguousarray(array), device or tvm.cpu())


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
