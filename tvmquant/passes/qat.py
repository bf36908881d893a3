"""The training graph of quantization-aware fine-tuning: fake quantization with straight-through gradients.

:func:`training_module` turns an annotated model (the input of :class:`~tvmquant.passes.BindQuantParams`)
into a Relax module whose ``main(inputs..., target, params...)`` returns a scalar loss, and whose
``main_adjoint`` (``relax.transform.Gradient``) also returns the gradient of every parameter. Each marker
becomes a differentiable fake quantizer with the parameters of its tensor::

    v = clamp(x / s + z, qmin, qmax);  x_hat = (round_ste(v) - z) * s

``round_ste(v) = v + no_grad(round(v) - v)``: forward the rounding, backward the identity (the
straight-through estimator, so the gradient w.r.t. ``x`` is the in-range mask). With ``learn_scales`` the
step size ``s`` is a parameter too (LSQ, Esser et al. 2020): its gradient is scaled by
``g = 1 / sqrt(N * qmax)`` through ``s*g + no_grad(s - s*g)``, and an affine activation's zero point ``z`` is a
parameter (LSQ+ offsets, Bhalgat et al. 2020), rounded straight-through so the forward uses the integer zero
point the integer model will use. Weights are per channel (one ``s`` per output channel); activations per
tensor.

The weights of quantized conv/matmul layers and the bias added to their output are parameters; everything
else stays constant. :func:`apply_trained` writes trained values back into the annotated model, so that the same
``BindQuantParams`` -> ``RealizeQuant`` flow gives the integer model.

Below ``api``: imports only base modules and ``passes/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .._compat import TensorType, const, const_value, is_const, op_name, tensor_shape
from .._relax import BindingRewriter, UnsupportedGraphError
from ..qparams import QParams, Role
from .annotate import LAYERS_ATTR, parse_marker

LOSSES = ("mse", "kl", "cross_entropy")

_GRADIENTS_REGISTERED = [False]


def register_gradients() -> None:
    """Register the gradients the training graph needs and TVM 0.27 lacks (idempotent).

    ``relax.grad.no_grad`` gets a zero gradient (the straight-through estimator rests on it) and ``relax.clip``
    (ReLU6) the in-range mask.
    """
    if _GRADIENTS_REGISTERED[0]:
        return
    from tvm.relax.op.grad import no_grad

    def no_grad_gradient(orig_var, orig_call, output_grad, ctx):
        return [no_grad(orig_call.args[0])]

    def clip_gradient(orig_var, orig_call, output_grad, ctx):
        x = orig_call.args[0]
        dtype = str(x.ty.dtype)
        low = relax.const(float(orig_call.args[1].value), dtype)
        high = relax.const(float(orig_call.args[2].value), dtype)
        inside = relax.op.logical_and(relax.op.greater_equal(x, low), relax.op.less_equal(x, high))
        return [
            relax.op.where(inside, output_grad, relax.op.zeros_like(output_grad)),
            no_grad(orig_call.args[1]),
            no_grad(orig_call.args[2]),
        ]

    tvm.ir.register_op_attr("relax.grad.no_grad", "FPrimalGradient", no_grad_gradient, level=11)
    tvm.ir.register_op_attr("relax.clip", "FPrimalGradient", clip_gradient, level=11)
    _GRADIENTS_REGISTERED[0] = True


@dataclass
class Parameter:
    """One trained tensor of the training graph.

    ``kind`` is ``"weight"``, ``"bias"``, ``"scale"`` or ``"zero_point"``; ``tensor`` the quantized tensor's
    name (``conv2d_3.weight``) or, for a bias, its layer's (``conv2d_3``); ``value`` the initial value, in the
    shape the graph uses (scales broadcast along their channel axis).
    """

    name: str
    kind: str
    tensor: str
    value: np.ndarray
    #: For scales and zero points: the QParams they belong to; for a bias, its original shape.
    params: QParams | None = None
    original_shape: tuple | None = None


@dataclass
class TrainingGraph:
    """What :func:`training_module` returns: the module, its parameters in order, and the target shape."""

    mod: tvm.IRModule
    parameters: list
    output_shape: tuple
    num_inputs: int


def _layer_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def _broadcast_shape(ndim: int, axis: int | None, size: int) -> tuple:
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def scan(annotated: tvm.IRModule, table: dict) -> tuple[dict, dict]:
    """``(weights, biases)``: marked constant weights ``{tensor name: value}`` and the bias constant added to each
    quantized conv/matmul output ``{layer name: value}``."""
    weights, biases = {}, {}
    marked_weight = {}  # marker var -> weight name
    accumulator = {}  # conv/matmul var -> layer name
    for block in annotated["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            parsed = parse_marker(value)
            if parsed is not None:
                tensor, name, role = parsed
                if role == str(Role.WEIGHT) and is_const(tensor) and name in table:
                    weights[name] = const_value(tensor)
                    marked_weight[binding.var] = name
                continue
            name = op_name(value)
            if name in ("relax.nn.conv2d", "relax.matmul") and value.args[1] in marked_weight:
                accumulator[binding.var] = _layer_of(marked_weight[value.args[1]])
            elif name == "relax.add":
                lhs, rhs = value.args
                if is_const(lhs):
                    lhs, rhs = rhs, lhs
                if lhs in accumulator and is_const(rhs) and accumulator[lhs] not in biases:
                    bias = const_value(rhs)
                    if np.issubdtype(bias.dtype, np.floating):
                        biases[accumulator[lhs]] = bias
    return weights, biases


class _TrainingRewriter(BindingRewriter):
    def __init__(
        self, table: dict, learn_scales: bool, loss: str, weights: dict, biases: dict, train_weights: bool = True
    ):
        super().__init__()
        self.table = table
        self.learn_scales = learn_scales
        self.train_weights = train_weights
        self.loss = loss
        self.weights = weights
        self.biases = biases
        self.parameters: list = []
        self.param_vars: dict = {}  # parameter name -> relax.Var
        self.target = None
        self.output_shape = None

    # -- parameters ---------------------------------------------------------------------------------------
    def _add(self, name, kind, tensor, value, params=None, original_shape=None):
        value = np.ascontiguousarray(value, np.float32)
        var = relax.Var(name.replace(".", "_"), TensorType(list(value.shape), "float32"))
        self.param_vars[name] = var
        self.parameters.append(Parameter(name, kind, tensor, value, params, original_shape))

    def begin(self, func):
        self.marked_weight = {}
        self.accumulator = {}
        self.accumulator_scale = {}  # conv/matmul var -> its INT32 accumulator's scale expression
        self.fq_scale = {}  # fake-quantized var -> (scale expression, QParams)
        self.bias_done = set()
        self.marker_ndim = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                parsed = parse_marker(binding.value)
                if parsed is not None:
                    self.marker_ndim[parsed[1]] = len(tensor_shape(parsed[0]))
        if self.train_weights:
            for name, value in self.weights.items():
                self._add(name, "weight", name, value)
        for layer, value in self.biases.items():
            self._add(layer + ".bias", "bias", layer, value, original_shape=value.shape)
        if self.learn_scales:
            for name, params in self.table.items():
                if name not in self.marker_ndim:
                    continue
                size = params.scale.size
                shape = _broadcast_shape(self.marker_ndim[name], params.axis, size)
                self._add(name + ".scale", "scale", name, params.scale.reshape(shape), params)
                if params.scheme == "affine":
                    zero = params.zero_point.astype(np.float32).reshape(shape)
                    self._add(name + ".zero_point", "zero_point", name, zero, params)

    def extra_params(self, func):
        ret = func.ret_ty
        if isinstance(ret, relax.TupleType):
            raise UnsupportedGraphError(
                f"fine-tuning needs a model with one output; this one returns {len(ret.fields)}"
            )
        self.output_shape = tuple(int(dim) for dim in ret.shape)
        self.target = relax.Var("target", TensorType(list(self.output_shape), "float32"))
        return [self.target] + [self.param_vars[p.name] for p in self.parameters]

    # -- graph --------------------------------------------------------------------------------------------
    def _fake_quant(self, x, params: QParams):
        ndim = len(tensor_shape(x))
        shape = _broadcast_shape(ndim, params.axis, params.scale.size)
        scale_var = self.param_vars.get(params.name + ".scale")
        no_grad = relax.op.grad.no_grad
        if scale_var is not None:
            # LSQ: forward s, backward g * ds; N counts the elements sharing one step size.
            elements = int(np.prod(tensor_shape(x))) // max(params.scale.size, 1)
            if params.role == Role.ACTIVATION:
                elements //= max(int(tensor_shape(x)[0]), 1)  # per sample, as LSQ counts features
            grad_scale = const(np.float32(1.0 / np.sqrt(max(elements, 1) * max(params.qmax, 1))))
            scaled = self.emit(relax.op.multiply(scale_var, grad_scale))
            scale = self.emit(relax.op.add(scaled, no_grad(relax.op.subtract(scale_var, scaled))))
        else:
            scale = const(params.scale.reshape(shape).astype(np.float32))
        v = self.emit(relax.op.divide(x, scale))
        zero = None
        zero_var = self.param_vars.get(params.name + ".zero_point")
        if zero_var is not None:
            zero = self.emit(relax.op.add(zero_var, no_grad(relax.op.subtract(relax.op.round(zero_var), zero_var))))
        elif np.any(params.zero_point != 0):
            zero = const(params.zero_point.astype(np.float32).reshape(shape))
        if zero is not None:
            v = self.emit(relax.op.add(v, zero))
        # Relax's maximum(x, y) passes ties to x, minimum(x, y) to y: v keeps its gradient at qmin and qmax
        # (the calibrated max weight sits exactly on the bound).
        v = self.emit(relax.op.maximum(v, const(np.float32(params.qmin))))
        v = self.emit(relax.op.minimum(const(np.float32(params.qmax)), v))
        v = self.emit(relax.op.add(v, no_grad(relax.op.subtract(relax.op.round(v), v))))
        if zero is not None:
            v = self.emit(relax.op.subtract(v, zero))
        out = self.emit(relax.op.multiply(v, scale), params.name.replace(".", "_") + "_fq")
        self.fq_scale[out] = (scale, params)
        return out

    def rewrite(self, var, value):
        parsed = parse_marker(value)
        if parsed is not None:
            tensor, name, role = parsed
            if name not in self.table:
                return tensor  # not calibrated: the marker is an identity
            source = self.param_vars.get(name, tensor) if role == str(Role.WEIGHT) else tensor
            out = self._fake_quant(source, self.table[name])
            if name in self.weights:
                self.marked_weight[out] = name
            return out
        name = op_name(value)
        if name in ("relax.nn.conv2d", "relax.matmul") and value.args[1] in self.marked_weight:
            out = self.emit(value)
            self.accumulator[out] = _layer_of(self.marked_weight[value.args[1]])
            self._track_accumulator_scale(name, value, out)
            return out
        if name == "relax.add":
            lhs, rhs = value.args
            if is_const(lhs):
                lhs, rhs = rhs, lhs
            layer = self.accumulator.get(lhs)
            if layer is None or layer + ".bias" not in self.param_vars or layer in self.bias_done or not is_const(rhs):
                return value
            self.bias_done.add(layer)
            bias = self.param_vars[layer + ".bias"]
            scale = self.accumulator_scale.get(lhs)
            if scale is not None:
                # As BindQuantParams: the bias on the INT32 accumulator's grid (scale_x * scale_w), rounded
                # straight-through, so training sees the bias the integer model adds.
                no_grad = relax.op.grad.no_grad
                steps = self.emit(relax.op.divide(bias, scale))
                steps = self.emit(relax.op.add(steps, no_grad(relax.op.subtract(relax.op.round(steps), steps))))
                bias = self.emit(relax.op.multiply(steps, scale))
            return relax.op.add(lhs, bias)
        return value

    def _track_accumulator_scale(self, name, value, out):
        """Record the scale of a quantized conv/matmul's INT32 accumulator in the output's broadcast shape (not when
        BindQuantParams leaves the bias in FP32: per-channel activations)."""
        x_entry, w_entry = self.fq_scale.get(value.args[0]), self.fq_scale.get(value.args[1])
        if x_entry is None or w_entry is None or x_entry[1].axis is not None or w_entry[1].role != Role.WEIGHT:
            return
        w_scale, w_params = w_entry
        ndim = len(tensor_shape(out))
        channels = w_params.scale.size
        if channels > 1:
            axis = 1 if name == "relax.nn.conv2d" else ndim - 1
            w_scale = self.emit(relax.op.reshape(w_scale, _broadcast_shape(ndim, axis, channels)))
        elif tensor_shape(w_scale):
            w_scale = self.emit(relax.op.reshape(w_scale, ()))
        self.accumulator_scale[out] = self.emit(relax.op.multiply(x_entry[0], w_scale))

    def rewrite_output(self, output):
        batch = self.output_shape[0] if self.output_shape else 1
        if self.loss == "mse":
            diff = self.emit(relax.op.subtract(output, self.target))
            return relax.op.mean(relax.op.multiply(diff, diff))
        # kl / cross_entropy: soft-target cross-entropy, -sum(p * log_softmax(y)) / batch. For KL the constant
        # entropy of the teacher is subtracted on the host when the loss is reported.
        log_prob = self.emit(relax.op.nn.log_softmax(output, axis=-1))
        total = self.emit(relax.op.sum(relax.op.multiply(self.target, log_prob)))
        return relax.op.multiply(total, const(np.float32(-1.0 / batch)))


def training_module(
    annotated: tvm.IRModule, table: dict, loss: str = "mse", learn_scales: bool = True, train_weights: bool = True
):
    """The training graph of ``annotated`` with ``table``'s parameters as the initial quantizers.

    ``train_weights=False`` keeps the weights constant: only biases (and, with ``learn_scales``, the quantizers)
    are trained.

    Returns a :class:`TrainingGraph` whose ``mod`` has ``main(inputs..., target, params...) -> loss`` and
    ``main_adjoint`` (same arguments) ``-> (loss, (grad of each param...))``; ``target`` is the teacher's output
    (``mse``), its probabilities (``kl``) or one-hot labels (``cross_entropy``).

    Examples
    --------
    >>> graph = training_module(qmodel.annotated, qmodel.table, "mse")  # doctest: +SKIP
    >>> [p.name for p in graph.parameters][:2]  # doctest: +SKIP
    ['conv2d_0.weight', 'conv2d_1.weight']
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    register_gradients()
    weights, biases = scan(annotated, table)
    rewriter = _TrainingRewriter(table, learn_scales, loss, weights, biases, train_weights)
    func = annotated["main"]
    num_inputs = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else None
    if num_inputs is not None and num_inputs != len(func.params):
        raise UnsupportedGraphError("fine-tuning needs a model whose weights are bound as constants")
    num_inputs = len(func.params)
    mod = rewriter.transform_module(annotated)
    if not rewriter.parameters:
        raise ValueError(
            "nothing to train: the weights are frozen (train_weights=False), the scales fixed (learn_scales=False) "
            "and no quantized layer has a bias; allow the weights or the scales to train"
        )
    main = mod["main"].without_attr(LAYERS_ATTR).without_attr("num_input")
    mod["main"] = main
    params = list(main.params)[num_inputs + 1 :]
    mod = relax.transform.Gradient("main", require_grads=params)(mod)
    # Only the adjoint runs (it returns the loss too): building the forward-only function would double the work.
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}, attrs=mod.attrs)
    return TrainingGraph(mod, rewriter.parameters, rewriter.output_shape, num_inputs)


