"""Quantization-aware fine-tuning in TVM: :func:`finetune`.

The simulated model's fake quantizers get straight-through gradients (:mod:`tvmquant.passes.qat`), TVM's
``Gradient`` pass builds the backward graph, and the training graph is compiled for this CPU through the project's
one build path (:func:`tvmquant.compile.host_build`: default schedules, not naive loops). Each step runs forward
and backward in TVM; the FP32 master weights (and, with ``learn_scales``, the LSQ step sizes and LSQ+ zero points)
are updated on the host by Adam. The trained model goes through the same ``BindQuantParams`` -> ``RealizeQuant``
flow as a post-training one, so the integer model still equals the simulated one within 1 LSB.

Optimizer: Adam (beta 0.9/0.999) with a cosine-decayed learning rate, and each tensor's step relative to its own
size (the update is ``lr * rms(initial tensor) * adam_direction``, Adafactor's parameter scaling; a scale's step
is relative to that scale, a zero point moves ``10 * lr`` integer steps at most). One ``lr`` then fits weights,
biases and step sizes alike. Adam normalises gradients, so LSQ's gradient scale ``1/sqrt(N*Qp)`` (which the
graph applies, see :mod:`tvmquant.passes.qat`) matters little here; the relative step plays its role.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import tvm
from tvm import relax

from ._compat import structural_hash, to_tensor
from .artifact import ArtifactError
from .frontend.prepare import ModelError
from .passes.qat import LOSSES, apply_trained, strip_markers, training_module
from .quant_math import DTYPE_RANGES
from .threads import generate_machine_code, use_physical_cores

#: Largest default training batch.
DEFAULT_BATCH = 32

_BUILDS: dict = {}  # structural hash -> executable: a second run on the same graph (another lr, seed) skips the build


def _build(mod):
    from .compile import host_build

    key = structural_hash(mod)
    if key not in _BUILDS:
        if len(_BUILDS) >= 8:
            _BUILDS.pop(next(iter(_BUILDS)))
        _BUILDS[key] = host_build(mod)
    return _BUILDS[key]


class FinetuneError(ValueError):
    """Fine-tuning stopped; ``last_good`` holds the model from the last step whose loss was finite (or None)."""

    def __init__(self, message: str, last_good=None, step: int | None = None):
        super().__init__(message)
        self.last_good = last_good
        self.step = step


def _check_hyper(epochs, lr, batch_size, loss, labels):
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr (learning rate) must be a finite number > 0, got {lr!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if labels is None:
        loss = loss or "mse"
        if loss not in ("mse", "kl"):
            raise ValueError(f"loss without labels (distillation) must be 'mse' or 'kl', got {loss!r}")
    else:
        loss = loss or "cross_entropy"
        if loss != "cross_entropy":
            raise ValueError(f"with labels the loss is cross-entropy; got loss={loss!r} (drop labels to distil)")
    assert loss in LOSSES
    return loss


def _as_arrays(data, inputs) -> dict:
    """``{input name: array (N, ...)}``, checked against the model's per-sample shapes."""
    if hasattr(data, "keys") and len(inputs) == 1 and len(data) == 1 and inputs[0].name not in data:
        data = next(iter(data.values()))  # one array (np.savez(path, x)) for a one-input model
    if isinstance(data, np.ndarray) or not hasattr(data, "keys"):
        if len(inputs) != 1:
            raise ValueError(f"the model has {len(inputs)} inputs; give data as a dict {{input name: array}}")
        data = {inputs[0].name: data}
    arrays = {}
    for spec in inputs:
        if spec.name not in data:
            raise ValueError(f"data has no array for input {spec.name!r} (it has {sorted(data)})")
        array = np.asarray(data[spec.name])
        if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]):
            raise ValueError(
                f"data for input {spec.name!r} has shape {array.shape}; the model expects (N, "
                f"{', '.join(str(d) for d in spec.shape[1:])}) with samples on axis 0"
            )
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"data for input {spec.name!r} has dtype {array.dtype}; give numbers ({spec.dtype})")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"data for input {spec.name!r} holds NaN or infinite values")
        arrays[spec.name] = array.astype(spec.dtype, copy=False)
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"the inputs hold different sample counts {counts}")
    extra = sorted(set(data) - {spec.name for spec in inputs})
    if extra:
        raise ValueError(f"data has arrays {extra} that are not inputs of the model ({[s.name for s in inputs]})")
    return arrays


