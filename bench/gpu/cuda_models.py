"""GPU host, TVM runtime only: time the tuned INT8 and FP16 libraries of bench/cuda_int8.py, and torch FP16.

Usage (repository root on the GPU host; TVM's runtime and tvm-ffi on PYTHONPATH, see bench/gpu/README.md)::

    TVM_USE_RUNTIME_LIB=1 python3 bench/gpu/cuda_models.py .gpu/cuda/models [OUT.json]

For every library in ``index.json``: load it (CUDA binaries from its ``.cuda.zip``, no nvcc), feed seeded
random inputs and weights (the INT8 ResNet at batch 1 gets its real weights and its logits are compared with
the CPU's INT8 and FP32 logits), time ``main`` with the VM's ``time_evaluator`` (median of 5 repeats of at
least 100 ms). Then torch FP16 (eager, cuDNN autotuning on, channels-last ResNet-50, ``nn.TransformerEncoderLayer``
fast path) and ``torch._int_mm`` on the transformer's matmul shapes. Writes JSON and prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _random(spec, rng):
    shape, dtype = tuple(spec["shape"]), spec["dtype"]
    if dtype.startswith("int"):
        return rng.integers(-127, 128, shape).astype(dtype)
    return (rng.standard_normal(shape) * 0.05).astype(dtype)


def time_vm(vm, device, args, min_repeat_ms=100, repeat=5) -> float:
    """Median seconds of one ``main`` call."""
    vm.set_input("main", *args)
    timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
    return float(np.median(timer("main").results))


def run_models(folder: str) -> tuple[dict, dict]:
    import tvm
    from tvm.runtime import vm as rvm

    from tvmquant import cuda_binaries

    with open(os.path.join(folder, "index.json")) as handle:
        index = json.load(handle)["models"]
    device = tvm.cuda(0)
    results, correctness = {}, {}
    for label, entry in index.items():
        path = os.path.join(folder, f"{label}.so")
        row = {k: entry[k] for k in ("model", "kind", "batch", "untuned_kernels")}
        try:
            stats = cuda_binaries.install(cuda_binaries.archive_path(path))
            start = time.time()
            vm = rvm.VirtualMachine(tvm.runtime.load_module(path), device)
            row["load_s"] = round(time.time() - start, 2)
            row["binaries"] = dict(stats)
            rng = np.random.default_rng(0)
            arrays = [_random(spec, rng) for spec in entry["params"]]
            if "weights" in entry:
                saved = np.load(os.path.join(folder, entry["weights"]))
                weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
                check = np.load(os.path.join(folder, entry["check"]))
                arrays = [check["input"]] + weights
            args = [tvm.runtime.tensor(a, device) for a in arrays]
            out = vm["main"](*args)
            out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
            row["finite"] = bool(np.all(np.isfinite(out)))
            if "weights" in entry:
                int8_cpu, fp32_cpu = check["int8_cpu"], check["fp32_cpu"]
                scale = float(np.abs(int8_cpu).max())
                correctness[label] = {
                    "max_abs_diff_vs_cpu_int8": float(np.abs(out - int8_cpu).max()),
                    "rel_l2_vs_cpu_int8": float(np.linalg.norm(out - int8_cpu) / np.linalg.norm(int8_cpu)),
                    "logit_scale": scale,
                    "top1_same_as_cpu_int8": bool(out.argmax() == int8_cpu.argmax()),
                    "top1_same_as_cpu_fp32": bool(out.argmax() == fp32_cpu.argmax()),
                    "rel_l2_vs_cpu_fp32": float(np.linalg.norm(out - fp32_cpu) / np.linalg.norm(fp32_cpu)),
                }
            row["ms"] = time_vm(vm, device, args) * 1e3
        except Exception:  # noqa: BLE001  (one failing library is a result)
            row["error"] = traceback.format_exc()[-1500:]
        results[label] = row
        print(
            label, json.dumps({k: v for k, v in row.items() if k != "error"}), row.get("error", "")[-300:], flush=True
        )
    return results, correctness


def deploy_check(folder: str, out_dir: str) -> dict:
    """`tvmquant run` (the CLI, TVM runtime only) on a library from `tvmquant compile --target nvidia/...`,
    compared with the same INT8 model's output on the build machine's CPU."""
    deploy = os.path.join(folder, "deploy")
    if not os.path.isdir(deploy):
        return {"skipped": "no deploy/ folder"}
    out = os.path.join(out_dir, "deploy_y_gpu.npz")
    command = [
        sys.executable,
        "-m",
        "tvmquant.cli",
        "run",
        os.path.join(deploy, "cnn_h100.so"),
        "--input",
        os.path.join(deploy, "x.npz"),
        "-o",
        out,
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        return {"ok": False, "stderr": run.stderr[-1500:]}
    got = np.load(out)["output0"]
    expected = np.load(os.path.join(deploy, "y_cpu.npz"))["output0"]
    return {
        "ok": True,
        "max_abs_diff_vs_cpu_int8": float(np.abs(got - expected).max()),
        "logit_scale": float(np.abs(expected).max()),
        "argmax_agree": float(np.mean(got.argmax(-1) == expected.argmax(-1))),
        "stdout": run.stdout.strip()[-300:],
    }


def torch_baselines() -> dict:
    import torch

    torch.backends.cudnn.benchmark = True
    out = {"torch": torch.__version__}

    def bench(fn, n=50):
        with torch.no_grad():
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) / n)
        return float(np.median(times)) * 1e3

    try:
        import torchvision

        net = torchvision.models.resnet50().eval().half().cuda().to(memory_format=torch.channels_last)
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
            out[f"resnet50_fp16_b{batch}"] = bench(lambda x=x: net(x))
    except Exception as err:  # noqa: BLE001
        out["resnet50_error"] = repr(err)[:300]
    try:
        layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, activation="gelu", batch_first=True, norm_first=True)
        layer = layer.eval().half().cuda()
        for batch in (1, 32):
            x = torch.randn(batch, 128, 768, device="cuda").half()
            out[f"transformer_fp16_b{batch}"] = bench(lambda x=x: layer(x))
        for batch in (1, 32):
            m = batch * 128
            total = 0.0
            for k, n in ((768, 768), (768, 768), (768, 768), (768, 768), (768, 3072), (3072, 768)):
                a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                b = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
                total += bench(lambda a=a, b=b: torch._int_mm(a, b))
            out[f"transformer_int_mm_6_matmuls_b{batch}"] = total
    except Exception as err:  # noqa: BLE001
        out["transformer_error"] = repr(err)[:300]
    return out


def main() -> None:
    folder = sys.argv[1]
    out_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.environ.get("OUT", folder), "cuda_models.json")
    device = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    result = {"device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result["models"], result["correctness"] = run_models(folder)
    try:
        result["correctness"]["deploy_cli_run"] = deploy_check(folder, os.path.dirname(os.path.abspath(out_path)))
    except Exception:  # noqa: BLE001
        result["correctness"]["deploy_cli_run"] = {"ok": False, "error": traceback.format_exc()[-800:]}
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)
    try:
        result["torch"] = torch_baselines()
    except Exception:  # noqa: BLE001
        result["torch"] = {"error": traceback.format_exc()[-800:]}
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"\n{'model':<28}{'ms':>10}")
    for label, row in result["models"].items():
        print(f"{label:<28}{row.get('ms', float('nan')):>10.3f}")
    for key, value in result["torch"].items():
        if isinstance(value, float):
            print(f"torch {key:<22}{value:>10.3f}")
    print("correctness", json.dumps(result["correctness"]))
    print("wrote", out_path)


if __name__ == "__main__":
    main()
