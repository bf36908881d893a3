"""Where MobileNetV2's post-training error comes from: its weights or its activations, and what per-channel
activation scales on the inputs of its depthwise convs would buy.

Quantizes the model with the default config on the 84 calibration images, then scores the simulated (fake-quant)
model on the 110 evaluation photos (FP32-vs-INT8 top-1 agreement, logit SQNR) with its quantization table changed
one way at a time:

``default``
    the table as calibrated (uint8 affine activations at the 99.99th percentile, per-channel int8 weights).
``weights at 32 bits``
    every weight fake-quantized to int32 over its own range instead (about FP32): what is left is the
    activations' error.
``depthwise inputs, per-tensor max``
    the input of each depthwise conv scaled to its observed maximum (FP32 activations, ONNX Runtime, the 84
    images), one scale per tensor: the reference for the next row.
``depthwise inputs, per-channel max``
    the same maxima, one scale per channel. A depthwise conv's output channel reads only its own input
    channel, so the per-channel input scale folds into that channel's requantize multiplier: no run-time cost
    in the integer model (``QuantConfig(depthwise_per_channel=True)`` realizes it; this is the simulated model).

Prepare as for ``bench/accuracy_imagenet.py``. Run: ``python bench/activation_error.py [-o
bench/results/activation_error.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))

from imagenet_data import prepared_model  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.api import QuantizedModel  # noqa: E402
from tvmquant.qparams import QParams, Role  # noqa: E402
from tvmquant.quant_math import sqnr_db  # noqa: E402
from tvmquant.target import host_mcpu  # noqa: E402


def depthwise_inputs(qmodel, model) -> list:
    """``(tvmquant tensor name, ONNX tensor name)`` of each quantized depthwise conv's input."""
    nodes = {node.name: node for node in model.graph.node}
    found = []
    for layer in qmodel.layers:
        node = nodes.get(layer.source)
        if node is None or node.op_type != "Conv" or not layer.quantized:
            continue
        if any(attr.name == "group" and attr.i > 1 for attr in node.attribute):
            found.append((layer.inputs[0], node.input[0]))
    return found


def channel_maxima(path: str, tensors: list, images: np.ndarray) -> dict:
    """Per-channel maximum of each ONNX tensor over ``images`` (FP32, ONNX Runtime)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    for name in tensors:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    maxima: dict = {}
    for start in range(0, len(images), 4):
        outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images[start : start + 4]})))
        for name in tensors:
            value = outputs[name].max(axis=(0, 2, 3))
            maxima[name] = value if name not in maxima else np.maximum(maxima[name], value)
    return maxima


def at_32_bits(params: QParams) -> QParams:
    """``params``' tensor fake-quantized to int32 over the same range: about FP32."""
    low, high = np.asarray(params.a_min, np.float32), np.asarray(params.a_max, np.float32)
    scale = np.maximum((high - low) / 4.0e9, 1e-12).astype(np.float32)
    zero = np.zeros(scale.shape, np.int32)
    return QParams(
        params.name, params.role, "int32", "affine", scale, zero, -(2**31), 2**31 - 1, params.axis, low, high
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=None, help="JSON to write")
    args = parser.parse_args(argv)
    import onnx

    path, calib, photos = prepared_model("mobilenet_v2")
    qmodel = tvmquant.quantize(path, calib_data=calib, progress=False, report_batches=0)
    reference_model = qmodel.compile(mode="fp32")
    reference = np.concatenate([np.asarray(reference_model(image[None])) for image in photos])

    def score(table) -> dict:
        model = QuantizedModel(qmodel.fp32, qmodel.annotated, table, qmodel.config, qmodel.inputs, qmodel.source)
        compiled = model.compile(mode="simulated")
        logits = np.concatenate([np.asarray(compiled(image[None])) for image in photos]).reshape(reference.shape)
        return {
            "agreement_pct": round(float(np.mean(reference.argmax(1) == logits.argmax(1)) * 100), 1),
            "logit_sqnr_db": round(sqnr_db(reference, logits), 2),
        }

    inputs = depthwise_inputs(qmodel, onnx.load(path, load_external_data=False))
    maxima = channel_maxima(path, [onnx_name for _, onnx_name in inputs], calib)
    spec = qmodel.config.activation
    rows = {"default": score(dict(qmodel.table))}
    weights = {n: at_32_bits(p) if p.role == Role.WEIGHT else p for n, p in qmodel.table.items()}
    rows["weights at 32 bits"] = score(weights)
    for label, per_channel in (
        ("depthwise inputs, per-tensor max", False),
        ("depthwise inputs, per-channel max", True),
    ):
        table = dict(qmodel.table)
        for name, onnx_name in inputs:
            high = maxima[onnx_name].astype(np.float32)
            if per_channel:
                table[name] = QParams.from_range(name, Role.ACTIVATION, spec, np.zeros_like(high), high, axis=1)
            else:
                table[name] = QParams.from_range(name, Role.ACTIVATION, spec, 0.0, float(high.max()))
        rows[label] = score(table)
    for label, row in rows.items():
        print(f"{label}: {row['agreement_pct']}% agreement, {row['logit_sqnr_db']} dB", flush=True)
    result = {
        "machine": {"mcpu": host_mcpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "model": "mobilenet_v2",
        "calibration_images": len(calib),
        "evaluation_images": len(photos),
        "depthwise_convs": len(inputs),
        "simulated": rows,
        "command": "python bench/activation_error.py -o bench/results/activation_error.json",
    }
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