def _check_labels(labels, count: int, output_shape: tuple) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.shape[0] != count:
        raise ValueError(f"labels has {labels.shape[0]} entries but data has {count} samples; give one per sample")
    if len(output_shape) != 2:
        raise ValueError(f"labels need a model with (batch, classes) output; this one returns {output_shape}")
    classes = output_shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"labels range over [{labels.min()}, {labels.max()}] but the model has {classes} classes (0..{classes - 1})"
        )
    return labels.astype(np.int64)


def _annotated_at(qmodel, batch: int):
    """The annotated and the FP32 model at the training batch."""
    if batch == qmodel.batch_size:
        return qmodel.annotated, qmodel.fp32
    try:
        rebatched = qmodel.rebatch(batch)
        return rebatched.annotated, rebatched.fp32
    except (ModelError, ArtifactError) as err:
        raise ValueError(
            f"batch_size={batch}: the model is quantized for batch {qmodel.batch_size} and cannot be recompiled for "
            f"another ({err}); use batch_size={qmodel.batch_size}"
        ) from None


def _step_unit(parameter) -> np.ndarray:
    """What one unit of the relative learning rate moves ``parameter`` by (see the module docstring)."""
    value = parameter.value
    if parameter.kind == "scale":
        return np.abs(value).astype(np.float32)
    if parameter.kind == "zero_point":
        return np.float32(10.0)
    rms = float(np.sqrt(np.mean(np.square(value, dtype=np.float64)))) if value.size else 0.0
    return np.float32(max(rms, 1e-3))


def _project(parameter, value: np.ndarray) -> np.ndarray:
    """Keep step sizes positive and zero points inside the integer range."""
    if parameter.kind == "scale":
        return np.maximum(value, parameter.value * np.float32(1e-3))
    if parameter.kind == "zero_point":
        return np.clip(value, parameter.params.qmin, parameter.params.qmax)
    return value


