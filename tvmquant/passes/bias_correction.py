"""Bias correction: cancel the mean error quantization adds to each conv/matmul output.

Quantizing a layer's input and weight shifts the mean of its output, per output channel; the layers after it
see that shift as a systematic bias (Nagel et al. 2019, "Data-Free Quantization through Weight Equalization
and Bias Correction"; NNCF's fast bias correction). :func:`bias_corrections` measures the shift on the
calibration data and returns, per quantized conv2d/matmul, the vector to add to its bias::

    correction[c] = mean(fp32 output[c]) - mean(quantized output[c])

Layers are corrected in graph order, each measured in the simulated model with the corrections of the layers
before it applied, so a layer corrects what reaches it, not what would have reached it without them. A
correction is kept only if it lowers the model's output error on the calibration data: one layer's mean error
can cancel part of another's further on, and removing it alone then hurts (MobileNetV2's late projection
convs: correcting every layer takes its logits from 13.0 to 11.1 dB, the kept corrections to 17.6 dB).
:class:`ApplyBiasCorrection` adds the vectors to the biases of the annotated model (a layer without a bias
gets one), before :class:`~tvmquant.passes.BindQuantParams` quantizes the biases to INT32.

Run after calibration (the corrections use its quantization table) and before BindQuantParams.

How it is measured: one compiled module serves every pass over the data. It is the annotated model with a
marker after each layer's output (after its bias add); the markers call back into Python, which fake-quantizes
the marked inputs and weights, adds the corrections in force and accumulates the channel means. Each layer
takes one whole forward pass over the calibration data, which tries its correction and measures the next
layer's shift on the way; a refused correction costs a partial pass more (up to the next layer), to measure
that shift again without it. Without the check (``check_output=False``), a pass that measures layer ``i``
stops at layer ``i``'s output: about ``L / 2`` forward passes for ``L`` layers.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from .._compat import const, const_value, is_const, op_name, tensor_shape
from .._io import flatten_outputs
from .._relax import BindingRewriter, tvmquant_module_pass
from ..qparams import Role
from ..quant_math import fake_quantize
from .annotate import marker, parse_marker
from .calibrate import StopRun, compile_vm, iter_batches, observing, run_vm

#: ``main`` attribute set by ApplyBiasCorrection: the layers corrected (keeps the pass idempotent).
CORRECTED_ATTR = "tvmquant.bias_corrected"
_OUTPUT_ROLE = "output"
_LINEAR_OPS = ("relax.nn.conv2d", "relax.matmul")


class _LayerOutputs:
    """Finds, in ``main`` of an annotated module, each quantized conv2d/matmul with a constant weight, its
    output channel axis and the binding that ends it (its constant bias add, or the layer call itself)."""

    def __init__(self, func):
        values = {}
        users: dict = {}
        order = []
        for block in func.body.blocks:
            for binding in block.bindings:
                values[binding.var] = binding.value
                order.append(binding.var)
                for arg in _call_args(binding.value):
                    users.setdefault(arg, []).append(binding.var)
        output = func.body.body
        for arg in output.fields if isinstance(output, relax.Tuple) else [output]:
            users.setdefault(arg, []).append(None)
        self.layers = []  # (layer name, channel axis, end var, bias add var or None)
        for var in order:
            value = values[var]
            if op_name(value) not in _LINEAR_OPS:
                continue
            weight = values.get(value.args[1])
            parsed = parse_marker(weight) if weight is not None else None
            if parsed is None or not parsed[1].endswith(".weight") or not is_const(parsed[0]):
                continue
            layer = parsed[1][: -len(".weight")]
            ndim = len(tensor_shape(var))
            axis = 1 if op_name(value) == "relax.nn.conv2d" else ndim - 1
            end, bias_add = var, None
            following = users.get(var, [])
            if len(following) == 1 and following[0] is not None:
                user = values[following[0]]
                if op_name(user) == "relax.add" and _bias_operand(user, var, ndim, axis) is not None:
                    end = bias_add = following[0]
            self.layers.append((layer, axis, end, bias_add))


def _call_args(value):
    if not isinstance(value, relax.Call):
        return []
    args = []
    for arg in value.args:
        if isinstance(arg, relax.Tuple):
            args.extend(arg.fields)
        else:
            args.append(arg)
    return args


def _bias_operand(add, var, ndim: int, axis: int):
    """The constant operand of ``add(var, bias)`` if it is a float bias along ``axis``, else None."""
    lhs, rhs = add.args
    other = rhs if lhs.same_as(var) else lhs
    if not is_const(other) or not (lhs.same_as(var) or rhs.same_as(var)):
        return None
    bias = const_value(other)
    if not np.issubdtype(bias.dtype, np.floating) or bias.ndim > ndim:
        return None
    shape = (1,) * (ndim - bias.ndim) + bias.shape
    if any(size != 1 for i, size in enumerate(shape) if i != axis):
        return None
    return other


class _Probe(BindingRewriter):
    """The annotated model with a marker ``<layer>.out`` on the end of every found layer."""

    def __init__(self, ends: dict):
        super().__init__()
        self.ends = ends  # end var -> layer name

    def rewrite(self, var, value):
        layer = self.ends.get(var)
        if layer is None:
            return value
        out = self.emit(value)
        return self.emit(marker(out, f"{layer}.out", _OUTPUT_ROLE), layer + "_out")


def bias_corrections(
    annotated: tvm.IRModule,
    table: dict,
    calib_data,
    inputs,
    build=None,
    progress: bool = False,
    check_output: bool = True,
) -> dict:
    """Per quantized conv2d/matmul layer, the vector to add to its bias (see the module docstring).

    Parameters
    ----------
    annotated : tvm.IRModule
        Output of AnnotateQuant (FP32 weights, markers).
    table : dict of str to QParams
        The calibrated quantization table.
    calib_data, inputs
        The calibration data and the model's input specs (as for :func:`~tvmquant.passes.calibrate`).
    build : callable, optional
        ``build(mod, target) -> executable`` (see :func:`~tvmquant.passes.calibrate.compile_vm`).
    progress : bool
        Show a progress bar over the layers.
    check_output : bool
        Keep a layer's correction only if it lowers the model's output error on the calibration data (the sum
        over outputs of error power / FP32 power, with the corrections kept so far applied); False keeps every
        layer's. A correction always lowers its own layer's error, but the mean error of a layer can cancel
        part of another's further on: in MobileNetV2 correcting every layer takes the logits from 13.0 to
        11.1 dB, the checked corrections to 17.6 dB.

    Returns
    -------
    dict of str to numpy.ndarray
        ``{layer name: float32 vector, one entry per output channel}``, in graph order; with ``check_output``
        only the layers kept.
    """
    found = _LayerOutputs(annotated["main"])
    layers = [(name, axis) for name, axis, _, _ in found.layers]
    if not layers:
        return {}
    probe = _Probe({end: name for name, _, end, _ in found.layers}).transform_module(annotated)
    vm = compile_vm(probe, build=build)
    batches = list(iter_batches(calib_data, inputs))
    axes = dict(layers)

    sums: dict = {}
    counts: dict = {}

    def accumulate(layer, array):
        axis = axes[layer]
        reduce = tuple(i for i in range(array.ndim) if i != axis)
        sums[layer] = sums.get(layer, 0.0) + array.astype(np.float64).sum(axis=reduce)
        counts[layer] = counts.get(layer, 0) + array.size // array.shape[axis]

    # FP32 reference: every layer's channel means (and the model's outputs) in one pass.
    def reference(name, array):
        if name.endswith(".out"):
            accumulate(name[: -len(".out")], array)

    # Channel means need the plain layout; what a callback leaves alone, or fake-quantizes per tensor, does not.
    def any_layout(name):
        params = table.get(name)
        return not name.endswith(".out") and (params is None or params.axis is None)

    references = []
    with observing(reference, any_layout):
        for batch in batches:
            result = run_vm(vm, batch, inputs)
            references.append(flatten_outputs(result) if check_output else None)
    fp32_mean = {layer: sums[layer] / counts[layer] for layer, _ in layers}
    powers = None
    if check_output:
        powers = [sum(float(np.sum(np.square(out, dtype=np.float64))) for out in outs) for outs in zip(*references)]

    applied: dict = {}  # the corrections in force during a run
    measured = [None]  # the layer whose output mean a run accumulates
    stopping = [False]  # whether the run ends there
    weights: dict = {}

    def simulated(name, array):
        if name.endswith(".out"):
            layer = name[: -len(".out")]
            if layer in applied:
                array += _along(applied[layer], array.ndim, axes[layer])
            elif layer == measured[0]:
                accumulate(layer, array)
                if stopping[0]:
                    raise StopRun(layer)
            return
        params = table.get(name)
        if params is None:
            return
        if params.role == Role.WEIGHT:  # the same constant every run: fake-quantized once
            if name not in weights:
                weights[name] = fake_quantize(
                    array, params.scale, params.zero_point, params.qmin, params.qmax, params.axis
                )
            array[...] = weights[name]
        else:
            array[...] = fake_quantize(array, params.scale, params.zero_point, params.qmin, params.qmax, params.axis)

    def run(corrections: dict, layer, whole: bool):
        """Run the calibration data with ``corrections``; ``layer``'s mean shift, and the output error if
        ``whole`` (else the run stops at ``layer``)."""
        applied.clear()
        applied.update(corrections)
        measured[0], stopping[0] = layer, not whole
        sums.pop(layer, None)
        counts.pop(layer, None)
        errors = [0.0] * len(powers or ())
        with observing(simulated, any_layout):
            for index, batch in enumerate(batches):
                if whole:
                    for position, (out, ref) in enumerate(
                        zip(flatten_outputs(run_vm(vm, batch, inputs)), references[index])
                    ):
                        errors[position] += float(np.sum(np.square(out - ref, dtype=np.float64)))
                else:
                    run_vm(vm, batch, inputs)
        shift = None if layer is None else (fp32_mean[layer] - sums[layer] / counts[layer]).astype(np.float32)
        return sum(e / p for e, p in zip(errors, powers or ()) if p > 0), shift

    iterator = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="bias correction", unit="layer", leave=False)
    corrections: dict = {}
    if not check_output:
        for index in iterator:
            _, corrections[layers[index][0]] = run(corrections, layers[index][0], whole=False)
        return corrections
    # One whole run per layer: it tries the layer's correction, measuring the next layer's shift on the way
    # (measured again, up to that layer only, when the try is refused).
    best, shift = run(corrections, layers[0][0], whole=True)
    for index in iterator:
        following = layers[index + 1][0] if index + 1 < len(layers) else None
        trial = {**corrections, layers[index][0]: shift}
        error, next_shift = run(trial, following, whole=True)
        if error < best:
            corrections, best = trial, error
        elif following is not None:
            _, next_shift = run(corrections, following, whole=False)
        shift = next_shift
    return corrections


def _along(vector, ndim: int, axis: int):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(vector, np.float32).reshape(shape)


@tvmquant_module_pass("ApplyBiasCorrection")
class ApplyBiasCorrection:
    """Add per-channel corrections to the biases of an annotated model's conv2d/matmul layers.

    A layer with a constant bias add gets ``bias + correction``; a layer without one gets ``+ correction``
    as a new bias. Run on the output of AnnotateQuant, before BindQuantParams. Idempotent: the corrected
    layers are recorded on ``main`` (``tvmquant.bias_corrected``) and a second run changes nothing.

    Parameters
    ----------
    corrections : dict of str to array
        ``{layer name: vector}`` from :func:`bias_corrections`. A name that is no quantized conv2d/matmul
        of the model is an error.
    """

    def __init__(self, corrections: dict):
        self.corrections = {name: np.asarray(vector, np.float32).reshape(-1) for name, vector in corrections.items()}

    def transform_module(self, mod, ctx):
        func = mod["main"]
        if not self.corrections or (func.attrs is not None and CORRECTED_ATTR in func.attrs):
            return mod
        found = _LayerOutputs(func)
        known = {name: (axis, end, bias_add) for name, axis, end, bias_add in found.layers}
        unknown = sorted(set(self.corrections) - set(known))
        if unknown:
            raise ValueError(
                f"bias corrections name layers {unknown[:4]} that are no quantized conv2d/matmul of this model "
                f"(it has {sorted(known)[:4]}...); the corrections belong to another model or config"
            )
        plan = {}
        for name, vector in self.corrections.items():
            axis, end, bias_add = known[name]
            channels = tensor_shape(end)[axis]
            if vector.shape[0] != channels:
                raise ValueError(
                    f"bias correction of layer {name!r} has {vector.shape[0]} entries; the layer has {channels} "
                    "output channels"
                )
            plan[end] = (vector, axis, bias_add is not None)
        new_mod = _Corrector(plan).transform_module(mod)
        new_mod["main"] = new_mod["main"].with_attr(CORRECTED_ATTR, json.dumps(sorted(self.corrections)))
        return new_mod


class _Corrector(BindingRewriter):
    def __init__(self, plan: dict):
        super().__init__()
        self.plan = plan

    def rewrite(self, var, value):
        entry = self.plan.get(var)
        if entry is None:
            return value
        vector, axis, has_bias = entry
        ndim = len(tensor_shape(var))
        if not has_bias:
            out = self.emit(value)
            return relax.op.add(out, const(_along(vector, ndim, axis)))
        lhs, rhs = value.args
        bias_first = is_const(lhs)
        bias = const_value(lhs if bias_first else rhs).astype(np.float32)
        shape = (1,) * (ndim - bias.ndim) + bias.shape
        corrected = (bias.reshape(shape) + _along(vector, ndim, axis)).astype(np.float32)
        if corrected.size == bias.size:
            corrected = corrected.reshape(bias.shape)  # keep the importer's bias shape
        operands = [const(corrected), rhs] if bias_first else [lhs, const(corrected)]
        return relax.op.add(*operands)
