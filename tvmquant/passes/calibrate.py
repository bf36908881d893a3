"""Calibration: run the annotated model on data, stream the marked tensors into observers, bind the result.

Three parts, in order:

1. the annotated module (see :class:`~tvmquant.passes.AnnotateQuant`) already exposes the tensors to
   observe: each passes through the ``tvmquant.observe`` marker;
2. :func:`calibrate` compiles it with the Relax VM, binds the marker to the observers, and streams the
   calibration batches through it (memory bounded by the observers' histograms, never by the data);
3. :class:`BindQuantParams` replaces each marker with ``quantize``/``dequantize`` using the computed
   parameters, which gives the simulated (fake-quant) model that :class:`~tvmquant.passes.RealizeQuant`
   lowers to integers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import numpy as np
import tvm
from tvm import relax

from .._compat import const, const_value, is_const, op_name, register_ffi_error, tensor_shape, to_tensor
from .._io import CalibrationDataError, flatten_outputs, iter_batches  # numpy-only, shared with deploy
from .._relax import MARKER_ALIAS, MARKER_INTO, BindingRewriter, MarkerLayout, dps_marker, tvmquant_module_pass
from ..calibration import CalibrationError, HistogramObserver, PerChannelObserver, make_observer
from ..config import PerChannel, QuantConfig, TensorSpec
from ..frontend.prepare import ModelError, check_index_range
from ..qparams import QParams, Role  # QParams: also importable from here, as before it moved
from ..quant_math import DTYPE_RANGES, fake_quantize, quantize
from ..threads import generate_machine_code, request_amx_permission, use_physical_cores
from . import binning
from .annotate import MARKER, depthwise_inputs, layers_of, parse_marker

# BindQuantParams raises it; calibration/ imports no TVM, so it is registered here.
register_ffi_error(CalibrationError)

# The observers' histograms bin with a compiled kernel from here on (the same counts, several times faster).
binning.install()


# ----------------------------------------------------------------------------------------------------------
# Calibration data
def count_samples(calib_data, inputs) -> int | None:
    """Number of model-sized batches in ``calib_data`` if it can be known without consuming it (an array, a
    dict of arrays, or a list or tuple of them; not a generator)."""
    batch = max(inputs[0].shape[0], 1) if inputs and inputs[0].shape else 1
    if isinstance(calib_data, (np.ndarray, list, tuple)) or hasattr(calib_data, "keys"):
        samples = _samples(calib_data, inputs)
        return None if samples is None else samples // batch
    return None


def _samples(data, inputs) -> int | None:
    """Samples (axis 0 of the first input) in an array, a dict of arrays or a list/tuple of either."""
    if isinstance(data, (list, tuple)):
        counts = [_samples(item, inputs) for item in data]
        return None if any(count is None for count in counts) else sum(counts)
    if hasattr(data, "keys"):
        keys = list(data.keys())
        if not keys:
            return 0  # iter_batches says what is wrong
        name = inputs[0].name if inputs and inputs[0].name in keys else keys[0]
        data = data[name]
    shape = getattr(data, "shape", None)
    return int(shape[0]) if shape else None


# ----------------------------------------------------------------------------------------------------------
# Running a module whose markers call back into Python
_ACTIVE_CALLBACK = [None]
_PENDING_ERROR = [None]


@register_ffi_error
class StopRun(Exception):
    """Raised by an observer callback to end the current run early (:func:`run_vm` then returns None)."""


@tvm.register_global_func(MARKER, override=True)
def _observe(tensor, name, role):
    # Return a fresh tensor, never the argument: the VM frees the argument's storage after its last use and
    # would hand that memory to a later op while the marker's output still aliased it.
    array = tensor.numpy()
    callback = _ACTIVE_CALLBACK[0]
    if callback is not None and _PENDING_ERROR[0] is None:
        try:
            callback[0](str(name), array)  # this form is never blocked
        except StopRun:
            raise  # ends the VM run here; run_vm catches it
        except Exception as err:  # noqa: BLE001 - re-raised unchanged by run_vm, outside TVM's FFI
            _PENDING_ERROR[0] = err
    return to_tensor(array)


#: Parsed layouts of the blocked markers' roles (a few per model; parsed once).
_LAYOUTS: dict = {}


@tvm.register_global_func(MARKER_INTO, override=True)
def _observe_into(tensor, name, role, out):
    # The VM allocated ``out`` (planned memory, as for any op): the marker copies its input there in C and shows
    # the callback a numpy view of it, no allocation and no copy through Python. What the callback writes into
    # the view is what flows on (the simulating callbacks fake-quantize in place). The view is valid only during
    # the call: a callback that keeps values copies them.
    out.copyfrom(tensor)
    callback = _ACTIVE_CALLBACK[0]
    if callback is None or _PENDING_ERROR[0] is not None:
        return
    _show(callback, str(name), role, out)


@tvm.register_global_func(MARKER_ALIAS, override=True)
def _observe_alias(tensor, name, role):
    # The marker of the graphs the x86 build compiles (tvmquant._relax.alias_markers): the VM leaves ``tensor``
    # unplanned, so returning it is safe. A callback that only reads sees it as it is, no copy; one that may
    # write gets a copy, which is what flows on (the input may have other users).
    callback = _ACTIVE_CALLBACK[0]
    if callback is None or _PENDING_ERROR[0] is not None:
        return tensor
    if callback[2]:
        _show(callback, str(name), role, tensor)
        return tensor
    out = tvm.runtime.empty(tensor.shape, tensor.dtype, tensor.device)
    out.copyfrom(tensor)
    _show(callback, str(name), role, out)
    return out


def _show(callback, name: str, role, out) -> None:
    """Call the observing callback on the marker's tensor ``out`` (see :func:`observing`)."""
    function, any_layout, read_only = callback
    try:
        view = np.from_dlpack(out)
        layout = _LAYOUTS.get(role)
        if layout is None:
            layout = _LAYOUTS[role] = MarkerLayout.decode(str(role))[1] or False
        if layout is False or any_layout is True or (any_layout is not False and any_layout(name)):
            function(name, view)
        else:  # a blocked tensor, to a callback that wants it plain (and may change it)
            plain = layout.unblock(view)
            function(name, plain)
            if not read_only:
                view[...] = layout.block(plain)
    except StopRun:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised unchanged by run_vm, outside TVM's FFI
        _PENDING_ERROR[0] = err


