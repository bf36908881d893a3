"""The tuning database: its records for one target (mcpu and cores), and whether a task is tuned."""

from __future__ import annotations

import logging
from collections import Counter

import tvm

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.s_tir import meta_schedule as ms

logger = logging.getLogger(__name__)


def _open_database(db_dir: str) -> ms.database.JSONDatabase:
    from ..common import open_json_database

    return open_json_database(db_dir)


def _mcpu(target) -> str:
    return str(target.attrs.get("mcpu", "")) if target is not None else ""


def _cores(target) -> int:
    return int(target.attrs.get("num-cores", 0) or 0) if target is not None else 0


def _key(target) -> tuple[str, str, int]:
    return (target.kind.name, _mcpu(target), _cores(target))


def describe_target(target) -> str:
    """``"sapphirerapids, 2 cores"``: what a database record or a build is for, in a message."""
    cores = _cores(target)
    return f"{_mcpu(target) or 'generic ' + target.kind.name}" + (f", {cores} cores" if cores else "")


def tuned_targets(db_dir: str) -> dict:
    """The targets the records of ``db_dir`` were tuned for: ``{target JSON: number of records}``."""
    import json

    found: dict = {}
    for record in _open_database(db_dir).get_all_tuning_records():
        key = json.dumps(json.loads(str(record.target)), sort_keys=True)
        found[key] = found.get(key, 0) + 1
    return found


def target_mismatch(db_dir: str, target: tvm.target.Target) -> str | None:
    """A one-line note when ``db_dir`` holds records for other CPUs or core counts than ``target`` (None when
    it holds none for other targets): ``"tuned for sapphirerapids, 2 cores, building for emeraldrapids,
    2 cores: re-tune or pass --target ..."``."""
    import json

    others = {}
    for key, count in tuned_targets(db_dir).items():
        other = tvm.target.Target(json.loads(key))
        if _key(other) != _key(target):
            others[describe_target(other)] = (count, key)
    if not others:
        return None
    (first, (_, first_json)), *_ = sorted(others.items(), key=lambda kv: -kv[1][0])
    listed = "; ".join(f"{name} ({count} records)" for name, (count, _) in others.items())
    return (
        f"{db_dir} was tuned for {listed}, building for {describe_target(target)}: re-tune for this target, "
        f"or pass --target '{first_json}' to build for {first}"
    )


def records_for_target(db_dir: str, target: tvm.target.Target) -> ms.database.MemoryDatabase:
    """The records of the JSON database in ``db_dir`` that were tuned for ``target``: same kind, ``mcpu`` and
    core count (``num-cores``).

    A database may hold records of several CPUs; meta-schedule itself ignores the record's target when it
    applies a database, so a schedule tensorized with VNNI (or AMX) would be replayed for an AVX2 build and
    fail in LLVM, and one tuned for 2 cores would be taken for 16. :func:`tune` and :func:`build` only look at
    the records this returns; :func:`target_mismatch` says what the others were tuned for.

    Parameters
    ----------
    db_dir : str
    target : tvm.target.Target

    Returns
    -------
    tvm.s_tir.meta_schedule.database.MemoryDatabase
    """
    selected = ms.database.MemoryDatabase(module_equality="structural")
    other = 0
    for record in _open_database(db_dir).get_all_tuning_records():
        if _key(record.target) != _key(target):
            other += 1
            continue
        workload = selected.commit_workload(record.workload.mod)
        selected.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
    if other:
        logger.info("%s: ignoring %d records tuned for other targets than %s", db_dir, other, describe_target(target))
    return selected


def _is_tuned(database: ms.Database, task: ms.ExtractedTask, target: tvm.target.Target) -> bool:
    """Whether ``task`` has a valid (measured) record in ``database``: :func:`build` replays it."""
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return False
    return database.query_tuning_record(mod, target, task.task_name) is not None


def _is_searched(
    database: ms.Database, task: ms.ExtractedTask, target: tvm.target.Target, counts: Counter | None = None
) -> bool:
    """Whether meta-schedule's search has run for ``task``: a valid record and at least two records in all.

    :func:`tune` first commits each kernel's default schedule (one record), then searches, which commits a
    record per measured candidate (failed ones included); a task with a single record was seeded by a
    ``tune`` stopped before its search (or tuned with one trial, before seeding): it is searched again.
    ``counts``: :func:`_record_counts` of ``database``, when several tasks are asked about.
    """
    if not _is_tuned(database, task, target):
        return False
    counts = _record_counts(database) if counts is None else counts
    return counts[database.commit_workload(task.dispatched[0])] >= 2  # the existing workload (``has_workload``)


def _record_counts(database: ms.Database) -> Counter:
    """``{workload: number of records}`` of ``database``."""
    return Counter(record.workload for record in database.get_all_tuning_records())
