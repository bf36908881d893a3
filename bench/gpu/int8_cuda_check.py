"""INT8 vs FP16 on an NVIDIA GPU: tune, check exactly against numpy, time; one prepared script for a GPU session.

Runs with the full TVM unpacked on the GPU host (see shared/GPU.md; no xgboost there, so the cost model is
``random``). For each workload (an NT int8 matmul and an NHWC int8 3x3 conv) it tunes the INT8 WMMA and dp4a
rules of :mod:`tvmquant.schedules.cuda` and an FP16 baseline (meta-schedule's stock ``cuda-tensorcore``
rules), checks the top tuned kernels of every tuning run against numpy (int8: exactly; fp16: relative error
against float64), times the best one, and writes JSON.

Usage (repository root on the GPU host)::

    PYTHONPATH=/tmp/site python3 bench/gpu/int8_cuda_check.py [OUT.json] [--trials 16] [--top-k 3]
    python3.11 bench/gpu/int8_cuda_check.py --dry-run   # CPU only: builds one sample per rule set, no GPU

The JSON goes to the path argument, else ``$OUT/int8_cuda_check.json``, else ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from tvmquant.schedules import cuda  # noqa: E402
from tvmquant.schedules._ms_worker import build_candidate  # noqa: E402

#: the FP16 baseline of each workload: f16 inputs, f32 accumulation and output
FP16 = {"dtype": "float16", "accum_dtype": "float32"}


def conv_reference(data, weight, padding):
    """NHWC x OHWI stride-1 conv2d in float64 (exact for int8 inputs)."""
    kernel = weight.shape[1]
    padded = np.pad(data.astype(np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h, out_w = padded.shape[1] - kernel + 1, padded.shape[2] - kernel + 1
    out = np.zeros((data.shape[0], out_h, out_w, weight.shape[0]))
    for dy in range(kernel):
        for dx in range(kernel):
            out += np.einsum(
                "nhwc,kc->nhwk", padded[:, dy : dy + out_h, dx : dx + out_w, :], weight[:, dy, dx, :].astype(np.float64)
            )
    return out


def workloads(matmul_shape, conv_shape):
    """name -> (int8 module, fp16 module, input shapes, reference function, op count)."""
    m, n, k = matmul_shape
    conv = dict(zip(["batch", "height", "width", "channels", "out_channels", "kernel", "padding"], conv_shape))
    out_h = conv["height"] + 2 * conv["padding"] - conv["kernel"] + 1
    out_w = conv["width"] + 2 * conv["padding"] - conv["kernel"] + 1
    return {
        f"matmul_{m}x{n}x{k}": dict(
            int8=cuda.int8_matmul(m, n, k),
            fp16=cuda.int8_matmul(m, n, k, **FP16),
            shapes=[(m, k), (n, k)],
            out=(m, n),
            reference=lambda a, b: a.astype(np.float64) @ b.astype(np.float64).T,
            ops=2 * m * n * k,
        ),
        "conv_{batch}x{height}x{width}x{channels}_{out_channels}_k{kernel}".format(**conv): dict(
            int8=cuda.int8_conv2d_nhwc(**conv),
            fp16=cuda.int8_conv2d_nhwc(**conv, **FP16),
            shapes=[
                (conv["batch"], conv["height"], conv["width"], conv["channels"]),
                (conv["out_channels"], conv["kernel"], conv["kernel"], conv["channels"]),
            ],
            out=(conv["batch"], out_h, out_w, conv["out_channels"]),
            reference=lambda a, b: conv_reference(a, b, conv["padding"]),
            ops=2 * conv["batch"] * out_h * out_w * conv["out_channels"] * conv["channels"] * conv["kernel"] ** 2,
        ),
    }


def check_and_time(lib, spec, dtype, rng, number=20, repeat=5):
    """Run ``lib`` on random inputs; compare with numpy; time it. Returns a dict."""
    device = tvm.cuda(0)
    if dtype == "int8":
        inputs = [rng.integers(-128, 128, shape, dtype=np.int8) for shape in spec["shapes"]]
        out_dtype = "int32"
    else:
        inputs = [rng.standard_normal(shape).astype(np.float16) for shape in spec["shapes"]]
        out_dtype = "float32"
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    out = tvm.runtime.tensor(np.zeros(spec["out"], out_dtype), device)
    lib["main"](*args, out)
    expected = spec["reference"](*inputs)
    got = out.numpy().astype(np.float64)
    result = {}
    if dtype == "int8":
        result["exact"] = bool(np.array_equal(got, expected))
        result["mismatches"] = int(np.count_nonzero(got != expected))
    else:
        result["max_rel_err"] = float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-30))
        result["ok"] = result["max_rel_err"] < 1e-2
    timer = lib.time_evaluator("main", device, number=number, repeat=repeat)
    seconds = float(np.median(timer(*args, out).results))
    result.update(ms=seconds * 1e3, tops=spec["ops"] / seconds / 1e12)
    return result


def tune(mod, target, work_dir, trials, space):
    """meta-schedule with the random cost model (no xgboost on the GPU host)."""
    return ms.tune_tir(
        mod,
        target,
        work_dir,
        max_trials_global=trials,
        num_trials_per_iter=min(trials, 32),
        builder=ms.builder.LocalBuilder(timeout_sec=150, f_build=build_candidate),
        space=space,
        cost_model="random",
        seed=0,
    )


def top_modules(database, mod, top_k):
    """The ``top_k`` fastest measured schedules (as IRModules) of ``mod`` in ``database``."""
    workload = database.commit_workload(mod)
    return [(record.run_secs, record.as_measure_candidate().sch.mod) for record in database.get_top_k(workload, top_k)]


def run_gpu(args, specs, target, result):
    rng = np.random.default_rng(0)
    work_root = tempfile.mkdtemp(prefix="int8_cuda_check_")
    variants = [
        ("int8_wmma", "int8", lambda: cuda.int8_space(target, "wmma")),
        ("int8_dp4a", "int8", lambda: cuda.int8_space(target, "dp4a")),
        ("fp16_tensorcore", "fp16", lambda: cuda.int8_space(target, "wmma_fp16")),
    ]
    for name, spec in specs.items():
        for variant, dtype, space in variants:
            entry = result["workloads"][name].setdefault(variant, {})
            start = time.time()
            try:
                database = tune(spec[dtype], target, os.path.join(work_root, f"{name}_{variant}"), args.trials, space())
                entry["tune_s"] = round(time.time() - start, 1)
                entry["records"] = len(database)
                checked = []
                for run_secs, mod in top_modules(database, spec[dtype], args.top_k):
                    lib = tvm.compile(mod, target=target)
                    item = check_and_time(lib, spec, dtype, rng)
                    item["tuned_ms"] = float(np.mean([float(s) for s in run_secs])) * 1e3
                    item["wmma_in_source"] = "wmma::mma_sync" in cuda.cuda_source(lib)
                    checked.append(item)
                entry["top_k"] = checked
                if checked:
                    entry["best"] = min(checked, key=lambda item: item["ms"])
            except Exception:
                entry["error"] = traceback.format_exc()[-2000:]
            print(name, variant, json.dumps(entry.get("best", entry.get("error")), default=str)[:400], flush=True)
    for name in specs:
        row = result["workloads"][name]
        fp16_ms = row.get("fp16_tensorcore", {}).get("best", {}).get("ms")
        for variant in ("int8_wmma", "int8_dp4a"):
            int8_ms = row.get(variant, {}).get("best", {}).get("ms")
            if fp16_ms and int8_ms:
                row[f"speedup_{variant}_vs_fp16"] = fp16_ms / int8_ms
    result["torch"] = torch_anchors(specs)


def torch_anchors(specs):
    """torch FP16 and ``torch._int_mm`` timings for the matmul (reference points; absent without torch)."""
    try:
        import torch
    except ImportError:
        return {"error": "torch not importable"}
    anchors = {}
    for name, spec in specs.items():
        if not name.startswith("matmul"):
            continue
        (m, k), (n, _) = spec["shapes"]
        a16, b16 = (
            torch.randn(m, k, device="cuda", dtype=torch.float16),
            torch.randn(n, k, device="cuda", dtype=torch.float16),
        )
        a8, b8 = (
            torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8),
            torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8),
        )
        calls = (("fp16", lambda a=a16, b=b16: a @ b.T), ("int_mm", lambda a=a8, b=b8: torch._int_mm(a, b.T)))
        for label, fn in calls:
            try:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / 50
                anchors[f"{name}_{label}"] = {"ms": seconds * 1e3, "tops": spec["ops"] / seconds / 1e12}
            except Exception as err:  # _int_mm has shape constraints
                anchors[f"{name}_{label}"] = {"error": str(err)[:300]}
    return anchors


def run_dry(specs, target, result):
    """CPU side only: one sampled candidate per rule set and workload, built and compiled to PTX with nvcc."""
    for name, spec in specs.items():
        for variant, kind, workload in (
            ("int8_wmma", "wmma", "int8"),
            ("int8_dp4a", "dp4a", "int8"),
            ("fp16_tensorcore", "wmma_fp16", "fp16"),
        ):
            built = cuda.sample_and_build(spec[workload], target, num_samples=1, kind=kind, ptx=cuda.have_nvcc())
            result["workloads"][name][variant] = [
                {
                    "ok": c.ok,
                    "error": c.error,
                    "build_s": round(c.seconds, 1),
                    "ptx_wmma_mma": c.count("wmma.mma.sync"),
                    "ptx_dp4a": c.count("dp4a.s32.s32"),
                }
                for c in built
            ]
            print(name, variant, result["workloads"][name][variant], flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="JSON path (default $OUT/int8_cuda_check.json)")
    parser.add_argument("--trials", type=int, default=16, help="meta-schedule trials per workload and rule set")
    parser.add_argument("--top-k", type=int, default=3, help="tuned kernels per run checked against numpy")
    parser.add_argument("--matmul", default="1024,1024,1024", help="M,N,K of the NT matmul")
    parser.add_argument("--conv", default="1,56,56,64,64,3,1", help="N,H,W,C,K,kernel,pad of the NHWC conv")
    parser.add_argument("--target", default="nvidia/nvidia-h100")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: build one sample per rule set, no tuning")
    args = parser.parse_args(argv)

    out = args.out or os.path.join(
        os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"), "int8_cuda_check.json"
    )
    target = cuda.cuda_target(args.target)
    specs = workloads([int(x) for x in args.matmul.split(",")], [int(x) for x in args.conv.split(",")])
    result = {
        "target": str(args.target),
        "tvm": tvm.__version__,
        "trials": args.trials,
        "dry_run": args.dry_run,
        "gpu": cuda.have_gpu(),
        "workloads": {name: {} for name in specs},
    }
    start = time.time()
    if args.dry_run:
        run_dry(specs, target, result)
    elif not result["gpu"]:
        raise SystemExit("no CUDA device (tvm.cuda(0).exist is false); use --dry-run on a machine without a GPU")
    else:
        run_gpu(args, specs, target, result)
    result["wall_s"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print("wrote", out)


if __name__ == "__main__":
    main()
