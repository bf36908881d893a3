"""Tuning with meta-schedule (evolutionary search, XGBoost cost model) into a reusable JSON database."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Literal

import tvm

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.utils import fork_seed

from ...target import target_has_amx, x86_target
from ...threads import default_num_threads, require_amx
from .. import intrinsics
from .._ms_worker import build_candidate, runner_initializer
from ..common import is_scheduled
from ..rpc import Fleet, FleetRunner, check_fleet
from . import amx
from .database import _is_searched, _is_tuned, _open_database, _record_counts, records_for_target
from .measure import XGB_WARMUP_SAMPLES, PooledBuilder, TuningProgress, _report, meta_schedule_logs
from .passes import prepare
from .target import _warn_if_not_runnable_here

logger = logging.getLogger(__name__)


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> list[ms.ExtractedTask]:
    """The meta-schedule tasks of ``mod`` after :func:`prepare`: one per distinct fused kernel that has a
    reduction (data-movement kernels get a fixed schedule in :func:`prepare` and are not tuned)."""
    target = x86_target() if target is None else target
    tasks = ms.relax_integration.extract_tasks(prepare(mod, target), target)
    return [task for task in tasks if not is_scheduled(task.dispatched[0]["main"])]


def plan_trials(
    trials: int,
    num_tasks: int,
    num_trials_per_iter: int = 16,
    trials_per_task: int | None = None,
    min_trials_per_task: int = 4,
) -> tuple[int, int, int, str | None]:
    """How :func:`tune` spreads a trial budget over ``num_tasks`` kernels.

    Meta-schedule's budget is global and its task schedulers give each task whole batches of
    ``num_trials_per_iter`` candidates, first one task after the other: ``--trials 320`` over 39 tasks
    measured 16 candidates for 20 tasks and none for the other 19, which then had no record. So every task
    gets at least ``min_trials_per_task`` (the total is raised when the budget is smaller, and a note says
    so), no task gets more than its share, and batches are no larger than the smallest share, so that the
    first round gives every task a batch.

    Parameters
    ----------
    trials : int
        Requested global budget.
    num_tasks : int
        Kernels to tune (at least 1).
    num_trials_per_iter : int
        Largest batch.
    trials_per_task : int, optional
        Cap per task; default ``ceil(total / num_tasks)``. An explicit cap below ``min_trials_per_task`` is
        also the floor.
    min_trials_per_task : int
        Floor per task.

    Returns
    -------
    total : int
        The global budget to pass to meta-schedule.
    per_task : int
        The cap per task.
    per_iter : int
        The batch size.
    note : str or None
        A one-line explanation when ``total`` differs from ``trials``.
    """
    if trials < 1 or num_tasks < 1 or num_trials_per_iter < 1 or min_trials_per_task < 1:
        raise ValueError(
            f"plan_trials: trials, num_tasks, num_trials_per_iter and min_trials_per_task must be at least 1, "
            f"got {trials}, {num_tasks}, {num_trials_per_iter}, {min_trials_per_task}"
        )
    if trials_per_task is not None and trials_per_task < 1:
        raise ValueError(f"tune: trials_per_task must be at least 1, got {trials_per_task}")
    floor = min_trials_per_task if trials_per_task is None else min(min_trials_per_task, trials_per_task)
    total, note = trials, None
    if trials < floor * num_tasks:
        total = floor * num_tasks
        note = (
            f"{trials} trials over {num_tasks} kernels: giving each kernel at least {floor}; total {total} "
            f"(tune with {16 * num_tasks} or more for fast kernels)"
        )
    per_task = trials_per_task if trials_per_task is not None else math.ceil(total / num_tasks)
    if per_task * num_tasks < total:  # an explicit cap leaves part of the budget unusable
        total = per_task * num_tasks
        note = f"{trials} trials over {num_tasks} kernels at most {per_task} each: total {total}"
    per_iter = max(1, min(num_trials_per_iter, total // num_tasks, per_task))
    return total, per_task, per_iter, note


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target | None = None,
    trials: int = 64,
    db_dir: str = "tvmquant_tuning",
    *,
    trials_per_task: int | None = None,
    min_trials_per_task: int = 4,
    num_trials_per_iter: int = 16,
    builder_timeout_sec: float = 150.0,
    runner_repeat: int = 3,
    task_scheduler: Literal["gradient", "round-robin"] = "gradient",
    cost_model: Literal["xgb", "mlp", "random"] = "xgb",
    strategy: Literal["evolutionary", "replay-trace", "replay-func"] = "evolutionary",
    seed: int | None = None,
    seed_defaults: bool = True,
    progress: bool = True,
    verbose: bool = False,
    rpc: Fleet | None = None,
) -> ms.Database:
    """Tune the INT8 kernels of a Relax module with meta-schedule; records go to a JSON database.

    Tasks that meta-schedule has already searched in ``db_dir`` (a valid record among at least two) are
    skipped, so a second call with the same database only re-runs the (seconds-long) graph passes. The budget
    is spread over every task still to tune (:func:`plan_trials`): each gets at least ``min_trials_per_task``
    measured candidates, and a line says so when that raises the total.

    Before the search, every task without a valid record gets its default schedule (the one :func:`build`
    gives a kernel without a record, :func:`tvmquant.schedules.x86.build.default_schedule`) measured by the
    same builder and runner and committed as a record (:func:`seed_default_schedules`): the build takes the
    best record per kernel, so a tuned build is never slower than the untuned one (as measured), and the
    evolutionary search starts its population from the database's best records, the default among them. After
    the search, the default of each kernel whose search result was measured faster is measured once more
    (one sample taken while the machine was busy must not decide alone). This costs one or two more builds
    and measurements per kernel (about what a trial costs, plus the seconds the heuristic takes to compile its
    choice, as in an untuned build) and is not counted in ``trials``; the progress lines report it apart.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module with u8 x s8 convs/matmuls (see the module docstring), weights bound as constants.
    target : tvm.target.Target, optional
        Defaults to :func:`x86_target` (host CPU). Tuning measures on this machine, so the target must run
        here (a warning says so when it cannot).
    trials : int
        Global trial budget over the tasks still to tune (raised to ``min_trials_per_task`` per task).
    db_dir : str
        Directory of the JSON database (``database_workload.json``, ``database_tuning_record.json``) and of
        meta-schedule's logs (``logs/``). It may be shared by several CPUs: only records tuned for
        ``target``'s ``mcpu`` count (:func:`records_for_target`).
    trials_per_task : int, optional
        Cap per task; default ``ceil(trials / number_of_tasks)``: the budget is spread evenly.
    min_trials_per_task : int
        Measured candidates every task gets at least.
    num_trials_per_iter : int
        Largest batch of candidates built and measured at once; smaller when a task's share is smaller.
        (Batches of 8 at 16 trials per task, so that the cost model guides each task's second batch, gave the
        same ResNet-50 latency as one batch of 16, in 787 s of tuning instead of 472 s.)
    builder_timeout_sec : float
        Build timeout per candidate. Generous because the 2-core machines here are shared; the builder
        workers use :func:`tvmquant.schedules._ms_worker.build_candidate`, which skips the ~25 s import
        of every TVMScript intrinsic that meta-schedule's default build function does in each fresh worker.
    runner_repeat : int
        Measurement repeats per candidate.
    task_scheduler, cost_model, strategy : str
        Meta-schedule components (gradient task scheduler, XGBoost cost model, evolutionary search).
    seed : int, optional
        Random seed of the search.
    seed_defaults : bool
        Measure each kernel's default schedule into the database before the search (see above).
    progress : bool
        Print one progress line per measured batch to stderr (always logged at INFO).
    verbose : bool
        Also print meta-schedule's own log (task tables, builder and runner messages) to stderr. Either way
        it is written to ``db_dir/logs`` (:func:`meta_schedule_logs`).
    rpc : tvmquant.schedules.rpc.Fleet, optional
        Measure on the RPC servers registered with a tracker under a key instead of here (candidates still
        build here). Checked before anything else (:func:`tvmquant.schedules.rpc.check_fleet`): an unreachable
        tracker, a key without servers or a server of another CPU fail in seconds.

    Returns
    -------
    tvm.s_tir.meta_schedule.Database
        The JSON database in ``db_dir``.

    Examples
    --------
    >>> target = x86_target(num_cores=2)  # doctest: +SKIP
    >>> tune(mod, target, trials=64, db_dir="tuning")  # doctest: +SKIP
    >>> ex = build(mod, target, db_dir="tuning")  # doctest: +SKIP
    """
    target = x86_target() if target is None else target
    fleet = None
    if rpc is not None:
        fleet = check_fleet(rpc, target)  # the servers request AMX and set threads in each measuring session
    else:
        _warn_if_not_runnable_here(target)
        if target_has_amx(target):
            require_amx(f"tuning for {target}")  # measuring AMX candidates needs the tile state here
    start = time.perf_counter()
    intrinsics.register_x86_intrinsics()  # before any TuneContext: its rules look the intrinsic up by name
    database = _open_database(db_dir)
    tuned = records_for_target(db_dir, target)
    tasks = extract_tasks(mod, target)
    counts = _record_counts(tuned)
    todo = [task for task in tasks if not _is_searched(tuned, task, target, counts)]
    # A task with a valid record but no search (a tune stopped after seeding) is not seeded again.
    to_seed = {task.task_name for task in todo if seed_defaults and not _is_tuned(tuned, task, target)}

    def say(level, message):
        _report(level, message, progress)

    if not todo:
        say(
            logging.INFO,
            f"[tune] all {len(tasks)} tasks already tuned in {db_dir} "
            f"({time.perf_counter() - start:.1f} s); nothing to do",
        )
        return database
    total, per_task, per_iter, note = plan_trials(
        trials, len(todo), num_trials_per_iter, trials_per_task, min_trials_per_task
    )
    if note:
        say(logging.WARNING, f"[tune] {note}")
    say(
        logging.INFO,
        f"[tune] {len(todo)} of {len(tasks)} tasks to tune ({len(tasks) - len(todo)} found in {db_dir}), "
        f"{total} trials (up to {per_task} per task, batches of {per_iter}), target {target}",
    )
    if cost_model == "xgb" and total < XGB_WARMUP_SAMPLES:
        # Until XGBModel has measured num_warmup_samples candidates its predictions are uniform random numbers,
        # yet it retrains after every batch (~5 s on 2 cores, i.e. most of a 10-kernel tune at 4 trials per
        # kernel). Below that many trials the random model searches the same way, without the retraining.
        logger.info("tune: %d trials < XGBModel's %d warm-up samples: random cost model", total, XGB_WARMUP_SAMPLES)
        cost_model = "random"
    log_dir = os.path.join(db_dir, "logs")
    num_threads = int(target.attrs.get("num-cores", 0)) or "physical"
    num_workers = max(1, int(target.attrs.get("num-cores", 1) or 1))
    evaluator = ms.runner.EvaluatorConfig(
        number=3, repeat=runner_repeat, min_repeat_ms=50, enable_cpu_cache_flush=False
    )
    if fleet is not None:
        say(
            logging.INFO,
            f"[tune] measuring on {fleet['servers']} RPC servers under key {rpc.key!r} at {rpc.tracker}, "
            f"{fleet['parallel']} at a time (probed: {fleet['probe'].get('host')}, "
            f"mcpu {fleet['probe'].get('mcpu')!r})",
        )
        runner = FleetRunner(rpc, target, fleet["parallel"], evaluator)
        num_workers = default_num_threads()  # builds run here (on this machine's cores), measurements there
    else:
        runner = ms.runner.LocalRunner(initializer=runner_initializer, evaluator_config=evaluator)
    with meta_schedule_logs(log_dir, [task.task_name for task in todo], verbose) as task_loggers:
        # What ms.relax_integration.extracted_tasks_to_tune_contexts does, with our loggers instead of the
        # ones from its get_loggers_from_work_dir (see meta_schedule_logs for why).
        strategy_obj = search_strategy(strategy, per_task)
        contexts = [
            ms.TuneContext(
                mod=task.dispatched[0],
                target=task.target,
                space_generator=amx.space_generator()
                if amx.is_amx_kernel(task.dispatched[0]["main"])
                else "post-order-apply",
                search_strategy=strategy_obj,
                task_name=task.task_name,
                logger=task_logger,
                rand_state=rand_state,
                num_threads=num_threads,
            ).clone()
            for task, task_logger, rand_state in zip(todo, task_loggers, fork_seed(seed, n=len(todo)))
        ]
        # build_candidate skips default_build's ~25 s import of every TVMScript intrinsic per worker.
        builder = PooledBuilder(builder_timeout_sec, num_workers, build_candidate)
        # Measure with as many threads as the target has cores (see tvmquant.threads): left to TVM, the runner's
        # pool would take half the logical CPUs on x86 (1 on a 2-core VM) and the search would favour schedules
        # that are fast on one thread.
        with _environment(TVM_NUM_THREADS=str(num_workers)), contextlib.closing(builder), _closing(runner):
            seeded = {}
            if to_seed:
                seeded = seed_default_schedules(
                    [ctx for ctx in contexts if ctx.task_name in to_seed], target, builder, runner, database, progress
                )
            callback = TuningProgress([ctx.task_name for ctx in contexts], total, echo=progress, default_sec=seeded)
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=[task.weight for task in todo],
                work_dir=db_dir,
                max_trials_global=total,
                max_trials_per_task=per_task,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
                task_scheduler=task_scheduler,
            )
            again = {}
            if seeded:
                beaten = _faster_than(records_for_target(db_dir, target), contexts, seeded)
                if beaten:
                    again = seed_default_schedules(beaten, target, builder, runner, database, progress, again=True)
    tuned = records_for_target(db_dir, target)
    if seeded:
        defaults = {name: min(secs, again.get(name, secs)) for name, secs in seeded.items()}
        say(
            logging.INFO,
            f"[tune] the search found a schedule measured faster than the default for "
            f"{len(_faster_than(tuned, contexts, defaults))} of {len(seeded)} seeded kernels; build() takes the "
            "faster of each",
        )
    missing = [task.task_name for task in todo if not _is_tuned(tuned, task, target)]
    say(
        logging.INFO,
        f"[tune] done in {time.perf_counter() - start:.0f} s: {sum(callback.trials)} trials "
        f"(and {len(seeded) + len(again)} default schedules measured), "
        f"{callback.build_errors} build errors, {callback.run_errors} run errors; meta-schedule's log: {log_dir}",
    )
    if missing:
        say(
            logging.WARNING,
            f"[tune] {len(missing)} of {len(todo)} kernels got no valid record (every measured candidate failed; "
            f"see {log_dir}): {', '.join(missing)}. build() gives them an untuned default schedule; run tune() "
            "again with more trials to retry them.",
        )
    return database


def seed_default_schedules(
    contexts: list,
    target: tvm.target.Target,
    builder,
    runner,
    database: ms.Database,
    progress: bool = True,
    again: bool = False,
) -> dict:
    """Measure the default schedule of each task and commit it to ``database`` as a tuning record.

    The default is what :func:`build` gives a kernel without a record
    (:func:`tvmquant.schedules.x86.build.default_schedule`: the fixed AMX schedule, else the heuristic's, else
    the first valid sketch). It is built by ``builder`` and measured by ``runner`` (the search's: same
    evaluator, same worker threads, the RPC fleet when tuning remotely), then committed like a measured
    candidate: its trace (decisions, ``EnterPostproc``, the postprocessors' instructions), the task's
    workload and target, the measured run times and the argument info. A kernel whose default fails to build
    or run is not seeded (a line says so); the search still runs for it.

    Parameters
    ----------
    contexts : list of tvm.s_tir.meta_schedule.TuneContext
        The tasks (their ``mod``, ``target`` and ``task_name``).
    target : tvm.target.Target
        The target :func:`build` is given (the default schedule is the one it would choose).
    builder, runner
        Meta-schedule's builder and runner.
    database : tvm.s_tir.meta_schedule.Database
    progress : bool
        Print the lines to stderr too.
    again : bool
        A second measurement after the search (of the kernels whose search result was measured faster than
        the first one): worded so in the lines.

    Returns
    -------
    dict
        ``{task name: mean run time in seconds}`` of the kernels seeded.
    """
    from .build import default_schedule

    def say(level, message):
        _report(level, message, progress)

    start = time.perf_counter()
    num_threads = int(target.attrs.get("num-cores", 0)) or "physical"
    if again:
        say(
            logging.INFO,
            f"[tune] measuring the default schedule of {len(contexts)} kernels again, whose search result was "
            "measured faster (a second sample of each; not counted in the trial budget)",
        )
    else:
        say(
            logging.INFO,
            f"[tune] measuring the default schedule of {len(contexts)} kernels first (one build and run each, "
            "not counted in the trial budget)",
        )
    pending, failed = [], []
    for ctx in contexts:
        try:
            sch = default_schedule(ctx.mod["main"], target, ctx.task_name, num_threads)
        except Exception as err:  # noqa: BLE001  (never stop tuning for a seed)
            logger.debug("tune: default schedule of %s failed (%s)", ctx.task_name, err)
            sch = None
        if sch is None:
            failed.append(f"{ctx.task_name} (no default schedule)")
            continue
        pending.append((ctx, sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
    built = builder.build([ms.builder.BuilderInput(sch.mod, ctx.target) for ctx, sch, _ in pending])
    runs = []
    for (ctx, sch, args_info), result in zip(pending, built, strict=True):
        if result.error_msg is not None:
            message = str(result.error_msg).strip().splitlines()
            failed.append(f"{ctx.task_name} (build: {message[-1] if message else '?'})")
            continue
        runs.append((ctx, sch, args_info, result.artifact_path))
    # One batch, as the search sends its candidates: the runner spreads it over its workers (or servers).
    # Device "cpu", as the task scheduler gives an llvm target's candidates.
    futures = runner.run([ms.runner.RunnerInput(path, "cpu", info) for _, _, info, path in runs])
    seeded = {}
    for (ctx, sch, args_info, artifact_path), future in zip(runs, futures, strict=True):
        result = future.result()
        with contextlib.suppress(Exception):
            ms.utils.remove_build_dir(artifact_path)
        if result.error_msg is not None or not result.run_secs:
            message = str(result.error_msg or "no run time").strip().splitlines()
            failed.append(f"{ctx.task_name} (run: {message[-1] if message else '?'})")
            continue
        workload = database.commit_workload(ctx.mod)
        database.commit_tuning_record(
            ms.database.TuningRecord(sch.trace, workload, result.run_secs, ctx.target, args_info)
        )
        secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
        seeded[ctx.task_name] = secs
        say(logging.INFO, f"[tune] default {len(seeded)}/{len(contexts)} {ctx.task_name}: {secs * 1e6:.1f} us")
    elapsed = f"({time.perf_counter() - start:.0f} s)"
    if again:
        say(
            logging.INFO,
            f"[tune] measured the default schedule of {len(seeded)} of {len(contexts)} kernels again {elapsed}",
        )
    else:
        say(
            logging.INFO,
            f"[tune] seeded {len(seeded)} of {len(contexts)} kernels with their default schedule {elapsed}",
        )
    if failed:
        what = "not measured again" if again else "not seeded (the search still runs)"
        say(logging.WARNING, f"[tune] {len(failed)} kernels {what}: {'; '.join(failed)}")
    return seeded


def _faster_than(records: ms.Database, contexts: list, secs: dict) -> list:
    """The contexts of ``secs`` (``{task name: seconds}``) whose best record in ``records`` is faster."""
    faster = []
    for ctx in contexts:
        if ctx.task_name not in secs:
            continue
        best = records.query_tuning_record(ctx.mod, ctx.target, ctx.task_name)
        if best is not None and sum(float(s) for s in best.run_secs) / len(best.run_secs) < secs[ctx.task_name]:
            faster.append(ctx)
    return faster


def search_strategy(strategy: str, trials_per_task: int):
    """The meta-schedule search strategy for ``strategy`` and a per-task budget.

    ``"evolutionary"`` gets a population sized to the budget (8 candidates per trial, 32 to 512): TVM's
    default of 512, each sampled and post-processed (tensorize checks included) before every batch, costs
    minutes per task on 2 cores when a task gets a few dozen trials. (A population of 128 still took ~9 s
    per task for 4 trials, most of a 10-kernel tune at 4 trials per kernel.) Other names pass through.
    """
    if strategy != "evolutionary":
        return strategy
    population = int(min(512, max(32, 8 * trials_per_task)))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 4)
    )


@contextlib.contextmanager
def _closing(runner):
    """Stop a :class:`FleetRunner`'s worker processes after the ``with`` body (LocalRunner has no close)."""
    try:
        yield runner
    finally:
        if hasattr(runner, "close"):
            runner.close()


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables (inherited by the tuner's worker processes) for the ``with`` body."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
