"""What the x86 and CUDA kernel pipelines share: the scheduled-kernel test and the legalize-and-fuse passes."""

from __future__ import annotations


def is_scheduled(func) -> bool:
    """Whether a PrimFunc already carries a schedule (``tirx.is_scheduled``): tuning and fallbacks skip it."""
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def fusion_passes(legalize_map: dict | None = None) -> list:
    """Legalize to TIR and fuse (the sequence of meta-schedule's ``compile_relax``), shared by the x86 and
    CUDA pipelines so that tuning and building see the same fused kernels. ``legalize_map`` overrides the
    legalization of some operators (``LegalizeOps(customize_legalize_map=...)``)."""
    from tvm import relax

    return [
        relax.transform.LegalizeOps(legalize_map),
        relax.transform.AnnotateTIROpPattern(),
        KeepGrowingOpsUnfused(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


#: ``op_pattern`` of a PrimFunc that ``FuseOps`` fuses with nothing (TVM's ``kOpaque``).
_OPAQUE = 8
#: Patterns ``FuseOps`` would fuse a growing op by: element-wise, broadcast, injective.
_FUSABLE = (0, 1, 2)


def _elements(buffer) -> int | None:
    total = 1
    for dim in buffer.shape:
        if not hasattr(dim, "value"):
            return None
        total *= int(dim.value)
    return total


def _grows(func) -> bool:
    """Whether ``func`` (one input buffer, one output) writes more elements than it reads: a pad."""
    params = list(func.params)
    if len(params) != 2 or not all(hasattr(p, "shape") for p in params):
        return False
    size_in, size_out = _elements(params[0]), _elements(params[1])
    return size_in is not None and size_out is not None and size_out > size_in


def _keep_growing_ops_unfused(mod, _ctx):
    """Mark pads (and any other one-input injective kernel whose output is larger than its input) opaque, so
    that ``FuseOps`` never makes them the epilogue of a conv or matmul.

    Fused as an epilogue, meta-schedule's tiling moves the pad into the conv's output tile with
    ``reverse_compute_at``, whose loops cover only the elements read from the conv: the padding border is never
    written (the EfficientNet-Lite0 kernels with TF-style bottom/right padding left 1.7-6.7% of their output as
    garbage). On its own, a pad is a copy of one activation.
    """
    from tvm import tirx

    mod = mod.clone()
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or "op_pattern" not in func.attrs:
            continue
        if int(func.attrs["op_pattern"]) in _FUSABLE and _grows(func):
            mod[gvar] = func.with_attr("op_pattern", _OPAQUE)
    return mod


def KeepGrowingOpsUnfused():  # noqa: N802  (a pass constructor, named as TVM's are)
    """The module pass of :func:`_keep_growing_ops_unfused`; run after ``AnnotateTIROpPattern``."""
    import tvm

    return tvm.transform.module_pass(_keep_growing_ops_unfused, opt_level=0, name="KeepGrowingOpsUnfused")


#: The files of a meta-schedule JSON database: one JSON value per line, appended as tuning goes.
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


class DatabaseError(ValueError):
    """A tuning database file is damaged beyond an interrupted last record."""


def open_json_database(db_dir: str, create: bool = True):
    """Meta-schedule's ``JSONDatabase`` in ``db_dir``, after :func:`repair_json_database`."""
    import os

    from tvm.s_tir import meta_schedule as ms

    if create:
        os.makedirs(db_dir, exist_ok=True)
    repair_json_database(db_dir)
    try:
        return ms.database.JSONDatabase(work_dir=db_dir, module_equality="structural")
    except Exception as err:  # TVM reads each line into objects: a line of valid JSON that is no record
        lines = [line for line in str(err).splitlines() if line.strip()]
        detail = lines[-1][:300] if lines else type(err).__name__
        if detail.endswith("(not rendered)"):  # a record's replay failed in TVM's loader threads: find it here
            detail = _first_bad_record(db_dir) or detail
        raise DatabaseError(
            f"tuning database {db_dir!r} does not load ({detail}); remove it (and re-tune) or restore it"
        ) from None


def _first_bad_record(db_dir: str) -> str | None:
    """Which tuning record of ``db_dir`` does not load and why, found by loading them one at a time (as
    ``JSONDatabase`` does in threads whose errors it does not render); None when each loads alone."""
    import json
    import os

    from tvm.s_tir import meta_schedule as ms

    try:
        with open(os.path.join(db_dir, DATABASE_FILES[0])) as stream:
            workloads = [json.loads(line) for line in stream if line.strip()]
        with open(os.path.join(db_dir, DATABASE_FILES[1])) as stream:
            records = [json.loads(line) for line in stream if line.strip()]
    except (OSError, ValueError):
        return None
    loaded = {}
    for number, (index, body) in enumerate(records, start=1):
        try:
            if index not in loaded:
                loaded[index] = ms.database.Workload.from_json(workloads[index])
            ms.database.TuningRecord.from_json(body, loaded[index])
        except Exception as err:  # noqa: BLE001  (the reason is the message)
            reason = _replay_error(loaded.get(index), body) or str(err)
            lines = [line for line in reason.splitlines() if line.strip()]
            return f"{DATABASE_FILES[1]} line {number}: {lines[-1][:300] if lines else type(err).__name__}"
    return None


def _replay_error(workload, body) -> str | None:
    """The message of replaying record ``body``'s trace on ``workload`` with errors rendered in full (the
    loader's are "(not rendered)"), or None when it replays."""
    import tvm

    try:
        sch = tvm.s_tir.Schedule(workload.mod, error_render_level="detail")
        tvm.s_tir.schedule.Trace.apply_json_to_schedule(body[0], sch)
    except Exception as err:  # noqa: BLE001
        return str(err)
    return None


def repair_json_database(db_dir: str) -> list:
    """Drop a record cut off mid-line (``tune`` killed while appending) from the database files in ``db_dir``.

    Meta-schedule appends one JSON line per record and fails to open a file whose last line is cut ("Unexpected
    end of string"). The complete records before it are kept (the file is rewritten atomically), so an
    interrupted ``tune`` leaves a database that loads and that the next ``tune`` extends. A damaged line that is
    not the last is an error naming the file and line. Returns the files repaired.
    """
    import json
    import logging
    import os

    from .._io import atomic_write

    repaired = []
    for name in DATABASE_FILES:
        path = os.path.join(db_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as stream:
            lines = [line for line in stream.read().split(b"\n") if line.strip()]
        bad = []
        for number, line in enumerate(lines):
            try:
                json.loads(line)
            except ValueError:
                bad.append(number)
        if not bad:
            continue
        if bad != [len(lines) - 1]:
            raise DatabaseError(
                f"tuning database file {path!r} line {bad[0] + 1} is not a JSON record; the database is damaged: "
                "remove the file (and re-tune) or restore it"
            )
        body = b"".join(line + b"\n" for line in lines[:-1])
        atomic_write(path, lambda stream, body=body: stream.write(body))
        logging.getLogger(__name__).warning(
            "%s: dropped a record cut off mid-line (an interrupted tune); %d complete records kept",
            path,
            len(lines) - 1,
        )
        repaired.append(path)
    return repaired
