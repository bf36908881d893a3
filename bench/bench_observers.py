"""Throughput and memory of the calibration observers on 10^8 streamed float32 values.

Each method runs in a fresh subprocess, so that its peak RSS (``resource.getrusage``) is its own. A worker
streams ``--batches`` batches of ``--batch-size`` values generated on the fly from a seeded RNG (a unit
Gaussian with rare outliers up to 200, one of 10^4 half-way through so that the histograms must grow),
times ``collect`` (generation excluded) and ``compute``, then measures with ``tracemalloc`` what one
``collect`` allocates on top of its batch and what the observer keeps. The data would take
``batches * batch_size * 4`` bytes if kept: the point is that memory stays flat far below that.

Run from the repository root (about a minute on 2 cores)::

    python bench/bench_observers.py            # writes bench/results/observers.json

The observers are pure numpy; the workers import ``tvmquant.calibration`` without running
``tvmquant/__init__.py`` (which loads TVM), so TVM's own memory does not blur the figures.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "observers.json"

#: Benchmark case -> observer constructor, evaluated in the worker (affine unless marked symmetric).
CASES = {
    "max": "MaxObserver(symmetric=False, name='bench')",
    "percentile": "PercentileObserver(99.99, 2048, symmetric=False, name='bench')",
    "percentile_symmetric": "PercentileObserver(99.99, 2048, symmetric=True, name='bench')",
    "entropy": "EntropyObserver(2048, 128, 128, symmetric=False, name='bench')",
    "entropy_symmetric": "EntropyObserver(2048, 128, 128, symmetric=True, name='bench')",
    "mse": "MSEObserver(2048, qmin=0, qmax=255, symmetric=False, name='bench')",
    "mse_symmetric": "MSEObserver(2048, qmin=-127, qmax=127, symmetric=True, name='bench')",
    "per_channel_max": "PerChannelMaxObserver(axis=0, symmetric=True, name='bench')",
}


def _import_calibration():
    """``tvmquant.calibration`` without executing ``tvmquant/__init__.py`` (which imports TVM)."""
    if "tvmquant" not in sys.modules:
        spec = importlib.util.find_spec("tvmquant")
        if spec is None:  # not installed: use the source tree this script sits in
            locations = [str(ROOT / "tvmquant")]
        else:
            locations = list(spec.submodule_search_locations)
        package = types.ModuleType("tvmquant")
        package.__path__ = locations
        sys.modules["tvmquant"] = package
    import tvmquant.calibration as calibration

    return calibration


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _make_batch(rng: np.random.Generator, index: int, batch_size: int, num_batches: int, shape) -> np.ndarray:
    batch = rng.standard_normal(batch_size, dtype=np.float32)
    # Rare outliers (1 in 10^4) on both sides, and one far out half-way through to force the histogram
    # to grow (re-bin) long after its first batch set the width.
    positions = rng.integers(0, batch_size, size=max(1, batch_size // 10_000))
    batch[positions] = rng.uniform(-200.0, 200.0, size=len(positions)).astype(np.float32)
    if index == num_batches // 2:
        batch[0] = np.float32(1e4)
    return batch.reshape(shape)


def run_worker(case: str, num_batches: int, batch_size: int, seed: int) -> dict:
    """Stream the data into one observer; timings, ranges and memory figures as a dict."""
    calibration = _import_calibration()
    rss_after_import = _max_rss_bytes()
    shape = (1000, batch_size // 1000) if case == "per_channel_max" else (batch_size,)
    make = eval(f"lambda: calibration.{CASES[case]}", {"calibration": calibration})  # noqa: S307

    observer = make()
    rng = np.random.default_rng(seed)
    generate_seconds = collect_seconds = 0.0
    for index in range(num_batches):
        start = time.perf_counter()
        batch = _make_batch(rng, index, batch_size, num_batches, shape)
        middle = time.perf_counter()
        observer.collect(batch)
        collect_seconds += time.perf_counter() - middle
        generate_seconds += middle - start
        del batch
    start = time.perf_counter()
    a_min, a_max = observer.compute()
    compute_seconds = time.perf_counter() - start
    max_rss = _max_rss_bytes()

    # Memory as Python sees it: what collect() allocates beyond its input, and what the observer keeps.
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    traced = make()
    collect_extra_peak = 0
    rng = np.random.default_rng(seed + 1)
    for index in range(5):
        batch = _make_batch(rng, index, batch_size, 5, shape)
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        traced.collect(batch)
        collect_extra_peak = max(collect_extra_peak, tracemalloc.get_traced_memory()[1] - before)
        del batch
    # 10^7 values in one call (per channel: 10x longer channels, the channel count must not change).
    big = np.concatenate([_make_batch(rng, 0, batch_size, 1, shape) for _ in range(10)], axis=len(shape) - 1)
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    traced.collect(big)
    big_batch_extra_peak = tracemalloc.get_traced_memory()[1] - before
    del big
    gc.collect()
    state_bytes = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()

    floats = num_batches * batch_size
    return {
        "method": case,
        "observer": CASES[case],
        "floats": floats,
        "batches": num_batches,
        "batch_shape": list(shape),
        "collect_seconds": round(collect_seconds, 4),
        "floats_per_second": round(floats / collect_seconds),
        "generate_seconds_excluded": round(generate_seconds, 4),
        "compute_seconds": round(compute_seconds, 6),
        "range": [
            np.asarray(a_min).tolist() if np.ndim(a_min) == 0 else "per-channel",
            np.asarray(a_max).tolist() if np.ndim(a_max) == 0 else "per-channel",
        ],
        "num_channels": int(np.size(a_max)),
        "max_rss_bytes": max_rss,
        "rss_after_import_bytes": rss_after_import,
        "rss_growth_bytes": max_rss - rss_after_import,
        "tracemalloc_collect_extra_peak_bytes": int(collect_extra_peak),
        "tracemalloc_collect_extra_peak_bytes_1e7_batch": int(big_batch_extra_peak),
        "tracemalloc_observer_state_bytes": int(state_bytes),
    }


def machine_info() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size % 1000:
        parser.error("--batch-size must be a multiple of 1000 (the per-channel case uses 1000 channels)")

    if args.worker:
        print(json.dumps(run_worker(args.worker, args.batches, args.batch_size, args.seed)))
        return 0

    results = []
    started = time.perf_counter()
    for case in args.methods:
        command = [
            sys.executable,
            __file__,
            "--worker",
            case,
            "--batches",
            str(args.batches),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ]
        worker = subprocess.run(command, capture_output=True, text=True)
        if worker.returncode:
            raise RuntimeError(f"benchmark worker for {case!r} failed:\n{worker.stderr}")
        result = json.loads(worker.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{case:22s} {result['floats_per_second'] / 1e6:8.1f} M floats/s  "
            f"compute {result['compute_seconds'] * 1e3:7.2f} ms  "
            f"max RSS {result['max_rss_bytes'] / 2**20:6.1f} MiB "
            f"(+{result['rss_growth_bytes'] / 2**20:.1f} after import)  "
            f"collect extra {result['tracemalloc_collect_extra_peak_bytes'] / 2**20:.1f} MiB, "
            f"1e7 batch {result['tracemalloc_collect_extra_peak_bytes_1e7_batch'] / 2**20:.1f} MiB, "
            f"state {result['tracemalloc_observer_state_bytes'] / 2**10:.1f} KiB",
            flush=True,
        )
    report = {
        "benchmark": "tvmquant.calibration observers, streaming float32",
        "machine": machine_info(),
        "settings": {"batches": args.batches, "batch_size": args.batch_size, "seed": args.seed},
        "data_bytes_if_kept": args.batches * args.batch_size * 4,
        "data": (
            "float32 unit Gaussian, 1 in 10^4 values replaced by U(-200, 200), one value of 1e4 in the middle"
            " batch (forces re-binning). The ranges are for reference only: with one value at 1e4 a uniform "
            "2048-bin histogram cannot resolve the Gaussian bulk (bin width 4), so entropy keeps the full "
            "range, as TensorRT's algorithm does on such data"
        ),
        "memory_notes": (
            "max_rss_bytes: peak RSS of the worker process (numpy imported, TVM not); rss_growth_bytes: "
            "peak RSS minus RSS after imports, including the 4 MB batch and the RNG's temporaries; "
            "tracemalloc_*: bytes one collect() allocates beyond its input, and bytes the observer keeps"
        ),
        "total_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
