"""Bring an FP32 Relax module into the canonical form the quantization passes expect.

Order: bind parameters as constants -> fold BatchNorm into convs -> fold constants -> canonicalize clips
(the ONNX importer emits ``Clip``/ReLU6 as ``call_tir(maximum)`` + ``call_tir(minimum)``) -> fold constants
-> dead-code elimination. Run before :class:`tvmquant.passes.AnnotateQuant`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .._compat import (
    TensorType,
    const_value,
    is_const,
    op_name,
    register_ffi_error,
    tensor_dtype,
    tensor_shape,
    to_tensor,
)
from .._relax import BindingRewriter, UnsupportedGraphError, tvmquant_module_pass


@register_ffi_error
class ModelError(ValueError):
    """The model cannot be quantized as given; the message names the file, node or tensor and what to do."""


@tvmquant_module_pass("CanonicalizeClip")
class CanonicalizeClip:
    """Turn importer-produced ``call_tir(maximum/minimum)`` with scalar constants into ``R.maximum``/
    ``R.minimum``, ``maximum(x, 0)`` into ``R.nn.relu`` and ``minimum(maximum(x, lo), hi)`` into ``R.clip``.

    Idempotent: a canonical graph has none of these left.
    """

    def transform_module(self, mod, ctx):
        return _ClipRewriter().transform_module(mod)


class _ClipRewriter(BindingRewriter):
    def begin(self, func):
        self.maximum_of = {}

    def _elementwise_kind(self, value):
        """'maximum'/'minimum' and (x, scalar) for a call_tir or op form with a scalar constant bound."""
        name = op_name(value)
        if name == "relax.call_tir":
            callee = value.args[0]
            args = list(value.args[1].fields)
            kind = callee.name_hint.rstrip("0123456789_")
        elif name in ("relax.maximum", "relax.minimum"):
            args = list(value.args)
            kind = name.split(".")[-1]
        else:
            return None
        if kind not in ("maximum", "minimum") or len(args) != 2:
            return None
        data, bound = args
        if not is_const(bound) or const_value(bound).size != 1:
            return None
        return kind, data, float(const_value(bound).reshape(()))

    def rewrite(self, var, value):
        found = self._elementwise_kind(value)
        if found is None:
            return value
        kind, data, bound = found
        if kind == "maximum":
            if bound == 0.0:
                new = relax.op.nn.relu(data)
            else:
                new = relax.op.maximum(data, relax.const(np.float32(bound), "float32"))
            out = self.emit(new)
            self.maximum_of[out] = (data, bound)
            return out
        if data in self.maximum_of:
            source, low = self.maximum_of[data]
            return relax.op.clip(source, relax.prim_value(low), relax.prim_value(bound))
        return relax.op.minimum(data, relax.const(np.float32(bound), "float32"))


def _same_shape(values, shape, dtype):
    return values.shape == tuple(shape) and str(values.dtype) == dtype


def _float(*arrays) -> bool:
    return all(a.dtype.kind == "f" for a in arrays)


#: Ops :class:`FoldConstantNumpy` evaluates, each exactly as TVM does (layout moves, selections, and IEEE
#: operations that are correctly rounded in both): ``fn(args, attrs, out_shape, out_dtype) -> ndarray or None``.
_NUMPY_FOLDS = {
    "relax.reshape": lambda a, attrs, shape, dtype: a[0].reshape(shape),
    "relax.expand_dims": lambda a, attrs, shape, dtype: a[0].reshape(shape),
    "relax.squeeze": lambda a, attrs, shape, dtype: a[0].reshape(shape),
    "relax.flatten": lambda a, attrs, shape, dtype: a[0].reshape(shape),
    "relax.permute_dims": lambda a, attrs, shape, dtype: np.transpose(
        a[0], None if attrs.axes is None else [int(x) for x in attrs.axes]
    ),
    "relax.broadcast_to": lambda a, attrs, shape, dtype: np.broadcast_to(a[0], shape).copy(),
    "relax.isnan": lambda a, attrs, shape, dtype: np.isnan(a[0]),
    "relax.where": lambda a, attrs, shape, dtype: np.where(a[0], a[1], a[2]),
    "relax.add": lambda a, attrs, shape, dtype: a[0] + a[1],
    "relax.subtract": lambda a, attrs, shape, dtype: a[0] - a[1],
    "relax.multiply": lambda a, attrs, shape, dtype: a[0] * a[1],
    "relax.divide": lambda a, attrs, shape, dtype: a[0] / a[1] if _float(*a) else None,
    "relax.sqrt": lambda a, attrs, shape, dtype: np.sqrt(a[0]) if _float(*a) else None,
    "relax.negative": lambda a, attrs, shape, dtype: -a[0],
    "relax.maximum": lambda a, attrs, shape, dtype: np.maximum(a[0], a[1]),
    "relax.minimum": lambda a, attrs, shape, dtype: np.minimum(a[0], a[1]),
    "relax.concat": lambda a, attrs, shape, dtype: np.concatenate(a, axis=int(attrs.axis)),
    "relax.astype": lambda a, attrs, shape, dtype: (
        a[0].astype(dtype) if a[0].dtype.kind in "iub" or np.dtype(dtype).kind == "f" else None
    ),  # float -> int casts are left to TVM (NaN and overflow are target-defined)
}


@tvmquant_module_pass("FoldConstantNumpy")
class FoldConstantNumpy:
    """Fold the constant expressions of ``main`` that are layout moves, selections or exact arithmetic
    (:data:`_NUMPY_FOLDS`) in numpy; the rest is left to ``relax.transform.FoldConstant``.

    TVM's ``FoldConstant`` compiles every foldable call with LLVM: ~190 compiles, 4-10 s, for the reshapes of
    the biases and the ``where(isnan(bound))`` of the clips in an ONNX MobileNetV2. The results are identical;
    a call whose numpy result does not have the shape and dtype TVM infers is left alone.
    """

    def transform_module(self, mod, ctx):
        return _NumpyFolder().transform_module(mod)


class _NumpyFolder(BindingRewriter):
    def rewrite(self, var, value):
        fold = _NUMPY_FOLDS.get(op_name(value))
        if fold is None:
            return value
        args = list(value.args)
        if value.op.name in ("relax.concat",) and len(args) == 1 and isinstance(args[0], relax.Tuple):
            args = list(args[0].fields)
        elif value.op.name in ("relax.reshape", "relax.broadcast_to"):
            args = args[:1]  # the target shape is the binding's type
        shape, dtype = tensor_shape(var), tensor_dtype(var)
        if shape is None or any(dim is None for dim in shape) or dtype is None or not all(map(is_const, args)):
            return value
        with np.errstate(all="ignore"):
            folded = fold([const_value(arg) for arg in args], value.attrs, shape, dtype)
        if folded is None:
            return value
        folded = np.asarray(folded)
        if not _same_shape(folded, shape, dtype):
            return value
        return relax.const(np.array(folded, order="C"), dtype)  # (ascontiguousarray makes 0-d arrays 1-d)


def _constant_arg(arg) -> bool:
    if isinstance(arg, relax.Tuple):
        return all(_constant_arg(field) for field in arg.fields)
    # Shapes, strings, dtypes and prim values are not computed: only variables and calls are.
    return is_const(arg) or not isinstance(arg, (relax.Var, relax.Call, tvm.ir.GlobalVar))


def has_constant_call(mod: tvm.IRModule) -> bool:
    """Whether ``main`` still has a call whose arguments are all constants (what ``FoldConstant`` could fold)."""
    found = []

    def visit(expr):
        if found or not isinstance(expr, relax.Call) or not isinstance(expr.op, (tvm.ir.Op, relax.GlobalVar)):
            return
        args = list(expr.args)
        if isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            args = args[1:]  # the callee, then its argument tuple
        elif isinstance(expr.op, tvm.ir.Op) and not expr.op.name.startswith("relax."):
            return
        if args and any(is_const(a) or isinstance(a, relax.Tuple) for a in args) and all(map(_constant_arg, args)):
            found.append(expr)

    relax.analysis.post_order_visit(mod["main"], visit)
    return bool(found)


@tvmquant_module_pass("FoldConstantLeft")
class FoldConstantLeft:
    """``relax.transform.FoldConstant`` where a constant call is left after :class:`FoldConstantNumpy`.

    TVM's pass legalizes every conv and elementwise op of the graph to find out whether it folds (about
    0.5 s a MobileNetV2, per import); most models have nothing left to fold by then.
    """

    def transform_module(self, mod, ctx):
        return relax.transform.FoldConstant()(mod) if has_constant_call(mod) else mod


def prepare(mod: tvm.IRModule, params: dict | None = None) -> tvm.IRModule:
    """Canonicalize an FP32 Relax module for quantization.

    Parameters
    ----------
    mod : tvm.IRModule
        A module with a Relax function ``main``.
    params : dict, optional
        Weights by parameter name (numpy arrays or TVM tensors), bound into ``main`` as constants.

    Returns
    -------
    tvm.IRModule
        ``main`` with constant weights, BatchNorm folded into convs and clips canonicalized.
    """
    if params:
        names = {p.name for p in mod["main"].params}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ModelError(f"params {unknown} are not parameters of main (it takes {sorted(names)})")
        bound = {k: to_tensor(v) if isinstance(v, np.ndarray) else v for k, v in params.items()}
        mod = relax.transform.BindParams("main", bound)(mod)
        func = mod["main"]
        if func.attrs is not None and "num_input" in func.attrs:
            mod["main"] = func.without_attr("params") if "params" in func.attrs else func
    seq = tvm.transform.Sequential(
        [
            relax.transform.Normalize(),
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),
            FoldConstantNumpy(),
            FoldConstantLeft(),
            CanonicalizeClip(),
            FoldConstantNumpy(),
            FoldConstantLeft(),
            relax.transform.DeadCodeElimination(["main"]),
            relax.transform.CanonicalizeBindings(),
        ]
    )
    try:
        mod = seq(mod)
    except UnsupportedGraphError as err:
        raise ModelError(str(err)) from None
    return _drop_unused_prim_funcs(mod)


def _drop_unused_prim_funcs(mod):
    return relax.transform.DeadCodeElimination(["main"])(mod)


def check_static(mod: tvm.IRModule) -> None:
    """Refuse graphs whose tensors still have shapes computed at run time, naming the first such binding."""
    func = mod["main"]
    for block in func.body.blocks:
        for binding in block.bindings:
            ty = binding.var.ty
            if isinstance(ty, TensorType) and (ty.shape is None or not hasattr(ty.shape, "values")):
                raise ModelError(
                    f"tensor {binding.var.name} (from {op_name(binding.value) or 'a call'}) has a shape only known "
                    "at run time; export the model with static shapes or constant-fold it before quantizing"
                )


def index_limits(mod: tvm.IRModule) -> dict:
    """``{input name: rows}`` for integer inputs that index a constant table (token ids into an embedding).

    Found as ``take(constant [rows, ...], indices)`` whose indices come from exactly one integer input of
    ``main`` (through the importer's negative-index ``where``/``add`` and casts). A value outside
    ``[0, rows)`` would read past the table: calibration and :class:`tvmquant.api.CompiledModel` refuse it,
    naming the input.
    """
    func = mod["main"]
    params = {param: param.name for param in func.params}
    values = {}
    limits: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
            value = binding.value
            if op_name(value) != "relax.take" or not is_const(value.args[0]):
                continue
            axis = getattr(value.attrs, "axis", 0)
            if axis is not None and int(axis) != 0:
                continue
            sources = _integer_sources(value.args[1], values, params)
            if len(sources) == 1:
                (name,) = sources
                rows = int(const_value(value.args[0]).shape[0])
                limits[name] = min(rows, limits.get(name, rows))
    return limits


def _integer_sources(expr, values: dict, params: dict, depth: int = 0) -> set:
    if expr in params:
        return {params[expr]} if "int" in str(getattr(expr.ty, "dtype", "")) else set()
    if depth > 8 or expr not in values or not isinstance(values[expr], relax.Call):
        return set()
    found = set()
    for arg in values[expr].args:
        if isinstance(arg, relax.Expr) and not is_const(arg):
            found |= _integer_sources(arg, values, params, depth + 1)
    return found


def check_index_range(batch: dict, limits: dict, where: str) -> None:
    """Refuse an index input (token ids) outside its table, naming the input, the value and the range."""
    for name, rows in limits.items():
        if name not in batch:
            continue
        array = np.asarray(batch[name])
        if array.size == 0 or not np.issubdtype(array.dtype, np.integer):
            continue
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            raise ModelError(
                f"{where} input {name!r} holds the index {bad}, but it indexes a table of {rows} rows (an "
                f"embedding's vocabulary): values must be in [0, {rows}); tokenize with the model's own vocabulary"
            )
