"""EqualizeCrossLayer: cross-layer equalization of conv -> (ReLU / ReLU6 / nothing) -> conv weight ranges.

Nagel et al. 2019, "Data-Free Quantization through Weight Equalization and Bias Correction": for a pair of
convs where the first one's output channel ``c`` feeds only the second one's input channel ``c`` through a
positively homogeneous activation (``relu(x / s) = relu(x) / s``), dividing the first conv's output channel
(weights and bias) by ``s_c > 0`` and multiplying the second conv's input channel by ``s_c`` leaves the
function unchanged. ``s_c = sqrt(r1_c / r2_c)`` (``r1_c``: the range of the first weight's output channel,
``r2_c``: of the second weight's input channel) gives both the same range ``sqrt(r1_c * r2_c)``. Pairs that
share a conv interact, so the rescaling sweeps over all pairs until it settles.

ReLU6 (``clip(x, 0, 6)``) is not homogeneous: ``clip(x / s, 0, 6 / s) = clip(x, 0, 6) / s``, so its upper bound
becomes ``6 / s_c`` per channel. Relax's clip takes scalar bounds; the pass writes the clip as
``minimum(relu(x), bound)`` with a per-channel constant ``bound``. Depthwise-separable pairs (a depthwise conv,
ReLU6, the pointwise conv after it; MobileNet's weakest layers) are pairs like any other: a grouped conv scales
the input channels of its own group.

Run on the canonical FP32 graph (after :func:`tvmquant.frontend.prepare.prepare`, which turns the importer's
ReLU6 into ``relax.clip``), before :class:`~tvmquant.passes.AnnotateQuant`. Idempotent: the equalized
function is marked (``tvmquant.equalized``) and left alone by a second run.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from tvm import relax

from .._compat import const, const_value, is_const, op_name, tensor_shape
from .._relax import BindingRewriter, tvmquant_module_pass

EQUALIZED_ATTR = "tvmquant.equalized"
_LOG = logging.getLogger(__name__)


class _Pair:
    """conv1 -> [bias add] -> [relu | clip(0, high)] -> conv2, every link the only user of the one before."""

    def __init__(self, conv1, bias_add, activation, high, conv2):
        self.conv1, self.bias_add, self.activation, self.high, self.conv2 = conv1, bias_add, activation, high, conv2


def _is_nchw_conv(value) -> bool:
    return (
        op_name(value) == "relax.nn.conv2d"
        and str(value.attrs["data_layout"]) == "NCHW"
        and str(value.attrs["kernel_layout"]) == "OIHW"
        and is_const(value.args[1])
    )


def find_pairs(func) -> list:
    """The equalizable pairs of ``func`` (a canonical FP32 Relax function), in graph order."""
    values, users, order = {}, {}, []
    for block in func.body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
            order.append(binding.var)
            if isinstance(binding.value, relax.Call):
                for arg in binding.value.args:
                    for item in arg.fields if isinstance(arg, relax.Tuple) else [arg]:
                        users.setdefault(item, []).append(binding.var)
    output = func.body.body
    for item in output.fields if isinstance(output, relax.Tuple) else [output]:
        users.setdefault(item, []).append(None)

    def only_user(var):
        following = users.get(var, [])
        return following[0] if len(following) == 1 and following[0] is not None else None

    pairs = []
    for var in order:
        if not _is_nchw_conv(values[var]):
            continue
        channels = tensor_shape(var)[1]
        link, bias_add, activation, high = only_user(var), None, None, None
        if link is not None and op_name(values[link]) == "relax.add":
            lhs, rhs = values[link].args
            bias = rhs if lhs.same_as(var) else lhs
            if is_const(bias) and _along_channels(const_value(bias), channels):
                bias_add, link = link, only_user(link)
        end = bias_add if bias_add is not None else var
        if link is not None and op_name(values[link]) == "relax.nn.relu":
            activation, link = link, only_user(link)
        elif link is not None and op_name(values[link]) == "relax.clip":
            low = float(values[link].args[1].value)
            if low == 0.0:
                activation, high, link = link, float(values[link].args[2].value), only_user(link)
        source = activation if activation is not None else end
        if link is None or not _is_nchw_conv(values[link]) or not values[link].args[0].same_as(source):
            continue
        pairs.append(_Pair(var, bias_add, activation, high, link))
    return pairs


def _along_channels(bias, channels: int) -> bool:
    """True for a bias that broadcasts along the channel axis of NCHW: (C, 1, 1) or (1, C, 1, 1)."""
    if bias.ndim > 4 or not np.issubdtype(bias.dtype, np.floating):
        return False
    shape = (1,) * (4 - bias.ndim) + bias.shape
    return shape[1] == channels and shape[0] == shape[2] == shape[3] == 1


def _input_channel_view(weight, groups: int):
    """``weight`` (O, C/groups, kh, kw) viewed as (groups, O/groups, C/groups, kh, kw)."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    return weight.reshape(groups, out_channels // groups, per_group, *weight.shape[2:])


