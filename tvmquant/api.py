"""The Python API: :func:`quantize`, :func:`pipeline`, :class:`QuantizedModel` and :func:`load`.

The flow: frontend (ONNX or Relax in) -> AnnotateQuant -> calibrate -> BindQuantParams (simulated model) ->
RealizeQuant (integer model) -> compile.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ._compat import tensor_dtype, tensor_shape, to_tensor, versions
from ._io import atomic_write, check_data_form, check_inputs, feed_from_args, flatten_outputs
from ._relax import output_names
from .artifact import ARTIFACT_FORMAT, READABLE_FORMATS, ArtifactError, SourceFile, write_zip
from .compile import host_build
from .config import DEFAULT, QuantConfig
from .frontend.onnx import InputSpec, import_onnx
from .frontend.prepare import ModelError, check_index_range, check_static, index_limits, prepare
from .op_table import LayerInfo
from .passes import error_kernels
from .passes.annotate import AnnotateQuant, layers_of
from .passes.calibrate import (
    BindQuantParams,
    ReferenceRuns,
    calibrate,
    compile_vm,
    count_samples,
    iter_batches,
    largest_activation,
    observing,
    run_vm,
    weight_qparams,
    weight_sqnr_terms,
)
from .passes.dynamic import RealizeDynamic
from .passes.error_kernels import fake_quantize_error
from .passes.realize import RealizeQuant
from .qparams import QParams, Role
from .quant_math import fake_quantize
from .target import target_has_amx, target_json
from .threads import generate_machine_code, require_amx, use_physical_cores


def pipeline(config: QuantConfig | None = None) -> tvm.transform.Pass:
    """The annotation pass sequence for ``config`` (calibration runs between it and realization).

    Examples
    --------
    >>> annotated = pipeline(QuantConfig())(mod)  # doctest: +SKIP
    """
    return tvm.transform.Sequential([AnnotateQuant(config or QuantConfig())], name="tvmquant.annotate")


def _relax_inputs(mod: tvm.IRModule) -> list:
    func = mod["main"]
    count = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(func.params)
    specs = []
    for param in list(func.params)[:count]:
        shape = tensor_shape(param)
        if shape is None or any(dim is None for dim in shape):
            raise ModelError(f"input {param.name!r} of main has no static shape; give one (e.g. batch 1)")
        specs.append(InputSpec(param.name, shape, tensor_dtype(param)))
    return specs


def load_model(
    model, params: dict | None = None, batch_size: int | None = None, equalize: bool = False, again: bool = False
):
    """``(prepared module, input specs, source, is_qdq)`` from an ONNX path/ModelProto or an IRModule.

    ``source`` is the ONNX model as imported: its bytes for a ModelProto the caller holds, the ModelProto itself
    for a file (read here, so no one else holds it: :class:`QuantizedModel` serializes it when asked, 0.25 s
    of a ResNet-50's quantize otherwise), None for an IRModule.

    A pre-quantized (QDQ) model comes back as its simulated QDQ module, integer weights kept. ``equalize`` runs
    :class:`~tvmquant.passes.equalize.EqualizeCrossLayer` on an FP32 model (``QuantConfig.equalize``).
    ``again``: the model was loaded before in this process (here: at another batch), so the ONNX checker does
    not run a second time and no source bytes are made (None); 0.6 s of a ResNet-50's quantize.
    """
    from .frontend.qdq import is_qdq_module, prepare_qdq

    if isinstance(model, tvm.IRModule):
        if is_qdq_module(model):
            if params:
                model = relax.transform.BindParams("main", params)(model)
            mod = prepare_qdq(model)
        else:
            mod = prepare(model, params)
        source = None
    else:
        from .frontend.onnx import fold_conv_batchnorm, load_onnx_model

        # The source kept (for rebatching and the QDQ export) is the model as imported: BatchNorm folded into
        # its convs, so that the exported weights are the ones the quantized model uses.
        proto = fold_conv_batchnorm(load_onnx_model(model))
        where = f"{os.fspath(model)!r}" if not hasattr(model, "graph") else "the ONNX model"
        mod, _ = import_onnx(proto, batch_size=batch_size, where=where, check=not again)
        mod = prepare_qdq(mod) if is_qdq_module(mod) else prepare(mod)
        if again:
            source = None
        elif isinstance(model, (str, os.PathLike)):
            source = proto  # read here, so held only here: serialized when asked for
        else:
            source = proto.SerializeToString()
    check_static(mod)
    if equalize and not is_qdq_module(mod):
        from .passes.equalize import EqualizeCrossLayer

        mod = EqualizeCrossLayer()(mod)
    return mod, _relax_inputs(mod), source, is_qdq_module(mod)


def quantize(
    model,
    config: QuantConfig | None = None,
    calib_data=None,
    *,
    params: dict | None = None,
    batch_size: int | None = None,
    calib_batch: int | None = None,
    progress: bool = True,
    report_batches: int = 8,
) -> "QuantizedModel":
    """Quantize an FP32 model to INT8.

    Parameters
    ----------
    model : str, os.PathLike, onnx.ModelProto or tvm.IRModule
        The FP32 model. An IRModule needs a Relax ``main`` with static input shapes.
    config : QuantConfig, optional
        Defaults to :data:`tvmquant.config.DEFAULT` (x86 VNNI: uint8 affine activations calibrated to the
        99.99th percentile, matmul inputs to their max, per-channel symmetric int8 weights).
    calib_data
        Iterable of ``{input name: array}`` dicts (or arrays, for one-input models), or one such dict /
        array with samples stacked on axis 0.
    params : dict, optional
        Weights of an IRModule whose ``main`` takes them as parameters.
    batch_size : int, optional
        Batch size to bind a dynamic ONNX batch axis to (default 1, with a notice). The quantized model can be
        compiled for another batch later (``compile(batch_size=...)``): the quantization table does not depend
        on it.
    calib_batch : int, optional
        Samples per calibration run. Models with a dynamic batch axis (ONNX) calibrate on a copy compiled for this
        batch (default: up to 16, what fits in a quarter of the free memory and divides the number of samples);
        other models calibrate at their own batch. The observers see the same values either way.
    progress : bool
        Show progress bars.
    report_batches : int
        Calibration batches used to measure per-tensor SQNR for :meth:`QuantizedModel.summary` (0: skip).

    Returns
    -------
    QuantizedModel

    Examples
    --------
    >>> import tvmquant
    >>> from tvmquant.examples import fmnist_model_path, load_fmnist_example
    >>> calib, test_x, test_y = load_fmnist_example()
    >>> qmodel = tvmquant.quantize(fmnist_model_path(), calib_data=calib[:32], progress=False)
    >>> logits = qmodel.compile()(test_x[:1])
    """
    config = config or DEFAULT
    fp32, inputs, source, qdq = load_model(model, params, batch_size, equalize=config.equalize)
    # A file is read once: the calibration copy at another batch is imported from the model read here.
    reload_from = source if hasattr(source, "SerializeToString") else model
    # An artifact keeps the source only on request (save(keep_source=True)); otherwise it records the file.
    source_file = SourceFile.of(model) if isinstance(model, (str, os.PathLike)) else None
    if qdq:
        # Pre-quantized (e.g. ONNX Runtime QDQ): scales and zero points are taken as given.
        from .frontend.qdq import describe_qdq

        _, table = describe_qdq(fp32)
        return QuantizedModel(fp32, fp32, table, config, inputs, source, qdq=fp32, source_file=source_file)
    if config.dynamic:
        # Dynamic activations: no calibration; only the weights' parameters are computed (from the weights).
        annotated = AnnotateQuant(config)(fp32)
        table = weight_qparams(annotated, config)
        qmodel = QuantizedModel(fp32, annotated, table, config, inputs, source, source_file=source_file)
        if report_batches and calib_data is not None:
            qmodel.measure_sqnr(calib_data, report_batches)
        return qmodel
    if calib_data is None:
        raise ModelError(
            "calib_data is required: give a few hundred representative input samples, or quantize without data "
            "with dynamic activations (config=tvmquant.config.DYNAMIC, `tvmquant quantize --dynamic`)"
        )
    check_data_form(calib_data)
    limits = index_limits(fp32)
    if hasattr(calib_data, "__next__"):  # a generator or iterator: read once, kept for the passes that read again
        model_batch = inputs[0].shape[0] if inputs and inputs[0].shape else 1
        run = max(model_batch, calib_batch or DEFAULT_CALIB_BATCH)  # the summary reads whole calibration batches
        calib_data = _ReadOnce(
            calib_data,
            keep_all=config.bias_correction or config.auto_skip is not None,
            keep_samples=-(-report_batches * model_batch // run) * run if report_batches else 0,
        )
    if isinstance(calib_data, (dict, np.ndarray, list, tuple)) or hasattr(calib_data, "keys"):
        # Data at hand is checked before anything compiles: a wrong shape or token id fails in a second.
        import warnings

        from ._io import InputNameNotice

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputNameNotice)  # calibration says it, once
            for index, batch in enumerate(iter_batches(calib_data, inputs)):
                check_index_range(batch, limits, f"calibration batch {index}")
    annotated = AnnotateQuant(config)(fp32)
    calib_annotated, calib_inputs = _calibration_module(
        reload_from, params, annotated, inputs, config, calib_data, calib_batch
    )
    model_batch = inputs[0].shape[0] if inputs and inputs[0].shape else 1

    def calibrate_keeping(graph, graph_inputs, keep: bool):
        """Calibrate ``graph``; with ``keep``, the summary's FP32 reference too: its first batches as calibration
        runs them (the summary does not run them again)."""
        batches = _sqnr_batches(report_batches, model_batch, graph_inputs) if keep and report_batches else 0
        reference = ReferenceRuns(batches)
        found = calibrate(
            graph,
            calib_data,
            graph_inputs,
            config,
            progress=progress,
            build=host_build,
            index_limits=limits,
            reference=reference,
        )
        return found, reference

    if report_batches:  # the summary's kernels, compiled in the background as calibration starts
        error_kernels.compile_ahead(largest_activation(calib_annotated))
    # Not kept under AutoSkip, whose runs would hold them, and which calibrates again when it skips layers.
    table, reference = calibrate_keeping(calib_annotated, calib_inputs, keep=config.auto_skip is None)
    auto_reasons: dict = {}
    if config.auto_skip is not None:
        from .passes.sensitivity import choose_auto_skips

        # On the calibration graph, whose VM calibration just compiled: as many samples as auto_skip.batches
        # model-sized batches hold, in calibration-sized runs.
        run_batch = calib_inputs[0].shape[0] if calib_inputs and calib_inputs[0].shape else 1
        auto_reasons = choose_auto_skips(
            calib_annotated,
            table,
            calib_data,
            calib_inputs,
            config.auto_skip,
            progress=progress,
            build=host_build,
            batches=max(1, -(-config.auto_skip.batches * max(model_batch, 1) // max(run_batch, 1))),
        )
        if auto_reasons:
            # Skipping changes which tensors are quantized (and their names): annotate and calibrate again.
            annotated = AnnotateQuant(config.replace(skip=config.skip + tuple(auto_reasons)))(fp32)
            annotated = _with_reasons(annotated, auto_reasons)
            config = config.replace(skip=config.skip + tuple(auto_reasons))
            calib_annotated, calib_inputs = _calibration_module(
                reload_from, params, annotated, inputs, config, calib_data, calib_batch
            )
            table, reference = calibrate_keeping(calib_annotated, calib_inputs, keep=True)
    corrections: dict = {}
    if config.bias_correction:
        from .passes.bias_correction import ApplyBiasCorrection, bias_corrections

        corrections = bias_corrections(
            calib_annotated, table, calib_data, calib_inputs, build=host_build, progress=progress
        )
        annotated = ApplyBiasCorrection(corrections)(annotated)
    qmodel = QuantizedModel(fp32, annotated, table, config, inputs, source, source_file=source_file)
    qmodel.bias_corrections = corrections
    if report_batches:
        import warnings

        from ._io import InputNameNotice

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputNameNotice)  # calibration already said so
            qmodel.measure_sqnr(
                calib_data, report_batches, graph=calib_annotated, inputs=calib_inputs, reference=reference
            )
    return qmodel


def _sqnr_batches(report_batches: int, model_batch: int, run_inputs) -> int:
    """Runs of ``run_inputs``' batch that :meth:`QuantizedModel.measure_sqnr` makes of ``report_batches``."""
    run_batch = run_inputs[0].shape[0] if run_inputs and run_inputs[0].shape else 1
    return max(1, -(-report_batches * max(model_batch, 1) // max(run_batch, 1)))


class _ReadOnce:
    """Calibration data from a generator or iterator: calibration streams it, and the items later passes read
    again are kept as they go by (the first ``keep_samples`` samples for the summary's SQNR; all of them when
    AutoSkip or bias correction runs, which read the data again in full). Read a second time, it replays them."""

    def __init__(self, source, keep_all: bool, keep_samples: int):
        self.source, self.keep_all, self.keep_samples = source, keep_all, keep_samples
        self.kept: list = []
        self.kept_samples = 0
        self.done = False

    def __iter__(self):
        if self.done:
            yield from self.kept
            return
        for item in self.source:
            if self.keep_all or self.kept_samples < self.keep_samples:
                self.kept.append(item)
                first = next(iter(item.values()), None) if hasattr(item, "keys") else item
                shape = getattr(first, "shape", None)
                self.kept_samples += int(shape[0]) if shape else 1
            yield item
        self.done = True


#: Largest default calibration batch; a quarter of the free memory bounds it too.
DEFAULT_CALIB_BATCH = 16


def _calibration_module(model, params, annotated, inputs, config, calib_data, calib_batch):
    """``(annotated module, input specs)`` to calibrate with: the model itself, or a copy at ``calib_batch``."""
    if calib_batch is not None and (not isinstance(calib_batch, int) or calib_batch < 1):
        raise ValueError(f"calib_batch must be a positive integer, got {calib_batch!r}")
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else 1
    dynamic = _has_dynamic_batch(model)
    if not dynamic:
        if calib_batch not in (None, batch):
            raise ValueError(
                f"calib_batch={calib_batch}: the model's batch axis is static ({batch}), so it calibrates {batch} "
                "sample(s) at a time; export it with a dynamic batch axis to calibrate in larger batches"
            )
        return annotated, inputs
    per_sample = _activation_bytes(annotated) // max(batch, 1)
    budget = _free_memory() // 4
    count = count_samples(calib_data, inputs)
    if calib_batch is None:
        fitting = [n for n in (16, 8, 4, 2, 1) if n <= DEFAULT_CALIB_BATCH and n * per_sample <= budget] or [1]
        dividing = [n for n in fitting if count is None or count % n == 0]
        calib_batch = (dividing or [1])[0]
    elif calib_batch * per_sample > 2 * budget:
        fits = max(1, budget // max(per_sample, 1))
        raise ValueError(
            f"calib_batch={calib_batch} needs about {calib_batch * per_sample / 2**30:.1f} GiB of activations, more "
            f"than this machine has free ({_free_memory() / 2**30:.1f} GiB); use calib_batch={fits} or less"
        )
    if calib_batch == batch:
        return annotated, inputs
    fp32, calib_inputs, _, _ = load_model(model, params, calib_batch, equalize=config.equalize, again=True)
    return AnnotateQuant(config)(fp32), calib_inputs


def _has_dynamic_batch(model) -> bool:
    """True for an ONNX model (path or ModelProto) whose first input's batch axis is symbolic."""
    if isinstance(model, tvm.IRModule):
        return False
    from .frontend.onnx import load_onnx_model

    proto = load_onnx_model(model)
    initializers = {init.name for init in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        return bool(dims) and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0)
    return False


def _activation_bytes(mod: tvm.IRModule) -> int:
    """Bytes of every tensor ``main`` binds: an upper bound of what one run keeps alive."""
    total = 0
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            shape = tensor_shape(binding.var)
            dtype = tensor_dtype(binding.var)
            if shape and dtype and all(dim is not None for dim in shape):
                total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return total


def _free_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _with_reasons(annotated, reasons: dict):
    """Record why the automatic mode skipped layers (in the layer table AnnotateQuant stores)."""
    import json as _json

    from .passes.annotate import LAYERS_ATTR

    layers = _json.loads(str(annotated["main"].attrs[LAYERS_ATTR]))
    for layer in layers:
        if layer["name"] in reasons:
            layer["reason"] = reasons[layer["name"]]
    annotated["main"] = annotated["main"].with_attr(LAYERS_ATTR, _json.dumps(layers))
    return annotated


class QuantizedModel:
    """A quantized model: its FP32, simulated and integer Relax modules and its quantization table.

    ``simulated`` (``BindQuantParams(table)`` of ``annotated``) and ``mod`` (``RealizeQuant`` of ``simulated``)
    are derived on first use. A model loaded from an artifact starts from its simulated module; it rebuilds
    ``fp32``, ``annotated`` and ``source`` on first use from the ONNX source, which the artifact keeps
    (``save(keep_source=True)``) or finds again at the path it recorded (:class:`~tvmquant.artifact.SourceFile`).

    Attributes
    ----------
    fp32, annotated : tvm.IRModule
        The model before annotation, and annotated (quantizable tensors marked; FP32 weights).
    table : dict of str to QParams
    config : QuantConfig
    inputs : list of InputSpec
    source : bytes, onnx.ModelProto or None
        The ONNX model as imported (None for a Relax source); a ModelProto is serialized when first read, and
        must not change meanwhile (:func:`load_model` hands over one that only it held).
    sqnr : dict
        SQNR (dB) per tensor and output, from :meth:`measure_sqnr`.
    qdq : tvm.IRModule or None
        Set for pre-quantized (QDQ) models: their simulated module as imported.
    source_file : SourceFile or None
        The ONNX file quantized (path, SHA-256), when it was given as a path.
    """

    def __init__(
        self,
        fp32: tvm.IRModule | None,
        annotated: tvm.IRModule | None,
        table: dict,
        config: QuantConfig,
        inputs: list,
        source: bytes | None = None,
        sqnr: dict | None = None,
        qdq: tvm.IRModule | None = None,
        source_file: SourceFile | None = None,
    ):
        self._fp32 = fp32
        self._annotated = annotated
        self.table = table
        self.config = config
        self.inputs = inputs
        self._source = source
        self.sqnr = sqnr if sqnr is not None else {}
        self.qdq = qdq
        self.source_file = source_file
        # Set by load(): what the FP32 modules are rebuilt from ("onnx": the source; "relax": nothing, unless the
        # artifact kept them), the artifact's path (for messages) and the layer table it recorded.
        self._source_kind = "onnx" if source is not None else "relax"
        self._artifact: str | None = None
        self._stored_layers: list | None = None
        #: ``{layer name: per-channel vector}`` added to conv2d/matmul biases (``QuantConfig.bias_correction``).
        self.bias_corrections: dict = {}
        #: What :func:`tvmquant.finetune` recorded (losses per epoch and per step, timings); None if not fine-tuned.
        self.finetune_log: dict | None = None

    def __repr__(self) -> str:
        layers = self.layers
        quantized = sum(layer.quantized for layer in layers)
        return f"QuantizedModel({quantized} of {len(layers)} layers in INT8, inputs={[s.name for s in self.inputs]})"

    # -- modules --------------------------------------------------------------------------------------------
    @property
    def fp32(self) -> tvm.IRModule:
        """The FP32 model (before annotation)."""
        if self._fp32 is None:
            self._fp32 = self._rebuild_fp32()
        return self._fp32

    @fp32.setter
    def fp32(self, mod: tvm.IRModule) -> None:
        self._fp32 = mod

    @property
    def annotated(self) -> tvm.IRModule:
        """The annotated model: quantizable tensors marked, FP32 weights (the input of BindQuantParams)."""
        if self._annotated is None:
            if self.qdq is not None:
                self._annotated = self.qdq
            else:
                annotated = AnnotateQuant(self.config)(self.fp32)
                # The automatic mode's reasons were recorded with the layers; annotation alone says "skip list".
                reasons = {layer.name: layer.reason for layer in self._stored_layers or [] if layer.reason}
                annotated = _with_reasons(annotated, reasons) if reasons else annotated
                if self.bias_corrections:
                    from .passes.bias_correction import ApplyBiasCorrection

                    annotated = ApplyBiasCorrection(self.bias_corrections)(annotated)
                self._annotated = annotated
        return self._annotated

    @annotated.setter
    def annotated(self, mod: tvm.IRModule) -> None:
        self._annotated = mod

    @property
    def source(self) -> bytes | None:
        """The ONNX model as imported (BatchNorm folded), serialized; None for a Relax source."""
        if self._source is None and self._source_kind == "onnx":
            self._source = self._find_source()
        elif hasattr(self._source, "SerializeToString"):
            self._source = self._source.SerializeToString()
        return self._source

    @source.setter
    def source(self, data: bytes | None) -> None:
        self._source = data

    def _where(self) -> str:
        return f"artifact {self._artifact!r}" if self._artifact else "this model"

    def _find_source(self) -> bytes:
        """The ONNX source of a loaded artifact that did not keep it: the recorded file, if unchanged."""
        from .frontend.onnx import fold_conv_batchnorm, load_onnx_model

        record = self.source_file
        problem = record.problem() if record is not None else "it recorded no file (quantized from a ModelProto)"
        if problem is not None:
            put_back = f", or put the ONNX model back at {record.path!r}" if record is not None else ""
            raise ArtifactError(
                f"{self._where()} keeps no FP32 weights and no ONNX source, and {problem}: FP32 mode, rebatching "
                f"and the ONNX export need them; re-quantize with --keep-source (save(keep_source=True)){put_back}"
            )
        return fold_conv_batchnorm(load_onnx_model(record.path)).SerializeToString()

    def _rebuild_fp32(self) -> tvm.IRModule:
        if self.qdq is not None:
            return self.qdq
        if self._source_kind == "relax":
            raise ArtifactError(
                f"{self._where()} keeps no FP32 weights (its model came from a Relax IRModule): FP32 mode needs "
                "them; re-quantize and save with keep_source=True"
            )
        fp32, inputs, _, _ = load_model(self.source_model(), batch_size=self.batch_size, equalize=self.config.equalize)
        if [spec.to_dict() for spec in inputs] != [spec.to_dict() for spec in self.inputs]:
            raise ArtifactError(
                f"{self._where()}: its ONNX source has inputs {[s.to_dict() for s in inputs]}, the quantized model "
                f"{[s.to_dict() for s in self.inputs]}; re-quantize the model"
            )
        return fp32

    def _graph(self) -> tvm.IRModule:
        """A module of this model that is at hand (all keep the layer table and the output names)."""
        for mod in (self.qdq, self._annotated, self._fp32, self.__dict__.get("simulated"), self.__dict__.get("mod")):
            if mod is not None:
                return mod
        return self.simulated

    @functools.cached_property
    def simulated(self) -> tvm.IRModule:
        """Fake-quant FP32 model (quantize/dequantize around every quantized tensor)."""
        if self.qdq is not None:
            return self.qdq
        if self.config.dynamic:
            return RealizeDynamic(self.table, simulate=True)(self.annotated)
        return BindQuantParams(self.table)(self.annotated)

    @functools.cached_property
    def mod(self) -> tvm.IRModule:
        """The integer model (INT8 inputs, INT32 accumulation)."""
        if self.config.dynamic:
            return RealizeDynamic(self.table)(self.annotated)
        return RealizeQuant()(self.simulated)

    @property
    def layers(self) -> list:
        if self.qdq is not None:
            from .frontend.qdq import describe_qdq

            return describe_qdq(self.qdq)[0]
        if self._annotated is None and self._stored_layers is not None:
            return [LayerInfo(**layer.__dict__) for layer in self._stored_layers]
        return layers_of(self.annotated)

    # -- reports ------------------------------------------------------------------------------------------
    def measure_sqnr(
        self,
        calib_data,
        max_batches: int = 8,
        graph: tvm.IRModule | None = None,
        inputs=None,
        reference: ReferenceRuns | None = None,
    ) -> dict:
        """SQNR (dB) of every quantized tensor and of the outputs, simulated vs FP32, on calibration data.

        ``graph`` and ``inputs``: the annotated model (before bias correction) at another batch; quantize passes
        its calibration copy, so the FP32 reference is the VM calibration compiled and ran. ``max_batches``
        counts model-sized batches. Without bias corrections the simulated values are computed at the markers
        of that same VM (what :class:`BindQuantParams` emits, in numpy; the INT32 rounding of biases is the one
        difference, well below a quantization step); with them, the corrected simulated model runs. With dynamic
        activations only the outputs are measured (their tensors have no fixed parameters).

        Beside each activation's end-to-end SQNR, ``sqnr[name + OWN_SQNR_SUFFIX]`` is its own error: its FP32
        values through its own quantize/dequantize, nothing upstream quantized. Where the end-to-end SQNR falls,
        this says whether the tensor itself is the culprit (clipped outlier channels, a range too wide) or only
        inherits error from earlier layers.

        ``reference``: the FP32 runs calibration kept of ``graph`` (:class:`~tvmquant.passes.calibrate.ReferenceRuns`),
        used instead of running those batches again.
        """
        if self.config.dynamic:
            graph, inputs = self.annotated, self.inputs  # the simulated model exists at the model's own batch
        elif graph is None:
            # Bias correction changes the biases of ``annotated``: the reference is the model before it.
            graph = AnnotateQuant(self.config)(self.fp32) if self.bias_corrections else self.annotated
        inputs = inputs if inputs is not None else self.inputs
        own = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else 1
        batches = _sqnr_batches(max_batches, own, inputs)
        vm = compile_vm(graph, build=host_build)
        terms = _SqnrTerms(self.table)
        terms.signal, terms.noise = weight_sqnr_terms(graph, self.table)
        sim_vm = None
        if self.config.dynamic:
            sim_vm = compile_vm(self.simulated, build=host_build)
        elif self.bias_corrections:
            from .passes.bias_correction import ApplyBiasCorrection

            corrected = ApplyBiasCorrection(self.bias_corrections)(graph)
            sim_vm = compile_vm(BindQuantParams(self.table, observe=True)(corrected), build=host_build)
        limits = self.index_limits
        kept = None
        if reference is not None and reference.graph is graph and reference.runs is not None and sim_vm is None:
            runs = reference.runs[:batches]
            kept = runs if len(runs) == batches and all(run is not None for run in runs) else None
        for index, batch_data in enumerate(iter_batches(calib_data, inputs)):
            if index >= batches:
                break
            check_index_range(batch_data, limits, f"calibration batch {index}")
            if kept is not None:  # calibration ran this batch on this VM and kept what it saw
                activations, reference_outputs = kept[index]
                kept[index] = reference.runs[index] = None  # freed once used
                for name, array in activations.items():
                    terms.keep(name, array, copy=False)
            else:
                # Kept and simulated values of one VM are compared in its own layout (per-channel ones in the
                # plain layout, as calibration keeps them); another VM's, in the plain one.
                with observing(terms.keep, any_layout=terms.per_tensor if sim_vm is None else False):
                    reference_outputs = flatten_outputs(run_vm(vm, batch_data, inputs))
            if sim_vm is None:
                # The same VM, its markers fake-quantizing: the simulated model.
                with observing(terms.simulate, any_layout=terms.per_tensor):
                    approx = flatten_outputs(run_vm(vm, batch_data, inputs))
            else:
                with observing(terms.compare):
                    approx = flatten_outputs(run_vm(sim_vm, batch_data, inputs))
            terms.kept.clear()
            for i, (ref, app) in enumerate(zip(reference_outputs, approx)):
                terms.add(f"output{i}", ref, app)
        signal, noise = terms.signal, terms.noise
        self.sqnr = {name: _db(signal[name], noise[name]) for name in signal}
        return self.sqnr

    def summary(self) -> "Summary":
        """Per layer: quantized or skipped and why, scales, zero points and SQNR; printable as a table."""
        rows = []
        for layer in self.layers:
            inputs = [name for name in layer.inputs if name in self.table]
            params = [self.table[name] for name in inputs]
            weight = self.table.get(layer.weight) if layer.weight else None
            sqnrs = [self.sqnr[name] for name in inputs if name in self.sqnr]
            own = [self.sqnr[name + OWN_SQNR_SUFFIX] for name in inputs if name + OWN_SQNR_SUFFIX in self.sqnr]
            rows.append(
                {
                    "layer": layer.name,
                    "source": layer.source,
                    "op": layer.op_type,
                    "status": "int8" if layer.quantized else "fp32",
                    "reason": layer.reason
                    or (
                        "dynamic: input ranges computed at run time, per row"
                        if layer.quantized and self.config.dynamic
                        else "inputs on the grid of an earlier tensor"
                        if layer.quantized and not inputs and not layer.weight
                        else ""
                    ),
                    "input_scale": [float(p.scale) for p in params],
                    "input_zero_point": [int(p.zero_point) for p in params],
                    "weight_scale": (
                        [float(np.min(weight.scale)), float(np.max(weight.scale))] if weight is not None else None
                    ),
                    "input_sqnr_db": min(sqnrs) if sqnrs else None,
                    "own_sqnr_db": min(own) if own else None,
                }
            )
        # sqnr keys the outputs by position (output0, ...); the summary shows the model's own names.
        names = self.output_names
        outputs = {}
        for name, value in self.sqnr.items():
            if name.startswith("output") and name[len("output") :].isdigit():
                index = int(name[len("output") :])
                outputs[names[index] if index < len(names) else name] = value
        return Summary(rows, outputs)

    @functools.cached_property
    def index_limits(self) -> dict:
        """``{input: rows}`` of inputs that index a constant table (token ids): values must be in ``[0, rows)``."""
        return index_limits(self._graph())

    @property
    def output_names(self) -> list:
        """The model's output names (the ONNX graph's own; ``output0``... for Relax sources)."""
        return output_names(self._graph())

    @property
    def batch_size(self) -> int | None:
        """The static batch (axis 0) of the first input."""
        return int(self.inputs[0].shape[0]) if self.inputs and self.inputs[0].shape else None

    def rebatch(self, batch_size: int) -> "QuantizedModel":
        """The same quantized model (same table) compiled for another static batch size (ONNX sources only)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if batch_size == self.batch_size:
            return self
        if self.source is None:
            raise ModelError("rebatch needs the ONNX source; for an IRModule, quantize it with the batch you need")
        fp32, inputs, source, qdq = load_model(
            self.source_model(), batch_size=batch_size, equalize=self.config.equalize
        )
        if inputs and inputs[0].shape and inputs[0].shape[0] != batch_size:
            raise ModelError(
                f"input {inputs[0].name!r} has a static batch of {inputs[0].shape[0]} in the ONNX model, so it cannot "
                f"be compiled for batch {batch_size}; export the model with a dynamic batch axis"
            )
        if qdq:
            return QuantizedModel(
                fp32, fp32, self.table, self.config, inputs, source, qdq=fp32, source_file=self.source_file
            )
        annotated = AnnotateQuant(self.config)(fp32)
        if self.bias_corrections:
            from .passes.bias_correction import ApplyBiasCorrection

            annotated = ApplyBiasCorrection(self.bias_corrections)(annotated)
        rebatched = QuantizedModel(
            fp32, annotated, self.table, self.config, inputs, source, dict(self.sqnr), source_file=self.source_file
        )
        rebatched.bias_corrections = self.bias_corrections
        return rebatched

    def source_model(self):
        """The ONNX ModelProto this model was quantized from (None for Relax sources)."""
        if self.source is None:
            return None
        import onnx

        return onnx.load_from_string(self.source)

    # -- compile and save ---------------------------------------------------------------------------------
    def compile(self, target=None, mode: str = "int8", db=None, batch_size: int | None = None) -> "CompiledModel":
        """Compile for ``target`` (default: this CPU) and return a callable on numpy inputs.

        ``mode`` is ``"int8"`` (the realized integer model), ``"simulated"`` (fake-quant FP32) or
        ``"fp32"`` (the original model). ``db`` is a tuning database directory (see ``tvmquant tune``).
        ``batch_size`` compiles for another static batch than the one quantized (ONNX sources with a dynamic
        batch axis).
        """
        if batch_size is not None and batch_size != self.batch_size:
            return self.rebatch(batch_size).compile(target, mode, db)
        modules = {"int8": lambda: self.mod, "simulated": lambda: self.simulated, "fp32": lambda: self.fp32}
        if mode not in modules:
            raise ValueError(f"mode must be one of {sorted(modules)}, got {mode!r}")
        if mode == "fp32" and self.qdq is not None:
            raise ValueError("a pre-quantized (QDQ) model has no FP32 version; use mode='simulated'")
        mod = modules[mode]()
        from .compile import as_target, build

        target = as_target(target)
        device = None
        if target.kind.name == "cuda":
            if not tvm.cuda(0).exist:
                raise RuntimeError(
                    f"compile(target={target.kind.name!r}): this machine has no CUDA GPU to run the model on; write "
                    "a library with export_library / `tvmquant compile --target ...` and run it on the GPU host"
                )
            device = tvm.cuda(0)
        amx = target_has_amx(target)
        if amx:
            require_amx(f"compile(target={target_json(target)})")  # before minutes of building for nothing
        return CompiledModel(
            build(mod, target=target, db=db), self.inputs, device, output_names(mod), index_limits(mod), amx=amx
        )

    def report(self, path, data=None, bench=None, *, progress: bool = True, sensitivity_batches: int = 8) -> dict:
        """Write a self-contained HTML report: the per-layer table, activation histograms with the range each
        calibration method picks, per-channel weight ranges, a sensitivity chart, and, when given, the latency of a
        ``tvmquant bench`` JSON of this model (``bench``); see :mod:`tvmquant.report`. The twin of
        ``tvmquant report``.

        ``data`` is the calibration data (any form :func:`quantize` takes): artifacts keep calibrated ranges, not
        histograms, so the report recomputes them. Needs matplotlib (``pip install "tvmquant[report]"``).

        Examples
        --------
        >>> qmodel.report("report.html", data=calib)  # doctest: +SKIP
        """
        from .report import build_report

        return build_report(self, path, data, bench, progress=progress, sensitivity_batches=sensitivity_batches)

    def export_onnx(self, path, sample: dict | None = None, fused_adds: bool = False) -> None:
        """Write a standard QDQ ONNX model (QuantizeLinear/DequantizeLinear, per-channel int8 weights, int32
        biases) that ONNX Runtime runs and that computes this model's integer outputs; see :mod:`tvmquant.export`
        (``fused_adds=True``: residual adds as ``Add``, which ONNX Runtime runs approximately as ``QLinearAdd``)."""
        from .export import export_qdq

        if self.config.dynamic:
            raise ModelError(
                "a dynamically quantized model has no fixed activation scales to write as QuantizeLinear nodes; "
                "quantize it with calibration data (a static config) to export QDQ ONNX"
            )
        export_qdq(self, path, sample, fused_adds=fused_adds)

    def manifest(self) -> dict:
        return {
            "format": ARTIFACT_FORMAT,
            "versions": versions(),
            "inputs": [spec.to_dict() for spec in self.inputs],
            "config": self.config.to_dict(),
            "quant_table": {name: params.to_dict() for name, params in self.table.items()},
            "layers": [layer.__dict__ for layer in self.layers],
            "sqnr_db": self.sqnr,
            "bias_corrections": {name: np.asarray(v, np.float32).tolist() for name, v in self.bias_corrections.items()},
            **({"finetune": self.finetune_log} if self.finetune_log else {}),
        }

    def save(self, path, keep_source: bool = False) -> None:
        """Write the model as an artifact (``.tvmq``, a zip; see :mod:`tvmquant.artifact`).

        The artifact holds the manifest (config, quantization table, layers, versions) and the simulated module
        once, its constants as raw bytes: int8 weights for quantized layers, FP32 only where a layer stays FP32.
        The integer model is derived from it, bit for bit. The ONNX source (or, for a Relax source, the FP32
        module) is kept only with ``keep_source=True`` (CLI ``--keep-source``); otherwise the manifest records
        the source's path and SHA-256, and FP32 mode, :meth:`rebatch` and :meth:`export_onnx` read the file
        there. Saving the same model twice writes the same bytes.

        Examples
        --------
        >>> qmodel.save("model.tvmq")  # doctest: +SKIP
        >>> qmodel.save("model.tvmq", keep_source=True)  # doctest: +SKIP
        """
        from .artifact import module_members

        manifest = self.manifest()
        members: dict = {}
        modules: dict = {}
        stored = {"qdq": self.qdq} if self.qdq is not None else {"simulated": self.simulated}
        if self.qdq is None and self.config.dynamic:
            # A dynamic model's integer module comes from the annotated one, not from the simulated: keep it instead
            # (simulated mode rebuilds from the ONNX source on request).
            stored = {"int8": self.mod}
        if keep_source and self._source_kind == "relax":
            stored["fp32"] = self.fp32
        for key, mod in stored.items():
            module_files, modules[key] = module_members(key, mod)
            members.update(module_files)
        if keep_source and self._source_kind == "onnx":
            members["source.onnx"] = self.source
        manifest["modules"] = modules
        manifest["source"] = {
            "kind": self._source_kind,
            "kept": bool(keep_source),
            "file": self.source_file.to_dict() if self.source_file is not None else None,
        }
        members["manifest.json"] = json.dumps(manifest, indent=2, default=_json_default)
        atomic_write(path, lambda handle: write_zip(handle, members))


def load(path) -> QuantizedModel:
    """Load an artifact written by :meth:`QuantizedModel.save` (or ``tvmquant quantize -o``).

    Reads format 2 and the older format 1. Only the simulated module is read; the integer model is derived
    from it on first use, and the FP32 modules from the ONNX source when a request needs them.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactError(f"artifact {path!r} does not exist")
    try:
        return _load(path)
    except ArtifactError:
        raise
    except Exception as err:  # zlib, zipfile, JSON, TVM's JSON loader, a manifest missing fields: all one error
        detail = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {detail[-1] if detail else ''}"
        raise ArtifactError(
            f"{path!r} is damaged or not a tvmquant artifact ({detail[:300]}); write one with `tvmquant quantize -o`"
        ) from None


def _load(path: str) -> QuantizedModel:
    from .artifact import check_archive, read_format1, read_module

    try:
        with zipfile.ZipFile(path) as archive:
            check_archive(archive, repr(path))
            manifest = json.loads(archive.read("manifest.json"))
            artifact_format = manifest.get("format")
            if artifact_format not in READABLE_FORMATS:
                newer = isinstance(artifact_format, int) and artifact_format > ARTIFACT_FORMAT
                raise ArtifactError(
                    f"{path!r} has artifact format {artifact_format!r}; this tvmquant reads formats "
                    f"{list(READABLE_FORMATS)}: "
                    + ("upgrade tvmquant, or " if newer else "")
                    + "re-quantize the model with this version (`tvmquant quantize MODEL -o ARTIFACT`)"
                )
            if artifact_format == 1:
                stored = read_format1(archive)
            else:
                modules = manifest["modules"]
                stored = {key: read_module(archive, entry, repr(path)) for key, entry in modules.items()}
                if manifest["source"]["kind"] == "onnx" and manifest["source"]["kept"]:
                    stored["source"] = archive.read("source.onnx")
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
        raise ArtifactError(
            f"{path!r} is damaged or not a tvmquant artifact ({err}); write one with `tvmquant quantize -o`"
        ) from None
    try:
        table = {name: QParams.from_dict(data) for name, data in manifest["quant_table"].items()}
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path!r} has a corrupt quantization table: {err}") from None
    inputs = [InputSpec.from_dict(d) for d in manifest["inputs"]]
    config = QuantConfig.from_dict(manifest["config"])
    sqnr = manifest.get("sqnr_db", {})
    if artifact_format == 1:
        qmodel = QuantizedModel(
            stored["fp32"], stored["annotated"], table, config, inputs, stored["source"], sqnr, stored["qdq"]
        )
    else:
        qdq = stored.get("qdq")
        source_info = manifest["source"]
        source_file = SourceFile.from_dict(source_info["file"]) if source_info["file"] else None
        fp32 = qdq if qdq is not None else stored.get("fp32")
        qmodel = QuantizedModel(fp32, qdq, table, config, inputs, stored.get("source"), sqnr, qdq, source_file)
        qmodel._source_kind = source_info["kind"]
        qmodel._stored_layers = [LayerInfo(**layer) for layer in manifest["layers"]]
        if qdq is None and "simulated" in stored:
            qmodel.__dict__["simulated"] = stored["simulated"]  # the cached_property's value: nothing to derive
        if "int8" in stored:
            qmodel.__dict__["mod"] = stored["int8"]
    qmodel.bias_corrections = {
        name: np.asarray(vector, np.float32) for name, vector in manifest.get("bias_corrections", {}).items()
    }
    finetune_log = manifest.get("finetune")
    qmodel.finetune_log = dict(finetune_log) if isinstance(finetune_log, dict) else None
    qmodel._artifact = path
    return qmodel


class CompiledModel:
    """A compiled model callable on numpy arrays: ``model(x)`` or ``model({"input": x})``."""

    def __init__(
        self, executable, inputs, device=None, output_names: list | None = None, index_limits=None, amx: bool = False
    ):
        self.executable = executable
        self.inputs = inputs
        #: ``{input: rows}`` of index inputs (token ids), checked on every call: out of range would read past
        #: the table (TVM's gather does not check).
        self.index_limits = dict(index_limits or {})
        #: The model's output names, in the order calls return them.
        self.output_names = list(output_names or [])
        self.device = device or tvm.cpu()
        use_physical_cores()
        if amx:
            require_amx("this model (compiled for an AMX-INT8 target)")
        generate_machine_code(executable)
        self.vm = relax.VirtualMachine(executable, self.device)

    def __call__(self, *args, **kwargs):
        checked = check_inputs(feed_from_args(args, kwargs, self.inputs), self.inputs)
        if self.index_limits:
            check_index_range(checked, self.index_limits, "the call's")
        result = self.vm["main"](*[to_tensor(checked[spec.name], self.device) for spec in self.inputs])
        outputs = flatten_outputs(result)
        return outputs[0] if len(outputs) == 1 else outputs

    def export_library(self, path) -> None:
        atomic_write(path, lambda handle: None)  # validates the folder early
        self.executable.export_library(os.fspath(path))


@dataclass
class Summary:
    """Per-layer quantization report; ``str()`` gives a table."""

    rows: list
    outputs: dict

    def __str__(self) -> str:
        sources = [row.get("source") or "" for row in self.rows]
        width = min(max([len(name) for name in sources] + [0]), 40)
        source_header = f" {'ONNX node':<{width}}" if width else ""
        header = (
            f"{'layer':<24}{source_header} {'op':<20} {'dtype':<5} {'in scale':>10} {'in zp':>6} "
            f"{'w scale (min..max)':>22} {'SQNR dB':>8} {'own dB':>7}  note"
        )
        lines = [header, "-" * len(header)]
        for row, source in zip(self.rows, sources):
            scale = f"{row['input_scale'][0]:.4g}" if row["input_scale"] else "-"
            zero = str(row["input_zero_point"][0]) if row["input_zero_point"] else "-"
            weight = f"{row['weight_scale'][0]:.3g}..{row['weight_scale'][1]:.3g}" if row["weight_scale"] else "-"
            sqnr = f"{row['input_sqnr_db']:.1f}" if row["input_sqnr_db"] is not None else "-"
            own = f"{row['own_sqnr_db']:.1f}" if row.get("own_sqnr_db") is not None else "-"
            source_cell = f" {source:<{width}}" if width else ""
            lines.append(
                f"{row['layer']:<24}{source_cell} {row['op']:<20} {row['status']:<5} {scale:>10} {zero:>6} "
                f"{weight:>22} {sqnr:>8} {own:>7}  {row['reason']}"
            )
        quantized = sum(row["status"] == "int8" for row in self.rows)
        lines.append(f"{quantized} of {len(self.rows)} layers in INT8 (skip lists take either name)")
        for name, value in self.outputs.items():
            lines.append(f"output {name!r} SQNR vs FP32 on calibration data: {value:.1f} dB")
        if any(row.get("own_sqnr_db") is not None for row in self.rows):
            lines.append(
                "SQNR dB: the layer's input in the quantized model vs FP32 (errors of earlier layers included); "
                "own dB: its quantization alone"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"layers": self.rows, "outputs": self.outputs}


#: Key suffix in ``QuantizedModel.sqnr`` of a tensor's own quantization error (see :meth:`measure_sqnr`).
OWN_SQNR_SUFFIX = "@own"


class _SqnrTerms:
    """Signal and noise sums per tensor: :meth:`keep` records a run's FP32 activations, :meth:`simulate`
    fake-quantizes every quantized tensor of the next run in place and compares it with what was kept."""

    def __init__(self, table: dict):
        self.table = table
        self.kept: dict = {}
        self.signal: dict = {}
        self.noise: dict = {}

    def _sum(self, name: str, sums: tuple[float, float]) -> None:
        self.signal[name] = self.signal.get(name, 0.0) + sums[0]
        self.noise[name] = self.noise.get(name, 0.0) + sums[1]

    def add(self, name: str, ref, app) -> None:
        # One compiled pass over both (float64 sums; numpy's float32 dot products for small or odd arrays, at a
        # relative error of at most ~0.5% of the sum, far below what the summary's 0.1 dB shows).
        self._sum(name, fake_quantize_error(np.asarray(app), np.asarray(ref)))

    def keep(self, name: str, array: np.ndarray, copy: bool = True) -> None:
        """Keep an FP32 activation, and add its own error (its values through its own quantize/dequantize);
        ``copy=False``: ``array`` is the caller's to give (calibration's kept copy)."""
        params = self.table.get(name)
        if params is not None and params.role == Role.ACTIVATION:
            self.kept[name] = array.copy() if copy else array
            self._sum(f"{name}{OWN_SQNR_SUFFIX}", fake_quantize_error(array, array, _fq_params(params)))

    def per_tensor(self, name: str) -> bool:
        """Whether ``name``'s values are fake-quantized alike in any layout (per-tensor, or not quantized)."""
        params = self.table.get(name)
        return params is None or params.axis is None

    def simulate(self, name: str, array: np.ndarray) -> None:
        params = self.table.get(name)
        if params is None:
            return
        if name in self.kept:  # fake-quantize in place and compare, in one pass
            self._sum(name, fake_quantize_error(array, self.kept.pop(name), _fq_params(params), write=True))
        else:
            array[...] = fake_quantize(array, *_fq_params(params))

    def compare(self, name: str, array: np.ndarray) -> None:
        """Compare a simulated activation (from a simulated model's observe markers) with the kept one."""
        if name in self.kept:
            self.add(name, self.kept.pop(name), array)


def _fq_params(params: QParams) -> tuple:
    """``fake_quantize``'s parameters after the array: ``(scale, zero_point, qmin, qmax, axis)``."""
    return params.scale, params.zero_point, params.qmin, params.qmax, params.axis


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


__all__ = ["quantize", "pipeline", "load", "QuantizedModel", "CompiledModel", "Summary", "LayerInfo", "ArtifactError"]
