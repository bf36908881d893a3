"""Pre-quantized models in: ONNX QDQ (QuantizeLinear/DequantizeLinear) made by other tools.

Their scales and zero points are taken as given (no re-calibration). Import keeps the integer weights: the
constants under each dequantize are hidden from constant folding while the graph is canonicalized, then put
back, with reshapes/transposes of quantized constants folded into the integer constant itself. The result
is a simulated (QDQ) Relax model that :class:`~tvmquant.passes.RealizeQuant` lowers to integer compute.

Run instead of :func:`tvmquant.frontend.prepare.prepare` for QDQ models.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from .. import op_table
from .._compat import StringImm, const, const_value, is_const, op_name, tensor_shape
from .._relax import BindingRewriter
from ..op_table import LayerInfo
from ..qparams import QParams, Role
from ..quant_math import DTYPE_RANGES
from .prepare import ModelError, prepare

_PLACEHOLDER = "tvmquant.qdq_constant"


def is_qdq_module(mod: tvm.IRModule) -> bool:
    """True if ``main`` quantizes or dequantizes anything (an imported QDQ model)."""
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            if op_name(binding.value) in ("relax.quantize", "relax.dequantize"):
                return True
    return False


class _HideConstants(BindingRewriter):
    """Replace integer constants under dequantize by opaque placeholders that FoldConstant cannot fold."""

    def begin(self, func):
        self.hidden: dict = {}

    def rewrite(self, var, value):
        if op_name(value) != "relax.dequantize" or not is_const(value.args[0]):
            return value
        data = value.args[0]
        if str(data.ty.dtype) not in DTYPE_RANGES:
            return value
        key = f"c{len(self.hidden)}"
        self.hidden[key] = data
        placeholder = self.emit(relax.call_pure_packed(_PLACEHOLDER, StringImm(key), ty_args=[data.ty]))
        return relax.Call(value.op, [placeholder, *value.args[1:]], value.attrs, list(value.ty_args))


class _RestoreConstants(BindingRewriter):
    """Put the hidden constants back and fold data movement of dequantized constants into the constant."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def begin(self, func):
        self.const_dq: dict = {}  # var -> (int constant array, scale, zero_point, axis or None)

    def rewrite(self, var, value):
        name = op_name(value)
        if name == "relax.call_pure_packed" and getattr(value.args[0], "global_symbol", None) == _PLACEHOLDER:
            return self.hidden[value.args[1].value]
        if (
            name == "relax.dequantize"
            and is_const(value.args[0])
            and is_const(value.args[1])
            and is_const(value.args[2])
        ):
            scale, zero_point = const_value(value.args[1]), const_value(value.args[2])
            axis = int(value.attrs["axis"]) % max(len(tensor_shape(value.args[0])), 1) if scale.size > 1 else None
            out = self.emit(value)
            self.const_dq[out] = (const_value(value.args[0]), scale, zero_point, axis)
            return out
        if name in ("relax.reshape", "relax.permute_dims") and value.args[0] in self.const_dq:
            folded = self._fold(name, self.bb.normalize(value), *self.const_dq[value.args[0]])
            if folded is not None:
                data, scale, zero_point, axis = folded
                out = self.emit(
                    relax.op.dequantize(const(data), const(scale), const(zero_point), axis=-1 if axis is None else axis)
                )
                self.const_dq[out] = folded
                return out
        return value

    @staticmethod
    def _fold(name, value, data, scale, zero_point, axis):
        if name == "relax.permute_dims":
            axes = [int(a) for a in value.attrs["axes"]] if value.attrs["axes"] is not None else None
            axes = axes if axes is not None else list(reversed(range(data.ndim)))
            new_axis = axes.index(axis) if axis is not None else None
            return np.transpose(data, axes), scale, zero_point, new_axis
        new_shape = tensor_shape(value)
        if new_shape is None or any(dim is None for dim in new_shape):
            return None
        if axis is None:
            return data.reshape(new_shape), scale, zero_point, None
        # Per-channel: only reshapes that keep the channel dimension and add or drop unit dims.
        old_dims = [d for d in data.shape if d != 1]
        new_dims = [d for d in new_shape if d != 1]
        if old_dims != new_dims or data.shape[axis] == 1:
            return None
        position = [i for i, d in enumerate(data.shape) if d != 1].index(axis)
        new_axis = [i for i, d in enumerate(new_shape) if d != 1][position]
        return data.reshape(new_shape), scale, zero_point, new_axis


