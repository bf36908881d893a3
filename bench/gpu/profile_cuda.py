"""GPU host, TVM runtime only: re-time the libraries of bench/cuda_int8.py after warming the GPU up, and time
every kernel call of chosen models in place (device synchronised before and after each call).

Usage: ``TVM_USE_RUNTIME_LIB=1 python3 bench/gpu/profile_cuda.py MODELS_DIR OUT.json [label ...]``
(labels to profile per kernel; default the two ResNet-50 libraries at batch 32).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cuda_models import _random, time_vm  # noqa: E402


def warm_up(seconds: float = 3.0) -> None:
    """Keep the GPU busy so that its clocks are up before anything is timed."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    end = time.time() + seconds
    while time.time() < end:
        a @ a
        torch.cuda.synchronize()


def main() -> None:
    import tvm
    from tvm.runtime import vm as rvm

    from tvmquant import cuda_binaries

    folder, out_path = sys.argv[1], sys.argv[2]
    labels = sys.argv[3:] or ["resnet50_int8_b32", "resnet50_fp16_b32"]
    with open(os.path.join(folder, "index.json")) as handle:
        index = json.load(handle)["models"]
    device = tvm.cuda(0)
    try:
        warm_up()
    except Exception as err:  # noqa: BLE001
        print("warm-up failed:", err)
    result = {"latency_ms": {}, "kernels": {}}
    vms = {}
    for label, entry in index.items():
        path = os.path.join(folder, f"{label}.so")
        cuda_binaries.install(cuda_binaries.archive_path(path))
        vm = rvm.VirtualMachine(tvm.runtime.load_module(path), device)
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(_random(spec, rng), device) for spec in entry["params"]]
        vm["main"](*args)
        times = [time_vm(vm, device, args, min_repeat_ms=100, repeat=5) for _ in range(2)]
        result["latency_ms"][label] = [t * 1e3 for t in times]
        vms[label] = (vm, args)
        print(label, [round(t * 1e3, 3) for t in times], flush=True)
    for label in labels:
        vm, args = vms[label]
        calls: list = []
        started: list = []

        def instrument(_func, name, before, _ret, *_args, calls=calls, started=started):
            device.sync()
            if before:
                started.append(time.perf_counter())
            else:
                calls.append((str(name), time.perf_counter() - started.pop()))

        vm.set_instrument(instrument)
        runs = 5
        for _ in range(runs):
            vm["main"](*args)
        totals: dict = {}
        for name, seconds in calls:
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += seconds
            entry[1] += 1
        rows = sorted(
            ({"name": n, "us_per_run": s * 1e6 / runs, "calls_per_run": c // runs} for n, (s, c) in totals.items()),
            key=lambda row: -row["us_per_run"],
        )
        result["kernels"][label] = rows
        print(label, "top kernels:")
        for row in rows[:12]:
            print(f"  {row['us_per_run']:9.1f} us {row['calls_per_run']:3d}x {row['name'][:90]}")
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)
    print("wrote", out_path)


if __name__ == "__main__":
    main()
