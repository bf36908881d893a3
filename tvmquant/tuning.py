"""``tvmquant.tune``: tune a model's kernels into a reusable meta-schedule database (the twin of ``tvmquant tune``).

Dispatches on the target: x86 CPUs tune here (:func:`tvmquant.schedules.x86.tune`); a CUDA target, which this
machine cannot measure, writes a measurement package for the GPU host, or imports that host's measurements
(:mod:`tvmquant.schedules.offline`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class TuneResult:
    """What a :func:`tune` call did.

    Attributes
    ----------
    action : str
        ``"tuned"`` (x86), ``"packaged"`` (CUDA: a measurement package was written) or ``"imported"``.
    db : str
        The database directory.
    details : dict
        ``package``: candidate and kernel counts; ``imported``: the import's counts.
    """

    action: str
    db: str
    details: dict = field(default_factory=dict)


def tune(
    model,
    target=None,
    trials: int = 64,
    db: str | os.PathLike = "tuning",
    *,
    trials_per_task: int | None = None,
    package: str | os.PathLike | None = None,
    import_package: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    rpc_parallel: int | None = None,
) -> TuneResult:
    """Tune the kernels of ``model`` for ``target`` into the database ``db``; a second call reuses it.

    Parameters
    ----------
    model : QuantizedModel, str or tvm.IRModule
        A quantized model (its INT8 kernels are tuned), the path of a ``.tvmq`` artifact, an FP32 ``.onnx``
        file (for a tuned FP32 baseline), or a Relax module.
    target : optional
        Anything :func:`tvmquant.target.as_target` takes; default this CPU.
    trials : int
        Trial budget over the kernels still untuned. On x86, each of them first gets its default schedule (what
        an untuned build uses) measured into ``db``, outside this budget (one more build and run per kernel):
        a build from the database is never slower than an untuned one, as measured.
    db : path
        Database directory (created; its parent must exist).
    trials_per_task : int, optional
        Cap per kernel.
    package, import_package : path, optional
        CUDA targets: write a measurement package to ``package``, or import the measured ``import_package``.
    batch_size : int, optional
        Static batch to tune for (models with a dynamic batch axis).
    progress : bool
        Progress lines.
    verbose : bool
        Also print meta-schedule's own log (it always goes to ``DB/logs/``).
    rpc_tracker, rpc_key : str, optional
        Measure on a tuning farm: the ``HOST:PORT`` of a ``python -m tvm.exec.rpc_tracker`` and the key its
        servers (``python -m tvmquant.rpc_server --tracker HOST:PORT --key KEY``) registered under. Candidates
        build here and are measured there; the database is the same.
    rpc_parallel : int, optional
        Measurements at once on the farm; default the number of servers under the key.

    Returns
    -------
    TuneResult

    Examples
    --------
    >>> import tvmquant
    >>> tvmquant.tune(qmodel, trials=256, db="tuning/")  # doctest: +SKIP
    >>> run = qmodel.compile(db="tuning/")  # doctest: +SKIP
    """
    from .target import as_target

    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials!r}")
    db = os.fspath(db)
    parent = os.path.dirname(os.path.abspath(db))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot create tuning database {db!r}: folder {parent!r} does not exist")
    if import_package is not None:
        from .schedules import offline

        return TuneResult("imported", db, offline.import_measurements(os.fspath(import_package), db))
    fleet = _fleet(rpc_tracker, rpc_key, rpc_parallel)
    target = as_target(target)
    kind = target.kind.name
    if kind not in ("llvm", "cuda"):
        raise ValueError(f"tune: target {kind!r} is not supported (llvm or cuda)")
    mod, name = _module_to_tune(model, batch_size)
    if kind == "cuda" and fleet is not None:
        raise ValueError(
            "tune: measuring CUDA candidates on RPC servers is not supported yet (--rpc-tracker works for llvm "
            "targets); tune for a GPU with --package DIR and `python -m tvmquant.remote measure DIR` on the GPU host"
        )
    if kind == "cuda":
        from .schedules import offline

        if package is None:
            raise ValueError(
                "tuning for a CUDA target writes a measurement package for the GPU host: give package=DIR "
                "(--package DIR), then run `python -m tvmquant.remote measure DIR` there and import it here "
                "(import_package=DIR, --import DIR)"
            )
        per_task = trials_per_task or max(1, trials // 8)
        manifest = offline.make_package({name: mod}, os.fspath(package), target, per_task=per_task, progress=progress)
        details = {"candidates": len(manifest["candidates"]), "tasks": len(manifest["tasks"])}
        return TuneResult("packaged", db, details)
    from .schedules import x86

    x86.tune(
        mod,
        target,
        trials=trials,
        db_dir=db,
        trials_per_task=trials_per_task,
        progress=progress,
        verbose=verbose,
        rpc=fleet,
    )
    return TuneResult("tuned", db, {"rpc": rpc_tracker} if fleet else {})


def _fleet(tracker, key, parallel):
    """The :class:`~tvmquant.schedules.rpc.Fleet` of the ``rpc_*`` arguments, or None (measure here)."""
    if tracker is None and key is None:
        if parallel is not None:
            raise ValueError("rpc_parallel (--rpc-parallel) needs rpc_tracker and rpc_key (--rpc-tracker, --rpc-key)")
        return None
    if not tracker or not key:
        raise ValueError(
            "measuring on RPC servers needs both rpc_tracker=HOST:PORT and rpc_key=KEY (--rpc-tracker, --rpc-key)"
        )
    if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
        raise ValueError(f"rpc_parallel must be at least 1, got {parallel!r}")
    from .schedules.rpc import Fleet, parse_tracker

    parse_tracker(tracker)
    return Fleet(tracker=tracker, key=key, parallel=parallel)


def _module_to_tune(model, batch_size):
    """``(Relax module, name)`` whose kernels to tune."""
    import tvm

    from .api import QuantizedModel, load, load_model

    if isinstance(model, tvm.IRModule):
        return model, "model"
    if isinstance(model, QuantizedModel):
        return (model.rebatch(batch_size) if batch_size else model).mod, "model"
    path = os.fspath(model)
    if path.endswith(".onnx"):
        mod, _, _, _ = load_model(path, batch_size=batch_size)
        return mod, os.path.basename(path)
    qmodel = load(path)
    return (qmodel.rebatch(batch_size) if batch_size else qmodel).mod, os.path.basename(path)
