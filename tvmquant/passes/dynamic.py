"""RealizeDynamic: dynamic quantization, activation ranges computed at run time (no calibration).

Input: the output of :class:`~tvmquant.passes.AnnotateQuant` for a config with ``Dynamic()`` activations, and
the weights' parameters (:func:`~tvmquant.passes.calibrate.weight_qparams`). Output: the integer model
(``simulate=False``) or its fake-quant twin (``simulate=True``: the same rounding, FP32 matmuls).

Each marked activation is quantized where it is marked, with parameters computed from the tensor itself:

- the data input of a matmul with a constant weight: uint8 affine **per row** (per token), ``scale = (max -
  min) / 255`` and ``zero_point = round(-min / scale)`` over the reduced axis ``K`` (min and max widened to
  include 0, as QUANT_MATH.md says), so that it runs on the same ``u8 x s8 -> s32`` matmul (VNNI ``vpdpbusd``)
  as a static model; the zero point's correction ``zero_point[row] * sum_k w[k, col]`` is one outer product;
- the two operands of an activation x activation matmul (attention ``QK^T``, ``PV``): int8 symmetric, per row
  of the first and per column of the second, so that ``acc * scale_a[row] * scale_b[col]`` is exact;
- a conv2d input: int8 symmetric per tensor (the zero point stays 0, so zero padding stays exact).

The integer result is ``(acc - correction) * scale_x * scale_w``, FP32 from there on. Run after AnnotateQuant,
instead of calibration, BindQuantParams and RealizeQuant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from .._compat import const, const_value, is_const, op_name, tensor_dtype, tensor_shape
from .._relax import BindingRewriter, tvmquant_module_pass
from ..qparams import Role
from ..quant_math import quantize
from .annotate import layers_of, parse_marker

#: The smallest scale: an all-zero row quantizes to zeros instead of dividing by zero.
TINY_SCALE = 1e-12

ROW_AFFINE = "row_affine"  # uint8, per row (reduce axis -1): matmul data with a constant weight
ROW_SYMMETRIC = "row_symmetric"  # int8, per row: first operand of activation x activation
COLUMN_SYMMETRIC = "column_symmetric"  # int8, per column (reduce axis -2): second operand
TENSOR_SYMMETRIC = "tensor_symmetric"  # int8, one scale: conv2d data


@dataclass
class DynamicValue:
    """An activation quantized at run time: ``real = (q - zero_point) * scale`` (``zero_point`` None: 0)."""

    q: relax.Var
    scale: relax.Var
    zero_point: relax.Var | None
    kind: str


@dataclass
class QuantizedWeight:
    """A constant weight quantized per channel: int8 values, scales along ``axis``."""

    q: np.ndarray
    scale: np.ndarray
    axis: int


def dynamic_kind(layer, position: int) -> str | None:
    """How input ``position`` of ``layer`` (a :class:`~tvmquant.op_table.LayerInfo`) is quantized, or None."""
    if layer.op_type == "conv2d":
        return TENSOR_SYMMETRIC
    if layer.op_type != "matmul":
        return None
    if position == 0:
        return ROW_AFFINE if layer.weight else ROW_SYMMETRIC
    return COLUMN_SYMMETRIC


@tvmquant_module_pass("RealizeDynamic")
class RealizeDynamic:
    """Quantize the marked activations at run time and run matmul / conv2d on the integers.

    Parameters
    ----------
    table : dict of str to QParams
        The weights' parameters (activations have none: they are computed at run time).
    simulate : bool
        Emit the fake-quant model (same quantization, FP32 compute) instead of the integer one.

    Examples
    --------
    >>> annotated = AnnotateQuant(config)(mod)  # doctest: +SKIP
    >>> integer = RealizeDynamic(weight_qparams(annotated, config))(annotated)  # doctest: +SKIP
    """

    def __init__(self, table: dict, simulate: bool = False):
        self.table = table
        self.simulate = simulate

    def transform_module(self, mod, ctx):
        realized = _DynamicRealizer(self.table, self.simulate, layers_of(mod)).transform_module(mod)
        return relax.transform.DeadCodeElimination(["main"])(realized)


class _DynamicRealizer(BindingRewriter):
    def __init__(self, table, simulate, layers):
        super().__init__()
        self.table = table
        self.simulate = simulate
        self.layers = {layer.name: layer for layer in layers}

    def begin(self, func):
        self.dynamic: dict = {}  # dequantized var -> DynamicValue
        self.weights: dict = {}  # dequantized weight var -> QuantizedWeight

    def rewrite(self, var, value):
        parsed = parse_marker(value)
        if parsed is not None:
            tensor, name, role = parsed
            if role == Role.WEIGHT:
                return self._weight(tensor, name)
            return self._activation(tensor, name)
        if self.simulate or op_name(value) not in ("relax.matmul", "relax.nn.conv2d"):
            return value
        if op_name(value) == "relax.matmul":
            return self._matmul(value)
        return self._conv2d(value)

    # -- markers ------------------------------------------------------------------------------------------
    def _weight(self, tensor, name):
        if name not in self.table or not is_const(tensor):
            return tensor
        params = self.table[name]
        q = quantize(
            const_value(tensor), params.scale, params.zero_point, "int8", params.axis, params.qmin, params.qmax
        )
        scale = np.asarray(params.scale, np.float32).reshape(-1)
        axis = params.axis if params.axis is not None else 0
        zero = np.zeros(scale.shape, np.int32)
        dq = self.emit(
            relax.op.dequantize(const(q), const(scale), const(zero), axis=axis, out_dtype="float32"),
            name.replace(".", "_") + "_dq",
        )
        self.weights[dq] = QuantizedWeight(q, scale, axis)
        return dq

    def _activation(self, tensor, name):
        layer_name, _, position = name.rpartition(".")
        layer = self.layers.get(layer_name)
        shape = tensor_shape(tensor)
        if layer is None or not position.startswith("in") or tensor_dtype(tensor) != "float32" or not shape:
            return tensor
        kind = dynamic_kind(layer, int(position[2:].split("_")[0]))
        if kind is None or (kind != TENSOR_SYMMETRIC and len(shape) < 2):
            return tensor
        base = name.replace(".", "_")
        emit = self.emit
        if kind == TENSOR_SYMMETRIC:
            amax = emit(relax.op.max(relax.op.abs(tensor), keepdims=True))
        elif kind == COLUMN_SYMMETRIC:
            amax = emit(relax.op.max(relax.op.abs(tensor), axis=[-2], keepdims=True))
        elif kind == ROW_SYMMETRIC:
            amax = emit(relax.op.max(relax.op.abs(tensor), axis=[-1], keepdims=True))
        if kind == ROW_AFFINE:
            low = emit(relax.op.minimum(relax.op.min(tensor, axis=[-1], keepdims=True), const(np.float32(0))))
            high = emit(relax.op.maximum(relax.op.max(tensor, axis=[-1], keepdims=True), const(np.float32(0))))
            width = emit(relax.op.divide(relax.op.subtract(high, low), const(np.float32(255))))
            scale = emit(relax.op.maximum(width, const(np.float32(TINY_SCALE))), base + "_scale")
            zero = emit(relax.op.clip(relax.op.round(relax.op.divide(relax.op.negative(low), scale)), 0, 255))
            rounded = emit(relax.op.add(relax.op.round(relax.op.divide(tensor, scale)), zero))
            q = emit(relax.op.astype(relax.op.clip(rounded, 0, 255), "uint8"), base + "_q")
            dq = emit(relax.op.multiply(relax.op.subtract(relax.op.astype(q, "float32"), zero), scale), base + "_dq")
            self.dynamic[dq] = DynamicValue(q, scale, zero, kind)
            return dq
        scale = emit(
            relax.op.maximum(relax.op.divide(amax, const(np.float32(127))), const(np.float32(TINY_SCALE))),
            base + "_scale",
        )
        rounded = emit(relax.op.clip(relax.op.round(relax.op.divide(tensor, scale)), -127, 127))
        q = emit(relax.op.astype(rounded, "int8"), base + "_q")
        dq = emit(relax.op.multiply(relax.op.astype(q, "float32"), scale), base + "_dq")
        self.dynamic[dq] = DynamicValue(q, scale, None, kind)
        return dq

    # -- integer compute ----------------------------------------------------------------------------------
    def _matmul(self, value):
        data, weight = value.args
        x = self.dynamic.get(data)
        if x is None:
            return value
        if weight in self.weights and x.kind == ROW_AFFINE:
            w = self.weights[weight]
            if w.q.ndim != 2 or w.axis != 1:
                return value
            acc = self.emit(relax.op.matmul(x.q, const(w.q), out_dtype="int32"))
            result = self.emit(relax.op.astype(acc, "float32"))
            column_sums = w.q.astype(np.int64).sum(axis=0).astype(np.float32)
            # acc - zero_point[row] * sum_k w[k, col]: exact in float32 while |acc| < 2^24 (K * 255 * 127 terms).
            correction = self.emit(relax.op.multiply(x.zero_point, const(column_sums)))
            result = self.emit(relax.op.subtract(result, correction))
            result = self.emit(relax.op.multiply(result, x.scale))
            return relax.op.multiply(result, const(w.scale))
        y = self.dynamic.get(weight)
        if y is None or x.kind != ROW_SYMMETRIC or y.kind != COLUMN_SYMMETRIC:
            return value
        acc = self.emit(relax.op.matmul(x.q, y.q, out_dtype="int32"))
        result = self.emit(relax.op.multiply(relax.op.astype(acc, "float32"), x.scale))
        return relax.op.multiply(result, y.scale)

    def _conv2d(self, value):
        data, weight = value.args
        x, w = self.dynamic.get(data), self.weights.get(weight)
        attrs = value.attrs
        if (
            x is None
            or w is None
            or x.kind != TENSOR_SYMMETRIC
            or w.axis != 0
            or str(attrs["data_layout"]) != "NCHW"
            or str(attrs["kernel_layout"]) != "OIHW"
        ):
            return value
        acc = self.emit(
            relax.op.nn.conv2d(
                x.q,
                const(w.q),
                strides=[int(s) for s in attrs["strides"]],
                padding=[int(p) for p in attrs["padding"]],
                dilation=[int(d) for d in attrs["dilation"]],
                groups=int(attrs["groups"]),
                out_dtype="int32",
            )
        )
        result = self.emit(relax.op.multiply(relax.op.astype(acc, "float32"), x.scale))
        return relax.op.multiply(result, const(w.scale.reshape(1, -1, 1, 1)))
