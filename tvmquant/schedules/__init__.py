"""Tuned INT8 kernels.

- :mod:`tvmquant.schedules.x86`: blocked VNNI convs/dense for x86 (graph passes, ``tune``, ``build``).
- :mod:`tvmquant.schedules.intrinsics`: the x86 INT8 tensor intrinsics, fixed for TVM 0.27's LLVM 22.
- :mod:`tvmquant.schedules.cuda`: NVIDIA GPUs: WMMA s8s8s32 / dp4a rules, the NHWC model pipeline, ``build``.
- :mod:`tvmquant.schedules.offline`: tune for a GPU from a machine without one (sample and build here,
  measure there with :mod:`tvmquant.remote`, import the times).
- :mod:`tvmquant.schedules.common`: what both pipelines share (``is_scheduled``, the fusion passes).

This package's own code is only the dispatcher, :func:`build_with_database`.

The submodules are imported lazily (by the functions below, or directly by the caller), so that
``import tvmquant`` stays cheap.
"""

from __future__ import annotations

import os

from .common import fusion_passes, is_scheduled  # noqa: E402, F401  (re-exported)


def build_with_database(mod, target, db: str | os.PathLike | None = None, checks: bool = True):
    """Compile a Relax module with the tuning database ``db`` (or none), dispatching on the target kind.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module, weights bound as constants.
    target : tvm.target.Target
    db : str or os.PathLike, optional
        Database directory written by :func:`tvmquant.schedules.x86.tune`.
    checks : bool
        False: x86 kernels without the checks of their arguments (:func:`tvmquant.schedules.x86.build`), for the
        graphs tvmquant runs itself; other targets keep them.

    Returns
    -------
    tvm.relax.VMExecutable

    Notes
    -----
    For ``llvm`` targets this is :func:`tvmquant.schedules.x86.build` (blocked INT8 kernels, VNNI; kernels
    without a record get an untuned default schedule); for ``cuda`` targets
    :func:`tvmquant.schedules.cuda.build` (NHWC, WMMA tensor cores, fused epilogues). Other targets go
    through meta-schedule's ``compile_relax`` with the database, when one is given.
    """
    db_dir = None if db is None else os.fspath(db)
    if target.kind.name == "llvm":
        from . import x86

        return x86.build(mod, target, db_dir=db_dir, checks=checks)
    if target.kind.name == "cuda":
        from . import cuda

        return cuda.build(mod, target, db_dir)
    import tvm
    from tvm.s_tir import meta_schedule as ms

    if db_dir is None:
        return tvm.compile(mod, target=target)
    from .common import open_json_database

    database = open_json_database(db_dir, create=False)
    return ms.relax_integration.compile_relax(database, mod, target, params=None)