class _DestinationMarkers(BindingRewriter):
    """Markers as ``call_dps_packed`` of :data:`MARKER_INTO`: the VM plans their outputs."""

    def rewrite(self, var, value):
        parsed = parse_marker(value)
        if parsed is None:
            return value
        tensor, name, role = parsed
        return dps_marker(tensor, name, role, var.ty)


def destination_markers(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with its markers in destination-passing form (what :func:`compile_vm` compiles)."""
    if not any(parse_marker(b.value) for block in mod["main"].body.blocks for b in block.bindings):
        return mod
    return _DestinationMarkers().transform_module(mod)


@contextlib.contextmanager
def observing(callback, any_layout=False, read_only=False):
    """Within the block, every executed marker calls ``callback(name, numpy array)``.

    The array is the tensor in its model layout (NCHW activations, OIHW weights), whatever layout the compiled
    graph runs it in. ``any_layout`` (True, or a predicate on names) says which tensors the callback may see
    in the layout they run in instead, saving a copy each way: right for anything the layout cannot change
    (per-tensor statistics, per-tensor fake-quantization, sums over the tensor), wrong for per-channel work
    and for values compared with another graph's.

    ``read_only`` promises that the callback never writes into the array (statistics, copies): the markers of
    the x86 build then show it the tensor itself, without copying it first. Otherwise what the callback
    writes is what flows on.
    """
    previous = _ACTIVE_CALLBACK[0]
    _ACTIVE_CALLBACK[0] = None if callback is None else (callback, any_layout, read_only)
    try:
        yield
    finally:
        _ACTIVE_CALLBACK[0] = previous


#: The last few VMs compiled, by (module, target, build): quantize compiles the same calibration graph for
#: calibration, the summary's FP32 reference and AutoSkip, and a ResNet-50 takes tens of seconds to compile.
_VM_CACHE: list = []
_VM_CACHE_SIZE = 2


def compile_vm(mod, target=None, build=None):
    """Compile ``mod`` for this CPU (:func:`tvmquant.target.host_target`: its ``mcpu`` and cores, LLVM ``-O2``)
    and return a Relax VM.

    ``build(mod, target)`` compiles; the library passes :func:`tvmquant.compile.build` (the target's pipeline
    with default schedules: a ResNet-50 FP32 batch runs in milliseconds, not seconds). Left ``None`` (passes
    used on their own), it is stock ``tvm.compile``: correct, but TVM's unscheduled kernels are naive loops.
    A module compiled again (structurally equal, same target and ``build``) reuses the VM built last time.
    """
    from .._compat import structural_equal, structural_hash
    from ..target import HOST_GRAPH_OPT_LEVEL, host_target

    target = target or host_target(opt_level=HOST_GRAPH_OPT_LEVEL)
    build = build or _stock_build
    key = (structural_hash(mod, map_free_vars=True), str(target), build)
    for index, (cached_key, cached_mod, vm) in enumerate(_VM_CACHE):
        if cached_key == key and structural_equal(cached_mod, mod, map_free_vars=True):
            _VM_CACHE.append(_VM_CACHE.pop(index))
            use_physical_cores()
            return vm
    executable = build(destination_markers(mod), target)
    use_physical_cores()
    request_amx_permission()  # a no-op without AMX; with it, kernels built for this CPU may use tiles
    generate_machine_code(executable)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    _VM_CACHE.append((key, mod, vm))
    del _VM_CACHE[:-_VM_CACHE_SIZE]
    return vm


def _stock_build(mod, target):
    return tvm.compile(mod, target=target)


def run_vm(vm, batch: dict, inputs):
    """Run ``main`` on one batch; an error raised by an observer surfaces here with its own type.

    An observer that raises :class:`StopRun` ends the run early: the result is then None.
    """
    args = [to_tensor(batch[spec.name]) for spec in inputs]
    _PENDING_ERROR[0] = None
    try:
        result = vm["main"](*args)
    except StopRun:
        _PENDING_ERROR[0] = None
        return None
    error, _PENDING_ERROR[0] = _PENDING_ERROR[0], None
    if error is not None:
        raise error
    return result


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


class ReferenceRuns:
    """The FP32 activations and outputs of the first ``batches`` calibration batches, kept as calibration runs
    them, so that the summary's SQNR (:meth:`tvmquant.api.QuantizedModel.measure_sqnr`) does not run them again.

    ``runs`` is a list of ``(activations, outputs)`` per batch (activations by tensor name, in the layout the
    calibration VM runs them in), or None when they would take more than ``max_bytes`` (then the summary runs
    them again: MobileNetV2's 8 images keep 215 MB; ResNet-50-style's raised its peak RSS from 1.27 to 1.64 GB).
    """

    def __init__(self, batches: int, max_bytes: int = 256 << 20):
        self.batches = batches
        self.max_bytes = max_bytes
        self.graph = None  # the annotated module the runs are of
        self.runs: list | None = []
        self._bytes = 0

    def keep(self, name: str, array: np.ndarray) -> None:
        if self.runs is None:
            return
        self._bytes += array.nbytes
        if self._bytes > self.max_bytes:
            self.runs = None
            return
        self.runs[-1][0][name] = array.copy()


def calibrate(
    annotated: tvm.IRModule,
    calib_data,
    inputs,
    config: QuantConfig,
    progress: bool = True,
    build=None,
    index_limits: dict | None = None,
    reference: ReferenceRuns | None = None,
) -> dict:
    """Compute quantization parameters for every marked tensor.

    Parameters
    ----------
    annotated : tvm.IRModule
        Output of AnnotateQuant.
    calib_data
        Calibration batches (see :func:`iter_batches`).
    inputs : list of InputSpec
        The model's inputs.
    config : QuantConfig
    progress : bool
        Show a progress bar.
    build : callable, optional
        ``build(mod, target) -> executable`` for the calibration VM (see :func:`compile_vm`).
    index_limits : dict, optional
        ``{input: rows}`` of index inputs (token ids, :func:`tvmquant.frontend.prepare.index_limits`): a value
        outside ``[0, rows)`` is refused, naming the batch and the input.
    reference : ReferenceRuns, optional
        Filled with the activations and outputs of the first ``reference.batches`` batches.

    Returns
    -------
    dict of str to QParams
    """
    table = weight_qparams(annotated, config)
    activation_names = [name for name, role in marker_names(annotated) if role == Role.ACTIVATION]
    op_types = {layer.name: layer.op_type for layer in layers_of(annotated)}
    specs = {name: config.activation_spec(op_types.get(name.rpartition(".")[0])) for name in activation_names}
    per_channel = depthwise_inputs(annotated) if config.depthwise_per_channel and not config.dynamic else set()
    observers = {
        name: make_observer(
            dataclasses.replace(specs[name], granularity=PerChannel(1)) if name in per_channel else specs[name],
            name,
            config.nan_policy,
        )
        for name in activation_names
    }
    if not observers:
        return table
    # The kernels the observers will call compile on a background thread while the graph's Python passes run here.
    histograms = any(isinstance(o, (HistogramObserver, PerChannelObserver)) for o in observers.values())
    binning.compile_ahead(largest_activation(annotated), histograms)
    # The annotated module as it is (weight markers too): the summary's SQNR and AutoSkip run the same graph, so
    # one compiled VM serves all three (compile_vm keeps it).
    vm = compile_vm(annotated, build=build)

    keeping = [False]

    def collect(name, tensor):
        observer = observers.get(name)
        if observer is not None:
            observer.collect(tensor)
            if keeping[0]:
                reference.keep(name, tensor)

    if reference is not None:
        reference.graph, reference.runs = annotated, []
    seen = 0
    batches = iter_batches(calib_data, inputs)
    # Per-tensor statistics are the same in any layout; per-channel ones are taken in the model's (NCHW).
    with observing(collect, any_layout=lambda name: name not in per_channel, read_only=True), warnings.catch_warnings():
        warnings.simplefilter("always")
        for batch in _progress(batches, count_samples(calib_data, inputs), "calibrating", progress):
            check_finite(batch, seen)
            if index_limits:
                check_index_range(batch, index_limits, f"calibration batch {seen}")
            keeping[0] = reference is not None and reference.runs is not None and seen < reference.batches
            if keeping[0]:
                reference.runs.append(({}, None))
            result = run_vm(vm, batch, inputs)
            if keeping[0] and reference.runs is not None:
                reference.runs[-1] = (reference.runs[-1][0], [np.array(o) for o in flatten_outputs(result)])
            seen += 1
    if seen == 0:
        raise CalibrationDataError("calibration data is empty: give at least one batch for every model input")
    for name, observer in observers.items():
        try:
            a_min, a_max = observer.compute()
        except CalibrationError as err:
            raise CalibrationError(f"{err} (after {seen} calibration batches)") from None
        table[name] = activation_qparams(name, specs[name], a_min, a_max)
    return fit_int32_biases(annotated, table)


def activation_qparams(name: str, spec: TensorSpec, a_min, a_max) -> QParams:
    """An activation's parameters for its calibrated range; per channel (axis 1) when the range has one entry
    per channel (``QuantConfig.depthwise_per_channel``) and every channel's zero point is 0, per tensor over all
    channels' range otherwise.

    Why zero points of 0: the integer depthwise conv pads its input with the one zero point of the tensor (real
    zero padding); channels with different ones would need a padding value per channel.
    """
    if np.ndim(a_min) == 0:
        return QParams.from_range(name, Role.ACTIVATION, spec, a_min, a_max)
    a_min, a_max = _widen_zero_channels(a_min, a_max)
    params = QParams.from_range(name, Role.ACTIVATION, spec, a_min.astype(np.float32), a_max.astype(np.float32), 1)
    if np.any(params.zero_point != 0):
        return QParams.from_range(name, Role.ACTIVATION, spec, float(np.min(a_min)), float(np.max(a_max)))
    return params


#: Largest INT32 bias :func:`fit_int32_biases` allows (half the range: the accumulator still has headroom).
_BIAS_LIMIT = 2**30


def fit_int32_biases(annotated: tvm.IRModule, table: dict) -> dict:
    """Raise the weight scale of channels whose INT32 bias ``round(bias / (scale_x * scale_w))`` would overflow.

    A (nearly) dead channel has a tiny weight scale (down to ``MIN_SCALE``), so its bias overflows INT32; the
    whole layer's bias then stayed FP32, and ONNX Runtime, quantizing that FP32 bias of an exported model itself,
    overflowed (EfficientNet-Lite0: 8-14 dB from tvmquant). A channel's scale is raised to
    ``|bias| / (scale_x * 2**30)``: its weights, tiny next to its bias, lose a little precision, and every
    bias fits (as ONNX Runtime's quantizer does). Returns the table with those weight parameters replaced.
    """

    names, values = {}, {}
    for block in annotated["main"].body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
            parsed = parse_marker(binding.value)
            if parsed is not None:
                names[binding.var] = parsed[1]
    linear = {}
    for var, value in values.items():
        if op_name(value) in ("relax.nn.conv2d", "relax.matmul") and len(value.args) >= 2:
            x_name, w_name = names.get(value.args[0]), names.get(value.args[1])
            if x_name in table and w_name in table and table[w_name].role == Role.WEIGHT:
                linear[var] = (op_name(value), x_name, w_name)
    table = dict(table)
    for value in values.values():
        if op_name(value) != "relax.add":
            continue
        lhs, rhs = value.args
        if is_const(lhs):
            lhs, rhs = rhs, lhs
        if lhs not in linear or not is_const(rhs):
            continue
        kind, x_name, w_name = linear[lhs]
        x_params, w_params = table[x_name], table[w_name]
        bias = const_value(rhs).astype(np.float64)
        channels = np.asarray(w_params.scale).size
        if (x_params.axis is not None and channels == 1) or not np.issubdtype(bias.dtype, np.floating):
            continue
        axis = 1 if kind == "relax.nn.conv2d" else -1
        shape = tensor_shape(lhs)
        try:
            if shape is None or None in shape or np.broadcast_shapes(bias.shape, shape) != tuple(shape):
                continue
        except ValueError:
            continue
        # The largest |bias| of each output channel, reduced over the bias itself (broadcast to the output's
        # shape first, it took 0.1 s of MobileNetV2's calibration).
        rows = np.moveaxis(np.abs(bias).reshape((1,) * (len(shape) - bias.ndim) + bias.shape), axis, 0)
        magnitude = np.broadcast_to(rows.reshape(rows.shape[0], -1).max(axis=1), (shape[axis],))
        magnitude = magnitude if channels > 1 else magnitude.max().reshape(())
        if np.ndim(magnitude) and magnitude.shape[0] != channels:
            continue
        needed = (magnitude / (x_params.scale_per_output(channels).astype(np.float64) * _BIAS_LIMIT)).astype(np.float32)
        scale = np.asarray(w_params.scale, np.float32)
        if np.all(needed <= scale):
            continue
        table[w_name] = dataclasses.replace(w_params, scale=np.maximum(scale, needed).astype(np.float32))
    return table


def check_finite(batch: dict, index: int) -> None:
    """Refuse NaN or Inf in a calibration input, naming the batch and the input.

    Bad values in the data itself are a data error, always refused; ``QuantConfig.nan_policy`` governs NaN/Inf
    that arise inside the model (an overflowing tensor), which observers then count and drop.
    """
    for name, array in batch.items():
        if not np.issubdtype(array.dtype, np.floating):
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            num_nan = int(np.count_nonzero(np.isnan(array)))
            # Samples are counted across batches (the calibration batch may differ from the data's batches).
            per_batch = array.shape[0] if array.ndim else 1
            first = index * per_batch + int(np.argmax(bad.reshape(per_batch, -1).any(axis=1))) if array.ndim else index
            raise CalibrationDataError(
                f"calibration sample {first} input {name!r} has {num_nan} NaN and {int(bad.sum()) - num_nan} Inf "
                "values in its batch; remove or fix those samples"
            )


def marker_names(mod) -> list:
    """``[(tensor name, role)]`` of the markers in ``main``, in program order."""
    result = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            parsed = parse_marker(binding.value)
            if parsed is not None:
                result.append((parsed[1], parsed[2]))
    return result


def largest_activation(mod) -> int:
    """Values of the largest activation a marker of ``main`` observes (0 when none has a static shape)."""
    largest = 0
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            parsed = parse_marker(binding.value)
            if parsed is not None and parsed[2] == str(Role.ACTIVATION):
                shape = tensor_shape(parsed[0])
                if shape and None not in shape:
                    largest = max(largest, int(np.prod(shape)))
    return largest


def weight_sqnr_terms(annotated: tvm.IRModule, table: dict) -> tuple[dict, dict]:
    """``(signal, noise)`` sums of every quantized constant weight against its fake-quantized value."""
    signal, noise = {}, {}
    for block in annotated["main"].body.blocks:
        for binding in block.bindings:
            parsed = parse_marker(binding.value)
            if parsed is None or parsed[2] != Role.WEIGHT or not is_const(parsed[0]) or parsed[1] not in table:
                continue
            params = table[parsed[1]]
            value = const_value(parsed[0]).astype(np.float32)
            approx = fake_quantize(value, params.scale, params.zero_point, params.qmin, params.qmax, params.axis)
            signal[parsed[1]] = float(np.sum(value.astype(np.float64) ** 2))
            noise[parsed[1]] = float(np.sum((value.astype(np.float64) - approx) ** 2))
    return signal, noise


def weight_qparams(annotated: tvm.IRModule, config: QuantConfig) -> dict:
    """Parameters of every marked weight, computed from the constants themselves."""
    layers = [layer for layer in layers_of(annotated) if layer.weight]
    axes = {layer.weight: layer.weight_axis for layer in layers}
    sources = {layer.weight: layer.source for layer in layers}
    table = {}
    spec = config.weight
    for block in annotated["main"].body.blocks:
        for binding in block.bindings:
            parsed = parse_marker(binding.value)
            if parsed is None or parsed[2] != Role.WEIGHT or not is_const(parsed[0]):
                continue
            tensor, name, _ = parsed
            value = const_value(tensor)
            _check_finite_weight(value, name, sources.get(name))
            if isinstance(spec.granularity, PerChannel):
                axis = axes.get(name, spec.granularity.axis)
                axis_spec = TensorSpec(spec.dtype, spec.scheme, PerChannel(axis), spec.bits, spec.method)
                observer = make_observer(axis_spec, name, config.nan_policy)
            else:
                axis = None
                observer = make_observer(spec, name, config.nan_policy)
            observer.collect(value)
            a_min, a_max = observer.compute()
            if axis is not None:
                a_min, a_max = _widen_zero_channels(a_min, a_max)
            table[name] = QParams.from_range(name, Role.WEIGHT, spec, a_min, a_max, axis)
    return table


def _check_finite_weight(value: np.ndarray, name: str, source: str | None) -> None:
    """Refuse a weight with NaN or Inf values, naming it (and its ONNX node): it would quantize to garbage."""
    bad = ~np.isfinite(value)
    if not bad.any():
        return
    num_nan = int(np.isnan(value).sum())
    where = f" (ONNX node {source!r})" if source else ""
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ModelError(
        f"weight {name}{where} has {num_nan} NaN and {int(bad.sum()) - num_nan} Inf values (the first at index "
        f"{first}); a model's weights must be finite: fix or re-export the model"
    )


def _widen_zero_channels(a_min, a_max):
    """Give a per-channel weight's all-zero channels the widest range of the other channels.

    Zero stays exact at any scale, but the smallest scale (``MIN_SCALE``) of a zero-width range makes the
    channel's INT32 bias ``bias / (scale_x * 1e-8)`` overflow, which kept the whole layer's bias in FP32 (and
    ONNX Runtime, quantizing that bias itself, overflowed: EfficientNet-Lite0's dead channels, 8-14 dB).
    """
    a_min, a_max = np.asarray(a_min, np.float64), np.asarray(a_max, np.float64)
    zero = (a_min == 0) & (a_max == 0)
    if a_min.ndim == 0 or not zero.any() or zero.all():
        return a_min, a_max
    a_min, a_max = a_min.copy(), a_max.copy()
    a_min[zero], a_max[zero] = a_min[~zero].min(), a_max[~zero].max()
    return a_min, a_max


# ----------------------------------------------------------------------------------------------------------
@tvmquant_module_pass("BindQuantParams")
class BindQuantParams:
    """Replace each marker by quantize -> (clip) -> dequantize with the parameters of its tensor.

    The result is the simulated (fake-quant) model, and the input of RealizeQuant. Weights are stored
    quantized (int8 constants) and dequantized in the graph, as ONNX QDQ models store them.

    Parameters
    ----------
    table : dict of str to QParams
    observe : bool
        Keep a marker after each dequantize (for per-tensor SQNR reports).
    """

    def __init__(self, table: dict, observe: bool = False):
        self.table = table
        self.observe = observe

    def transform_module(self, mod, ctx):
        return _Binder(self.table, self.observe).transform_module(mod)


class _Binder(BindingRewriter):
    def __init__(self, table, observe):
        super().__init__()
        self.table = table
        self.observe = observe

    def begin(self, func):
        self.dq_params: dict = {}  # dequantized var -> QParams
        self.accumulator_scale: dict = {}  # conv/matmul output var -> (scale vector, channel axis)

    def rewrite(self, var, value):
        parsed = parse_marker(value)
        if parsed is None:
            return self._linear_and_bias(var, value)
        tensor, name, role = parsed
        if name not in self.table:
            raise CalibrationError(f"tensor {name!r} has no quantization parameters: calibrate the model first")
        params = self.table[name]
        dequantized = self.emit(qdq_expr(self, tensor, params), name.replace(".", "_") + "_dq")
        self.dq_params[dequantized] = params
        if self.observe:
            from .annotate import marker

            return self.emit(marker(dequantized, name, role))
        return dequantized

    def _linear_and_bias(self, var, value):
        """Track the INT32 accumulator scale of quantized conv/matmul and quantize their bias to INT32.

        The integer model adds ``round(bias / (scale_x * scale_w))`` to the accumulator; the simulated model
        must use that same rounded bias, or the two drift apart by more than one LSB over a deep network.
        """
        name = op_name(value)
        if name in ("relax.nn.conv2d", "relax.matmul"):
            x_params = self.dq_params.get(value.args[0])
            w_params = self.dq_params.get(value.args[1])
            if x_params is None or w_params is None or w_params.role != Role.WEIGHT:
                return value
            out = self.emit(value)
            ndim = len(tensor_shape(out))
            w_scale = np.asarray(w_params.scale, np.float32).reshape(-1)
            if x_params.axis is not None:  # a depthwise conv's per-channel input
                if name != "relax.nn.conv2d" or w_scale.size == 1:
                    return out
                x_scale = x_params.scale_per_output(w_scale.size)
            else:
                x_scale = np.float32(x_params.scale)
            scale = (x_scale * w_scale).astype(np.float32)
            self.accumulator_scale[out] = (scale, 1 if name == "relax.nn.conv2d" else ndim - 1)
            return out
        if name != "relax.add":
            return value
        lhs, rhs = value.args
        if is_const(lhs):
            lhs, rhs = rhs, lhs
        if lhs not in self.accumulator_scale or not is_const(rhs):
            return value
        bias = const_value(rhs)
        scale, axis = self.accumulator_scale[lhs]
        shape = [1] * len(tensor_shape(lhs))
        shape[axis] = scale.shape[0]
        if bias.ndim > len(shape) or not np.issubdtype(bias.dtype, np.floating):
            return value
        bias_shape = (1,) * (len(shape) - bias.ndim) + bias.shape
        if any(b not in (1, s) for b, s in zip(bias_shape, shape)) or bias_shape[axis] != shape[axis]:
            return value
        scale_b = np.broadcast_to(scale.reshape(shape), shape).astype(np.float64)
        bias_q = np.round(bias.reshape(bias_shape).astype(np.float64) / scale_b)
        if np.any(np.abs(bias_q) > 2**31 - 1):
            return value
        bias_q = np.broadcast_to(bias_q, shape).astype(np.int32)
        dequantized = relax.op.dequantize(
            const(bias_q), const(scale), const(np.zeros(scale.shape, np.int32)), axis=axis, out_dtype="float32"
        )
        return relax.op.add(lhs, self.emit(dequantized))


def qdq_expr(rewriter: BindingRewriter, tensor, params: QParams):
    """Emit quantize (and clip to a restricted range) for ``tensor``; return the dequantize expression."""
    scale = const(np.asarray(params.scale, np.float32))
    zero_point = const(np.asarray(params.zero_point, np.int32))
    axis = params.axis if params.axis is not None else -1
    base = params.name.replace(".", "_")
    if params.role == Role.WEIGHT and is_const(tensor):
        q_value = quantize(
            const_value(tensor), params.scale, params.zero_point, params.dtype, params.axis, params.qmin, params.qmax
        )
        q = const(q_value)
    else:
        q = rewriter.emit(relax.op.quantize(tensor, scale, zero_point, axis=axis, out_dtype=params.dtype), base + "_q")
        low, high = DTYPE_RANGES[params.dtype]
        if params.qmin > low or params.qmax < high:
            q = rewriter.emit(
                relax.op.clip(q, relax.prim_value(params.qmin), relax.prim_value(params.qmax)), base + "_qc"
            )
    return relax.op.dequantize(q, scale, zero_point, axis=axis, out_dtype="float32")
