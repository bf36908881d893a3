"""RealizeQuant: lower a simulated (quantize/dequantize) model to integer compute.

Input: the output of :class:`~tvmquant.passes.BindQuantParams`, or an imported ONNX QDQ model. Output: a
model where conv2d and matmul take int8/uint8 inputs and accumulate in int32, biases are int32, the
accumulator is requantized straight to the next quantized tensor's scale (relu/clip folded into the clip
bounds), and consecutive quantized ops exchange int8 tensors without a dequantize/quantize round trip.
Dequantize remains only where the graph goes back to FP32.

How: every value is tracked as an affine view ``real = (base + offset - zero_point) * scale`` of an integer
(or float) ``base`` tensor, with an optional pending clamp. Ops read the op table
(:mod:`tvmquant.op_table`) to decide whether they run on ``base``. Every binding also keeps its FP32
meaning, emitted alongside; dead-code elimination drops the FP32 values nobody uses.

Requantization uses a float32 multiplier ``M = scale_in / scale_out`` and rounds in float32
(see QUANT_MATH.md, "Integer arithmetic"); the result equals the simulated model within 1 LSB.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .. import op_table
from .._compat import const, const_value, is_const, op_name, tensor_dtype, tensor_shape
from .._relax import BindingRewriter, tvmquant_module_pass
from ..quant_math import DTYPE_RANGES, QUANT_DTYPES


@dataclass
class Affine:
    """``real = (base + offset - zero_point) * scale``, then clamped to ``[low, high]``."""

    base: relax.Var
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None  # axis of base along which scale/zero_point vary
    offset: np.ndarray | None = None  # int32, broadcastable to base (bias and zero-point corrections)
    low: float = -math.inf
    high: float = math.inf

    @property
    def dtype(self) -> str:
        return tensor_dtype(self.base)

    @property
    def per_tensor(self) -> bool:
        return self.axis is None

    def has_clamp(self) -> bool:
        return self.low > -math.inf or self.high < math.inf


def _vector_shape(vector, ndim: int, axis: int | None):
    vector = np.asarray(vector)
    if axis is None or vector.ndim == 0:
        return vector.reshape(())
    shape = [1] * ndim
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)


@tvmquant_module_pass("RealizeQuant")
class RealizeQuant:
    """Lower quantize/dequantize pairs around quantizable ops to integer compute.

    Idempotent: a realized model has no dequantize feeding a quantizable op, so a second run changes
    nothing but dead bindings.
    """

    def transform_module(self, mod, ctx):
        realized = _Realizer().transform_module(mod)
        return tvm.transform.Sequential(
            [relax.transform.DeadCodeElimination(["main"]), relax.transform.CanonicalizeBindings()]
        )(realized)


class _Realizer(BindingRewriter):
    def begin(self, func):
        self.affine: dict = {}

    # -- helpers ------------------------------------------------------------------------------------------
    def _ndim(self, expr) -> int:
        return len(tensor_shape(expr))

    def _base_float(self, aff: Affine, apply_clamp: bool):
        """``base + offset`` as float32, clamped in the base domain if asked."""
        t = aff.base
        if aff.offset is not None:
            t = self.emit(relax.op.add(t, const(aff.offset.astype(np.int32))))
        if tensor_dtype(t) != "float32":
            t = self.emit(relax.op.astype(t, "float32"))
        if apply_clamp and aff.has_clamp():
            ndim = self._ndim(t)
            scale = _vector_shape(aff.scale, ndim, aff.axis).astype(np.float64)
            zero = _vector_shape(aff.zero_point, ndim, aff.axis).astype(np.float64)
            if aff.low > -math.inf:
                t = self.emit(relax.op.maximum(t, const((aff.low / scale + zero).astype(np.float32))))
            if aff.high < math.inf:
                t = self.emit(relax.op.minimum(t, const((aff.high / scale + zero).astype(np.float32))))
        return t

    def _to_float(self, aff: Affine):
        """Emit the FP32 value of ``aff``."""
        t = self._base_float(aff, apply_clamp=False)
        ndim = self._ndim(t)
        zero = _vector_shape(aff.zero_point, ndim, aff.axis)
        if np.any(zero != 0):
            t = self.emit(relax.op.subtract(t, const(zero.astype(np.float32))))
        t = self.emit(relax.op.multiply(t, const(_vector_shape(aff.scale, ndim, aff.axis).astype(np.float32))))
        if aff.low > -math.inf:
            t = self.emit(relax.op.maximum(t, const(np.float32(aff.low))))
        if aff.high < math.inf:
            t = self.emit(relax.op.minimum(t, const(np.float32(aff.high))))
        return t

    def _qparams(self, value):
        """``(scale, zero_point, axis)`` of a quantize/dequantize call with constant parameters, or None."""
        scale, zero_point = value.args[1], value.args[2]
        if not (is_const(scale) and is_const(zero_point)):
            return None
        scale_v = const_value(scale).astype(np.float32)
        zero_v = const_value(zero_point).astype(np.int64)
        axis = int(value.attrs["axis"]) if scale_v.size > 1 or zero_v.size > 1 else None
        if axis is not None:
            axis = axis % self._ndim(value.args[0])
            scale_v = np.broadcast_to(scale_v.reshape(-1), (tensor_shape(value.args[0])[axis],)).copy()
            zero_v = np.broadcast_to(zero_v.reshape(-1), scale_v.shape).copy()
        else:
            scale_v, zero_v = scale_v.reshape(()), zero_v.reshape(())
        return scale_v, zero_v, axis

    def _is_plain_q(self, aff: Affine | None) -> bool:
        """An int8/uint8 per-tensor value with no pending offset or clamp."""
        return (
            aff is not None
            and aff.dtype in QUANT_DTYPES
            and aff.per_tensor
            and aff.offset is None
            and not self._clamp_effective(aff)
        )

    def _is_channel_q(self, aff: Affine | None) -> bool:
        """An int8/uint8 value with one scale per channel (axis 1) and zero points of 0, no offset or clamp: the
        per-channel input of a depthwise conv (``QuantConfig.depthwise_per_channel``)."""
        return (
            aff is not None
            and aff.dtype in QUANT_DTYPES
            and aff.axis == 1
            and aff.offset is None
            and not aff.has_clamp()
            and not np.any(aff.zero_point != 0)
        )

    def _clamp_effective(self, aff: Affine) -> bool:
        if not aff.has_clamp():
            return False
        if aff.dtype not in QUANT_DTYPES or not aff.per_tensor:
            return True
        low, high = DTYPE_RANGES[aff.dtype]
        scale, zero = float(aff.scale), float(aff.zero_point)
        return aff.low > (low - zero) * scale or aff.high < (high - zero) * scale

    # -- requantization -----------------------------------------------------------------------------------
    def requantize(self, aff: Affine, scale_out: np.ndarray, zero_out: np.ndarray, dtype: str, axis=None):
        """Emit ``aff`` requantized to ``(scale_out, zero_out)``: one pair, or one per index of ``axis``.

        Returns None where ``aff`` varies along another axis than ``axis`` (the quantize stays as it is).
        """
        if (
            axis is None
            and self._is_plain_q(aff)
            and aff.dtype == dtype
            and np.float32(aff.scale) == np.float32(scale_out)
            and int(aff.zero_point) == int(zero_out)
        ):
            return aff.base  # the chain stays in int8: no dequantize/quantize round trip
        if axis is not None and aff.axis not in (None, axis):
            return None
        t = self._base_float(aff, apply_clamp=False)
        ndim = self._ndim(t)
        zero_in = _vector_shape(aff.zero_point, ndim, aff.axis)
        if np.any(zero_in != 0):
            t = self.emit(relax.op.subtract(t, const(zero_in.astype(np.float32))))
        scale_out = np.asarray(scale_out, np.float32)
        zero_out = np.asarray(zero_out, np.int64)
        scale_in = _vector_shape(aff.scale, ndim, aff.axis).astype(np.float64)
        multiplier = (scale_in / _vector_shape(scale_out, ndim, axis).astype(np.float64)).astype(np.float32)
        t = self.emit(relax.op.round(relax.op.multiply(t, const(multiplier))))
        zero = _vector_shape(zero_out, ndim, axis)
        if np.any(zero != 0):
            t = self.emit(relax.op.add(t, const(zero.astype(np.float32))))
        dtype_low, dtype_high = DTYPE_RANGES[dtype]
        low = np.full(zero.shape, dtype_low, np.int64)
        high = np.full(zero.shape, dtype_high, np.int64)
        scale = _vector_shape(scale_out, ndim, axis)
        if aff.low > -math.inf:
            low = np.maximum(low, np.round(np.float32(aff.low) / scale).astype(np.int64) + zero)
        if aff.high < math.inf:
            high = np.minimum(high, np.round(np.float32(aff.high) / scale).astype(np.int64) + zero)
        if low.size == 1 or (np.all(low == low.flat[0]) and np.all(high == high.flat[0])):
            low_value, high_value = float(low.flat[0]), float(high.flat[0])
            t = self.emit(relax.op.clip(t, relax.prim_value(low_value), relax.prim_value(high_value)))
        else:  # per-channel bounds (a ReLU6 clip at per-channel scales)
            t = self.emit(relax.op.maximum(t, const(low.astype(np.float32))))
            t = self.emit(relax.op.minimum(t, const(high.astype(np.float32))))
        return relax.op.astype(t, dtype)

    # -- the rewrite --------------------------------------------------------------------------------------
    def _record(self, value, aff: Affine | None):
        out = self.emit(value)
        if aff is not None:
            self.affine[out] = aff
        return out

    def rewrite(self, var, value):
        name = op_name(value)
        if name == "relax.dequantize":
            params = self._qparams(value)
            if params is None or tensor_dtype(value.args[0]) not in ("int8", "uint8", "int32"):
                return value
            scale, zero_point, axis = params
            return self._record(value, Affine(value.args[0], scale, zero_point, axis))
        if name == "relax.quantize":
            params = self._qparams(value)
            source = self.affine.get(value.args[0])
            out_dtype = str(value.attrs["out_dtype"])
            if params is None or source is None or out_dtype not in QUANT_DTYPES:
                return value
            requantized = self.requantize(source, params[0], params[1], out_dtype, params[2])
            return value if requantized is None else requantized
        rule = op_table.OP_TABLE.get(name)
        if rule is None:
            return value
        if rule.realize == op_table.LINEAR:
            realized = self._linear(name, value)
            return realized if realized is not None else value
        if name == "relax.add":
            return self._bias_add(value)
        if rule.realize == op_table.CLAMP:
            return self._clamp(name, value)
        if rule.realize == op_table.TRANSPARENT:
            return self._transparent(name, value)
        if rule.realize == op_table.AVERAGE:
            return self._average(value)
        if rule.realize == op_table.CONCAT:
            return self._concat(value)
        return value

    def _linear(self, name, value):
        data, weight = value.args[0], value.args[1]
        x_aff, w_aff = self.affine.get(data), self.affine.get(weight)
        if w_aff is None:
            return None
        if not self._is_plain_q(x_aff):
            # A per-channel input is realized only where it folds: into a depthwise conv's output channels.
            if not (self._is_channel_q(x_aff) and name == "relax.nn.conv2d" and is_const(w_aff.base)):
                return None
            if int(value.attrs["groups"]) != tensor_shape(data)[1]:
                return None
        w_is_const = is_const(w_aff.base)
        if w_is_const:
            if w_aff.dtype != "int8" or np.any(w_aff.zero_point != 0) or w_aff.offset is not None:
                return None
        elif not self._is_plain_q(w_aff):
            return None
        if name == "relax.nn.conv2d":
            return self._conv2d(value, x_aff, w_aff) if w_is_const else None
        return self._matmul(value, x_aff, w_aff, w_is_const)

    def _conv2d(self, value, x_aff: Affine, w_aff: Affine):
        attrs = value.attrs
        if str(attrs["data_layout"]) != "NCHW" or str(attrs["kernel_layout"]) != "OIHW":
            return None
        weight_q = const_value(w_aff.base)
        out_channels = weight_q.shape[0]
        if w_aff.axis not in (None, 0):
            return None
        # Per-tensor, or per channel with zero points of 0 (a depthwise conv's input, checked by _linear).
        zero_x = int(x_aff.zero_point) if x_aff.per_tensor else 0
        padding = [int(p) for p in attrs["padding"]]
        data = x_aff.base
        if zero_x != 0 and any(padding):
            top, left, bottom, right = padding
            # Real zero padding is the zero point in the integer domain: pad explicitly, outside the conv.
            data = self.emit(relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zero_x)))
            padding = [0, 0, 0, 0]
        acc = self.emit(
            relax.op.nn.conv2d(
                data,
                w_aff.base,
                strides=[int(s) for s in attrs["strides"]],
                padding=padding,
                dilation=[int(d) for d in attrs["dilation"]],
                groups=int(attrs["groups"]),
                out_dtype="int32",
            )
        )
        offset = None
        if zero_x != 0:
            weight_sums = weight_q.reshape(out_channels, -1).astype(np.int64).sum(axis=1)
            offset = (-zero_x * weight_sums).astype(np.int32).reshape(1, out_channels, 1, 1)
        w_scale = np.broadcast_to(np.asarray(w_aff.scale, np.float32).reshape(-1), (out_channels,))
        if x_aff.per_tensor:
            x_scale = np.float32(x_aff.scale)
        else:  # output channel o of a depthwise conv reads input channel o // multiplier
            x_scale = np.repeat(np.asarray(x_aff.scale, np.float32), out_channels // x_aff.scale.size)
        scale = (x_scale * w_scale).astype(np.float32)
        aff = Affine(acc, scale, np.zeros(out_channels, np.int64), 1, offset)
        return self._record(self._to_float(aff), aff)

    def _matmul(self, value, x_aff: Affine, w_aff: Affine, w_is_const: bool):
        out_ndim = len(tensor_shape(value.args[0]))
        if w_is_const:
            weight_q = const_value(w_aff.base)
            if weight_q.ndim != 2 or w_aff.axis not in (None, 1):
                return None
            columns = weight_q.shape[1]
            acc = self.emit(relax.op.matmul(x_aff.base, w_aff.base, out_dtype="int32"))
            zero_x = int(x_aff.zero_point)
            offset = None
            if zero_x != 0:
                offset = (-zero_x * weight_q.astype(np.int64).sum(axis=0)).astype(np.int32)
            w_scale = np.broadcast_to(np.asarray(w_aff.scale, np.float32).reshape(-1), (columns,))
            scale = (np.float32(x_aff.scale) * w_scale).astype(np.float32)
            aff = Affine(acc, scale, np.zeros(columns, np.int64), out_ndim - 1, offset)
            return self._record(self._to_float(aff), aff)
        # activation x activation (attention)
        acc = self._matmul_activations(x_aff, w_aff)
        scale = np.float32(np.float32(x_aff.scale) * np.float32(w_aff.scale))
        aff = Affine(acc, scale, np.zeros((), np.int64), None, None)
        return self._record(self._to_float(aff), aff)

    def _matmul_activations(self, x_aff: Affine, w_aff: Affine):
        """The int32 product ``(a - za) @ (b - zb)`` of two quantized activations (attention's ``QK^T``, ``PV``).

        A uint8 ``a`` times an 8-bit ``b`` runs as one u8 x s8 matmul, the instruction VNNI and AMX have: a
        uint8 ``b`` becomes ``b - 128`` (exact in int8) with zero point ``zb - 128``, and the zero points come
        out as sums, exactly in int32 (no reduced extent in the formula: it holds for a symbolic one)::

            (a - za) @ (s - zs) = a @ s - zs * rowsum(a) - za * colsum(s - zs)

        Other dtype pairs subtract the zero points in int32 (an int32 matmul) unless both are zero.
        """
        a, b = x_aff.base, w_aff.base
        za, zb = int(x_aff.zero_point), int(w_aff.zero_point)
        if x_aff.dtype == "int8" and w_aff.dtype == "int8" and za == zb == 0:
            return self.emit(relax.op.matmul(a, b, out_dtype="int32"))
        if x_aff.dtype != "uint8" or w_aff.dtype not in ("uint8", "int8"):
            a = self.emit(relax.op.subtract(relax.op.astype(a, "int32"), const(np.int32(za))))
            b = self.emit(relax.op.subtract(relax.op.astype(b, "int32"), const(np.int32(zb))))
            return self.emit(relax.op.matmul(a, b, out_dtype="int32"))
        if w_aff.dtype == "uint8":
            b = self.emit(relax.op.astype(relax.op.subtract(relax.op.astype(b, "int32"), const(np.int32(128))), "int8"))
            zb -= 128
        acc = self.emit(relax.op.matmul(a, b, out_dtype="int32"))
        if zb != 0:
            rows = self.emit(relax.op.sum(relax.op.astype(a, "int32"), axis=[-1], keepdims=True))
            acc = self.emit(relax.op.subtract(acc, relax.op.multiply(rows, const(np.int32(zb)))))
        if za != 0:
            centred = relax.op.subtract(relax.op.astype(b, "int32"), const(np.int32(zb)))
            cols = self.emit(relax.op.sum(centred, axis=[-2], keepdims=True))
            acc = self.emit(relax.op.subtract(acc, relax.op.multiply(cols, const(np.int32(za)))))
        return acc

    def _bias_add(self, value):
        lhs, rhs = value.args
        if is_const(lhs):
            lhs, rhs = rhs, lhs
        aff = self.affine.get(lhs)
        if aff is None or tensor_dtype(aff.base) != "int32" or aff.has_clamp():
            return value
        bias_aff = self.affine.get(rhs)
        if bias_aff is not None and is_const(bias_aff.base) and bias_aff.dtype == "int32":
            # An INT32 bias already quantized with the accumulator's scale (BindQuantParams, ONNX QDQ).
            if np.any(bias_aff.zero_point != 0) or not np.array_equal(
                np.asarray(bias_aff.scale, np.float32).reshape(-1), np.asarray(aff.scale, np.float32).reshape(-1)
            ):
                return value
            bias_q = const_value(bias_aff.base).astype(np.int64)
            offset = bias_q + (aff.offset if aff.offset is not None else 0)
            new_aff = dataclasses.replace(aff, offset=offset.astype(np.int32))
            return self._record(self._to_float(new_aff), new_aff)
        if not is_const(rhs):
            return value
        bias = const_value(rhs)
        if not np.issubdtype(bias.dtype, np.floating):
            return value
        ndim = self._ndim(aff.base)
        scale = _vector_shape(aff.scale, ndim, aff.axis).astype(np.float64)
        try:
            bias_q = np.round(bias.astype(np.float64) / scale)
            np.broadcast_shapes(bias_q.shape, tensor_shape(aff.base))
        except ValueError:
            return value
        if np.any(np.abs(bias_q) > 2**31 - 1):
            return value
        offset = bias_q.astype(np.int64) + (aff.offset if aff.offset is not None else 0)
        new_aff = dataclasses.replace(aff, offset=offset.astype(np.int32))
        return self._record(self._to_float(new_aff), new_aff)

    def _clamp(self, name, value):
        aff = self.affine.get(value.args[0])
        if aff is None:
            return value
        if name == "relax.nn.relu":
            low, high = 0.0, math.inf
        else:
            low, high = float(value.args[1].value), float(value.args[2].value)
        return self._record(value, dataclasses.replace(aff, low=max(aff.low, low), high=min(aff.high, high)))

    def _transparent(self, name, value):
        aff = self.affine.get(value.args[0])
        if aff is None:
            return value
        channel_preserving = name == "relax.nn.max_pool2d" and aff.axis == 1
        if not (aff.per_tensor and aff.offset is None) and not channel_preserving:
            return value
        new_base = self.emit(relax.Call(value.op, [aff.base, *value.args[1:]], value.attrs, list(value.ty_args)))
        return self._record(value, dataclasses.replace(aff, base=new_base))

    def _average(self, value):
        aff = self.affine.get(value.args[0])
        if aff is None:
            return value
        if not aff.per_tensor:
            name = op_name(value)
            keeps_channels = name in ("relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d") or (
                name == "relax.mean"
                and 1 not in [int(a) % self._ndim(aff.base) for a in value.attrs["axis"]]
                and bool(value.attrs["keepdims"])
            )
            if not (keeps_channels and aff.axis == 1):
                return value
        base = self._base_float(aff, apply_clamp=True)
        new_base = self.emit(relax.Call(value.op, [base, *value.args[1:]], value.attrs, list(value.ty_args)))
        return self._record(value, Affine(new_base, aff.scale, aff.zero_point, aff.axis))

    def _concat(self, value):
        fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else None
        if not fields:
            return value
        affs = [self.affine.get(field) for field in fields]
        if not all(self._is_plain_q(a) for a in affs):
            return value
        first = affs[0]
        if any(a.dtype != first.dtype or a.scale != first.scale or a.zero_point != first.zero_point for a in affs):
            return value
        new_base = self.emit(relax.Call(value.op, [relax.Tuple([a.base for a in affs])], value.attrs))
        return self._record(value, dataclasses.replace(first, base=new_base))


@tvmquant_module_pass("ExposeQuantizedTensors")
class ExposeQuantizedTensors:
    """Append every quantized activation tensor (the integer input of a dequantize) to ``main``'s outputs.

    For tests and reports: run it on the simulated model, then realize; both return the same tensors.
    """

    def transform_module(self, mod, ctx):
        return _Exposer().transform_module(mod)


class _Exposer(BindingRewriter):
    def begin(self, func):
        self.exposed = []

    def rewrite(self, var, value):
        if op_name(value) == "relax.dequantize" and not is_const(value.args[0]):
            source = value.args[0]
            if not any(source.same_as(seen) for seen in self.exposed):
                self.exposed.append(source)
        return value

    def rewrite_output(self, output):
        return relax.Tuple([output, *self.exposed])
