"""Stress runs (issue 17, item 6): calibration that streams 10,000 samples in bounded memory, and a model of
1,000 layers.

``streaming``
    ``tvmquant.quantize`` of a small CNN (conv, depthwise, residual add, GAP, MatMul; 3x32x32 input, dynamic
    batch) on calibration samples produced one at a time by a generator, never held in memory together: 112
    samples (7 calibration batches of 16) and 10,000, each in a fresh process. Peak resident memory (``VmHWM``): bounded
    means the 10,000-sample run peaks where the 112-sample run does (the samples themselves would be 123 MB).
``deep``
    A chain of 1,000 quantizable layers (500 x [3x3 conv + ReLU, 1x1 conv], 8 channels, 8x8): quantize time
    (import, annotate, calibrate, realize), the number of quantized layers, and the integer model compiled and
    checked against the simulated model on a few inputs.

Run: ``python bench/stress.py [-o bench/results/stress.json]`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _graph_helpers():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    return onnx, TensorProto, helper, numpy_helper


def streaming_cnn(path: str) -> None:
    """A small CNN with a dynamic batch axis: 3x32x32 -> 16 channels -> depthwise -> residual -> GAP -> 10."""
    onnx, TensorProto, helper, numpy_helper = _graph_helpers()
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def weight(name, shape):
        fan_in = int(np.prod(shape[1:]))
        inits.append(
            numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), name)
        )
        return name

    def conv(name, x, shape, group=1, pads=1, stride=1):
        nodes.append(
            helper.make_node(
                "Conv",
                [x, weight(f"{name}.w", shape)],
                [name],
                name=name,
                group=group,
                pads=[pads] * 4,
                strides=[stride, stride],
            )
        )
        return name

    h = conv("stem", "input", (16, 3, 3, 3), stride=2)
    nodes.append(helper.make_node("Relu", [h], ["stem_relu"]))
    d = conv("dw", "stem_relu", (16, 1, 3, 3), group=16)
    nodes.append(helper.make_node("Relu", [d], ["dw_relu"]))
    p = conv("pw", "dw_relu", (16, 16, 1, 1), pads=0)
    nodes.append(helper.make_node("Add", [p, "stem_relu"], ["res"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["res"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32) * 0.3, "fc.w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["logits"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "stress_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def deep_chain(path: str, layers: int = 1000, channels: int = 8, size: int = 8) -> None:
    """``layers`` quantizable convs: pairs of (3x3 conv + ReLU, 1x1 conv), static batch 1."""
    onnx, TensorProto, helper, numpy_helper = _graph_helpers()
    rng = np.random.default_rng(1)
    inits, nodes = [], []
    x = "input"
    for i in range(layers):
        k = 3 if i % 2 == 0 else 1
        w = (rng.standard_normal((channels, channels, k, k)) * np.sqrt(1.0 / (channels * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[k // 2] * 4))
        x = f"c{i}"
        if k == 3:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "deep_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, size, size])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        kb = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    return kb / 1024


def _samples(count: int):
    rng = np.random.default_rng(2)
    for _ in range(count):
        yield (rng.standard_normal((1, 3, 32, 32)) * 0.5).astype(np.float32)


def worker_streaming(model: str, count: int) -> dict:
    import tvmquant

    start = time.perf_counter()
    qmodel = tvmquant.quantize(model, calib_data=_samples(count), progress=False, report_batches=0)
    seconds = time.perf_counter() - start
    return {
        "samples": count,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "quantized_layers": sum(layer.quantized for layer in qmodel.layers),
        "sample_bytes_total_mb": round(count * 3 * 32 * 32 * 4 / 1e6, 1),
    }


def worker_deep(model: str) -> dict:
    import tvmquant

    rng = np.random.default_rng(3)
    calib = (rng.standard_normal((4, 8, 8, 8)) * 0.5).astype(np.float32)
    start = time.perf_counter()
    qmodel = tvmquant.quantize(model, calib_data=[calib[i : i + 1] for i in range(4)], progress=False, report_batches=0)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    integer, simulated = qmodel.compile(), qmodel.compile(mode="simulated")
    compile_s = time.perf_counter() - start
    errors = []
    for i in range(2):
        x = calib[i : i + 1]
        a, b = integer(x), simulated(x)
        step = float(np.max(np.abs(b))) / 127 or 1.0
        errors.append(float(np.max(np.abs(a - b))) / step)
    return {
        "layers": len(qmodel.layers),
        "quantized_layers": sum(layer.quantized for layer in qmodel.layers),
        "quantize_s": round(quantize_s, 1),
        "compile_int8_and_simulated_s": round(compile_s, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "int8_vs_simulated_max_diff_in_output_steps": round(max(errors), 3),
    }


def _run(args: list) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", *args], capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {
            "error": f"exit {done.returncode}: " + " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        }
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind = argv[1]
        result = worker_streaming(argv[2], int(argv[3])) if kind == "streaming" else worker_deep(argv[2])
        print("RESULT " + json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[112, 10000])
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("-o", "--output", default=os.path.join(HERE, "results", "stress.json"))
    args = parser.parse_args(argv)

    from tvmquant.benchmark import machine_info

    folder = tempfile.mkdtemp(prefix="tvmq-stress-")
    cnn, deep = os.path.join(folder, "cnn.onnx"), os.path.join(folder, "deep.onnx")
    streaming_cnn(cnn)
    deep_chain(deep, args.layers)
    result = {"machine": machine_info(), "streaming": [], "deep": None}
    for count in args.samples:
        result["streaming"].append(_run(["streaming", cnn, str(count)]))
        print(json.dumps(result["streaming"][-1]), flush=True)
    runs = [r for r in result["streaming"] if "peak_rss_mb" in r]
    if len(runs) >= 2:
        result["streaming_rss_growth_mb"] = round(runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1)
    result["deep"] = _run(["deep", deep])
    print(json.dumps(result["deep"]), flush=True)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
