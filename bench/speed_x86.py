"""Batch-1 latency on this CPU, side by side in one run: TVM FP32 tuned vs tvmquant INT8 tuned (same trial
budget, meta-schedule + XGBoost), ONNX Runtime FP32 and ONNX Runtime INT8 (``quantize_static``, QDQ,
per-channel int8 weights, uint8 activations), OpenVINO FP32 and OpenVINO INT8 (``nncf.quantize`` of the same
ONNX file on the same calibration data; rows skipped with a note when openvino/nncf are not installed), at 1
and 2 threads; plus per-kernel GOP/s of the tuned INT8 kernels as a share of the peak of the unit they run on
(AMX kernels: ``bench/amx_peak.c``; the others: ``bench/vnni_peak.c``), and tuning wall time. The JSON's
``machine`` has the CPU model, LLVM's ``mcpu`` and the ``amx_int8`` flag.

Models: a ResNet-50-style network (bottleneck blocks, random weights, 224x224), MobileNetV2 (ImageNet
weights, ``bench/models/export_imagenet.py``) and the bundled Fashion-MNIST CNN.

Each compiled model is exported as a library and timed in a fresh process per thread count
(``TVM_NUM_THREADS``), so TVM's thread pool really has that many threads.

Run: ``python bench/speed_x86.py [--models resnet50 mobilenet_v2 fmnist] [--trials-per-task 16]``
(``--untuned``: no tuning, the default schedules; for a quick run on a small machine).
Writes ``bench/results/speed_x86.json`` (per model as it finishes).
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

from tvmquant.benchmark import machine_info, openvino_models, time_library, time_onnx, time_openvino
from tvmquant.threads import request_amx_permission

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


def measure_amx_peak(cores: int, folder: str) -> dict:
    """Measured AMX-INT8 peak (``bench/amx_peak.c``): GOP/s of one core, and of ``cores`` cores at once.

    ``{"skipped": reason}`` without a compiler that knows ``-mamx-int8`` or without ``amx_int8`` (the probe
    checks /proc/cpuinfo and exits 2, it does not die with SIGILL).
    """
    binary = os.path.join(folder, "amx_peak")
    source = os.path.join(HERE, "amx_peak.c")
    try:
        subprocess.run(["cc", "-O2", "-mamx-tile", "-mamx-int8", source, "-o", binary], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        return {"skipped": f"cannot compile bench/amx_peak.c ({err})"}
    probe = subprocess.run([binary, "1000"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"skipped": probe.stderr.strip() or f"amx_peak exited {probe.returncode}"}
    one = float(subprocess.run([binary], check=True, capture_output=True, text=True).stdout.split()[0])
    runs = [subprocess.Popen([binary], stdout=subprocess.PIPE, text=True) for _ in range(cores)]
    together = sum(float(run.communicate()[0].split()[0]) for run in runs)
    return {"gops_1_core": round(one, 1), f"gops_{cores}_cores": round(together, 1), "source": "bench/amx_peak.c"}


def resnet50_style(seed: int = 0):
    """ResNet-50 (3-4-6-3 bottleneck blocks, 224x224, BatchNorm folded), random He-initialised weights."""
    from tvmquant.testing.models import RESNET50_STAGES, resnet_style

    return resnet_style(seed, RESNET50_STAGES, size=224, classes=1000, graph_name="resnet50_style")


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


def kernel_report(db_dir: str, target, tasks) -> list:
    """Best measured latency and GOP/s of every tuned kernel in the database, named after its task, with the
    number of times the model calls it; sorted by total time in the model."""
    import tvm_ffi
    from tvm.s_tir.analysis import estimate_tir_flops

    from tvmquant.schedules.x86 import records_for_target

    by_hash = {tvm_ffi.structural_hash(task.dispatched[0]): task for task in tasks}
    best: dict = {}
    for record in records_for_target(db_dir, target).get_all_tuning_records():
        task = by_hash.get(tvm_ffi.structural_hash(record.workload.mod))
        if not record.run_secs or task is None:
            continue
        seconds = float(np.mean([float(s) for s in record.run_secs]))
        if task.task_name not in best or seconds < best[task.task_name][0]:
            best[task.task_name] = (seconds, record, task)
    rows = []
    for name, (seconds, record, task) in best.items():
        flops = float(estimate_tir_flops(record.workload.mod))
        rows.append({"kernel": name, "calls": int(task.weight), "us": seconds * 1e6, "gops": flops / seconds / 1e9})
    return sorted(rows, key=lambda r: -r["us"] * r["calls"])


def bench_model(
    name: str,
    trials_per_task: int,
    seconds: float,
    folder: str,
    strategy: str = "evolutionary",
    peak=None,
    amx_peak=None,
    untuned: bool = False,
) -> dict:
    import tvmquant
    from tvmquant.api import load_model
    from tvmquant.library import write_library
    from tvmquant.schedules import x86
    from tvmquant.testing.ort import ort_quantize

    path, calib = model_and_data(name, folder)
    target = x86.x86_target(num_cores=2)
    result = {"model": name, "trials_per_task": 0 if untuned else trials_per_task, "search_strategy": strategy}
    result["target"] = str(target)

    qmodel = tvmquant.quantize(path, calib_data=calib, progress=False, report_batches=0)
    x_path = os.path.join(folder, f"{name}_x.npz")  # one real sample, under the model's input name
    np.savez(x_path, **{qmodel.inputs[0].name: calib[:1]})
    fp32_mod, _, _, _ = load_model(path)
    timings = {}
    for label, mod in (("tvm_fp32", fp32_mod), ("tvmquant_int8", qmodel.mod)):
        db_dir = None if untuned else os.path.join(folder, f"{name}_{label}_db")
        start = time.time()
        tasks = x86.extract_tasks(mod, target)
        if not untuned:
            x86.tune(
                mod,
                target,
                trials=trials_per_task * len(tasks),
                db_dir=db_dir,
                trials_per_task=trials_per_task,
                strategy=strategy,
                progress=True,
            )
        result[f"{label}_tuning_seconds"] = round(time.time() - start, 1)
        result[f"{label}_tasks"] = len(tasks)
        if label == "tvmquant_int8":
            result["int8_amx_kernels"] = sum("int8_amx" in task.task_name for task in tasks)
        library = os.path.join(folder, f"{name}_{label}.so")
        write_library(x86.build(mod, target, db_dir=db_dir), mod, library, qmodel.inputs, target)
        if label == "tvmquant_int8" and db_dir is not None:
            # Tuning measures each kernel with one thread per core of the target (2 here); AMX kernels against
            # the AMX peak, the others against VNNI's.
            rows = []
            for row in kernel_report(db_dir, target, tasks)[:10]:
                unit, unit_peak = ("amx", amx_peak) if "int8_amx" in row["kernel"] else ("vnni", peak)
                rows.append({**row, "unit": unit, "share_of_peak": row["gops"] / unit_peak if unit_peak else None})
            result["int8_kernels"] = rows
        for threads in (1, 2):
            timings[f"{label}_ms_{threads}t"] = time_library(library, x_path, threads, seconds)

    ort_int8 = ort_quantize(path, calib, "minmax", out_dir=folder)
    for threads in (1, 2):
        timings[f"ort_fp32_ms_{threads}t"] = time_onnx(path, x_path, threads, seconds)
        timings[f"ort_int8_ms_{threads}t"] = time_onnx(ort_int8, x_path, threads, seconds)
    try:
        ov_paths = openvino_models(path, {qmodel.inputs[0].name: calib}, folder)
    except ImportError as err:
        result["skipped"] = {"openvino": f"openvino/nncf are not installed ({err})"}
    else:
        result["openvino_int8"] = f"nncf.quantize on the same {len(calib)} calibration samples"
        for threads in (1, 2):
            timings[f"ov_fp32_ms_{threads}t"] = time_openvino(ov_paths["ov_fp32"], x_path, threads, seconds)
            timings[f"ov_int8_ms_{threads}t"] = time_openvino(ov_paths["ov_int8"], x_path, threads, seconds)
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
        for engine in ("ov_int8", "ov_fp32"):
            if f"{engine}_ms_{t}t" in timings:
                result["ratios"][f"int8_speedup_vs_{engine}_{t}t"] = (
                    timings[f"{engine}_ms_{t}t"] / timings[f"tvmquant_int8_ms_{t}t"]
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
    parser.add_argument("--untuned", action="store_true", help="no tuning: the default schedules (a quick run)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "speed_x86.json"))
    args = parser.parse_args()
    request_amx_permission()  # a no-op without AMX; this process measures nothing itself, its children ask too
    folder = tempfile.mkdtemp(prefix="tvmquant-speed-")
    result = {
        "command": "python bench/speed_x86.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "models": {},
    }
    cores = os.cpu_count() or 1
    result["vnni_peak"] = measure_vnni_peak(cores, folder)
    peak = result["vnni_peak"].get(f"gops_{cores}_cores")
    result["amx_peak"] = measure_amx_peak(cores, folder)
    amx_peak = result["amx_peak"].get(f"gops_{cores}_cores")
    for name in args.models:
        result["models"][name] = bench_model(
            name, args.trials_per_task, args.seconds, folder, args.strategy, peak, amx_peak, args.untuned
        )
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