def finetune(
    qmodel,
    data,
    labels=None,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int | None = None,
    learn_scales: bool = True,
    train_weights: bool = True,
    loss: str | None = None,
    seed: int = 0,
    progress: bool = True,
    report_batches: int = 8,
):
    """Fine-tune a quantized model with fake quantization (QAT), optionally learning its quantizers (LSQ).

    Parameters
    ----------
    qmodel : QuantizedModel
        Quantized from FP32 (``tvmquant.quantize`` or ``tvmquant.load``); its table initialises the quantizers.
        Left untouched.
    data : np.ndarray or dict of str to np.ndarray
        Training inputs, samples on axis 0 (unlabelled calibration images suffice).
    labels : np.ndarray of int, optional
        One class index per sample: train with cross-entropy. Without labels the model distils from its own
        FP32 version's outputs (``loss``).
    epochs : int
        Passes over ``data`` (shuffled each epoch; a last partial batch is dropped).
    lr : float
        Relative learning rate of Adam (see the module docstring), cosine-decayed to 0. The default suits a
        pre-trained model at 8 bits: on MobileNetV2 (84 images, KL loss, 4 epochs) 1e-4 gained 3.6 points of
        agreement with FP32, 3e-4 lost 7 and 1e-3 lost 23 (``bench/finetune_imagenet.py``). A model quantized
        to 4 bits starts further off and takes more (Fashion-MNIST W4A4: 3e-3).
    batch_size : int, optional
        Samples per step (default ``min(32, N)``); needs an ONNX source with a dynamic batch axis unless it is the
        model's own batch.
    learn_scales : bool
        Learn the step sizes (LSQ: per channel for weights, per tensor for activations) and affine zero points
        (LSQ+); else the calibrated ones stay fixed.
    train_weights : bool
        Train the FP32 weights of the quantized layers; ``False`` trains only their biases and (with
        ``learn_scales``) the quantizers. Far fewer parameters, so it tolerates higher rates: on MobileNetV2 at
        ``lr=1e-3`` it gained where training the weights lost 23 points. At the default rate, training the
        weights did better there (89.1% against 86.4% agreement; the README's fine-tuning results).
    loss : {'mse', 'kl'}, optional
        Distillation loss without labels (default ``'mse'`` on the outputs; ``'kl'`` on their softmax).
    seed : int
        Shuffling seed.
    progress : bool
        Show a progress bar (epoch, loss).
    report_batches : int
        Batches of ``data`` used to measure the new model's SQNR for ``summary()`` (0: skip).

    Returns
    -------
    QuantizedModel
        A new model: trained FP32 weights, learned scales and zero points in its table (what the artifact,
        ``summary()`` and the QDQ export show). ``finetune_log`` holds the loss per epoch (``loss``) and per
        step (``loss_history``); the artifact keeps it, and the report draws it.

    Raises
    ------
    FinetuneError
        When the loss turns NaN or infinite; the message says at which step, ``last_good`` holds the model of the
        last finite step.

    Examples
    --------
    >>> tuned = tvmquant.finetune(qmodel, calib_images, epochs=4)  # doctest: +SKIP
    >>> tuned.save("tuned.tvmq", keep_source=True)  # doctest: +SKIP
    """
    loss = _check_hyper(epochs, lr, batch_size, loss, labels)
    if qmodel.qdq is not None:
        raise ModelError("a pre-quantized (QDQ) model has no FP32 weights to fine-tune; quantize the FP32 model")
    if not qmodel.table or not any(layer.quantized for layer in qmodel.layers):
        raise ModelError("the model has no quantized layer to fine-tune (every layer stays FP32)")
    arrays = _as_arrays(data, qmodel.inputs)
    count = next(iter(arrays.values())).shape[0]
    batch = batch_size or min(DEFAULT_BATCH, count)
    if count < batch:
        raise ValueError(f"batch_size={batch} is larger than the {count} samples given; use {count} or less")
    annotated, fp32 = _annotated_at(qmodel, batch)
    graph = training_module(annotated, qmodel.table, loss, learn_scales, train_weights)
    if labels is not None:
        labels = _check_labels(labels, count, graph.output_shape)

    from .passes.calibrate import compile_vm, run_vm

    timing = {"start": time.perf_counter()}
    names = [spec.name for spec in qmodel.inputs]
    # Teacher: the FP32 model at the training batch (not the annotated graph's: bias corrections change it).
    targets = None
    if labels is None:
        teacher = compile_vm(fp32, build=lambda mod, target: _build(mod))
        outputs = []
        for start in range(0, count - batch + 1, batch):
            feed = {name: arrays[name][start : start + batch] for name in names}
            outputs.append(run_vm(teacher, feed, qmodel.inputs).numpy())
        rest = count % batch
        if rest:  # the last samples, in a batch that overlaps the one before
            feed = {name: arrays[name][count - batch :] for name in names}
            outputs.append(run_vm(teacher, feed, qmodel.inputs).numpy()[batch - rest :])
        targets = np.concatenate(outputs).astype(np.float32)
        if loss == "kl":
            shifted = targets - targets.max(axis=-1, keepdims=True)
            targets = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
        del teacher
    timing["teacher"] = time.perf_counter()
    executable = _build(graph.mod)
    use_physical_cores()
    generate_machine_code(executable)  # LLVM's machine code, on every core (else lazily, on one, in the VM)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    step_fn = vm["main_adjoint"]
    timing["build"] = time.perf_counter()

    params = [p.value.copy() for p in graph.parameters]
    units = [_step_unit(p) for p in graph.parameters]
    first_moment = [np.zeros_like(v) for v in params]
    second_moment = [np.zeros_like(v) for v in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    steps_per_epoch = count // batch
    total = steps_per_epoch * int(epochs)
    rng = np.random.default_rng(seed)
    log = {"loss": [], "loss_history": [], "steps": total, "batch_size": batch, "loss_kind": loss}
    step_seconds = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="finetune", unit="step", leave=False)
    previous = [v.copy() for v in params]
    step = 0
    try:
        for epoch in range(int(epochs)):
            order = rng.permutation(count)
            epoch_losses = []
            for index in range(steps_per_epoch):
                rows = order[index * batch : (index + 1) * batch]
                feed = [to_tensor(np.ascontiguousarray(arrays[name][rows])) for name in names]
                if labels is not None:
                    target = np.zeros(graph.output_shape, np.float32)
                    target[np.arange(batch), labels[rows]] = 1.0
                else:
                    target = targets[rows]
                tick = time.perf_counter()
                result = step_fn(*feed, to_tensor(np.ascontiguousarray(target)), *[to_tensor(v) for v in params])
                value = float(result[0].numpy())
                grads = [g.numpy() for g in result[1]]
                step_seconds += time.perf_counter() - tick
                if not math.isfinite(value) or not all(np.all(np.isfinite(g)) for g in grads):
                    good = _result(qmodel, graph, previous, log, arrays, 0)
                    raise FinetuneError(
                        f"the loss turned {'NaN' if math.isnan(value) else 'non-finite'} at step {step + 1} of "
                        f"{total} (epoch {epoch + 1}, batch {index + 1}); stopped, the weights of step {step} are "
                        f"kept (FinetuneError.last_good); lower the learning rate (lr={lr})",
                        good,
                        step + 1,
                    )
                if loss == "kl":
                    probs = target
                    value += float(np.sum(probs * np.log(np.maximum(probs, 1e-30))) / batch)
                epoch_losses.append(value)
                log["loss_history"].append(value)  # per step: the report's loss curve
                previous = [v.copy() for v in params]
                rate = lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
                t = step + 1
                for i, grad in enumerate(grads):
                    first_moment[i] = beta1 * first_moment[i] + (1 - beta1) * grad
                    second_moment[i] = beta2 * second_moment[i] + (1 - beta2) * grad * grad
                    m_hat = first_moment[i] / (1 - beta1**t)
                    v_hat = second_moment[i] / (1 - beta2**t)
                    update = rate * units[i] * m_hat / (np.sqrt(v_hat) + eps)
                    params[i] = _project(graph.parameters[i], (params[i] - update).astype(np.float32))
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{value:.4g}")
            log["loss"].append(float(np.mean(epoch_losses)))
        # Where the time went: the FP32 teacher's outputs, compiling the training graph (to machine code),
        # TVM's forward+backward steps, and the host's optimizer updates (the rest of the loop).
        loop = time.perf_counter() - timing["build"]
        log["seconds"] = {
            "teacher": round(timing["teacher"] - timing["start"], 2),
            "build": round(timing["build"] - timing["teacher"], 2),
            "tvm_steps": round(step_seconds, 2),
            "host_updates": round(loop - step_seconds, 2),
        }
    finally:
        if bar is not None:
            bar.close()
    # The last update may itself have gone non-finite: check before building the model.
    if not all(np.all(np.isfinite(v)) for v in params):
        good = _result(qmodel, graph, previous, log, arrays, 0)
        raise FinetuneError(
            f"the weights turned non-finite at step {step}; the weights of step {step - 1} are kept "
            f"(FinetuneError.last_good); lower the learning rate (lr={lr})",
            good,
            step,
        )
    return _result(qmodel, graph, params, log, arrays, report_batches)