def prepare_qdq(mod: tvm.IRModule) -> tvm.IRModule:
    """Canonicalize an imported QDQ model, keeping its integer weights and biases."""
    check_qdq(mod)
    hider = _HideConstants()
    hidden_mod = hider.transform_module(mod)
    prepared = prepare(hidden_mod)
    restored = _RestoreConstants(hider.hidden).transform_module(prepared)
    restored = relax.transform.DeadCodeElimination(["main"])(restored)
    check_qdq(restored)
    return restored


def check_qdq(mod: tvm.IRModule) -> None:
    """Refuse inconsistent quantization parameters, naming the node."""
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            name = op_name(binding.value)
            if name not in ("relax.quantize", "relax.dequantize"):
                continue
            value = binding.value
            where = f"{name.split('.')[-1]} {binding.var.name}"
            if not (is_const(value.args[1]) and is_const(value.args[2])):
                raise ModelError(f"{where}: scale and zero point must be constants")
            scale, zero_point = const_value(value.args[1]), const_value(value.args[2])
            if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                raise ModelError(f"{where}: scale must be positive and finite, got {scale.ravel()[:4]}")
            dtype = str(value.attrs["out_dtype"]) if name == "relax.quantize" else str(value.args[0].ty.dtype)
            bounds = DTYPE_RANGES.get(dtype)
            if bounds and (np.any(zero_point < bounds[0]) or np.any(zero_point > bounds[1])):
                raise ModelError(f"{where}: zero point {zero_point.ravel()[:4]} is outside the {dtype} range")
            if scale.size > 1:
                shape = tensor_shape(value.args[0])
                axis = int(value.attrs["axis"]) % len(shape)
                if shape[axis] != scale.size:
                    raise ModelError(
                        f"{where}: {scale.size} per-channel scales on axis {axis}, but that axis has {shape[axis]} "
                        f"channels (tensor shape {shape})"
                    )


def describe_qdq(mod: tvm.IRModule):
    """The layers of a prepared QDQ model and the quantization parameters it carries.

    Returns
    -------
    layers : list of LayerInfo
        Quantized when every activation input comes out of a dequantize.
    table : dict of str to QParams
        Activations by the name of their quantized tensor; weights as ``<layer>.weight``.
    """
    dequantized: dict = {}  # var -> (source var or None for constants, QParams)
    table: dict = {}
    layers: list = []
    counts: dict = {}
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value, name = binding.value, op_name(binding.value)
            if name == "relax.dequantize":
                source = value.args[0]
                scale, zero_point = const_value(value.args[1]), const_value(value.args[2])
                dtype = str(source.ty.dtype)
                if dtype not in DTYPE_RANGES:
                    continue  # a dtype tvmquant does not realize (int16, ...): its consumers count as FP32
                axis = int(value.attrs["axis"]) % len(tensor_shape(source)) if scale.size > 1 else None
                qmin, qmax = DTYPE_RANGES[dtype]
                params = QParams(
                    binding.var.name,  # renamed after the tensor it quantizes, below
                    Role.WEIGHT if is_const(source) else Role.ACTIVATION,
                    dtype,
                    "symmetric" if np.all(zero_point == 0) and dtype == "int8" else "affine",
                    scale.astype(np.float32).reshape(-1 if axis is not None else ()),
                    zero_point.astype(np.int32).reshape(-1 if axis is not None else ()),
                    qmin,
                    qmax,
                    axis,
                )
                dequantized[binding.var] = (None if is_const(source) else source, params)
                continue
            rule = op_table.OP_TABLE.get(name)
            if rule is None or not rule.is_layer:
                continue
            if name == "relax.add" and any(
                is_const(arg) or (arg in dequantized and dequantized[arg][0] is None) for arg in value.args
            ):
                continue  # a bias add, folded into its producer
            index = counts.get(rule.op_type, 0)
            counts[rule.op_type] = index + 1
            info = LayerInfo(f"{rule.op_type}_{index}", rule.op_type, output_shape=tensor_shape(binding.var))
            args = list(value.args)
            quantized = True
            positions = sorted(
                set(rule.activation_inputs) | ({rule.weight_input} if rule.weight_input is not None else set())
            )
            for position in positions:
                items = args[position].fields if isinstance(args[position], relax.Tuple) else [args[position]]
                for item in items:
                    entry = dequantized.get(item)
                    if entry is None:
                        quantized = quantized and is_const(item)
                    elif entry[0] is None:
                        info.weight = f"{info.name}.weight"
                        info.weight_axis = entry[1].axis
                        table[info.weight] = dataclasses.replace(entry[1], name=info.weight)
                    else:
                        tensor = entry[0].name
                        table[tensor] = dataclasses.replace(entry[1], name=tensor)
                        info.inputs.append(tensor)
            info.quantized = quantized
            info.reason = "" if quantized else "inputs not quantized in the QDQ model"
            layers.append(info)
    return layers, table