class _Applier(BindingRewriter):
    def __init__(self, weights: dict, biases: dict):
        super().__init__()
        self.weights = weights
        self.biases = biases

    def begin(self, func):
        self.marked_weight = {}
        self.accumulator = {}
        self.bias_done = set()

    def rewrite(self, var, value):
        parsed = parse_marker(value)
        if parsed is not None:
            tensor, name, role = parsed
            if is_const(tensor) and (name in self.weights or _layer_of(name) in self.biases):
                if name in self.weights:
                    value = relax.Call(
                        value.op,
                        [value.args[0], const(self.weights[name]), *value.args[2:]],
                        value.attrs,
                        list(value.ty_args),
                    )
                out = self.emit(value, name.replace(".", "_"))  # marked even when untrained: its bias may be
                self.marked_weight[out] = name
                return out
            return value
        name = op_name(value)
        if name in ("relax.nn.conv2d", "relax.matmul") and value.args[1] in self.marked_weight:
            out = self.emit(value)
            self.accumulator[out] = _layer_of(self.marked_weight[value.args[1]])
            return out
        if name == "relax.add":
            lhs, rhs = value.args
            if is_const(lhs):
                lhs, rhs = rhs, lhs
            layer = self.accumulator.get(lhs)
            if layer in self.biases and layer not in self.bias_done and is_const(rhs):
                self.bias_done.add(layer)
                return relax.op.add(lhs, const(self.biases[layer].astype(const_value(rhs).dtype)))
        return value


def apply_trained(annotated: tvm.IRModule, weights: dict, biases: dict) -> tvm.IRModule:
    """``annotated`` with trained weights ``{tensor name: array}`` and biases ``{layer name: array}``."""
    return _Applier(weights, biases).transform_module(annotated)


class _Stripper(BindingRewriter):
    def rewrite(self, var, value):
        parsed = parse_marker(value)
        return parsed[0] if parsed is not None else value


def strip_markers(annotated: tvm.IRModule) -> tvm.IRModule:
    """The FP32 model of an annotated one: markers replaced by their tensors, the layer table dropped."""
    mod = _Stripper().transform_module(annotated)
    mod["main"] = mod["main"].without_attr(LAYERS_ATTR)
    return mod


__all__ = [
    "LOSSES",
    "Parameter",
    "TrainingGraph",
    "apply_trained",
    "register_gradients",
    "strip_markers",
    "training_module",
]
