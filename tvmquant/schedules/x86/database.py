"""The tuning database: its records for one target (mcpu and cores), and whether a task is tuned."""

from __future__ import annotations

import logging

import tvm

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.s_tir import meta_schedule as ms

logger = logging.getLogger(__name__)


def _open_database(db_dir: str) -> ms.database.JSONDatabase:
    from ..common import open_json_database

    return open_json_database(db_dir)


def _mcpu(target) -> str:
    return str(target.attrs.get("mcpu", "")) if target is not None else ""


def records_for_target(db_dir: str, target: tvm.target.Target) -> ms.database.MemoryDatabase:
    """The records of the JSON database in ``db_dir`` that were tuned for ``target``'s CPU.

    A database may hold records of several CPUs (``mcpu``); meta-schedule itself ignores the record's
    target when it applies a database, so a schedule tensorized with VNNI would be replayed for an AVX2
    build and fail in LLVM. :func:`tune` and :func:`build` only look at the records this returns.

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
        if _mcpu(record.target) != _mcpu(target) or record.target.kind.name != target.kind.name:
            other += 1
            continue
        workload = selected.commit_workload(record.workload.mod)
        selected.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
    if other:
        logger.info("%s: ignoring %d records tuned for other CPUs than %s", db_dir, other, _mcpu(target))
    return selected


def _is_tuned(database: ms.Database, task: ms.ExtractedTask, target: tvm.target.Target) -> bool:
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return False
    return database.query_tuning_record(mod, target, task.task_name) is not None
