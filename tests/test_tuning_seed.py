"""tune() seeds the database with each kernel's default schedule: a tuned build is never worse than none.

On AVX2 Zen 3, a ResNet-50-style INT8 model ran 418 ms untuned and 601 ms after tuning 16 trials per kernel:
the search had not reached the heuristic defaults, and the database held only what it found. Now every task's
default schedule (the one build() gives a kernel without a record) is measured and committed first, so the best
record per kernel is at worst the default, and the evolutionary search starts from it.
"""

from __future__ import annotations

import importlib
import re
import warnings

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from test_schedules_x86 import conv_module, run  # noqa: E402
from tvm_ffi import structural_equal  # noqa: E402

from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.x86 import database  # noqa: E402

tune_module = importlib.import_module("tvmquant.schedules.x86.tune")


def _model():
    """A requantized 1x1 conv feeding a padded 3x3 conv: two tuned kernels (and a pad, not tuned)."""
    rng = np.random.default_rng(21)
    mod, _, _ = conv_module((1, 16, 8, 8), [(16, 1, 1, 0, 1), (32, 3, 1, 1, 1)], rng, requantize=True)
    data = rng.integers(0, 256, (1, 16, 8, 8)).astype("uint8")
    return mod, data


def _replayed(record, task):
    """The kernel ``record``'s trace gives, as build()'s MetaScheduleApplyDatabase replays it."""
    sch = tvm.s_tir.Schedule(task.dispatched[0])
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod["main"]


def _records_of(records, task):
    workload = records.commit_workload(task.dispatched[0])
    return [r for r in records.get_all_tuning_records() if r.workload.same_as(workload)]


def _mean(record) -> float:
    return float(np.mean([float(s) for s in record.run_secs]))


def _no_untuned_warning(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        executable = build()
    untuned = [w for w in caught if "no tuning record" in str(w.message)]
    assert not untuned, untuned[0].message
    return executable


def test_tune_seeds_every_task_with_its_default_schedule(tmp_path, capsys):
    mod, data = _model()
    target = x86.x86_target(num_cores=2)
    db = str(tmp_path / "db")
    # One random candidate per kernel: without the seed, the database holds only that candidate.
    x86.tune(mod, target, trials=1, trials_per_task=1, db_dir=db, strategy="replay-trace", cost_model="random", seed=0)
    err = capsys.readouterr().err
    tasks = x86.extract_tasks(mod, target)
    assert len(tasks) == 2
    assert f"[tune] seeded {len(tasks)} of {len(tasks)} kernels with their default schedule" in err
    # The budget is the search's; a default the search beat is measured a second time.
    measured = re.search(rf"{len(tasks)} trials \(and (\d+) default schedules measured\)", err)
    assert measured and len(tasks) <= int(measured.group(1)) <= 2 * len(tasks), err[-2000:]
    assert re.search(rf"faster than the default for \d of {len(tasks)} seeded kernels", err)
    assert err.count("[tune] task ") == len(tasks) and ", default " in err  # progress lines show the default apart
    records = database.records_for_target(db, target)  # what build() reads: the seeds pass its target filter
    for task in tasks:
        default = x86.default_schedule(task.dispatched[0]["main"], target, task.task_name, 2).mod["main"]
        mine = _records_of(records, task)
        seeds = [r for r in mine if structural_equal(_replayed(r, task), default)]
        assert seeds, f"{task.task_name}: no record replays to the default schedule"
        # The seed, the one searched candidate, and a second sample of the default if the candidate was faster.
        assert len(mine) == 1 + len(seeds) and len(seeds) <= 2
        assert all(max(float(s) for s in seed.run_secs) < 1e9 for seed in seeds)  # measured, not failures
        best = records.query_tuning_record(task.dispatched[0], target, task.task_name)
        assert _mean(best) <= min(_mean(seed) for seed in seeds)  # what build() replays is at worst the default
    tuned = _no_untuned_warning(lambda: x86.build(mod, target, db_dir=db))
    np.testing.assert_array_equal(run(tuned, data), run(x86.build(mod, target), data))


def test_a_tune_stopped_after_seeding_builds_the_defaults_and_searches_next_time(tmp_path, monkeypatch):
    mod, data = _model()
    target = x86.x86_target(num_cores=2)
    db = str(tmp_path / "db")

    def stopped(**_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(x86.ms.tune, "tune_tasks", stopped)
    with pytest.raises(KeyboardInterrupt):
        x86.tune(mod, target, trials=8, db_dir=db, progress=False)
    tasks = x86.extract_tasks(mod, target)
    records = database.records_for_target(db, target)
    assert [len(_records_of(records, task)) for task in tasks] == [1] * len(tasks)
    # The seeds alone schedule every kernel exactly as an untuned build does.
    prepared = x86.prepare(mod, target)
    kernels = x86.untuned_functions(prepared)
    assert len(kernels) == len(tasks)
    applied = x86.apply_database(prepared, target, db)
    assert not x86.untuned_functions(applied)
    with target:
        untuned = x86.ScheduleUntunedFromSketch(target)(prepared)
    for name in kernels:
        assert structural_equal(applied[name], untuned[name]), name
    tuned = _no_untuned_warning(lambda: x86.build(mod, target, db_dir=db))
    np.testing.assert_array_equal(run(tuned, data), run(x86.build(mod, target), data))

    # The next tune() searches the seeded tasks (a seed alone is not a search) without seeding them again.
    seen = {}
    monkeypatch.setattr(x86.ms.tune, "tune_tasks", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(tune_module, "seed_default_schedules", lambda *a, **k: pytest.fail("seeded again"))
    x86.tune(mod, target, trials=8, db_dir=db, progress=False)
    assert sorted(ctx.task_name for ctx in seen["tasks"]) == sorted(task.task_name for task in tasks)


def _renamed(func):
    """``func`` with every block renamed: structurally equal (names are not compared), as the same layer is
    when imported again (a reduction's block is named after its input, ``lv361_red`` or ``lv769_red``)."""
    text = func.script()
    for name in set(x86.amx.block_names(func)) - {"root"}:
        text = text.replace(f'T.sblock("{name}")', f'T.sblock("{name}_other")')
    renamed = tvm.script.from_source(text)
    assert structural_equal(renamed, func) and x86.amx.block_names(renamed) != x86.amx.block_names(func)
    return renamed


def test_seeds_replay_when_the_same_kernel_was_scheduled_under_other_block_names(tmp_path, monkeypatch):
    # The kernel's default schedule is memoised by structure: a build of another import of the model (its
    # blocks named otherwise) must not lend its trace to the seed, or the database no longer loads
    # ("GetSBlock ... not found" when meta-schedule replays the record on the stored workload).
    mod, _ = _model()
    target = x86.x86_target(num_cores=2)
    tasks = x86.extract_tasks(mod, target)
    for task in tasks:
        x86.default_schedule(_renamed(task.dispatched[0]["main"]), target, task.task_name, 2)
    monkeypatch.setattr(x86.ms.tune, "tune_tasks", lambda **_kwargs: None)  # seeding only
    db = str(tmp_path / "db")
    x86.tune(mod, target, trials=len(tasks), db_dir=db, progress=False)
    records = database.records_for_target(db, target)  # loads: every record replays on its workload
    for task in tasks:
        (seed,) = _records_of(records, task)
        default = x86.default_schedule(task.dispatched[0]["main"], target, task.task_name, 2).mod["main"]
        assert structural_equal(_replayed(seed, task), default), task.task_name
