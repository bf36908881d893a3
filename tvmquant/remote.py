"""The GPU-host half of offline tuning: check and time the candidates of a package (TVM runtime only).

Usage on the GPU host (repository or wheel of tvmquant importable, TVM's runtime on ``PYTHONPATH``)::

    TVM_USE_RUNTIME_LIB=1 python -m tvmquant.remote measure PACKAGE [--out PACKAGE/measurements.json]

``PACKAGE`` is a folder written by :func:`tvmquant.schedules.offline.make_package` (its ``traces.json`` may stay
behind). Candidates run in a child process; when a kernel crashes it (a CUDA context error is sticky), the rest
of that library is marked failed and a new child goes on with the next library. For every task the CPU reference kernel
(``references.so``) computes the expected output from seeded random inputs; every candidate is checked
against it, then timed with TVM's ``time_evaluator`` (median of ``repeat`` runs of at least
``min_repeat_ms``). The JSON is rewritten after each library, so a run cut short keeps what it measured.
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

MANIFEST = "manifest.json"
MEASUREMENTS = "measurements.json"


def read_manifest(package: str) -> dict:
    """The manifest of a package folder, or a clear error naming the folder."""
    path = os.path.join(package, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{package!r} is not a measurement package (no {MANIFEST}); make one with "
            "`tvmquant tune MODEL --target nvidia/... --package DIR`"
        )
    with open(path) as handle:
        return json.load(handle)


def random_inputs(specs: list[dict], seed: int) -> list[np.ndarray]:
    """Seeded random arrays for kernel arguments (full int8 range, unit normals for floats)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape, dtype = tuple(spec["shape"]), spec["dtype"]
        if dtype.startswith("int") or dtype.startswith("uint"):
            info = np.iinfo(dtype)
            low, high = max(int(info.min), -128), min(int(info.max), 127)
            arrays.append(rng.integers(low, high + 1, shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def compare(got: np.ndarray, expected: np.ndarray) -> dict:
    """Agreement of a GPU output with the CPU reference (:func:`_int_verdict`, :func:`_float_verdict`)."""
    if got.shape != expected.shape:
        return {"correct": False, "error": f"shape {got.shape} != {expected.shape}"}
    if np.issubdtype(expected.dtype, np.integer):
        diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
        return _int_verdict(int(np.count_nonzero(diff)), int(diff.max()) if diff.size else 0, diff.size)
    got64, expected64 = got.astype(np.float64), expected.astype(np.float64)
    if not np.all(np.isfinite(got64)):
        return _float_verdict(None)
    norm = np.linalg.norm(expected64)
    return _float_verdict(float(np.linalg.norm(got64 - expected64) / norm) if norm > 0 else float(np.abs(got64).max()))


def _int_verdict(mismatches: int, max_diff: int, size: int) -> dict:
    """Integer outputs: exact, or within 1 on at most 0.1% of elements (a float epilogue's round-half cases
    may land differently on CPU and GPU)."""
    correct = max_diff <= 1 and mismatches <= max(1, size // 1000)
    return {"correct": bool(correct), "mismatches": mismatches, "max_abs_diff": max_diff}


def _float_verdict(rel: float | None) -> dict:
    """Float outputs: relative L2 error under 1e-2 (float16 inputs); ``None`` means non-finite values."""
    if rel is None:
        return {"correct": False, "rel_err": None, "nonfinite": True}
    return {"correct": bool(rel < 1e-2), "rel_err": rel}


def _measure_libraries(
    package: str,
    libraries: list[str],
    out_path: str,
    min_repeat_ms: float,
    repeat: int,
    deadline: float = float("inf"),
    device_kind: str = "cuda",
) -> None:
    """Child process: check and time every candidate of ``libraries`` in order; keep ``out_path`` (JSON) current.

    ``out_path`` holds ``{"done": [library, ...], "started": library, "candidates": {symbol: result}}``.
    """
    import tvm

    from . import cuda_binaries

    manifest = read_manifest(package)
    stats = cuda_binaries.install(os.path.join(package, "candidates.cuda.zip"))
    device = tvm.cuda(0) if device_kind == "cuda" else tvm.cpu(0)
    state: dict = {"done": [], "started": None, "candidates": {}, "binaries": stats}
    references = tvm.runtime.load_module(os.path.join(package, "references.so"))

    def flush():
        with open(out_path + ".tmp", "w") as handle:
            json.dump(state, handle)
        os.replace(out_path + ".tmp", out_path)

    for library in libraries:
        if time.time() > deadline:
            break
        state["started"] = library
        flush()
        lib = tvm.runtime.load_module(os.path.join(package, library))
        mine = [c for c in manifest["candidates"] if c["library"] == library]
        for task_index in sorted({c["task"] for c in mine}):
            _measure_task(
                manifest["tasks"][task_index],
                [c for c in mine if c["task"] == task_index],
                lib,
                references,
                device,
                state["candidates"],
                min_repeat_ms,
                repeat,
                flush,
            )
        state["done"].append(library)
        flush()


def _measure_task(task, candidates, lib, references, device, results, min_repeat_ms, repeat, flush) -> None:
    from ._compat import to_tensor

    specs = task["args"]
    outputs = [i for i, spec in enumerate(specs) if spec.get("output")] or [len(specs) - 1]
    arrays = random_inputs(specs, seed=task["index"])
    start = time.time()
    cpu_args = [to_tensor(a) for a in arrays]
    references[task["reference"]](*cpu_args)
    expected = {i: cpu_args[i].numpy() for i in outputs}
    reference_s = round(time.time() - start, 3)
    inputs = {i: to_tensor(a, device) for i, a in enumerate(arrays) if i not in outputs}  # read-only
    on_gpu = _torch_expected(expected, device)
    for candidate in candidates:
        symbol = candidate["symbol"]
        result: dict = {"task": task["index"], "reference_s": reference_s}
        try:
            # Outputs start as random garbage, so an element the kernel does not write shows up.
            args = [inputs[i] if i in inputs else to_tensor(arrays[i], device) for i in range(len(arrays))]
            lib[symbol](*args)
            device.sync()
            checks = [_check(args[i], expected[i], on_gpu.get(i)) for i in outputs]
            result["correct"] = all(check["correct"] for check in checks)
            result["check"] = checks[0] if len(checks) == 1 else checks
            timer = lib.time_evaluator(symbol, device, number=1, repeat=repeat, min_repeat_ms=int(min_repeat_ms))
            result["seconds"] = float(np.median(timer(*args).results))
        except Exception as err:  # noqa: BLE001  (a failing kernel is a result)
            result["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        results[symbol] = result
        flush()


def _torch_expected(expected: dict, device) -> dict:
    """The reference outputs as torch tensors on the GPU (compared there: a b32 output is ~100 MB), or {}."""
    if device.dlpack_device_type() != 2:  # not CUDA
        return {}
    try:
        import torch

        return {i: torch.from_numpy(array).cuda() for i, array in expected.items()}
    except Exception:  # noqa: BLE001  (no torch: compare in numpy)
        return {}


def _check(got, expected: np.ndarray, expected_gpu) -> dict:
    """:func:`compare` of a device tensor with the reference, on the GPU through torch when it can."""
    if expected_gpu is not None:
        try:
            import torch

            got_t = torch.from_dlpack(got)
            if not expected_gpu.dtype.is_floating_point:
                diff = (got_t.to(torch.int64) - expected_gpu.to(torch.int64)).abs()
                max_diff = int(diff.max()) if diff.numel() else 0
                return _int_verdict(int((diff != 0).sum()), max_diff, diff.numel())
            g, e = got_t.double(), expected_gpu.double()
            if not bool(torch.isfinite(g).all()):
                return _float_verdict(None)
            norm = float(torch.linalg.norm(e))
            return _float_verdict(float(torch.linalg.norm(g - e)) / norm if norm > 0 else float(g.abs().max()))
        except Exception:  # noqa: BLE001  (fall back to numpy)
            pass
    return compare(got.numpy(), expected)


def measure_package(
    package: str,
    out: str | None = None,
    budget_s: float = 600.0,
    min_repeat_ms: float = 10.0,
    repeat: int = 3,
    library_timeout_s: float = 300.0,
    device: str = "cuda",
) -> dict:
    """Check and time every candidate of ``package`` on this host's GPU (see the module docstring).

    Returns the measurements (also written to ``out``, default ``PACKAGE/measurements.json``).
    """
    out = out or os.path.join(package, MEASUREMENTS)
    manifest = read_manifest(package)
    libraries = sorted({c["library"] for c in manifest["candidates"]}, key=lambda name: int(name.split("_")[-1][:-3]))
    env = dict(os.environ)
    env.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))  # the CPU references run on every core
    measured: dict = {}
    runs: list = []
    remaining = list(libraries)
    start = time.time()
    summary = {
        "device": _device_name(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "package_format": manifest["format"],
        "libraries": len(libraries),
    }

    def write():
        _write(
            out,
            {
                **summary,
                "runs": runs,
                "skipped": remaining,
                "candidates": measured,
                "wall_s": round(time.time() - start, 1),
            },
        )

    while remaining and time.time() - start < budget_s:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            part = handle.name
        command = [sys.executable, "-m", "tvmquant.remote", "_libraries", package, part, *remaining]
        command += ["--min-repeat-ms", str(min_repeat_ms), "--repeat", str(repeat)]
        command += ["--deadline", str(start + budget_s), "--device", device]
        left = max(10.0, budget_s - (time.time() - start) + library_timeout_s)
        try:
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=left)
            status, tail = run.returncode, (run.stderr or "")[-800:]
        except subprocess.TimeoutExpired:
            status, tail = "timeout", ""
        try:
            with open(part) as handle:
                state = json.load(handle)
        except (OSError, ValueError):
            state = {"done": [], "started": None, "candidates": {}}
        os.unlink(part)
        measured.update(state["candidates"])
        done = set(state["done"])
        started = state.get("started")
        crashed = started if started is not None and started not in done and status != 0 else None
        runs.append(
            {
                "status": status,
                "done": len(done),
                "crashed_in": crashed,
                "binaries": state.get("binaries"),
                "stderr_tail": tail if status != 0 else "",
            }
        )
        if crashed is None and not done and status != 0:
            crashed = remaining[0]  # died before starting a library: do not retry it forever
        if status == 0 and not done:
            break  # the deadline passed before the next library
        remaining = [name for name in remaining if name not in done and name != crashed]
        if crashed is not None:
            for candidate in manifest["candidates"]:
                if candidate["library"] == crashed and candidate["symbol"] not in measured:
                    measured[candidate["symbol"]] = {"task": candidate["task"], "error": f"process ended: {status}"}
        print(
            f"{len(done)} libraries done, crashed in {crashed}, {len(remaining)} left, {time.time() - start:.0f} s",
            flush=True,
        )
        write()
    write()
    with open(out) as handle:
        return json.load(handle)


def _device_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvmquant.remote", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="check and time every candidate of a package on this GPU")
    m.add_argument("package")
    m.add_argument("--out", default=None)
    m.add_argument("--budget-s", type=float, default=600.0, help="stop starting libraries after this long")
    m.add_argument("--min-repeat-ms", type=float, default=10.0)
    m.add_argument("--repeat", type=int, default=3)
    m.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: for tests of llvm packages")
    w = sub.add_parser("_libraries")
    w.add_argument("package")
    w.add_argument("out")
    w.add_argument("libraries", nargs="+")
    w.add_argument("--min-repeat-ms", type=float, default=10.0)
    w.add_argument("--repeat", type=int, default=3)
    w.add_argument("--deadline", type=float, default=float("inf"))
    w.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.command == "measure" and not os.path.isfile(os.path.join(args.package, MANIFEST)):
        print(f"error: {args.package!r} is not a measurement package (no {MANIFEST})", file=sys.stderr)
        return 2
    if args.command == "_libraries":
        _measure_libraries(
            args.package, args.libraries, args.out, args.min_repeat_ms, args.repeat, args.deadline, args.device
        )
        return 0
    result = measure_package(args.package, args.out, args.budget_s, args.min_repeat_ms, args.repeat, device=args.device)
    ok = sum(1 for r in result["candidates"].values() if r.get("correct") and r.get("seconds") is not None)
    print(f"{ok}/{len(result['candidates'])} candidates correct and timed; wrote {args.out or 'measurements.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
