"""Batch-1 latency on this CPU, side by side in one run: TVM FP32 tuned vs tvmquant INT8 tuned (same trial
budget, meta-schedule + XGBoost), ONNX Runtime FP32 and ONNX Runtime INT8 (``quantize_static``, QDQ,
per-channel int8 weights, uint8 activations), at 1 and 2 threads; plus per-kernel GOP/s of the tuned INT8
convs as a share of the VNNI peak, and tuning wall time.

Models: a ResNet-50-style network (bottleneck blocks, random weights, 224x224), MobileNetV2 (ImageNet
weights, ``bench/models/export_imagenet.py``) and the bundled Fashion-MNIST CNN.

Each compiled model is exported as a library and timed in a fresh process per thread count
(``TVM_NUM_THREADS``), so TVM's thread pool really has that many threads.

Run: ``python bench/speed_x86.py [--models resnet50 mobilenet_v2 fmnist] [--trials-per-task 16]``.
Writes ``bench/results/speed_x86.json`` (per model as it finishes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))


def measure_vnni_peak(cores: int, folder: str) -> dict:
    """Measured AVX512-VNNI peak (``bench/vnni_peak.c``): GOP/s of one core, and of ``cores`` cores at once.

    Returns ``{}`` when no C compiler or no VNNI is available (then no share of peak is reported).
    """
    binary = os.path.join(folder, "vnni_peak")
    source = os.path.join(HERE, "vnni_peak.c")
    flags = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni"]
    try:
        subprocess.run(["cc", *flags, source, "-o", binary], check=True, capture_output=True)
        one = float(subprocess.run([binary], check=True, capture_output=True, text=True).stdout.split()[0])
        runs = [subprocess.Popen([binary], stdout=subprocess.PIPE, text=True) for _ in range(cores)]
        together = sum(float(run.communicate()[0].split()[0]) for run in runs)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return {}
    return {"gops_1_core": round(one, 1), f"gops_{cores}_cores": round(together, 1), "source": "bench/vnni_peak.c"}


def resnet50_style(seed: int = 0):
    """ResNet-50 (3-4-6-3 bottleneck blocks, 224x224, BatchNorm folded), random He-initialised weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def conv(x, cin, cout, k, stride=1, relu=True):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        wn, bn, out = name("w"), name("b"), name("conv")
        inits.extend([numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)])
        nodes.append(helper.make_node("Conv", [x, wn, bn], [out], pads=[k // 2] * 4, strides=[stride] * 2))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
            return out + "_relu"
        return out

    x = conv("input", 3, 64, 7, 2)
    pooled = name("pool")
    nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = pooled, 64
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            h = conv(x, cin, width, 1)
            h = conv(h, width, width, 3, stride)
            h = conv(h, width, width * 4, 1, relu=False)
            shortcut = conv(x, cin, width * 4, 1, stride, relu=False) if block == 0 else x
            added = name("add")
            nodes.append(helper.make_node("Add", [h, shortcut], [added]))
            nodes.append(helper.make_node("Relu", [added], [added + "_relu"]))
            x, cin = added + "_relu", width * 4
    gap, flat = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    nodes.append(helper.make_node("Flatten", [gap], [flat]))
    w = (rng.standard_normal((1000, 2048)) * np.sqrt(1.0 / 2048)).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b")])
    nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet50_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def model_and_data(name: str, folder: str):
    import onnx

    if name == "resnet50":
        path = os.path.join(folder, "resnet50_style.onnx")
        onnx.save(resnet50_style(), path)
        rng = np.random.default_rng(1)
        calib = (rng.standard_normal((16, 3, 224, 224)) * 0.5).astype(np.float32)
        return path, calib
    if name == "mobilenet_v2":
        from imagenet_data import load_imagenet_eval, preprocess

        return os.path.join(HERE, "models", "onnx", "mobilenet_v2.onnx"), preprocess(
            load_imagenet_eval()["calib_u8"][:16], "mobilenet_v2"
        )
    from tvmquant.examples import fmnist_model_path, load_fmnist_example

    return fmnist_model_path(), load_fmnist_example()[0][:64]


_TIMER = """
import os, sys, time, json, numpy as np
from tvmquant.deploy import load_library
model = load_library(sys.argv[1])
x = np.load(sys.argv[2])
for _ in range(5): model(x)
times = []
deadline = time.time() + float(sys.argv[3])
while time.time() < deadline or len(times) < 10:
    start = time.perf_counter(); model(x); times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": float(np.median(times) * 1000), "runs": len(times)}))
"""

_ORT_TIMER = """
import sys, time, json, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.intra_op_num_threads = int(sys.argv[3]); options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2]); name = session.get_inputs()[0].name
for _ in range(5): session.run(None, {name: x})
times = []
deadline = time.time() + float(sys.argv[4])
while time.time() < deadline or len(times) < 10:
    start = time.perf_counter(); session.run(None, {name: x}); times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": float(np.median(times) * 1000), "runs": len(times)}))
"""


def time_library(library: str, x_path: str, threads: int, seconds: float) -> float:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", _TIMER, library, x_path, str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def time_ort(model_path: str, x_path: str, threads: int, seconds: float) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _ORT_TIMER, model_path, x_path, str(threads), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def kernel_report(db_dir: str, target) -> list:
    """Best measured latency and GOP/s of every tuned kernel in the database."""
    from tvm.s_tir.analysis import estimate_tir_flops

    from tvmquant.schedules.x86 import records_for_target

    database = records_for_target(db_dir, target)
    rows = []
    for record in database.get_all_tuning_records():
        if not record.run_secs:
            continue
        seconds = float(np.mean([float(s) for s in record.run_secs]))
        mod = record.workload.mod
        name = next(iter(gv.name_hint for gv in mod.get_global_vars()))
        flops = float(estimate_tir_flops(mod))
        rows.append({"kernel": name, "us": seconds * 1e6, "gops": flops / seconds / 1e9})
    best: dict = {}
    for row in rows:
        key = (row["kernel"], round(row["gops"] * row["us"]))
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    return sorted(best.values(), key=lambda r: -r["gops"] * r["us"])


def bench_model(
    name: str, trials_per_task: int, seconds: float, folder: str, strategy: str = "evolutionary", peak=None
) -> dict:
    import tvmquant
    from tvmquant.api import load_model
    from tvmquant.deploy import write_library
    from tvmquant.schedules import x86
    from tvmquant.testing.ort import ort_quantize

    path, calib = model_and_data(name, folder)
    x = calib[:1]
    x_path = os.path.join(folder, f"{name}_x.npy")
    np.save(x_path, x)
    target = x86.x86_target(num_cores=2)
    result = {"model": name, "trials_per_task": trials_per_task, "search_strategy": strategy}

    qmodel = tvmquant.quantize(path, calib_data=calib, progress=False, report_batches=0)
    fp32_mod, _, _, _ = load_model(path)
    timings = {}
    for label, mod in (("tvm_fp32", fp32_mod), ("tvmquant_int8", qmodel.mod)):
        db_dir = os.path.join(folder, f"{name}_{label}_db")
        start = time.time()
        tasks = len(x86.extract_tasks(mod, target))
        x86.tune(
            mod,
            target,
            trials=trials_per_task * tasks,
            db_dir=db_dir,
            trials_per_task=trials_per_task,
            strategy=strategy,
            progress=True,
        )
        result[f"{label}_tuning_seconds"] = round(time.time() - start, 1)
        result[f"{label}_tasks"] = tasks
        library = os.path.join(folder, f"{name}_{label}.so")
        write_library(x86.build(mod, target, db_dir=db_dir), mod, library, qmodel.inputs, target)
        if label == "tvmquant_int8":
            # Tuning measures each kernel with one thread per core of the target (2 here).
            result["int8_kernels"] = [
                {**row, "share_of_vnni_peak": row["gops"] / peak if peak else None}
                for row in kernel_report(db_dir, target)[:8]
            ]
        for threads in (1, 2):
            timings[f"{label}_ms_{threads}t"] = time_library(library, x_path, threads, seconds)

    ort_int8 = ort_quantize(path, calib, "minmax", out_dir=folder)
    for threads in (1, 2):
        timings[f"ort_fp32_ms_{threads}t"] = time_ort(path, x_path, threads, seconds)
        timings[f"ort_int8_ms_{threads}t"] = time_ort(ort_int8, x_path, threads, seconds)
    result["latency_ms"] = timings
    result["ratios"] = {
        f"int8_speedup_vs_tvm_fp32_{t}t": timings[f"tvm_fp32_ms_{t}t"] / timings[f"tvmquant_int8_ms_{t}t"]
        for t in (1, 2)
    }
    for t in (1, 2):
        result["ratios"][f"int8_speedup_vs_ort_int8_{t}t"] = (
            timings[f"ort_int8_ms_{t}t"] / timings[f"tvmquant_int8_ms_{t}t"]
        )
        result["ratios"][f"int8_speedup_vs_ort_fp32_{t}t"] = (
            timings[f"ort_fp32_ms_{t}t"] / timings[f"tvmquant_int8_ms_{t}t"]
        )
    print(json.dumps(result, indent=1), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["fmnist", "resnet50", "mobilenet_v2"])
    parser.add_argument("--trials-per-task", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument(
        "--strategy",
        default="evolutionary",
        choices=["evolutionary", "replay-trace"],
        help="meta-schedule search (evolutionary uses the XGBoost cost model)",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results", "speed_x86.json"))
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="tvmquant-speed-")
    flags = open("/proc/cpuinfo").read()
    result = {
        "command": "python bench/speed_x86.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpu": next(
                (line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), ""
            ),
            "llvm_mcpu": __import__("tvm").target.codegen.llvm_get_system_cpu(),
            "cores": os.cpu_count(),
            "avx512_vnni": "avx512_vnni" in flags,
            "amx_int8": "amx_int8" in flags,
        },
        "models": {},
    }
    cores = os.cpu_count() or 1
    result["vnni_peak"] = measure_vnni_peak(cores, folder)
    peak = result["vnni_peak"].get(f"gops_{cores}_cores")
    for name in args.models:
        result["models"][name] = bench_model(name, args.trials_per_task, args.seconds, folder, args.strategy, peak)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
