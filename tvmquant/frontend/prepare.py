"""Bring an FP32 Relax module into the canonical form the quantization passes expect.

Order: bind parameters as constants -> fold BatchNorm into convs -> fold constants -> canonicalize clips
(the ONNX importer emits ``Clip``/ReLU6 as ``call_tir(maximum)`` + ``call_tir(minimum)``) -> fold constants
-> dead-code elimination. Run before :class:`tvmquant.passes.AnnotateQuant`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .._compat import TensorType, const_value, is_const, op_name, register_ffi_error, to_tensor
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
            relax.transform.FoldConstant(),
            CanonicalizeClip(),
            relax.transform.FoldConstant(),
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