def _result(qmodel, graph, values, log, arrays, report_batches):
    """The new QuantizedModel from trained parameter values."""
    from .api import QuantizedModel

    weights, biases, scales, zeros = {}, {}, {}, {}
    for parameter, value in zip(graph.parameters, values):
        if parameter.kind == "weight":
            weights[parameter.tensor] = value.astype(np.float32)
        elif parameter.kind == "bias":
            biases[parameter.tensor] = value.reshape(parameter.original_shape).astype(np.float32)
        elif parameter.kind == "scale":
            scales[parameter.tensor] = value
        else:
            zeros[parameter.tensor] = value
    table = {}
    for name, params in qmodel.table.items():
        if name not in scales:
            table[name] = params
            continue
        scale = np.asarray(scales[name], np.float32).reshape(params.scale.shape)
        low, high = DTYPE_RANGES[params.dtype]
        zero = params.zero_point
        if name in zeros:
            zero = np.clip(np.round(zeros[name]).reshape(params.zero_point.shape), low, high).astype(np.int32)
        a_min = ((params.qmin - zero.astype(np.float64)) * scale).astype(np.float32)
        a_max = ((params.qmax - zero.astype(np.float64)) * scale).astype(np.float32)
        table[name] = dataclasses.replace(params, scale=scale, zero_point=zero, a_min=a_min, a_max=a_max)
    annotated = apply_trained(qmodel.annotated, weights, biases)
    source = _updated_onnx(qmodel, weights, biases) if qmodel.source is not None else None
    new = QuantizedModel(strip_markers(annotated), annotated, table, qmodel.config, list(qmodel.inputs), source)
    new._source_kind = "onnx" if source is not None else "relax"
    new.finetune_log = dict(log)
    if report_batches:
        import warnings

        from ._io import InputNameNotice

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputNameNotice)
            new.measure_sqnr(_model_batches(arrays, qmodel), report_batches)
    return new


