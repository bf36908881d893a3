"""Untuned default schedules vs tuned, INT8 ResNet-50-style (issue 13, item 3: untuned within 1.5x of tuned).

The ResNet-50-style network of ``bench/speed_x86.py``, quantized on 8 random images; one library built with the
default schedules (no database), one after ``tvmquant.schedules.x86.tune`` with 16 trials per kernel (meta-schedule
evolutionary search + XGBoost, started from the default schedules, which ``tune`` measures into the
database first); both timed in fresh processes at 1 and 2 threads (``tvmquant.benchmark``).

Run: ``python bench/untuned_vs_tuned.py [--trials-per-task 16] [-o bench/results/untuned_vs_tuned.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def search_vs_default(mod, target, db_dir: str) -> dict:
    """Per kernel: the default schedule's best measured time in the database (``tune`` seeds it) and the best
    record's; counts the kernels whose best record is a search result (built from the database, they run it)."""
    import tvm
    from tvm_ffi import structural_equal

    from tvmquant.schedules import x86

    records = x86.records_for_target(db_dir, target)
    kernels, searched = {}, 0
    for task in x86.extract_tasks(mod, target):
        module = task.dispatched[0]
        default = x86.default_schedule(
            module["main"], target, task.task_name, int(target.attrs.get("num-cores", 0)) or "physical"
        )
        workload = records.commit_workload(module)
        default_us, best_us = [], []
        for record in records.get_all_tuning_records():
            if not record.workload.same_as(workload) or max(float(s) for s in record.run_secs) >= 1e9:
                continue
            us = float(np.mean([float(s) for s in record.run_secs])) * 1e6
            best_us.append(us)
            sch = tvm.s_tir.Schedule(module)
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            if default is not None and structural_equal(sch.mod["main"], default.mod["main"]):
                default_us.append(us)
        entry = {"default_us": round(min(default_us), 1) if default_us else None}
        entry["best_us"] = round(min(best_us), 1) if best_us else None
        if best_us and (not default_us or min(best_us) < min(default_us)):
            searched += 1
        kernels[task.task_name] = entry
    return {"kernels_with_a_search_result_faster_than_the_default": searched, "per_kernel": kernels}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials-per-task", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("-o", "--output", default=os.path.join(HERE, "results", "untuned_vs_tuned.json"))
    args = parser.parse_args(argv)

    import onnx
    from speed_x86 import resnet50_style

    import tvmquant
    from tvmquant.benchmark import machine_info, time_library
    from tvmquant.library import write_library
    from tvmquant.schedules import x86

    warnings.simplefilter("ignore")
    folder = tempfile.mkdtemp(prefix="tvmq-untuned-tuned-")
    path = os.path.join(folder, "resnet50_style.onnx")
    onnx.save(resnet50_style(), path)
    calib = (np.random.default_rng(1).standard_normal((8, 3, 224, 224)) * 0.5).astype(np.float32)
    qmodel = tvmquant.quantize(path, calib_data=calib, progress=False, report_batches=0)
    sample = os.path.join(folder, "x.npz")
    np.savez(sample, **{qmodel.inputs[0].name: calib[:1]})
    target = x86.x86_target()
    mod = qmodel.mod
    result = {"machine": machine_info(), "target": str(target), "trials_per_task": args.trials_per_task}

    start = time.time()
    untuned = os.path.join(folder, "untuned.so")
    write_library(x86.build(mod, target), mod, untuned, qmodel.inputs, target)
    result["untuned_build_s"] = round(time.time() - start, 1)

    tasks = x86.extract_tasks(mod, target)
    db_dir = os.path.join(folder, "db")
    start = time.time()
    x86.tune(mod, target, trials=args.trials_per_task * len(tasks), db_dir=db_dir, trials_per_task=args.trials_per_task)
    result["tuning_s"] = round(time.time() - start, 1)
    result["tasks"] = len(tasks)
    # tune() measures each kernel's default schedule into the database first: the build takes the faster.
    result["search_vs_default"] = search_vs_default(mod, target, db_dir)
    tuned = os.path.join(folder, "tuned.so")
    write_library(x86.build(mod, target, db_dir=db_dir), mod, tuned, qmodel.inputs, target)

    latency = {}
    for threads in (1, 2):
        latency[f"untuned_{threads}t"] = time_library(untuned, sample, threads, args.seconds)
        latency[f"tuned_{threads}t"] = time_library(tuned, sample, threads, args.seconds)
    result["latency_ms"] = latency
    result["untuned_over_tuned"] = {
        f"{t}t": round(latency[f"untuned_{t}t"] / latency[f"tuned_{t}t"], 3) for t in (1, 2)
    }
    result["goal"] = "untuned within 1.5x of tuned (issue 13, item 3)"
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
