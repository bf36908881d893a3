"""INT8 vs FP16 on an NVIDIA GPU, tuned from this (GPU-less) machine: the CPU-side steps.

Models: a ResNet-50-style network (bench/speed_x86.py's, random He weights, BatchNorm folded) and a
BERT-base-sized transformer encoder block (seq 128, dim 768, 12 heads, MLP 3072; tests/models.py), each at
batch 1 and 32, as tvmquant INT8 (preset ``cuda_int8``: int8 x int8 WMMA tensor cores, requantize epilogues
fused) and as TVM FP16 (``ToMixedPrecision``: f16 x f16 -> f32 WMMA), tuned with the same trial budget.

Steps (the GPU steps run on the GPU host with TVM's runtime only; see bench/gpu/README.md)::

    python bench/cuda_int8.py package --per-task 8      # models + candidate package  -> .gpu/cuda/pkg
    [GPU]  python -m tvmquant.remote measure .gpu/cuda/pkg
    python bench/cuda_int8.py models                     # import times, build tuned libraries -> .gpu/cuda/models
    [GPU]  python bench/gpu/cuda_models.py .gpu/cuda/models
    python bench/cuda_int8.py report                     # -> bench/results/cuda_int8.json

Weights are lifted out of the benchmark libraries (the GPU host gets them at random, except for the INT8
ResNet at batch 1, whose real weights go along to check its logits against this CPU's INT8 build).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

WORK = os.path.join(ROOT, ".gpu", "cuda")
PACKAGE = os.path.join(WORK, "pkg")
MODULES = os.path.join(WORK, "modules")
MODELS = os.path.join(WORK, "models")
DB = os.path.join(WORK, "db")
RESULTS = os.path.join(ROOT, "bench", "results", "cuda_int8.json")
TRANSFORMER = dict(seq=128, dim=768, heads=12)
BATCHES = (1, 32)
CHECKED = "resnet50_int8_b1"  # the library whose logits are compared with this CPU's


def _dynamic_batch(model):
    """The ONNX model with a symbolic batch dimension (so that ``QuantizedModel.rebatch`` works)."""
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def build_modules(folder: str) -> dict:
    """Quantize both models and write every benchmark module (Relax JSON) to ``folder``; returns labels."""
    import onnx
    import tvm
    from models import transformer_block
    from speed_x86 import resnet50_style

    import tvmquant
    from tvmquant.config import PRESETS
    from tvmquant.schedules import cuda

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    sources = {
        "resnet50": (
            _dynamic_batch(resnet50_style()),
            (rng.standard_normal((16, 3, 224, 224)) * 0.5).astype(np.float32),
        ),
        "transformer": (
            transformer_block(seed=0, batch=None, **TRANSFORMER),
            rng.standard_normal((16, TRANSFORMER["seq"], TRANSFORMER["dim"])).astype(np.float32),
        ),
    }
    labels = {}
    for name, (model, calib) in sources.items():
        path = os.path.join(folder, f"{name}.onnx")
        onnx.save(model, path)
        start = time.time()
        qmodel = tvmquant.quantize(path, calib_data=calib, config=PRESETS["cuda_int8"], progress=False)
        print(f"{name}: quantized in {time.time() - start:.0f} s", flush=True)
        np.save(os.path.join(folder, f"{name}_sample.npy"), calib[:1])
        for batch in BATCHES:
            at_batch = qmodel if batch == 1 else qmodel.rebatch(batch)
            for kind, mod in (("int8", at_batch.mod), ("fp16", cuda.to_fp16(at_batch.fp32))):
                label = f"{name}_{kind}_b{batch}"
                with open(os.path.join(folder, f"{label}.json"), "w") as handle:
                    handle.write(tvm.ir.save_json(mod))
                labels[label] = {"model": name, "kind": kind, "batch": batch}
            if batch == 1:
                with open(os.path.join(folder, f"{name}_fp32_b1.json"), "w") as handle:
                    handle.write(tvm.ir.save_json(at_batch.fp32))
    with open(os.path.join(folder, "labels.json"), "w") as handle:
        json.dump(labels, handle, indent=1)
    return labels


def load_modules(folder: str) -> dict:
    import tvm

    with open(os.path.join(folder, "labels.json")) as handle:
        labels = json.load(handle)
    mods = {}
    for label in labels:
        with open(os.path.join(folder, f"{label}.json")) as handle:
            mods[label] = tvm.ir.load_json(handle.read())
    return mods


def cmd_package(args) -> None:
    from tvmquant.schedules import offline

    if not os.path.exists(os.path.join(MODULES, "labels.json")):
        build_modules(MODULES)
    mods = load_modules(MODULES)
    manifest = offline.make_package(
        mods, PACKAGE, per_task=args.per_task, functions_per_library=args.per_library, workers=args.workers
    )
    print(f"{len(manifest['tasks'])} tasks, {len(manifest['candidates'])} candidates in {manifest['build_s']} s")


def cmd_models(args) -> None:
    import tvm

    from tvmquant import cuda_binaries
    from tvmquant.schedules import cuda, offline

    if not args.only or not os.path.isdir(DB):
        counts = offline.import_measurements(PACKAGE, DB)
        print("imported", counts, flush=True)
    os.makedirs(MODELS, exist_ok=True)
    target = cuda.cuda_target()
    mods = load_modules(MODULES)
    with open(os.path.join(MODULES, "labels.json")) as handle:
        labels = json.load(handle)
    index = {}
    if args.only and os.path.exists(os.path.join(MODELS, "index.json")):
        with open(os.path.join(MODELS, "index.json")) as handle:
            index = json.load(handle)["models"]
    for label, mod in mods.items():
        if args.only and label not in args.only:
            continue
        start = time.time()
        prepared, weights = cuda.lift_constants(cuda.prepare(mod, target))
        applied = cuda.apply_database(prepared, target, DB)
        tuned = len(cuda.untuned_kernels(applied))
        executable = cuda.build(applied, target, prepared=True)
        path = os.path.join(MODELS, f"{label}.so")
        executable.export_library(path)
        cuda_binaries.write_archive(cuda_binaries.precompile(executable, target), cuda_binaries.archive_path(path))
        func = prepared["main"]
        shapes = [{"shape": [int(d) for d in p.ty.shape.values], "dtype": str(p.ty.dtype)} for p in func.params]
        entry = {
            **labels[label],
            "params": shapes,
            "num_input": 1,
            "untuned_kernels": tuned,
            "build_s": round(time.time() - start, 1),
        }
        if label == CHECKED:
            if not os.path.exists(os.path.join(MODELS, f"{label}_check.npz")):
                _correctness_files(label)
            np.savez(os.path.join(MODELS, f"{label}_weights.npz"), *weights)
            entry.update(weights=f"{label}_weights.npz", check=f"{label}_check.npz")
        index[label] = entry
        print(f"{label}: built in {entry['build_s']} s ({tuned} GEMM kernels without a record)", flush=True)
    with open(os.path.join(MODELS, "index.json"), "w") as handle:
        json.dump({"models": index, "target": offline.target_dict(target), "tvm": tvm.__version__}, handle, indent=1)


def _correctness_files(label: str) -> None:
    """This CPU's INT8 and FP32 logits for a fixed input, to check the GPU library's output against."""
    import tvm
    from tvm import relax

    from tvmquant.compile import build as cpu_build

    os.makedirs(MODELS, exist_ok=True)
    sample = np.load(os.path.join(MODULES, "resnet50_sample.npy"))
    outputs = {}
    for kind, path in (("int8", f"{label}.json"), ("fp32", "resnet50_fp32_b1.json")):
        with open(os.path.join(MODULES, path)) as handle:
            module = tvm.ir.load_json(handle.read())
        vm = relax.VirtualMachine(cpu_build(module), tvm.cpu())
        outputs[kind] = vm["main"](tvm.runtime.tensor(sample)).numpy()
    np.savez(
        os.path.join(MODELS, f"{label}_check.npz"), input=sample, int8_cpu=outputs["int8"], fp32_cpu=outputs["fp32"]
    )


def cmd_check_files(args) -> None:
    _correctness_files(CHECKED)


def cmd_report(args) -> None:
    """Merge the package summary, the measurements and the GPU model timings into bench/results."""
    from tvmquant.benchmark import machine_info

    with open(os.path.join(PACKAGE, "manifest.json")) as handle:
        manifest = json.load(handle)
    with open(args.measurements) as handle:
        measured = json.load(handle)
    with open(args.gpu_results) as handle:
        gpu = json.load(handle)
    best: dict = {}
    per_task = []
    for task in manifest["tasks"]:
        rows = [r for r in measured["candidates"].values() if r.get("task") == task["index"]]
        good = [r["seconds"] for r in rows if r.get("correct") and r.get("seconds") is not None]
        best[task["index"]] = min(good) if good else None
        per_task.append(
            {
                "task": task["name"],
                "kind": task["kind"],
                "models": task["weights"],
                "candidates": len(rows),
                "correct": sum(1 for r in rows if r.get("correct")),
                "wrong": sum(1 for r in rows if r.get("seconds") is not None and not r.get("correct")),
                "failed": sum(1 for r in rows if r.get("seconds") is None),
                "best_us": round(min(good) * 1e6, 2) if good else None,
            }
        )
    kernel_sums = {}
    for label in manifest["models"]:
        total, missing = 0.0, 0
        for task in manifest["tasks"]:
            if label in task["weights"]:
                if best[task["index"]] is None:
                    missing += 1
                else:
                    total += task["weights"][label] * best[task["index"]]
        kernel_sums[label] = {"ms": round(total * 1e3, 3), "kernels_without_record": missing}
    models = gpu.get("models", {})
    torch_ms = gpu.get("torch", {})
    ratios = {}
    for name in ("resnet50", "transformer"):
        for batch in BATCHES:
            int8 = models.get(f"{name}_int8_b{batch}", {}).get("ms")
            fp16 = models.get(f"{name}_fp16_b{batch}", {}).get("ms")
            torch16 = torch_ms.get(f"{name}_fp16_b{batch}")
            if int8:
                ratios[f"{name}_b{batch}"] = {
                    "int8_vs_tvm_fp16": round(fp16 / int8, 3) if fp16 else None,
                    "int8_vs_torch_fp16": round(torch16 / int8, 3) if torch16 else None,
                }
    result = {
        "what": "tvmquant INT8 (WMMA s8s8s32, fused requantize) vs TVM FP16 (WMMA f16f16f32), same trials; "
        "torch FP16 eager",
        "command": "bench/cuda_int8.py package, models, report; python -m tvmquant.remote measure and "
        "bench/gpu/cuda_models.py on the GPU host (bench/gpu/visit.sh)",
        "build_machine": machine_info(),
        "gpu": gpu.get("device"),
        "target": manifest["target"],
        "trials_per_task": manifest["per_task"],
        "search": "meta-schedule ReplayTrace: random draws from each kernel's design space, measured on the GPU",
        "tuning": {
            "kernels": len(manifest["tasks"]),
            "candidates": len(manifest["candidates"]),
            "package_build_s_on_build_machine": manifest["build_s"],
            "gpu_measure_s": measured.get("wall_s"),
            "correct": sum(1 for r in measured["candidates"].values() if r.get("correct")),
            "wrong": sum(1 for r in measured["candidates"].values() if r.get("seconds") and not r.get("correct")),
        },
        "latency_ms": {label: row.get("ms") for label, row in models.items()},
        "torch_ms": torch_ms,
        "speedups": ratios,
        "sum_of_best_kernels_ms": kernel_sums,
        "correctness": gpu.get("correctness"),
        "raw": {
            "gpu_models": os.path.relpath(args.gpu_results, ROOT),
            "measurements": os.path.relpath(args.measurements, ROOT),
        },
        "python": platform.python_version(),
    }
    if args.before:
        with open(args.before) as handle:
            before = json.load(handle)
        result["before_pool_fix"] = {
            "latency_ms": {label: row.get("ms") for label, row in before.get("models", {}).items()},
            "torch_ms": before.get("torch"),
            "note": "the same libraries before pooling kernels got one thread per output: ResNet-50's INT8 max "
            "pool (requantize fused) took 6.3 ms at batch 32 "
            "(bench/results/gpu/profile_cuda_h200_before_pool_fix.json)",
        }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({"latency_ms": result["latency_ms"], "speedups": ratios, "sums": kernel_sums}, indent=1))
    print("wrote", RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("package")
    p.add_argument("--per-task", type=int, default=8)
    p.add_argument("--per-library", type=int, default=32)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_package)
    m = sub.add_parser("models")
    m.add_argument("--only", nargs="*", default=None, help="rebuild these libraries only (keeps the database)")
    m.set_defaults(func=cmd_models)
    c = sub.add_parser("check-files", help="CPU logits for the GPU's correctness check (any time after package)")
    c.set_defaults(func=cmd_check_files)
    r = sub.add_parser("report")
    r.add_argument("gpu_results", help="the JSON bench/gpu/cuda_models.py wrote")
    r.add_argument("--measurements", default=os.path.join(PACKAGE, "measurements.json"))
    r.add_argument("--before", default=None, help="an earlier cuda_models JSON to keep beside it")
    r.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
