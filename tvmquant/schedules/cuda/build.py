"""Build without a GPU: apply a database, default schedules for the other kernels (ScheduleUntuned), compile,
and run nvcc on the CUDA source."""

from __future__ import annotations

import tvm

from ..common import is_scheduled
from .passes import prepare
from .target import cuda_target, nvcc_compile_mode
from .tune import _compiles, _gemm_dtypes, _sample


@tvm.transform.module_pass(opt_level=0, name="ScheduleUntuned")
class ScheduleUntuned:
    """Module pass: schedule the kernels that have no tuning record (the input module is left as it is).

    GEMM kernels get the first sampled schedule of their tensor-core design space that compiles (a valid,
    untuned WMMA kernel); kernels whose reductions are short windows (pooling, 7x7 means) get one thread per
    output; the others get ``dlight``'s default GPU schedules (reduction, general reduction, fallback).
    """

    def __init__(self, target: tvm.target.Target, seed: int = 0, tries: int = 8):
        self.target, self.seed, self.tries = target, seed, tries

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        from tvm.s_tir import dlight as dl

        mod = mod.clone()  # a pass never writes into its argument
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
                continue
            if _gemm_dtypes(func) is None:
                continue
            single = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            for sch in _sample(single, self.target, self.tries, self.seed, gvar.name_hint):
                if _compiles(sch, self.target) is None:
                    updates[gvar] = (
                        sch.mod["main"].with_attr("global_symbol", gvar.name_hint).with_attr("tirx.is_scheduled", True)
                    )
                    break
        for gvar, func in mod.functions.items():
            if gvar in updates or not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
                continue
            if _gemm_dtypes(func) is None and 0 < _largest_reduction(func) <= WINDOW_REDUCTION:
                # Pooling windows (3x3, 2x2) and short means (7x7), maybe with a fused requantize: one thread
                # per output. dlight's GeneralReduction would take them and reduce 9 values with a whole
                # thread block per output: 6.3 ms for ResNet-50's max pool at batch 32 on an H200, 58 us
                # with this schedule (bench/results/gpu/profile_cuda_h200*.json).
                single = tvm.IRModule({"main": func})
                with self.target:
                    single = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(single)
                updates[gvar] = single["main"].with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        with self.target:
            return dl.ApplyDefaultSchedule(dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)


#: reductions at most this long (pooling windows) get one thread per output, not a cross-thread reduction
WINDOW_REDUCTION = 64


def _largest_reduction(func: tvm.tirx.PrimFunc) -> int:
    """The largest reduction extent (product of a block's reduction iterators) of the kernel's blocks."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001
        return 0
    largest = 0
    for block in blocks:
        extent = 1
        reduces = False
        for iv in sch.get(block).iter_vars:
            if int(iv.iter_type) != 0:
                reduces = True
                extent *= int(iv.dom.extent)
        if reduces:
            largest = max(largest, extent)
    return largest


def build(
    mod: tvm.IRModule,
    target: tvm.target.Target | None = None,
    db_dir: str | None = None,
    *,
    prepared: bool = False,
):
    """Compile a Relax model for a CUDA target with the tuned kernels of ``db_dir`` (a meta-schedule JSON
    database, e.g. from :func:`import_measurements`).

    Kernels without a record get :class:`ScheduleUntuned`'s schedules, so a build never fails for want of
    tuning. ``prepared=True`` says ``mod`` already went through :func:`prepare` (e.g. then
    :func:`lift_constants`). Runs without a GPU: the library holds CUDA source, compiled when it is loaded
    (by ``nvcc`` or NVRTC on the GPU host, or taken from the binaries :func:`tvmquant.cuda_binaries.precompile`
    made).

    Returns
    -------
    tvm.relax.VMExecutable
    """
    from tvm import relax

    target = cuda_target() if target is None else target
    prepared = mod if prepared else prepare(mod, target)
    prepared = ScheduleUntuned(target)(apply_database(prepared, target, db_dir))
    with nvcc_compile_mode(), target, tvm.transform.PassContext(opt_level=3):
        return relax.build(prepared, target=target)


def apply_database(prepared: tvm.IRModule, target: tvm.target.Target, db_dir: str | None) -> tvm.IRModule:
    """The best record of ``db_dir`` applied to every kernel of a :func:`prepare`-d module that has one
    (the module itself when ``db_dir`` is None). :func:`build` takes the result with ``prepared=True``."""
    from tvm import relax

    if db_dir is None:
        return prepared
    from tvm.s_tir.tensor_intrin import cuda as _wmma  # noqa: F401  records replay tensorize() by name

    from ..common import open_json_database

    database = open_json_database(db_dir, create=False)
    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)


def untuned_kernels(applied: tvm.IRModule) -> list[str]:
    """The GEMM kernels of a module (after :func:`apply_database`) that got no tuned schedule."""
    return sorted(
        gvar.name_hint
        for gvar, func in applied.functions.items()
        if isinstance(func, tvm.tirx.PrimFunc) and not is_scheduled(func) and _gemm_dtypes(func) is not None
    )
