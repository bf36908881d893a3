"""MobileNetV2's quantization error, tensor by tensor: which weights and activations cost the most, and what
per-channel scales at depthwise inputs and a better rounding of the depthwise weights would buy.

The default config's table (84 calibration images) is applied to the FP32 ONNX model as fake quantization: each
quantized activation gets a QuantizeLinear/DequantizeLinear pair in front of the layers tvmquant feeds it to, each
quantized weight is replaced by its fake-quantized value, and ONNX Runtime runs the result with its graph
optimizations off (so it computes the QDQ definition in FP32, not its own fused integer kernels). That reproduces
tvmquant's simulated model (default: 76.4% / 12.98 dB here, against 77.3% / 12.97 dB from
``bench/activation_error.py``) in about a second per variant, so every tensor can be scored alone. Scores: FP32-vs-
INT8 top-1 agreement and logit SQNR on the 110 evaluation photos.

Rows: the whole table; weights only (activations FP32); activations only; each activation alone and each
weight alone (the ten costliest of each); the depthwise inputs per channel (per-channel 99.99th percentiles of
the FP32 activations on the calibration images, as ``depthwise_per_channel`` calibrates them); the depthwise
weights rounded to minimise each channel's output error on the calibration images (all 2^9 up/down choices of a
3x3 channel, cost ``d^T E[p p^T] d`` for the weight error ``d`` and the input patches ``p``); and both.

Prepare as for ``bench/accuracy_imagenet.py``. Run: ``python bench/error_budget.py [-o
bench/results/error_budget.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))

from imagenet_data import prepared_model  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.config import TensorSpec  # noqa: E402
from tvmquant.qparams import QParams, Role  # noqa: E402
from tvmquant.quant_math import fake_quantize, sqnr_db  # noqa: E402
from tvmquant.target import host_mcpu  # noqa: E402


class FakeQuantOnnx:
    """The ONNX model with a tvmquant table applied as fake quantization, run by ONNX Runtime."""

    def __init__(self, model, layers, images):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        self.model, self.layers, self.images = model, [layer for layer in layers if layer.quantized], images
        self.nodes = {node.name: node for node in model.graph.node}
        self.weights = {init.name: init for init in model.graph.initializer}
        self.reference = self.run(model)

    def run(self, model) -> np.ndarray:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate(
            [session.run(None, {name: self.images[i : i + 22]})[0] for i in range(0, len(self.images), 22)]
        )

    def source_tensor(self, layer, tensor: str) -> str:
        """The ONNX tensor a tvmquant activation name (``conv2d_3.in0``) stands for, read by ``layer``."""
        return self.nodes[layer.source].input[int(tensor.rsplit(".in", 1)[1])]

    def weight_value(self, layer) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.weights[self.nodes[layer.source].input[1]]).astype(np.float64)

    def build(self, table: dict, fp32=(), weights=None):
        """The fake-quantized model; names in ``fp32`` stay FP32; ``weights`` replaces weights by value."""
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        nodes = {node.name: node for node in model.graph.node}
        inits = {init.name: init for init in model.graph.initializer}
        inserted, done = [], {}
        for layer in self.layers:
            node = nodes[layer.source]
            if layer.weight and layer.weight not in fp32:
                init = inits[node.input[1]]
                value = (weights or {}).get(layer.weight)
                if value is None:
                    value = _fake_quantize_weight(numpy_helper.to_array(init).astype(np.float64), table[layer.weight])
                init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
            for tensor in layer.inputs:
                if tensor in fp32:
                    continue
                if tensor in done:  # the same quantized tensor, read by another layer (a residual add)
                    source, dequantized = done[tensor]
                    for position, name in enumerate(node.input):
                        if name == source:
                            node.input[position] = dequantized
                    continue
                params, source = table[tensor], self.source_tensor(layer, tensor)
                base = tensor.replace(".", "_")
                scale = np.asarray(params.scale, np.float32)
                zero_dtype = np.uint8 if params.dtype == "uint8" else np.int8
                model.graph.initializer.extend(
                    [
                        numpy_helper.from_array(scale, base + "_s"),
                        numpy_helper.from_array(np.asarray(params.zero_point).astype(zero_dtype), base + "_z"),
                    ]
                )
                axis = {"axis": int(params.axis)} if scale.ndim else {}
                names = [base + "_s", base + "_z"]
                inserted.append(
                    (
                        node,
                        [
                            helper.make_node("QuantizeLinear", [source, *names], [base + "_q"], **axis),
                            helper.make_node("DequantizeLinear", [base + "_q", *names], [base + "_dq"], **axis),
                        ],
                    )
                )
                node.input[int(tensor.rsplit(".in", 1)[1])] = base + "_dq"
                done[tensor] = (source, base + "_dq")
        for node, pair in inserted:
            position = list(model.graph.node).index(node)
            for offset, new in enumerate(pair):
                model.graph.node.insert(position + offset, new)
        return model

    def score(self, table, fp32=(), weights=None) -> dict:
        logits = self.run(self.build(table, fp32, weights))
        return {
            "agreement_pct": round(float(np.mean(self.reference.argmax(1) == logits.argmax(1)) * 100), 1),
            "logit_sqnr_db": round(float(sqnr_db(self.reference, logits)), 2),
        }

    def activations(self, names: dict, images: np.ndarray) -> dict:
        """FP32 values of ONNX tensors ``{tvmquant name: ONNX name}`` on ``images``."""
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for onnx_name in names.values():
            model.graph.output.append(helper.make_tensor_value_info(onnx_name, TensorProto.FLOAT, None))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = [output.name for output in session.get_outputs()]
        values: dict = {name: [] for name in names}
        for start in range(0, len(images), 21):
            run = dict(zip(outputs, session.run(None, {session.get_inputs()[0].name: images[start : start + 21]})))
            for name, onnx_name in names.items():
                values[name].append(run[onnx_name])
        return {name: np.concatenate(chunks) for name, chunks in values.items()}


def _fake_quantize_weight(weight: np.ndarray, params: QParams) -> np.ndarray:
    scale = np.asarray(params.scale, np.float64)
    axis = params.axis
    if axis is not None and weight.shape[axis] != scale.size:  # Gemm with transB: tvmquant's axis 1 is ONNX's 0
        axis = next(d for d in range(weight.ndim) if weight.shape[d] == scale.size)
    return fake_quantize(weight, scale, params.zero_point, params.qmin, params.qmax, axis)


def round_depthwise(weight: np.ndarray, params: QParams, values: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """``weight`` ([C, 1, 3, 3]) quantized with the rounding of each channel that minimises ``d^T E[p p^T] d``."""
    x = np.pad(values.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    channels = weight.shape[0]
    height = (x.shape[2] - 3) // stride + 1
    width = (x.shape[3] - 3) // stride + 1
    taps = [
        x[:, :, i : i + stride * height : stride, j : j + stride * width : stride] for i in range(3) for j in range(3)
    ]
    patches = np.moveaxis(np.stack(taps, -1), 1, 0).reshape(channels, -1, 9)
    moments = np.matmul(patches.transpose(0, 2, 1), patches) / patches.shape[1]
    flat = weight.reshape(channels, 9)
    scale = np.asarray(params.scale, np.float64).reshape(channels, 1)
    choices = np.array(list(itertools.product((0.0, 1.0), repeat=9)))
    rounded = np.empty_like(flat)
    for c in range(channels):
        q = np.clip(np.floor(flat[c] / scale[c]) + choices, params.qmin, params.qmax)
        error = q * scale[c] - flat[c]
        rounded[c] = q[np.argmin(np.einsum("ki,ij,kj->k", error, moments[c], error))] * scale[c]
    return rounded.reshape(weight.shape)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=None, help="JSON to write")
    args = parser.parse_args(argv)
    import onnx

    path, calib, photos = prepared_model("mobilenet_v2")
    qmodel = tvmquant.quantize(path, calib_data=calib, progress=False, report_batches=0)
    table = dict(qmodel.table)
    sim = FakeQuantOnnx(onnx.load(path), qmodel.layers, photos)
    activations = {n for n, p in table.items() if p.role == Role.ACTIVATION}
    weights = {n for n, p in table.items() if p.role == Role.WEIGHT}
    rows = {
        "default": sim.score(table),
        "weights only (activations FP32)": sim.score(table, activations),
        "activations only (weights FP32)": sim.score(table, weights),
    }
    print(rows, flush=True)
    alone = {}
    for name in sorted(activations | weights):
        alone[name] = sim.score(table, (activations | weights) - {name})["logit_sqnr_db"]
    costliest = lambda names: dict(sorted(((n, alone[n]) for n in names), key=lambda item: item[1])[:10])  # noqa: E731
    depthwise = [
        layer
        for layer in sim.layers
        if layer.op_type == "conv2d" and any(a.name == "group" and a.i > 1 for a in sim.nodes[layer.source].attribute)
    ]
    values = sim.activations({layer.inputs[0]: sim.source_tensor(layer, layer.inputs[0]) for layer in depthwise}, calib)
    per_channel = dict(table)
    spec = TensorSpec("uint8", "affine")
    for layer in depthwise:
        name = layer.inputs[0]
        channels = np.moveaxis(values[name], 1, 0).reshape(values[name].shape[1], -1)
        high = np.percentile(channels, 99.99, axis=1).astype(np.float32)
        per_channel[name] = QParams.from_range(name, Role.ACTIVATION, spec, np.zeros_like(high), high, axis=1)
    rounded = {}
    for layer in depthwise:
        attrs = {a.name: a for a in sim.nodes[layer.source].attribute}
        rounded[layer.weight] = round_depthwise(
            sim.weight_value(layer),
            table[layer.weight],
            values[layer.inputs[0]],
            attrs["strides"].ints[0],
            attrs["pads"].ints[0],
        )
    rows["depthwise inputs per channel"] = sim.score(per_channel)
    rows["depthwise weights rounded on calibration data"] = sim.score(table, weights=rounded)
    rows["depthwise weights rounded: weights only"] = sim.score(table, activations, weights=rounded)
    rows["both"] = sim.score(per_channel, weights=rounded)
    for label, row in rows.items():
        print(f"{label}: {row['agreement_pct']}% agreement, {row['logit_sqnr_db']} dB", flush=True)
    result = {
        "machine": {"mcpu": host_mcpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "model": "mobilenet_v2",
        "calibration_images": len(calib),
        "evaluation_images": len(photos),
        "simulator": "the default table as QDQ on the FP32 ONNX model, ONNX Runtime with graph optimizations off",
        "rows": rows,
        "costliest_activations_alone_db": costliest(activations),
        "costliest_weights_alone_db": costliest(weights),
        "command": "python bench/error_budget.py -o bench/results/error_budget.json",
    }
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
