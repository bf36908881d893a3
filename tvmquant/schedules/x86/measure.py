"""How tuning builds and measures: pooled builder workers, progress lines, meta-schedule's logs in the database
folder."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Sequence

import numpy as np
from tvm.ir.utils import derived_object

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

logger = logging.getLogger(__name__)


def _report(level: int, message: str, echo: bool) -> None:
    if echo:
        print(message, file=sys.stderr, flush=True)
    # Without any handler configured, logging would print a WARNING a second time (its last-resort handler).
    if not echo or logger.hasHandlers():
        logger.log(level, message)


@derived_object
class TuningProgress(PyMeasureCallback):
    """Meta-schedule measure callback that reports progress: task, trials, best latency, build errors.

    One line per measured batch, through the ``tvmquant.schedules.x86`` logger (and stderr when
    ``echo`` is set), e.g.::

        [tune] task 1/3 fused_conv2d_int8_nchwc_add: 32 trials (total 48/96), best 541 us (427 GOP/s), default 602 us
        [tune] task 1/3 fused_conv2d_int8_nchwc_add: 2/16 candidates failed to build: ...

    Parameters
    ----------
    task_names : list of str
    total_trials : int
        The global trial budget (for the "total" column).
    echo : bool
        Also print to stderr (for interactive use when logging is not configured).
    default_sec : dict, optional
        ``{task name: seconds}``: the measured default schedules in the database (:func:`tune` seeds it), the
        best so far of their tasks; the lines show them apart.
    """

    def __init__(self, task_names: list[str], total_trials: int, echo: bool = True, default_sec: dict | None = None):
        self.task_names = list(task_names)
        self.total_trials = total_trials
        self.echo = echo
        self.trials = [0] * len(task_names)
        self.default_sec = [(default_sec or {}).get(name) for name in self.task_names]
        self.best_sec = [math.inf if d is None else d for d in self.default_sec]
        self.build_errors = 0
        self.run_errors = 0

    def _say(self, level: int, message: str) -> None:
        _report(level, message, self.echo)

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        name = self.task_names[task_id]
        prefix = f"[tune] task {task_id + 1}/{len(self.task_names)} {name}"
        failed_builds = [r.error_msg for r in builder_results if r.error_msg]
        failed_runs = [r.error_msg for r in runner_results if r.error_msg]
        if failed_builds:
            self.build_errors += len(failed_builds)
            first = str(failed_builds[0]).strip().splitlines()
            self._say(
                logging.WARNING,
                f"{prefix}: {len(failed_builds)}/{len(builder_results)} candidates failed "
                f"to build (first error: {first[-1] if first else '?'})",
            )
        if failed_runs:
            self.run_errors += len(failed_runs)
            first = str(failed_runs[0]).strip().splitlines()
            self._say(
                logging.WARNING,
                f"{prefix}: {len(failed_runs)}/{len(runner_results)} candidates failed "
                f"to run (first error: {first[-1] if first else '?'})",
            )
        for result in runner_results:
            if result.error_msg is None and result.run_secs:
                secs = float(np.mean([float(s) for s in result.run_secs]))
                self.best_sec[task_id] = min(self.best_sec[task_id], secs)
        if not measure_candidates:
            return  # the scheduler polls finished tasks with empty batches; nothing to report
        self.trials[task_id] += len(measure_candidates)
        best = self.best_sec[task_id]
        flop = float(task_scheduler.tasks_[task_id].flop)
        speed = f"best {best * 1e6:.1f} us ({flop / best / 1e9:.0f} GOP/s)" if best < math.inf else "no valid run yet"
        if self.default_sec[task_id] is not None:
            speed += f", default {self.default_sec[task_id] * 1e6:.1f} us"
        self._say(
            logging.INFO,
            f"{prefix}: {self.trials[task_id]} trials (total {sum(self.trials)}/{self.total_trials}), {speed}",
        )


@derived_object
class PooledBuilder(PyBuilder):
    """Meta-schedule's ``LocalBuilder`` (same worker function and results), keeping its worker processes for
    ``batches_per_pool`` batches instead of starting new ones for every batch.

    A fresh worker costs ~1.3 s of CPU (``import tvm``) before it compiles a small kernel in ~0.1 s, and a
    budget spread over every kernel means many small batches: `tvmquant tune` with one trial for each of the
    bundled CNN's 10 kernels took 98 s with fresh workers per batch and 41 s with these (2 shared cores,
    under load). ``LocalBuilder`` restarts its pool each batch against a
    memory leak of long-lived workers; this one still replaces its workers every ``batches_per_pool`` batches
    (and the pool replaces a worker that timed out).

    Parameters
    ----------
    timeout_sec : float
        Build timeout per candidate.
    max_workers : int
    f_build : callable
        ``(mod, target, params) -> tvm.runtime.Module``, run in the workers (picklable).
    batches_per_pool : int
    """

    def __init__(self, timeout_sec: float, max_workers: int, f_build, batches_per_pool: int = 16):
        self.timeout_sec = timeout_sec
        self.max_workers = max_workers
        self.f_build = f_build
        self.batches_per_pool = batches_per_pool
        self._pool = None
        self._batches = 0

    def build(self, build_inputs):
        if self._pool is None or self._batches >= self.batches_per_pool:
            self.close()
            self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec)
        self._batches += 1
        jobs = [(self.f_build, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
        results = []
        for result in self._pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
            if result.status == StatusKind.COMPLETE:
                results.append(BuilderResult(result.value, None))
            elif result.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"PooledBuilder: timeout, killed after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"PooledBuilder: an exception occurred\n{result.value}"))
        return results

    def close(self) -> None:
        """Stop the worker processes; the next :meth:`build` starts new ones."""
        if self._pool is not None:
            self._pool.shutdown()
        self._pool = None
        self._batches = 0


#: ``num_warmup_samples`` of meta-schedule's ``XGBModel`` (TVM 0.27 default): it predicts at random below it.
XGB_WARMUP_SAMPLES = 100


#: Meta-schedule's logger. Its children (task scheduler, builder, runner, cost model) propagate to it.
MS_LOGGER = "tvm.s_tir.meta_schedule"


_LOG_FORMAT = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def meta_schedule_logs(log_dir: str, task_names: Sequence[str], verbose: bool = False):
    """Send meta-schedule's logging to files in ``log_dir`` for the ``with`` body; yield one logger per task.

    Files (the names meta-schedule itself uses): ``tvm.s_tir.meta_schedule.logging.task_scheduler.log``
    (the task scheduler's tables, builder and runner messages) and
    ``tvm.s_tir.meta_schedule.logging.task_<i>_<name>.log`` (each task's search). With ``verbose`` the
    scheduler's lines also go to stderr. On exit the loggers are put back as they were.

    Parameters
    ----------
    log_dir : str
        Created if missing.
    task_names : sequence of str
    verbose : bool

    Yields
    ------
    list of logging.Logger
        The per-task loggers, for ``TuneContext(logger=...)``.

    Notes
    -----
    Why not meta-schedule's ``get_loggers_from_work_dir`` (which ``extracted_tasks_to_tune_contexts`` calls):

    - It lists the handlers already on the ``tvm.s_tir.meta_schedule`` logger *by name* and fails with
      ``AttributeError: 'NoneType' object has no attribute 'format'`` (``logging.py:234``) when one has none.
      It also makes that logger non-propagating for good, and pytest >= 9.1 attaches its two (unnamed)
      capture handlers to every non-propagating logger at the start of each test: so the second ``tune`` of a
      pytest session crashed (with ``-p no:logging``, or alone, it did not). Any application that adds a
      plain ``StreamHandler`` to that logger hit the same crash.
    - It configures logging with ``logging.config.dictConfig``, which closes every handler of the process
      (the application's included), and leaves a console handler on ``sys.stdout`` that printed
      ``[INFO] Logging directory: ...`` and the per-task tables into the terminal.
    """
    os.makedirs(log_dir, exist_ok=True)

    def file_handler(logger_name: str) -> logging.Handler:
        handler = logging.FileHandler(os.path.join(log_dir, logger_name + ".log"), mode="a", encoding="utf-8")
        handler.setFormatter(_LOG_FORMAT)
        return handler

    parent = logging.getLogger(MS_LOGGER)
    saved = (parent.level, parent.propagate, list(parent.handlers))
    ours = [file_handler(MS_LOGGER + ".logging.task_scheduler")]
    if verbose:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(_LOG_FORMAT)
        ours.append(console)
    # While tuning, this logger writes only to our handlers: handlers left by an earlier meta-schedule
    # dictConfig would print to a stdout of their time and append to another run's log files, and
    # propagating would put the scheduler's tables into the application's (or pytest's) root handlers.
    for handler in saved[2]:
        parent.removeHandler(handler)
    for handler in ours:
        parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    parent.propagate = False
    width = len(str(max(len(task_names) - 1, 0)))
    task_loggers, task_handlers = [], []
    for i, name in enumerate(task_names):
        logger_name = f"{MS_LOGGER}.logging.task_{i:0{width}d}_{name[:100]}"  # clipped as meta-schedule does
        task_logger = logging.getLogger(logger_name)
        handler = file_handler(logger_name)
        task_logger.addHandler(handler)
        task_logger.setLevel(logging.DEBUG)
        task_logger.propagate = False  # each task's search stays in its file (as with meta-schedule's own set-up)
        task_loggers.append(task_logger)
        task_handlers.append(handler)
    try:
        yield task_loggers
    finally:
        for task_logger, handler in zip(task_loggers, task_handlers):
            task_logger.removeHandler(handler)
            handler.close()
            # Back to a plain child logger: a late message goes to the parent rather than to logging's
            # last-resort handler (stderr).
            task_logger.setLevel(logging.NOTSET)
            task_logger.propagate = True
        for handler in ours:
            parent.removeHandler(handler)
            handler.close()
        for handler in saved[2]:
            parent.addHandler(handler)
        parent.setLevel(saved[0])
        parent.propagate = saved[1]
