"""Compile a (quantized) Relax module for a target, applying a tuning database when one is given."""

from __future__ import annotations

import tvm

from ._compat import cpu_target


def host_target(num_cores: int | None = None):
    """An LLVM target for the CPU this process runs on (``mcpu`` detected by LLVM, all its cores)."""
    import os

    mcpu = tvm.target.codegen.llvm_get_system_cpu()
    return cpu_target(mcpu if mcpu and mcpu != "generic" else None, num_cores or os.cpu_count())


def as_target(target):
    """A ``tvm.target.Target`` from a Target, a dict, a tag (``"nvidia/nvidia-h100"``) or ``None`` (host)."""
    if target is None:
        return host_target()
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if isinstance(target, str):
        if target in ("llvm", "cpu", "host"):
            return host_target()
        if target.startswith("{"):
            import json

            return tvm.target.Target(json.loads(target))
        try:
            return tvm.target.Target(target)
        except Exception as err:  # TVM raises its own error types
            raise ValueError(
                f"target {target!r} is not understood ({err}); give a tag such as 'nvidia/nvidia-h100', "
                '\'llvm\', or a JSON dict such as \'{"kind": "llvm", "mcpu": "sapphirerapids"}\''
            ) from None
    raise TypeError(f"target must be a tvm Target, dict, str or None, got {type(target).__name__}")


def build(mod: tvm.IRModule, target=None, db=None):
    """Compile ``mod`` into a Relax VM executable.

    Parameters
    ----------
    mod : tvm.IRModule
    target : see :func:`as_target`
    db : str or os.PathLike, optional
        A meta-schedule database directory written by ``tvmquant tune``; its best schedules are applied and
        ops without a record keep TVM's default schedule.
    """
    target = as_target(target)
    if db is not None:
        from .schedules import build_with_database

        return build_with_database(mod, target, db)
    return tvm.compile(mod, target=target)
