"""What the x86 and CUDA kernel pipelines share: the scheduled-kernel test and the legalize-and-fuse passes."""

from __future__ import annotations


def is_scheduled(func) -> bool:
    """Whether a PrimFunc already carries a schedule (``tirx.is_scheduled``): tuning and fallbacks skip it."""
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def fusion_passes() -> list:
    """Legalize to TIR and fuse (the sequence of meta-schedule's ``compile_relax``), shared by the x86 and
    CUDA pipelines so that tuning and building see the same fused kernels."""
    from tvm import relax

    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


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
        raise DatabaseError(
            f"tuning database {db_dir!r} does not load ({detail}); remove it (and re-tune) or restore it"
        ) from None


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
