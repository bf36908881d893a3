"""Pre-quantized QDQ models: ONNX Runtime's ``quantize_static`` output of the bundled Fashion-MNIST CNN,
imported by tvmquant (scales taken as given) and compiled onto its integer path, against ONNX Runtime running
the same file: accuracy on the full 10k test set and batch-1 latency, side by side in one run.

Run: ``python bench/qdq_import.py [--db DIR]`` (``--db``: a tuning database from ``tvmquant tune``; without
it the script tunes the imported model's kernels itself, 8 random-search trials per kernel).
Writes ``bench/results/qdq_import.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

import tvmquant
from tvmquant.examples import fmnist_model_path, load_fashion_mnist, load_fmnist_example
from tvmquant.testing.ort import ort_quantize, ort_session

HERE = os.path.dirname(os.path.abspath(__file__))


def latency_ms(fn, x, repeat: int = 200) -> float:
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _ort_runner(session):
    return lambda x: session.run(None, {"input": x})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=None)
    args = parser.parse_args()
    calib, _, _ = load_fmnist_example()
    test_x, test_y = load_fashion_mnist("test")
    folder = tempfile.mkdtemp()
    rows = []
    for per_channel in (True, False):
        path = ort_quantize(fmnist_model_path(), calib, "minmax", per_channel=per_channel, out_dir=folder)
        session = ort_session(path, threads=2)
        ort_pred = np.concatenate(
            [np.argmax(session.run(None, {"input": test_x[i : i + 100]})[0], 1) for i in range(0, len(test_x), 100)]
        )
        qmodel = tvmquant.quantize(path, progress=False)
        batched = qmodel.rebatch(100).compile(db=None)
        tvm_pred = np.concatenate([np.argmax(batched(test_x[i : i + 100]), 1) for i in range(0, len(test_x), 100)])
        db = args.db
        if db is None:  # tune the imported model's INT8 kernels (8 random-search trials per kernel)
            from tvmquant.schedules import x86

            db = os.path.join(folder, f"db_{per_channel}")
            x86.tune(
                qmodel.mod,
                x86.x86_target(),
                trials=1000,
                db_dir=db,
                trials_per_task=8,
                strategy="replay-trace",
                progress=False,
            )
        single = qmodel.compile(db=db)
        one = test_x[:1]
        row = {
            "weights": "per-channel" if per_channel else "per-tensor",
            "onnxruntime_accuracy": float(np.mean(ort_pred == test_y) * 100),
            "tvmquant_accuracy": float(np.mean(tvm_pred == test_y) * 100),
            "prediction_agreement_pct": float(np.mean(ort_pred == tvm_pred) * 100),
            "onnxruntime_latency_ms_b1_2threads": latency_ms(_ort_runner(session), one),
            "tvmquant_latency_ms_b1": latency_ms(single, one),
            "tvmquant_tuning": "given database" if args.db else "8 replay-trace trials per kernel",
        }
        row["speedup_vs_onnxruntime"] = row["onnxruntime_latency_ms_b1_2threads"] / row["tvmquant_latency_ms_b1"]
        rows.append(row)
        print(row, flush=True)
    result = {
        "model": "tvmquant/examples/fmnist_cnn.onnx quantized by onnxruntime quantize_static (QDQ, uint8 act.)",
        "rows": rows,
        "command": "python bench/qdq_import.py" + (f" --db {args.db}" if args.db else ""),
        "machine": {"platform": platform.platform(), "cpu": _cpu(), "cores": os.cpu_count()},
    }
    with open(os.path.join(HERE, "results", "qdq_import.json"), "w") as handle:
        json.dump(result, handle, indent=2)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