def _input_ranges(weight, groups: int):
    """max |w| per input channel of a (grouped) OIHW weight."""
    view = np.abs(_input_channel_view(weight, groups))
    return view.max(axis=(1, 3, 4)).reshape(-1)


@tvmquant_module_pass("EqualizeCrossLayer")
class EqualizeCrossLayer:
    """Rescale conv weight channels across conv -> (ReLU/ReLU6/none) -> conv pairs; FP32 output unchanged.

    Parameters
    ----------
    sweeps : int
        Passes over all pairs (neighbouring pairs share a conv and converge together).
    min_scale, max_scale : float
        Bounds of each channel's rescaling factor (guards dead channels, whose range is 0).

    Examples
    --------
    >>> mod = EqualizeCrossLayer()(prepare(mod))  # doctest: +SKIP
    """

    def __init__(self, sweeps: int = 8, min_scale: float = 1e-3, max_scale: float = 1e3):
        if not (isinstance(sweeps, int) and sweeps >= 1):
            raise ValueError(f"EqualizeCrossLayer sweeps must be an int >= 1, got {sweeps!r}")
        self.sweeps = sweeps
        self.min_scale = min_scale
        self.max_scale = max_scale

    def transform_module(self, mod, ctx):
        func = mod["main"]
        if func.attrs is not None and EQUALIZED_ATTR in func.attrs:
            return mod
        pairs = find_pairs(func)
        if not pairs:
            return mod
        values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        weights = {}
        for pair in pairs:
            for conv in (pair.conv1, pair.conv2):
                weights[conv] = const_value(values[conv].args[1]).astype(np.float64)
        biases = {}
        for pair in pairs:
            if pair.bias_add is not None:
                lhs, rhs = values[pair.bias_add].args
                bias = rhs if is_const(rhs) else lhs
                biases[pair.bias_add] = const_value(bias).astype(np.float64)
        highs = {pair.activation: np.full(tensor_shape(pair.conv1)[1], pair.high) for pair in pairs if pair.high}
        for _ in range(self.sweeps):
            for pair in pairs:
                w1, w2 = weights[pair.conv1], weights[pair.conv2]
                groups2 = int(values[pair.conv2].attrs["groups"])
                r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
                r2 = _input_ranges(w2, groups2)
                ok = (r1 > 0) & (r2 > 0)
                scale = np.ones_like(r1)
                scale[ok] = np.sqrt(r1[ok] / r2[ok])
                scale = np.clip(scale, self.min_scale, self.max_scale)
                weights[pair.conv1] = w1 / scale.reshape(-1, 1, 1, 1)
                view = _input_channel_view(w2, groups2) * scale.reshape(groups2, 1, -1, 1, 1)
                weights[pair.conv2] = view.reshape(w2.shape)
                if pair.bias_add is not None:
                    bias = biases[pair.bias_add]
                    biases[pair.bias_add] = (bias.reshape(-1) / scale).reshape(bias.shape)
                if pair.activation in highs:
                    highs[pair.activation] = highs[pair.activation] / scale
        _LOG.info("cross-layer equalization: %d conv pairs", len(pairs))
        new_mod = _Rewriter(weights, biases, highs).transform_module(mod)
        new_mod["main"] = new_mod["main"].with_attr(EQUALIZED_ATTR, json.dumps(len(pairs)))
        return new_mod


class _Rewriter(BindingRewriter):
    def __init__(self, weights, biases, highs):
        super().__init__()
        self.weights, self.biases, self.highs = weights, biases, highs

    def rewrite(self, var, value):
        if var in self.weights:
            args = [value.args[0], const(self.weights[var].astype(np.float32)), *value.args[2:]]
            return relax.Call(value.op, args, value.attrs, list(value.ty_args))
        if var in self.biases:
            lhs, rhs = value.args
            bias = const(self.biases[var].astype(np.float32))
            return relax.op.add(lhs, bias) if is_const(rhs) else relax.op.add(bias, rhs)
        if var in self.highs:
            high = self.highs[var]
            if np.allclose(high, high[0], rtol=0, atol=0):
                return relax.op.clip(value.args[0], relax.prim_value(0.0), relax.prim_value(float(high[0])))
            # A per-channel upper bound is no relax.clip: relu, then the minimum with a (1, C, 1, 1) constant.
            relu = self.emit(relax.op.nn.relu(value.args[0]))
            return relax.op.minimum(relu, const(high.astype(np.float32).reshape(1, -1, 1, 1)))
        return value
