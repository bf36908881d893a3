"""Build: apply a tuning database, give every other kernel a default schedule, compile."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Literal

import tvm
from tvm import relax, tirx

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.relax.backend.cpu_generic import pipeline as _cpu_backend

from ..._compat import structural_equal, structural_hash
from ..._relax import alias_markers
from ...target import x86_target
from ...threads import default_num_threads, request_amx_permission
from .. import intrinsics
from .._ms_worker import build_candidate
from . import amx, defaults
from .database import describe_target, records_for_target, target_mismatch
from .passes import prepare
from .target import int8_isa

logger = logging.getLogger(__name__)


def untuned_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs of ``mod`` without a schedule (after ``MetaScheduleApplyDatabase``)."""
    names = []
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            attrs = func.attrs
            if attrs is None or not ("tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])):
                names.append(gvar.name_hint)
    return sorted(names)


#: How untuned kernels are scheduled: ``"heuristic"`` (:func:`tvmquant.schedules.x86.defaults.choose_schedule`,
#: register-tiled decisions) or ``"first"`` (the first sampled sketch that compiles, the old default).
SketchPolicy = Literal["heuristic", "first"]


@tvm.transform.module_pass(opt_level=0, name="ScheduleUntunedFromSketch")
class ScheduleUntunedFromSketch:
    """Schedule every PrimFunc that has no schedule yet from meta-schedule's design space, without measuring.

    The CPU counterpart of ``DefaultGPUSchedule``: the design space meta-schedule would search (multi-level
    tiling, VNNI tensorization where the target has it, parallel/vectorize/unroll), validated by the same
    postprocessors and a compile, as tuning candidates are. With ``policy="heuristic"`` (the default) the
    sketch's decisions are set by :func:`tvmquant.schedules.x86.defaults.choose_schedule` (a register tile of
    vector accumulators, outer tiles for the cores, the pad kept out of the conv); a kernel it cannot
    schedule, and every kernel with ``policy="first"``, gets the first sketch whose decisions, drawn from a
    fixed seed, pass and compile. PrimFuncs marked ``tirx.is_scheduled`` (tuned) are left alone; a PrimFunc
    for which no sketch survives the postprocessors stays unscheduled. Run after ``MetaScheduleApplyDatabase``.

    Parameters
    ----------
    target : tvm.target.Target
    seed : int
        Seed of the sampled decisions of the fallback (fixed, so builds are reproducible).
    policy : {"heuristic", "first"}
    verify : {"always", "tensorized"}
        Which heuristic schedules are compiled on their own before they are accepted
        (:func:`tvmquant.schedules.x86.defaults.choose_schedule`); sampled sketches always are.
    on_scheduled : callable, optional
        ``on_scheduled(name, func)`` for each kernel as soon as it is scheduled (:func:`build` starts compiling
        it there, while the next ones are scheduled).
    """

    def __init__(
        self,
        target: tvm.target.Target,
        seed: int = 0,
        policy: SketchPolicy = "heuristic",
        verify: Literal["always", "tensorized"] = "always",
        on_scheduled=None,
    ):
        if policy not in ("heuristic", "first"):
            raise ValueError(f"ScheduleUntunedFromSketch: policy must be 'heuristic' or 'first', got {policy!r}")
        self.target = target
        self.seed = seed
        self.policy = policy
        self.verify = verify
        self.on_scheduled = on_scheduled

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if int8_isa(self.target) in ("amx", "vnni", "avx512"):
            intrinsics.register_x86_intrinsics()
        else:
            # Meta-schedule's x86 rules look dot-product intrinsics up only on the targets above. Here it is
            # enough that TuneContext's import of the intrinsic package is cheap (2 s of TVMScript parsing saved).
            intrinsics.enter_intrinsic_package()
        num_threads = int(self.target.attrs.get("num-cores", 0)) or "physical"
        mod = mod.clone()
        for name in untuned_functions(mod):
            gvar = mod.get_global_var(name)
            scheduled = _first_valid_sketch(
                mod[gvar], self.target, name, self.seed, num_threads, policy=self.policy, verify=self.verify
            )
            if scheduled is not None:
                mod[gvar] = scheduled
                if self.on_scheduled is not None:
                    self.on_scheduled(name, scheduled)
        return mod


#: Default schedules already found in this process:
#: ``{(structural hash, target, seed, threads, policy, verify, AMX emulated): [(func, schedule)]}`` (a tensorized
#: schedule holds the body of the intrinsic that was registered when it was made).
#: Models repeat kernel shapes (ResNet blocks), and a process often builds the same model more than once
#: (INT8, simulated, FP32; a test suite): a kernel's default schedule is searched for once.
_SKETCH_CACHE: dict = {}


def _first_valid_sketch(
    func: tirx.PrimFunc,
    target,
    name: str,
    seed: int,
    num_threads,
    tries: int = 16,
    policy: SketchPolicy = "first",
    verify: Literal["always", "tensorized"] = "always",
):
    """The default schedule of one kernel as a scheduled PrimFunc (:func:`default_schedule`'s), or None."""
    sch = default_schedule(func, target, name, num_threads, seed=seed, tries=tries, policy=policy, verify=verify)
    return None if sch is None else sch.mod["main"].with_attr("tirx.is_scheduled", True)


def default_schedule(
    func: tirx.PrimFunc,
    target,
    name: str,
    num_threads,
    *,
    seed: int = 0,
    tries: int = 16,
    policy: SketchPolicy = "heuristic",
    verify: Literal["always", "tensorized"] = "always",
) -> tvm.s_tir.Schedule | None:
    """The schedule a kernel without a tuning record gets (what :class:`ScheduleUntunedFromSketch` applies),
    with its trace: the fixed AMX schedule for an AMX kernel; with ``policy="heuristic"`` the heuristic's
    sketch (:func:`tvmquant.schedules.x86.defaults.heuristic_schedule`, ``verify`` as there); else (or when
    those fail) the first design-space sketch (in meta-schedule's order: tensorized first) that passes the
    postprocessors and compiles, trying ``tries`` samples of its decisions before moving to the next sketch.
    None when no sketch survives.

    The trace replays the schedule on ``func`` (:func:`tvmquant.schedules.x86.tune` commits it to the
    database as a tuning record, so that tuning starts from it). Memoised per process on the kernel's
    structure and block names (:data:`_SKETCH_CACHE`): the trace looks blocks up by name, and structural
    equality ignores names, so a kernel of the same structure whose blocks are named otherwise (another import
    of the same layer) is scheduled anew; a cached trace would not replay on it.
    """
    key = (structural_hash(func), str(target), seed, str(num_threads), policy, verify, amx.emulating())
    names = amx.block_names(func)
    for known, sch in _SKETCH_CACHE.get(key, ()):
        if structural_equal(known, func) and amx.block_names(known) == names:
            return sch
    sch = None
    if amx.is_amx_kernel(func):
        sch = _amx_default(func, target, name, num_threads)
    if sch is None and policy == "heuristic":
        sch = defaults.heuristic_schedule(func, target, name, num_threads, verify)
        if sch is None:
            logger.debug("ScheduleUntunedFromSketch: no heuristic schedule for %s; first valid sketch", name)
    if sch is None:
        sch = _search_valid_sketch(func, target, name, seed, num_threads, tries)
    _SKETCH_CACHE.setdefault(key, []).append((func, sch))
    return sch


def _amx_default(func: tirx.PrimFunc, target, name: str, num_threads) -> tvm.s_tir.Schedule | None:
    """The fixed AMX schedule (:func:`tvmquant.schedules.x86.amx.amx_schedule`), checked by a compile; None
    (the design space is tried next) when it does not apply or compile."""
    cores = num_threads if isinstance(num_threads, int) else int(target.attrs.get("num-cores", 1) or 1)
    try:
        sch = amx.amx_schedule(func, cores)
        if sch is not None:
            build_candidate(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target, None)
    except Exception as err:  # noqa: BLE001  (any schedule or codegen failure: fall back to the design space)
        logger.warning("AMX default schedule of %s failed (%s); using the design space", name, str(err).splitlines()[0])
        return None
    return sch


def _search_valid_sketch(func: tirx.PrimFunc, target, name: str, seed: int, num_threads, tries: int):

    def design_space(rand_state):
        context = defaults.design_space_context(func, target, name, rand_state, num_threads)
        return context, list(context.generate_design_space())

    spaces = [design_space(seed)]  # the other samples are drawn only when a sketch fails (rare)
    for index in range(len(spaces[0][1])):
        for k in range(tries):
            if k == len(spaces):
                spaces.append(design_space(seed + k))
            context, sketches = spaces[k]
            sketch = sketches[index]
            sketch.enter_postproc()  # as the search does: a trace seeding it re-runs the postprocessors
            if not all(postproc.apply(sketch) for postproc in context.space_generator.postprocs):
                continue
            try:
                # What the tuner's builder does to every candidate: some samples pass the postprocessors and
                # still fail in codegen (a 64-lane vectorized loop around the 16-lane VNNI body of a dense).
                scheduled = sketch.mod["main"].with_attr("global_symbol", "main")  # MakePackedAPI needs it
                build_candidate(tvm.IRModule({"main": scheduled}), target, None)
            except Exception as err:  # noqa: BLE001  (any codegen failure: try the next sample)
                logger.debug("ScheduleUntunedFromSketch: a sketch of %s does not compile (%s)", name, err)
                continue
            return sketch
    logger.debug("ScheduleUntunedFromSketch: no valid sketch for %s; left unscheduled", name)
    return None


#: Set once a module failed to compile with unchecked default schedules (:func:`build`): every later build in
#: the process checks them, instead of failing on the same cached schedule and building twice again.
_CHECK_EVERY_DEFAULT = [False]


def _build_kernels(funcs: dict, target, attrs=None, checks: bool = True):
    """One LLVM module of the kernels ``funcs`` (``{name or GlobalVar: PrimFunc}``), as ``relax.build`` compiles
    them (TIR's default pipeline); safe on any thread. ``checks=False``: without the argument checks
    (:func:`kernel_checks`)."""
    with kernel_checks(checks):
        return tvm.tirx.build(tvm.IRModule(funcs, attrs=attrs), target=target, pipeline="default")


def kernel_checks(checks: bool):
    """A pass context in which the kernels compile with (``checks``) or without the checks TVM compiles into
    each of them: the type, shape, strides and device of every tensor it is called with, each an assertion with
    its message (``tirx.disable_assert``). Without them LLVM has a third less to compile (MobileNetV2's
    calibration graph, its 48 kernels one by one on Zen 3: 8.1 -> 5.3 s). Only for graphs that tvmquant's own
    VM runs: the VM's ``main`` checks the tensors it is given, and it hands each kernel tensors it allocated
    for it. The current context's opt level is kept: a pass context is per thread, so a worker thread has the
    default one."""
    import contextlib

    if checks:
        return contextlib.nullcontext()
    current = tvm.transform.PassContext.current()
    config = dict(current.config) if current.config else {}
    config["tirx.disable_assert"] = True
    return tvm.transform.PassContext(
        opt_level=current.opt_level,
        required_pass=list(current.required_pass),
        disabled_pass=list(current.disabled_pass),
        config=config,
    )


class _EarlyBuild:
    """Kernels compiled to machine code on a worker thread as soon as their schedule is known.

    Scheduling the untuned kernels is Python on one core (MobileNetV2's calibration graph: 0.5 s); LLVM, which
    releases the GIL, then compiled every kernel on every core. Here the kernels ``prepare`` already scheduled
    are handed to the workers (the cores but one) at once, and each other kernel as soon as it is scheduled, a
    few to a module, so LLVM runs on the otherwise idle core meanwhile. When lowering is done, :meth:`take`
    cancels the modules not started yet (their kernels are compiled with the rest, on every core) and keeps a
    module only where each of its kernels is, structurally, the one the lowered module holds (lowering adds
    only ``global_symbol``); anything else (a failed compile, a kernel lowering changed or dropped) is compiled
    again. MobileNetV2's calibration graph (batch 4, 2-core Xeon): 2.70 -> 2.52 s to a runnable VM.
    """

    #: Kernels per LLVM module (each module costs a few milliseconds of its own).
    GROUP = 3

    def __init__(self, target, workers: int, checks: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.target, self.checks = target, checks
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="tvmquant-build")
        self.pending: list = []
        self.jobs: list = []

    def add(self, name: str, func: tirx.PrimFunc) -> None:
        self.pending.append((name, func.with_attr("global_symbol", name)))
        if len(self.pending) >= self.GROUP:
            self.flush()

    def add_scheduled(self, mod: tvm.IRModule) -> None:
        """Every kernel of ``mod`` already marked ``tirx.is_scheduled`` (fixed schedules, tuning records)."""
        untuned = set(untuned_functions(mod))
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and gvar.name_hint not in untuned:
                self.add(gvar.name_hint, func)

    def flush(self) -> None:
        if self.pending:
            funcs, self.pending = dict(self.pending), []
            self.jobs.append((funcs, self.pool.submit(self._build, funcs)))

    def _build(self, funcs: dict):
        library = _build_kernels(funcs, self.target, checks=self.checks)
        library.get_function(next(iter(funcs)), False)  # LLVM generates the module's machine code at its first lookup
        return library

    def take(self, kernels: list) -> tuple[list, list]:
        """``(early modules, kernels left)`` for ``kernels`` (a list of ``(GlobalVar, PrimFunc)``): each early
        module is ``(its kernels by name, a future of its library)``; modules not started yet are cancelled, and
        their kernels are left, to be compiled with the rest on every core."""
        self.flush()
        lowered = {gvar.name_hint: func for gvar, func in kernels}
        early = []
        for funcs, future in self.jobs:
            if future.cancel() or not all(
                name in lowered and structural_equal(func, lowered[name]) for name, func in funcs.items()
            ):
                continue
            early.append((funcs, future))
        covered = {name for funcs, _ in early for name in funcs}
        return early, [(gvar, func) for gvar, func in kernels if gvar.name_hint not in covered]

    def libraries(self, early: list, attrs=None) -> list:
        """The libraries of ``early`` (from :meth:`take`), waited for; a module that failed is compiled again
        here, where its error is raised."""
        libraries = []
        for funcs, future in early:
            try:
                libraries.append(future.result())
            except Exception as err:  # noqa: BLE001  (compiled again here, where an error is raised)
                logger.debug("build: an early kernel module did not compile (%s); compiling it again", err)
                libraries.append(_build_kernels(funcs, self.target, attrs, self.checks))
        return libraries

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _relax_build(
    mod: tvm.IRModule,
    target,
    pipeline,
    workers: int | None = None,
    early: _EarlyBuild | None = None,
    checks: bool = True,
) -> relax.VMExecutable:
    """``relax.build(mod, target, relax_pipeline=pipeline)``, with the kernels compiled on ``workers`` threads.

    ``relax.build`` hands every kernel to one ``tvm.tirx.build``: one LLVM module, lowered, optimised and (on
    first use) turned into machine code on one core. Here the kernels are dealt round-robin into ``workers``
    modules (default: the physical cores) built on as many threads (TVM releases the GIL; each LLVM module has
    its own context) and linked as the executable's library and its imports, where the VM looks functions
    up. :func:`tvmquant.threads.generate_machine_code` then compiles them to machine code in parallel too.
    Everything else is what ``relax.build`` does (TVM 0.27's ``vm_build``); a module with few kernels, or a
    split that fails (kernels that call each other, other TVM internals), goes through ``relax.build`` itself.
    ``checks=False`` compiles the kernels without their argument checks (:func:`kernel_checks`).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tvm.relax import vm_build

    workers = default_num_threads() if workers is None else workers

    def whole():
        with kernel_checks(checks):
            return relax.build(mod, target=target, relax_pipeline=pipeline)

    if workers < 2:
        return whole()
    try:
        with target:
            lowered = pipeline(mod)
        attrs = dict(lowered.attrs) if lowered.attrs else {}
        params = dict(attrs.get("const_name_to_constant", {}))
        builder = relax.ExecBuilder()
        tir = vm_build._filter_tir(vm_build._vmcodegen(builder, lowered, "bytecode"))
        kernels = sorted(tir.functions.items(), key=lambda item: item[0].name_hint) if tir is not None else []
        if len(kernels) < 4 * workers:
            return whole()
        started, kernels = early.take(kernels) if early is not None else ([], kernels)
        parts = [dict(kernels[i::workers]) for i in range(workers) if kernels[i::workers]]
        with ThreadPoolExecutor(workers) as pool:
            libs = list(pool.map(lambda part: _build_kernels(part, target, tir.attrs, checks), parts))
        if early is not None:  # the modules still compiling early finish meanwhile
            libs += early.libraries(started, tir.attrs)
        library = libs[0]
        others = []
        for ext in attrs.get("external_mods", []):
            if vm_build._is_device_module(ext):
                library.import_module(ext)
            else:
                others.append(ext)
        for lib in libs[1:]:
            library.import_module(lib)
        return relax.VMExecutable(vm_build._ffi_api.VMLink(builder, target, library, others, params))
    except Exception as err:  # noqa: BLE001  (e.g. kernels that call each other: build as one module)
        logger.debug("build: compiling the kernels on %d threads failed (%s); one module", workers, err)
        return whole()


def apply_database(prepared: tvm.IRModule, target: tvm.target.Target, db_dir: str) -> tvm.IRModule:
    """``prepared`` (the output of :func:`prepare`) with the best record of ``db_dir`` for ``target``
    (:func:`records_for_target`) replayed on each kernel that has one (``MetaScheduleApplyDatabase``; the
    kernels it schedules are marked ``tirx.is_scheduled``)."""
    intrinsics.register_x86_intrinsics()  # records replay `tensorize("dot_16x4_vnni")` by name
    database = records_for_target(db_dir, target)
    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)


def build(
    mod: tvm.IRModule,
    target: tvm.target.Target | None = None,
    db_dir: str | None = None,
    *,
    fallback: Literal["sketch", "first-sketch", "none"] = "sketch",
    warn_untuned: bool = True,
    checks: bool = True,
) -> relax.VMExecutable:
    """Compile a Relax module with the INT8 x86 passes and the tuned kernels of ``db_dir``; never fails
    for want of a record.

    Kernels without a record (all of them when ``db_dir`` is None) get a default schedule
    (:class:`ScheduleUntunedFromSketch`: ``fallback="sketch"``, the heuristic's decisions; ``"first-sketch"``,
    the first sampled sketch that compiles, the default before the heuristic) or compile unscheduled
    (``fallback="none"``: correct but scalar and single-threaded). A warning names them.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module (weights bound as constants).
    target : tvm.target.Target, optional
        Defaults to :func:`x86_target` (host CPU).
    db_dir : str, optional
        Directory of the JSON database written by :func:`tune`.
    fallback : {"sketch", "first-sketch", "none"}
        What untuned kernels get. ``"sketch"`` (and any ``db_dir``) costs ~25 s once per process: TVM's
        intrinsic registry has to be imported (see :mod:`tvmquant.schedules.intrinsics`).
    warn_untuned : bool
        Warn with the names of the kernels that had no tuning record.
    checks : bool
        False compiles the kernels without the checks of the tensors each is called with (:func:`kernel_checks`):
        for graphs that only a VM of tvmquant's own runs (calibration, the summary's SQNR, AutoSkip, fine-
        tuning), never for a library that is deployed.

    Returns
    -------
    tvm.relax.VMExecutable
        Run with ``relax.VirtualMachine(ex, tvm.cpu())["main"](...)``.

    Examples
    --------
    >>> ex = build(mod, x86_target(), db_dir="tuning")  # doctest: +SKIP
    >>> vm = relax.VirtualMachine(ex, tvm.cpu())  # doctest: +SKIP
    >>> out = vm["main"](tvm.runtime.tensor(x_q)).numpy()  # doctest: +SKIP
    """
    if fallback not in ("sketch", "first-sketch", "none"):
        raise ValueError(f"build: fallback must be 'sketch', 'first-sketch' or 'none', got {fallback!r}")
    target = x86_target() if target is None else target
    if amx.amx_enabled(target):
        # The executable is usually run by this process (relax.VirtualMachine(ex, tvm.cpu())): without the tile
        # state its first AMX kernel dies with SIGILL. A no-op on CPUs without AMX (a cross-compile).
        request_amx_permission()
    prepared = prepare(mod, target)
    if db_dir is not None and not os.path.isfile(os.path.join(db_dir, "database_tuning_record.json")):
        warnings.warn(
            f"build: no tuning database in {db_dir!r}; every kernel gets the {fallback!r} fallback",
            stacklevel=2,
        )
        db_dir = None
    if db_dir is not None:
        prepared = apply_database(prepared, target, db_dir)
    untuned = untuned_functions(prepared)
    if untuned and warn_untuned and db_dir is not None:
        what = "get an untuned default schedule" if fallback != "none" else "compile unscheduled (slow)"
        mismatch = target_mismatch(db_dir, target)
        if mismatch is not None and len(records_for_target(db_dir, target).get_all_tuning_records()) == 0:
            warnings.warn(f"build: {mismatch}; meanwhile all {len(untuned)} kernels {what}", stacklevel=2)
        else:
            warnings.warn(
                f"build: {len(untuned)} kernel(s) have no tuning record in {db_dir!r} for "
                f"{describe_target(target)} and {what}: {', '.join(untuned)}. Run tvmquant.schedules.x86.tune(...) "
                "with the same target and database." + (f" ({mismatch})" if mismatch else ""),
                stacklevel=2,
            )
    elif untuned and warn_untuned:
        logger.info("build: no tuning database; %d kernel(s) use the %r fallback", len(untuned), fallback)
    lower = _cpu_backend.dataflow_lower_passes(target) + _cpu_backend.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0, name="TvmquantX86Finalize")
    def finalize(module: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tvm.transform.Sequential(lower)(alias_markers(module))

    def compile_with(verify):
        scheduled = prepared
        workers = default_num_threads()
        early = _EarlyBuild(target, workers - 1, checks) if workers > 1 else None
        try:
            if early is not None:
                early.add_scheduled(prepared)
            if untuned and fallback != "none":
                policy = "heuristic" if fallback == "sketch" else "first"
                on_scheduled = early.add if early is not None else None
                with target:
                    scheduled = ScheduleUntunedFromSketch(
                        target, policy=policy, verify=verify, on_scheduled=on_scheduled
                    )(prepared)
            with target, tvm.transform.PassContext(opt_level=3):
                return _relax_build(scheduled, target, finalize, workers=workers, early=early, checks=checks)
        finally:
            if early is not None:
                early.close()

    if not (untuned and fallback == "sketch") or _CHECK_EVERY_DEFAULT[0]:
        return compile_with("always")
    try:
        # Plain (not tensorized) default schedules are not compiled one by one first: see choose_schedule.
        return compile_with("tensorized")
    except Exception as err:  # noqa: BLE001  (any failure: the checked path below raises what is real)
        logger.warning(
            "build: the module did not compile with unchecked default schedules (%s); building again, and from "
            "now on in this process, with every default schedule compiled on its own first",
            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
        )
        _CHECK_EVERY_DEFAULT[0] = True  # the unchecked schedules stay cached: do not trip over them again
        return compile_with("always")
