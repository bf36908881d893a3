"""Untuned default schedules on this CPU: the first sampled sketch (old) vs the heuristic's decisions (new).

For each model, FP32 (what calibration runs) and INT8 (``tvmquant.quantize`` with random calibration data),
each compiled for the host with ``tvmquant.schedules.x86.build(mod, target, fallback=...)``:

- ``first-sketch``: meta-schedule's first design-space sketch whose random decisions (fixed seed) pass the
  postprocessors and compile (the default before ``tvmquant.schedules.x86.defaults``);
- ``sketch``: the heuristic (register tile of vector accumulators, outer tiles for the cores, pad kept out of
  the conv), falling back to the first valid sketch per kernel;
- ``tuned`` (``--tune``, Fashion-MNIST only by default: ResNet-50 takes many minutes on 2 cores):
  ``x86.tune(mod, target, trials=16 * tasks)`` with meta-schedule's evolutionary search, then ``build``.

Each build runs in a fresh process (TVM's intrinsic registry import, ~25 s, is timed apart as
``intrinsics_seconds``; the default schedules are memoised per process, so a second build in one process
would be free). Each library is timed in a fresh process per thread count (``TVM_NUM_THREADS``, medians of a
timing window, :func:`tvmquant.benchmark.time_library`). The machine is shared: repeat with ``--repeats`` and
read the medians.

Run: ``python bench/default_schedules.py [--models resnet50 fmnist] [--tune fmnist] [--repeats 3]``.
Writes ``bench/results/default_schedules.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Build one (model, precision, policy) in a fresh process; prints a JSON line with the timings.
_BUILD = r"""
import json, sys, time
t0 = time.time()
import tvm
from tvmquant.library import write_library
from tvmquant.schedules import intrinsics, x86
from tvmquant.api import _relax_inputs
intrinsics.register_x86_intrinsics()
t1 = time.time()
mod = tvm.ir.load_json(open(sys.argv[1]).read())
fallback, library, db_dir = sys.argv[2], sys.argv[3], (sys.argv[4] or None)
target = x86.x86_target()
start = time.time()
ex = x86.build(mod, target, db_dir=db_dir, fallback=fallback, warn_untuned=False)
built = time.time() - start
write_library(ex, mod, library, _relax_inputs(mod), target)
print(json.dumps({"build_seconds": round(built, 1), "intrinsics_seconds": round(t1 - t0, 1)}))
"""

#: Tune one module in a fresh process: ``x86.tune(mod, target, trials=16 * tasks, db_dir=...)``.
_TUNE = r"""
import json, sys, time
import tvm
from tvmquant.schedules import x86
mod = tvm.ir.load_json(open(sys.argv[1]).read())
target = x86.x86_target()
tasks = x86.extract_tasks(mod, target)
start = time.time()
x86.tune(mod, target, trials=16 * len(tasks), db_dir=sys.argv[2], trials_per_task=16, progress=False)
print(json.dumps({"tuning_seconds": round(time.time() - start, 1), "tasks": len(tasks)}))
"""


def _run_json(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_path(name: str, folder: str) -> str:
    if name == "resnet50":
        import onnx

        sys.path.insert(0, HERE)
        from speed_x86 import resnet50_style

        path = os.path.join(folder, "resnet50_style.onnx")
        onnx.save(resnet50_style(), path)
        return path
    from tvmquant.examples import fmnist_model_path

    return fmnist_model_path()


def bench_model(name: str, folder: str, seconds: float, repeats: int, tune: bool, say) -> dict:
    import tvm

    import tvmquant
    from tvmquant.api import load_model

    path = model_path(name, folder)
    fp32, inputs, _, _ = load_model(path, batch_size=1)
    spec = inputs[0]
    rng = np.random.default_rng(1)
    calib = (rng.standard_normal((8, *spec.shape[1:])) * 0.5).astype(spec.dtype)
    start = time.time()
    qmodel = tvmquant.quantize(path, calib_data=calib, progress=False, report_batches=0)
    result = {"input": {"name": spec.name, "shape": list(spec.shape)}, "calibration_images": len(calib)}
    result["quantize_seconds"] = round(time.time() - start, 1)  # FP32 build with the new defaults + 8 images
    x_path = os.path.join(folder, f"{name}_x.npz")
    np.savez(x_path, **{spec.name: calib[:1]})

    modules = {"fp32": fp32, "int8": qmodel.mod}
    policies = ["first-sketch", "sketch"] + (["tuned"] if tune else [])
    for precision, mod in modules.items():
        mod_path = os.path.join(folder, f"{name}_{precision}.json")
        with open(mod_path, "w") as handle:
            handle.write(tvm.ir.save_json(mod))
        rows = {}
        for policy in policies:
            row = {}
            db_dir = ""
            if policy == "tuned":
                db_dir = os.path.join(folder, f"{name}_{precision}_db")
                say(f"{name} {precision}: tuning ...")
                row.update(_run_json(_TUNE, mod_path, db_dir))
            library = os.path.join(folder, f"{name}_{precision}_{policy}.so")
            say(f"{name} {precision} {policy}: building ...")
            row.update(_run_json(_BUILD, mod_path, "sketch" if policy == "tuned" else policy, library, db_dir))
            for threads in (1, 2):
                times = [tvmquant.benchmark.time_library(library, x_path, threads, seconds) for _ in range(repeats)]
                row[f"ms_{threads}t"] = round(statistics.median(times), 3)
                row[f"ms_{threads}t_runs"] = [round(t, 3) for t in times]
            say(f"{name} {precision} {policy}: {json.dumps(row)}")
            rows[policy] = row
        for t in (1, 2):
            rows[f"speedup_new_vs_old_{t}t"] = round(rows["first-sketch"][f"ms_{t}t"] / rows["sketch"][f"ms_{t}t"], 2)
            if tune:
                rows[f"new_over_tuned_{t}t"] = round(rows["sketch"][f"ms_{t}t"] / rows["tuned"][f"ms_{t}t"], 2)
                rows[f"old_over_tuned_{t}t"] = round(rows["first-sketch"][f"ms_{t}t"] / rows["tuned"][f"ms_{t}t"], 2)
        result[precision] = rows
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["fmnist", "resnet50"], choices=["fmnist", "resnet50"])
    parser.add_argument("--tune", nargs="*", default=["fmnist"], help="models that also get a tuned reference")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="fresh timing processes per measurement")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "default_schedules.json"))
    args = parser.parse_args()

    import tvmquant.benchmark
    from tvmquant.schedules import x86

    folder = tempfile.mkdtemp(prefix="tvmquant-defaults-")
    target = x86.x86_target()
    result = {
        "command": "python bench/default_schedules.py " + " ".join(sys.argv[1:]),
        "machine": {**tvmquant.benchmark.machine_info(), "target": str(target)},
        "note": "2-core machine shared with other jobs: latencies are medians of --repeats fresh processes",
        "models": {},
    }

    def say(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    for name in args.models:
        result["models"][name] = bench_model(name, folder, args.seconds, args.repeats, name in args.tune, say)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
