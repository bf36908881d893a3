"""Tune for a GPU from a machine without one: sample and build here, measure there, import the times.

meta-schedule measures candidates on the device it tunes for. When the compiler host has no GPU (a CI box, a
laptop) and the GPU host has only TVM's runtime, the tuning loop splits in three steps:

1. :func:`make_package` (here, needs ``nvcc``): the tuning tasks of one or more Relax models
   (:func:`tvmquant.schedules.cuda.extract_tasks`), ``per_task`` schedules drawn from each task's design space
   (the project's WMMA rules for int8 and float16 GEMMs, meta-schedule's CUDA rules otherwise), each lowered
   to check it builds, then grouped into a few libraries with their CUDA binaries compiled by ``nvcc``
   (:mod:`tvmquant.cuda_binaries`). A CPU reference of every task (the unscheduled kernel, outer loops
   parallel) goes along, so the GPU host can check each candidate's output.
2. :func:`tvmquant.remote.measure_package` (on the GPU host, runtime only): runs each candidate on seeded
   random inputs, compares it with the reference, times it, and writes ``measurements.json``.
3. :func:`import_measurements` (here): turns the times into meta-schedule tuning records in a JSON database;
   :func:`tvmquant.schedules.cuda.build` (``tvmquant compile --db``) then picks the fastest correct schedule of
   every kernel.

The records are ordinary meta-schedule records (trace, workload, run seconds), so a later ``tune`` with a
GPU can start from them, and an XGBoost cost model can train on them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from . import cuda

logger = logging.getLogger(__name__)

PACKAGE_FORMAT = 1
MANIFEST = "manifest.json"
MEASUREMENTS = "measurements.json"
TRACES = "traces.json"

__all__ = ["make_package", "import_measurements", "reference_target", "PACKAGE_FORMAT"]


def target_dict(target: tvm.target.Target) -> dict:
    """A target as plain JSON-able Python (``Target(target_dict(t))`` gives ``t`` back)."""

    def plain(value):
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if hasattr(value, "items"):
            return {str(k): plain(v) for k, v in value.items()}
        if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
            return [plain(v) for v in value]
        if hasattr(value, "value"):
            return value.value
        return str(value)

    return {key: value for key, value in plain(target.export()).items() if value not in ("", None)}


def reference_target() -> tvm.target.Target:
    """The CPU target of the reference kernels: any x86-64 server with AVX2 (the GPU host's CPU is unknown)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})


def _reference(func: tvm.tirx.PrimFunc, symbol: str) -> tvm.tirx.PrimFunc:
    """The unscheduled kernel with the outermost loop of every top-level block parallel (a CPU reference)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        node = sch.get(block)
        spatial = sum(1 for iv in node.iter_vars if int(iv.iter_type) == 0)
        if not loops or spatial == 0:
            continue
        try:
            outer = sch.fuse(*loops[: min(2, spatial)]) if spatial >= 2 and len(loops) >= 2 else loops[0]
            sch.parallel(outer)
        except Exception:  # noqa: BLE001  (a loop that cannot be fused or parallelized stays serial)
            continue
    return sch.mod["main"].with_attr("global_symbol", symbol)


@dataclass
class _Candidate:
    symbol: str
    task: int
    trace: str  # tvm.ir.save_json of the schedule's trace
    func: tvm.tirx.PrimFunc


def _arg_specs(func: tvm.tirx.PrimFunc) -> list[dict]:
    """Shape, dtype and whether the kernel writes it, for each buffer argument."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    written = set()
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        written.update(region.source.name for region in sch.get(block).writes)
    specs = []
    for param in func.params:  # TVM 0.27: the params are the buffers
        spec = {"shape": [int(d) for d in param.shape], "dtype": str(param.dtype)}
        if param.name in written:
            spec["output"] = True
        specs.append(spec)
    return specs


def _compile_library(payload) -> dict:
    """Build one candidate library and its CUDA binary (runs in a worker process)."""
    from .. import cuda_binaries

    funcs_json, target_json, path = payload
    target = tvm.target.Target(json.loads(target_json))
    funcs = {symbol: tvm.ir.load_json(text) for symbol, text in funcs_json}
    try:
        lib = tvm.compile(tvm.IRModule(funcs), target=target)
        binaries = cuda_binaries.precompile(lib, target)
        lib.export_library(path)
    except Exception as err:  # noqa: BLE001  (nvcc refused one kernel: the library is dropped, not the package)
        return {"path": path, "binaries": {}, "error": f"{type(err).__name__}: {str(err).strip()[-400:]}"}
    return {"path": path, "binaries": binaries}


def make_package(
    models,
    out_dir: str | os.PathLike,
    target: tvm.target.Target | None = None,
    per_task: int = 8,
    seed: int = 0,
    functions_per_library: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write a measurement package for the tuning tasks of ``models`` to ``out_dir``.

    Parameters
    ----------
    models : dict of str to tvm.IRModule
        Relax models by label (e.g. ``{"resnet50_int8_b1": mod}``); tasks shared between models are sampled
        once.
    out_dir : path
        Created if missing; must be empty.
    target : tvm.target.Target, optional
        A CUDA target (default :func:`tvmquant.schedules.cuda.cuda_target`, an H100).
    per_task : int
        Schedules drawn per task (the trial budget).
    seed : int
        Seed of the sampling.
    functions_per_library : int
        Candidates per library (one ``nvcc`` run each; smaller libraries isolate a crashing kernel better).
    workers : int, optional
        Processes compiling libraries (default: the CPU count).

    Returns
    -------
    dict
        The manifest (also written as ``out_dir/manifest.json``).
    """
    from .. import cuda_binaries

    target = cuda.cuda_target() if target is None else target
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.listdir(out_dir):
        raise FileExistsError(f"package folder {out_dir!r} is not empty; give a new folder")
    start = time.time()

    tasks, seen = [], {}
    for label, mod in models.items():
        for task in cuda.extract_tasks(mod, target):
            task_mod = task.dispatched[0]
            key = tvm_ffi.structural_hash(task_mod)
            if key in seen and tvm_ffi.structural_equal(tasks[seen[key]]["mod"], task_mod):
                tasks[seen[key]]["models"].setdefault(label, task.weight)
                continue
            seen[key] = len(tasks)
            tasks.append({"name": task.task_name, "mod": task_mod, "models": {label: task.weight}})
    _say(progress, f"{len(tasks)} tasks in {len(models)} model(s) ({time.time() - start:.0f} s)")

    candidates: list[_Candidate] = []
    rejected = 0
    for index, task in enumerate(tasks):
        func = task["mod"]["main"]
        task["kind"] = cuda.space_kind(func) or "cuda"
        task["args"] = _arg_specs(func)
        drawn = cuda._sample(task["mod"], target, per_task, seed + index, task["name"])
        for number, sch in enumerate(drawn):
            error = cuda._compiles(sch, target)
            if error is not None:
                rejected += 1
                continue
            symbol = f"t{index}_c{number}"
            candidates.append(
                _Candidate(
                    symbol, index, tvm.ir.save_json(sch.trace), sch.mod["main"].with_attr("global_symbol", symbol)
                )
            )
        _say(progress, f"task {index + 1}/{len(tasks)} {task['name'][:60]}: {len(drawn)} drawn")
    _say(progress, f"{len(candidates)} candidates, {rejected} rejected at lowering ({time.time() - start:.0f} s)")

    # Group whole tasks into libraries, so that each task's reference runs once, in one worker.
    groups, current = [], []
    for index in range(len(tasks)):
        mine = [c for c in candidates if c.task == index]
        if current and len(current) + len(mine) > functions_per_library:
            groups.append(current)
            current = []
        current.extend(mine)
    if current:
        groups.append(current)
    payloads = []
    for number, group in enumerate(groups):
        path = os.path.join(out_dir, f"candidates_{number}.so")
        funcs_json = [(c.symbol, tvm.ir.save_json(c.func)) for c in group]
        payloads.append((funcs_json, json.dumps(target_dict(target)), path))
    workers = workers or os.cpu_count() or 1
    binaries = {}
    dropped = set()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(_compile_library, payloads):
            binaries.update(done["binaries"])
            name = os.path.basename(done["path"])
            if "error" in done:
                dropped.add(name)
                logger.warning("library %s dropped: %s", name, done["error"])
                _say(progress, f"dropped {name}: {done['error'][-200:]}")
            else:
                _say(progress, f"built {name} ({time.time() - start:.0f} s)")
    cuda_binaries.write_archive(binaries, os.path.join(out_dir, "candidates.cuda.zip"))

    references = tvm.IRModule(
        {f"ref_{index}": _reference(task["mod"]["main"], f"ref_{index}") for index, task in enumerate(tasks)}
    )
    tvm.compile(references, target=reference_target()).export_library(os.path.join(out_dir, "references.so"))

    library_of = {c.symbol: f"candidates_{number}.so" for number, group in enumerate(groups) for c in group}
    candidates = [c for c in candidates if library_of[c.symbol] not in dropped]
    manifest = {
        "format": PACKAGE_FORMAT,
        "target": target_dict(target),
        "per_task": per_task,
        "seed": seed,
        "tvm": tvm.__version__,
        "models": {label: [i for i, t in enumerate(tasks) if label in t["models"]] for label in models},
        "tasks": [
            {
                "index": index,
                "name": task["name"],
                "kind": task["kind"],
                "weights": task["models"],
                "args": task["args"],
                "reference": f"ref_{index}",
            }
            for index, task in enumerate(tasks)
        ],
        "candidates": [{"symbol": c.symbol, "task": c.task, "library": library_of[c.symbol]} for c in candidates],
        "build_s": round(time.time() - start, 1),
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as handle:
        json.dump(manifest, handle)
    # The traces and workloads stay on this machine (the GPU host needs neither): TRACES is not shipped.
    with open(os.path.join(out_dir, TRACES), "w") as handle:
        json.dump(
            {
                "workloads": [tvm.ir.save_json(task["mod"]) for task in tasks],
                "traces": {c.symbol: c.trace for c in candidates},
            },
            handle,
        )
    _say(progress, f"package written to {out_dir} ({time.time() - start:.0f} s)")
    return manifest


def import_measurements(
    package_dir: str | os.PathLike, db_dir: str | os.PathLike, measurements: str | os.PathLike | None = None
) -> dict:
    """Commit the measured candidates of a package to the meta-schedule JSON database ``db_dir``.

    Candidates whose output did not match the reference, or that failed to run, are committed with no run
    time (meta-schedule's mark for a failed build or run), so they are never picked.

    Returns
    -------
    dict
        ``{"committed": n, "correct": n, "wrong": n, "failed": n, "tasks": n, "tuned_tasks": n}``.
    """
    from ..remote import read_manifest

    package_dir = os.fspath(package_dir)
    manifest = read_manifest(package_dir)
    if not os.path.isfile(os.path.join(package_dir, TRACES)):
        raise FileNotFoundError(
            f"{package_dir!r} has no {TRACES}: import into the database on the machine that made the package "
            "(the traces stay there; the GPU host needs only the rest)"
        )
    path = os.fspath(measurements) if measurements is not None else os.path.join(package_dir, MEASUREMENTS)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no measurements at {path!r}: run `python -m tvmquant.remote measure {package_dir}` on the GPU host "
            "and copy its measurements.json back"
        )
    with open(path) as handle:
        measured = json.load(handle)["candidates"]
    from tvm.s_tir.tensor_intrin import cuda as _wmma  # noqa: F401  traces name the WMMA intrinsics

    with open(os.path.join(package_dir, TRACES)) as handle:
        saved = json.load(handle)
    target = tvm.target.Target(manifest["target"])
    db_dir = os.fspath(db_dir)
    os.makedirs(db_dir, exist_ok=True)
    from .common import open_json_database

    database = open_json_database(db_dir)
    counts = {"committed": 0, "correct": 0, "wrong": 0, "failed": 0, "unmeasured": 0}
    tuned = set()
    workloads = {}
    for candidate in manifest["candidates"]:
        result = measured.get(candidate["symbol"])
        if result is None:
            counts["unmeasured"] += 1
            continue
        task = candidate["task"]
        if task not in workloads:
            mod = tvm.ir.load_json(saved["workloads"][task])
            workloads[task] = (database.commit_workload(mod), ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
        workload, args_info = workloads[task]
        ok = result.get("seconds") is not None and bool(result.get("correct", False))
        run_secs = [float(result["seconds"])] if ok else None
        trace = tvm.ir.load_json(saved["traces"][candidate["symbol"]])
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, run_secs, target, args_info))
        counts["committed"] += 1
        if ok:
            counts["correct"] += 1
            tuned.add(task)
        elif result.get("seconds") is not None:
            counts["wrong"] += 1
        else:
            counts["failed"] += 1
    counts["tasks"] = len(manifest["tasks"])
    counts["tuned_tasks"] = len(tuned)
    return counts


def _say(progress: bool, message: str) -> None:
    logger.info(message)
    if progress:
        print(message, flush=True)