def _model_batches(arrays: dict, qmodel):
    batch = qmodel.batch_size or 1
    count = next(iter(arrays.values())).shape[0]
    return [
        {name: array[start : start + batch] for name, array in arrays.items()}
        for start in range(0, count - batch + 1, batch)
    ]


def _updated_onnx(qmodel, weights: dict, biases: dict) -> bytes | None:
    """The ONNX source with trained weights and biases, matched to its initializers by their original values
    (as the QDQ export matches them); None if some trained tensor has no initializer to go to."""
    import onnx
    from onnx import numpy_helper

    from .passes.qat import scan

    original_weights, original_biases = scan(qmodel.annotated, qmodel.table)
    model = onnx.load_from_string(qmodel.source)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    replaced = set()

    def put(init_name, array):
        init = inits[init_name]
        new = numpy_helper.from_array(array.astype(numpy_helper.to_array(init).dtype), init_name)
        init.CopyFrom(new)

    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        as_relax = weight.T if trans_b else weight
        match = next(
            (
                name
                for name, value in original_weights.items()
                if name not in replaced and value.shape == as_relax.shape and np.array_equal(value, as_relax)
            ),
            None,
        )
        if match is None:
            continue
        if match in weights:
            trained = weights[match]
            put(node.input[1], trained.T if trans_b else trained)
        replaced.add(match)
        layer = match.rsplit(".", 1)[0]
        if layer not in biases:
            continue
        bias_name = None
        if len(node.input) > 2 and node.input[2] in inits:
            bias_name = node.input[2]
        elif node.op_type == "MatMul" and len(consumers.get(node.output[0], [])) == 1:
            add, position = consumers[node.output[0]][0]
            other = add.input[1 - position]
            if add.op_type == "Add" and other in inits:
                bias_name = other
        if bias_name is None:
            return None
        onnx_bias = numpy_helper.to_array(inits[bias_name])
        if onnx_bias.size != original_biases[layer].size:
            return None
        put(bias_name, biases[layer].reshape(onnx_bias.shape))
        replaced.add(layer + ".bias")
    if set(weights) - replaced or {layer + ".bias" for layer in biases} - replaced:
        return None
    return model.SerializeToString()


__all__ = ["FinetuneError", "finetune"]
