"""Per-kernel time of a compiled model: where a library from ``tvmquant compile`` spends its time.

Runs the Relax VM with an instrument that times every call (kernels and VM builtins such as
``alloc_tensor``), over a few runs, and prints the kernels sorted by total time with their call counts.
Instrumenting adds a few microseconds per call, so the total is a little above the plain latency.

Run: ``TVM_NUM_THREADS=1 python bench/profile_library.py model.so inputs.npz [--runs 5] [--top 40]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def profile(library: str, inputs_npz: str, runs: int = 5) -> tuple[float, list[tuple[str, float, int]]]:
    """Mean milliseconds per run, and (name, ms per run, calls per run) per called function."""
    import tvm
    from tvm import relax

    from tvmquant.deploy import load_library

    model = load_library(library)  # checks the metadata; its VM runs the library
    feed = dict(np.load(inputs_npz))
    args = [tvm.runtime.tensor(feed[spec.name]) for spec in model.inputs]
    vm = relax.VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
    for _ in range(3):
        vm["main"](*args)
    totals: dict[str, list] = {}
    started: list[float] = []

    def instrument(_func, name, before, _ret, *_args):
        if before:
            started.append(time.perf_counter())
            return
        entry = totals.setdefault(str(name), [0.0, 0])
        entry[0] += time.perf_counter() - started.pop()
        entry[1] += 1

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    rows = [(name, seconds * 1e3 / runs, calls // runs) for name, (seconds, calls) in totals.items()]
    rows.sort(key=lambda row: -row[1])
    return sum(row[1] for row in rows), rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("library")
    parser.add_argument("inputs", help=".npz with one array per model input (one batch)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    total, rows = profile(args.library, args.inputs, args.runs)
    print(f"total {total:.3f} ms per run (instrumented)")
    for name, ms, calls in rows[: args.top]:
        print(f"{ms:9.3f} ms {calls:4d}x  {name}")


if __name__ == "__main__":
    main()
