"""INT8 meta-schedule rules for NVIDIA GPUs: WMMA tensor cores (s8 x s8 -> s32) and a dp4a fallback.

Why not meta-schedule's stock ``cuda-tensorcore`` rules: in TVM 0.27 their int8 WMMA candidates keep A, B and
the int32 accumulator tile in ``shared.dyn``; the shared-memory merging passes then let the int32 tile reuse
the int8 tiles' memory, and ``LowerAccessPtr`` rejects the int8 alias of an int32 buffer, so (depending on
the sampled tiles) nearly every candidate fails to build. :func:`int8_rules` keeps A/B in ``shared.dyn`` and
stages the int32 C tile in static ``shared``, with no software pipeline; every sampled candidate builds.
Vector loads are limited to 1-4 lanes because CUDA codegen emits invalid ``make_int2`` / ``make_int4`` calls
for int8x8 / int8x16 constant broadcasts (the zero padding of a conv).

The dp4a rule (``__dp4a``, 4-way int8 dot product) is the fallback for shapes or GPUs without int8 tensor
cores.

Building needs no GPU: without a CUDA driver ``tvm.compile`` returns the CUDA source only, and
:func:`compile_cuda_source` runs ``nvcc`` on it (cubin to check that ``ptxas`` accepts it, PTX to check which
instructions were used). ``TVM_CUDA_COMPILE_MODE=nvcc`` is set on import so that ``tvm.compile`` uses the
installed ``nvcc`` where a driver is present.

Version-sensitive imports (TVM 0.27: ``tvm.s_tir.meta_schedule``, ``tvm.s_tir.tensor_intrin``,
``tvm.support.nvcc``) are gathered at the top of this module; the intrinsic modules (slow to import: they
parse every CUDA intrinsic) are imported by :func:`int8_rules`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Literal

os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")

import tvm  # noqa: E402
from tvm import te  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from . import fusion_passes, is_scheduled  # noqa: E402

__all__ = [
    "BuiltCandidate",
    "Int8Kind",
    "compile_cuda_source",
    "cuda_source",
    "cuda_target",
    "have_gpu",
    "have_nvcc",
    "int8_conv2d_nhwc",
    "int8_matmul",
    "int8_rules",
    "int8_space",
    "nvcc_arch",
    "sample_and_build",
]

Int8Kind = Literal["wmma", "dp4a", "wmma_fp16"]

logger = logging.getLogger(__name__)

#: vector lengths for cooperative shared-memory loads (int8x8 / int8x16 broadcasts miscompile, see above)
VECTOR_LOAD_LENS = (1, 2, 3, 4)


def cuda_target(tag: str = "nvidia/nvidia-h100") -> tvm.target.Target:
    """The CUDA target for ``tag``, with the thread and shared-memory limits meta-schedule needs.

    Example: ``cuda_target()`` is an H100 (``sm_90a``); a bare ``{"kind": "cuda"}`` lacks
    ``max_threads_per_block`` and is refused by meta-schedule.
    """
    return tvm.target.Target(tag)


def have_nvcc() -> bool:
    """True when ``nvcc`` is on PATH."""
    return shutil.which("nvcc") is not None


def have_gpu() -> bool:
    """True when a CUDA device is present (False, not an error, without a driver)."""
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no CUDA runtime in this build of TVM
        return False


# ----------------------------------------------------------------------------------------------------------
# Workloads
def int8_matmul(
    m: int = 256, n: int = 256, k: int = 256, transpose_b: bool = True, dtype: str = "int8", accum_dtype: str = "int32"
) -> tvm.IRModule:
    """``C[m, n] = sum_k A[m, k] * B[n, k]`` (s8 x s8 -> s32) as a one-function TIR module.

    ``transpose_b=True`` is the NT layout (B given as ``[n, k]``, the layout of a dense weight); with False
    B is ``[k, n]``. ``dtype``/``accum_dtype`` give the FP16 baseline (``"float16"``, ``"float32"``).
    """
    data = te.placeholder((m, k), dtype, name="A")
    weight = te.placeholder((n, k) if transpose_b else (k, n), dtype, name="B")
    red = te.reduce_axis((0, k), "k")
    wide = accum_dtype
    if transpose_b:
        out = te.compute(
            (m, n),
            lambda i, j: te.sum(data[i, red].astype(wide) * weight[j, red].astype(wide), axis=red),
            name="C",
        )
    else:
        out = te.compute(
            (m, n),
            lambda i, j: te.sum(data[i, red].astype(wide) * weight[red, j].astype(wide), axis=red),
            name="C",
        )
    return tvm.IRModule({"main": te.create_prim_func([data, weight, out]).with_attr("global_symbol", "main")})


def int8_conv2d_nhwc(
    batch: int = 1,
    height: int = 14,
    width: int = 14,
    channels: int = 64,
    out_channels: int = 64,
    kernel: int = 3,
    padding: int = 1,
    dtype: str = "int8",
    accum_dtype: str = "int32",
) -> tvm.IRModule:
    """Stride-1 NHWC x OHWI conv2d (s8 x s8 -> s32) with zero padding, as a one-function TIR module.

    Data ``[batch, height, width, channels]``, weight ``[out_channels, kernel, kernel, channels]``, output
    ``[batch, out_h, out_w, out_channels]``. The pad is its own block, so that the search may keep it out of
    the tensorized conv.
    """
    data = te.placeholder((batch, height, width, channels), dtype, name="X")
    weight = te.placeholder((out_channels, kernel, kernel, channels), dtype, name="W")
    padded = te.compute(
        (batch, height + 2 * padding, width + 2 * padding, channels),
        lambda b, y, x, c: te.if_then_else(
            te.all(y >= padding, y < height + padding, x >= padding, x < width + padding),
            data[b, y - padding, x - padding, c],
            tvm.tirx.const(0, dtype),
        ),
        name="pad",
    )
    out_h, out_w = height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1
    rc = te.reduce_axis((0, channels), "rc")
    ry = te.reduce_axis((0, kernel), "ry")
    rx = te.reduce_axis((0, kernel), "rx")
    out = te.compute(
        (batch, out_h, out_w, out_channels),
        lambda b, y, x, k: te.sum(
            padded[b, y + ry, x + rx, rc].astype(accum_dtype) * weight[k, ry, rx, rc].astype(accum_dtype),
            axis=[ry, rx, rc],
        ),
        name="conv",
    )
    return tvm.IRModule({"main": te.create_prim_func([data, weight, out]).with_attr("global_symbol", "main")})


# ----------------------------------------------------------------------------------------------------------
# Rules and design space
def int8_rules(kind: Int8Kind = "wmma", vector_load_lens=VECTOR_LOAD_LENS) -> list:
    """Meta-schedule rules for INT8 on CUDA: the INT8 rule first, then meta-schedule's usual cuda rules.

    Parameters
    ----------
    kind : "wmma", "dp4a" or "wmma_fp16"
        ``"wmma"``: 16x16x16 s8s8s32 WMMA for NN and NT layouts (A/B in ``shared.dyn``, C in static
        ``shared``, no software pipeline). ``"dp4a"``: ``__dp4a`` on CUDA cores. ``"wmma_fp16"``: the same
        staging for f16 x f16 -> f32, the FP16 baseline (the stock ``cuda-tensorcore`` rules hit the same
        shared-memory aliasing bug for it).
    vector_load_lens : sequence of int
        Lane counts for shared-memory loads.

    Returns
    -------
    list of tvm.s_tir.meta_schedule.ScheduleRule
    """
    import tvm.s_tir.tensor_intrin.cuda as cuda_intrin  # registers the WMMA intrinsics
    import tvm.s_tir.tensor_intrin.dot_product_common  # noqa: F401  registers dp4a_s8s8s32

    rule = ms.schedule_rule
    # The first stock cuda rule is ApplyCustomRule; ours replaces the stock MultiLevelTiling after it.
    stock = list(ms.ScheduleRule.create("cuda"))[1:]
    if kind in ("wmma", "wmma_fp16"):
        in_dtype, accum_dtype = ("int8", "int32") if kind == "wmma" else ("float16", "float32")
        groups = [
            cuda_intrin.get_wmma_intrin_group("shared.dyn", "shared", in_dtype, accum_dtype, trans_b)
            for trans_b in (False, True)
        ]
        int8_rule = rule.MultiLevelTilingTensorCore(
            intrin_groups=groups,
            structure="SSSRRSRS",
            tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"],
            max_innermost_factor=4,
            vector_load_lens=list(vector_load_lens),
            reuse_read=rule.ReuseType(req="must", levels=[4], scope="shared.dyn"),
            reuse_write=rule.ReuseType(req="must", levels=[2], scope="shared"),
            use_software_pipeline=False,
        )
    elif kind == "dp4a":
        int8_rule = rule.MultiLevelTilingWithIntrin(
            "dp4a_s8s8s32",
            structure="SSSRRSRS",
            tile_binds=["blockIdx.x", "vthread.x", "threadIdx.x"],
            max_innermost_factor=64,
            vector_load_lens=list(vector_load_lens),
            reuse_read=rule.ReuseType(req="must", levels=[4], scope="shared"),
            reuse_write=rule.ReuseType(req="must", levels=[3], scope="local"),
        )
    else:
        raise ValueError(f"int8 CUDA rule kind {kind!r} is not one of 'wmma', 'dp4a', 'wmma_fp16'")
    return [rule.ApplyCustomRule(), int8_rule] + stock


def int8_space(target: tvm.target.Target, kind: Int8Kind = "wmma") -> ms.space_generator.PostOrderApply:
    """The design-space generator for INT8 kernels on ``target`` (rules of :func:`int8_rules`).

    Postprocessors: ``cuda-tensorcore`` (rewrites the tensorize annotations). Mutators: ``cuda-tensorcore``
    for WMMA, ``cuda`` for dp4a. Pass it as ``space=`` to ``ms.tune_tir`` / ``ms.relax_integration.tune_relax``.

    Example
    -------
    >>> space = int8_space(cuda_target(), "wmma")
    >>> db = ms.tune_tir(int8_matmul(), cuda_target(), "work", 64, space=space)  # doctest: +SKIP
    """
    if target.kind.name != "cuda":
        raise ValueError(f"int8_space needs a cuda target, got {target.kind.name!r} ({target})")
    mutators = "cuda" if kind == "dp4a" else "cuda-tensorcore"
    return ms.space_generator.PostOrderApply(
        sch_rules=int8_rules(kind), postprocs="cuda-tensorcore", mutator_probs=mutators
    )


# ----------------------------------------------------------------------------------------------------------
# Building without a GPU
def nvcc_arch(target: tvm.target.Target) -> list[str]:
    """``nvcc`` ``-gencode`` flags for the target's ``arch`` (``sm_90a`` -> compute_90a / sm_90a)."""
    arch = str(target.attrs.get("arch", "sm_90"))
    number = re.fullmatch(r"sm_(\d+[a-z]?)", arch)
    if number is None:
        raise ValueError(f"target {target} has arch {arch!r}; expected sm_XX")
    return ["-gencode", f"arch=compute_{number.group(1)},code=sm_{number.group(1)}"]


def compile_cuda_source(source: str, target: tvm.target.Target, target_format: str = "ptx") -> bytes:
    """Compile CUDA source with the installed ``nvcc`` to ``"ptx"`` or ``"cubin"`` for ``target``'s arch."""
    from tvm.support import nvcc

    with target:
        return bytes(nvcc.compile_cuda(source, target_format=target_format, arch=nvcc_arch(target), compiler="nvcc"))


def cuda_source(lib) -> str:
    """The CUDA source of a module built by ``tvm.compile`` / ``relax.build`` (its CUDA device modules, at
    any depth of the import tree)."""
    from ..cuda_binaries import cuda_modules

    return "".join(module.inspect_source("") for module in cuda_modules(getattr(lib, "mod", lib)))


@dataclass
class BuiltCandidate:
    """One sampled schedule and what building it gave.

    ``error`` is None when ``tvm.compile`` (and, with ``nvcc``, ptxas via a cubin build) accepted it.
    """

    index: int
    script: str
    source: str = ""
    ptx: str = ""
    error: str | None = None
    seconds: float = 0.0
    lib: object = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def count(self, instruction: str) -> int:
        """Occurrences of ``instruction`` (e.g. ``"wmma.mma.sync"``, ``"dp4a"``) in the PTX."""
        return self.ptx.count(instruction)


def _prim_modules(mod, target) -> list[tuple[str, tvm.IRModule]]:
    """(name, one-PrimFunc IRModule) pairs: the module itself for TIR, the tuning tasks for Relax."""
    if isinstance(mod, tvm.tirx.PrimFunc):
        return [("main", tvm.IRModule({"main": mod.with_attr("global_symbol", "main")}))]
    if any(isinstance(func, tvm.relax.Function) for func in mod.functions.values()):
        tasks = ms.relax_integration.extract_tasks(mod, target)
        return [(task.task_name, task.dispatched[0]) for task in tasks]
    return [("main", mod)]


def sample_and_build(
    mod, target: tvm.target.Target, num_samples: int = 2, kind: Int8Kind = "wmma", seed: int = 0, ptx: bool = True
) -> list[BuiltCandidate]:
    """Sample ``num_samples`` schedules from the INT8 design space and build each with ``tvm.compile``.

    Parameters
    ----------
    mod : tvm.tirx.PrimFunc or tvm.IRModule
        A TIR workload (e.g. :func:`int8_matmul`), or a Relax module (each of its tuning tasks is sampled).
    target : tvm.target.Target
        A CUDA target, e.g. :func:`cuda_target`.
    num_samples : int
        Candidates per task (random replays of the design-space traces).
    kind : "wmma" or "dp4a"
    seed : int
        Random seed of the sampling.
    ptx : bool
        Also compile each candidate's CUDA source with ``nvcc`` (cubin, then PTX). Needs ``nvcc`` on PATH.

    Returns
    -------
    list of BuiltCandidate
        In task order, then sample order. Without a CUDA driver ``source`` is all ``tvm.compile`` gives.

    Example
    -------
    >>> built = sample_and_build(int8_matmul(128, 128, 128), cuda_target(), 1)  # doctest: +SKIP
    >>> built[0].count("wmma.mma.sync") > 0  # doctest: +SKIP
    True
    """
    if ptx and not have_nvcc():
        raise RuntimeError("sample_and_build(ptx=True) needs nvcc on PATH; install the CUDA toolkit or pass ptx=False")
    built = []
    for task_name, task_mod in _prim_modules(mod, target):
        context = ms.TuneContext(
            mod=task_mod,
            target=target,
            space_generator=int8_space(target, kind),
            search_strategy=ms.search_strategy.ReplayTrace(),
            task_name=task_name,
            rand_state=seed,
            num_threads=1,
        )
        spaces = context.space_generator.generate_design_space(context.mod)
        if not spaces:
            raise RuntimeError(f"task {task_name!r}: the {kind} INT8 rules generated no design space")
        strategy = context.search_strategy
        strategy.pre_tuning(num_samples, num_samples, spaces, None, None)
        candidates = strategy.generate_measure_candidates() or []
        strategy.post_tuning()
        for candidate in candidates:
            item = BuiltCandidate(index=len(built), script=candidate.sch.mod.script())
            start = time.perf_counter()
            try:
                item.lib = tvm.compile(candidate.sch.mod, target=target)
                item.source = cuda_source(item.lib)
                if ptx:
                    compile_cuda_source(item.source, target, "cubin")  # ptxas accepts it
                    item.ptx = compile_cuda_source(item.source, target, "ptx").decode(errors="replace")
            except Exception as err:  # a candidate that fails to build is a result, not a crash
                item.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}"
            item.seconds = time.perf_counter() - start
            built.append(item)
    return built


# ----------------------------------------------------------------------------------------------------------
# Whole models: NHWC layout, fusion, tuning tasks, build
def prepare(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Lower a Relax model to fused TIR kernels for a CUDA target (what :func:`tune_offline` tunes).

    Convs go to NHWC x OHWI (the channel axis is the GEMM reduction axis, contiguous for the tensor-core
    loads); the requantize epilogue (bias add, scale, round, clip, cast) follows them into NHWC through
    :class:`~tvmquant.schedules.layout.SinkLayoutTransform`, so that ``FuseOps`` fuses it into the conv
    kernel. Works for the INT8 model and for an FP16 one (see :func:`to_fp16`).

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module, weights bound as constants.
    target : tvm.target.Target, optional
        A CUDA target (default :func:`cuda_target`).

    Returns
    -------
    tvm.IRModule
        Relax ``main`` calling fused, unscheduled PrimFuncs.
    """
    from tvm import relax

    from .layout import SinkLayoutTransform

    target = cuda_target() if target is None else target
    passes = [
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
        SinkLayoutTransform(),
        relax.transform.DeadCodeElimination(),
        *fusion_passes(),
    ]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def to_fp16(mod: tvm.IRModule) -> tvm.IRModule:
    """The FP16 baseline of an FP32 Relax model: convs and matmuls in float16 with float32 accumulation
    (``ToMixedPrecision``), as TVM users deploy FP16 on tensor cores."""
    from tvm import relax

    with tvm.transform.PassContext(opt_level=3):
        return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)


def _gemm_dtypes(func: tvm.tirx.PrimFunc) -> tuple[str, str] | None:
    """(input dtype, accumulator dtype) of the first reduction block that reads two or more regions, if any.

    That block is the kernel's anchor and picks the rule set: int8 -> WMMA s8s8s32, float16 -> WMMA
    f16f16f32, anything else -> meta-schedule's own CUDA rules. Anchors are GEMMs (conv, matmul, attention's
    batch matmuls) and also layer norms, whose statistics block reads its input twice (mean and square);
    those get tuned with the stock rules. Pooling windows and means read one region and are not anchors.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001  (no root block: an already lowered kernel)
        return None
    for block in blocks:
        node = sch.get(block)
        if not any(int(iv.iter_type) != 0 for iv in node.iter_vars):  # 0: data parallel
            continue
        if len(node.reads) < 2 or len(node.writes) != 1:
            continue
        return str(node.reads[0].source.dtype), str(node.writes[0].source.dtype)
    return None


def space_kind(func: tvm.tirx.PrimFunc) -> Int8Kind | None:
    """The rule set for a fused kernel: ``"wmma"`` (int8 GEMM), ``"wmma_fp16"`` (float16 GEMM) or None
    (no tensor-core GEMM: meta-schedule's stock CUDA rules)."""
    dtypes = _gemm_dtypes(func)
    if dtypes == ("int8", "int32"):
        return "wmma"
    if dtypes is not None and dtypes[0] == "float16":
        return "wmma_fp16"
    return None


def design_space(func: tvm.tirx.PrimFunc, target: tvm.target.Target):
    """The design-space generator for one fused kernel (see :func:`space_kind`)."""
    kind = space_kind(func)
    if kind is None:
        return ms.space_generator.PostOrderApply(sch_rules="cuda", postprocs="cuda", mutator_probs="cuda")
    return int8_space(target, kind)


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> list:
    """The tuning tasks of a Relax model after :func:`prepare`: one per distinct fused kernel with an anchor
    (see :func:`_gemm_dtypes`: convs, matmuls, layer norms). The other kernels (elementwise, pooling, means,
    softmax) get fixed schedules in :func:`build` (:class:`ScheduleUntuned`)."""
    target = cuda_target() if target is None else target
    tasks = ms.relax_integration.extract_tasks(prepare(mod, target), target)
    return [task for task in tasks if _gemm_dtypes(task.dispatched[0]["main"]) is not None]


def _sample(task_mod: tvm.IRModule, target, count: int, seed: int, name: str) -> list:
    """``count`` schedules drawn from the task's design space (meta-schedule's ReplayTrace strategy).

    When the tensor-core rules cannot apply (e.g. a conv whose fused epilogue writes two outputs: the
    epilogue is not a stage pipeline for ``compute_at``), the draw comes from the dp4a rules (int8), then from
    meta-schedule's stock CUDA rules.
    """
    func = task_mod["main"]
    spaces = [design_space(func, target)]
    if space_kind(func) == "wmma":
        spaces.append(int8_space(target, "dp4a"))
    if space_kind(func) is not None:
        spaces.append(ms.space_generator.PostOrderApply(sch_rules="cuda", postprocs="cuda", mutator_probs="cuda"))
    for space in spaces:
        context = ms.TuneContext(
            mod=task_mod,
            target=target,
            space_generator=space,
            search_strategy=ms.search_strategy.ReplayTrace(),
            task_name=name,
            rand_state=seed,
            num_threads=1,
        )
        try:
            designs = context.space_generator.generate_design_space(context.mod)
        except Exception as err:  # noqa: BLE001  (a rule that cannot apply: try the next rule set)
            logger.warning("kernel %s: no design space (%s)", name, str(err).strip().splitlines()[-1][:200])
            continue
        if not designs:
            continue
        strategy = context.search_strategy
        strategy.pre_tuning(count, count, designs, None, None)
        candidates = strategy.generate_measure_candidates() or []
        strategy.post_tuning()
        return [candidate.sch for candidate in candidates]
    return []


def _compiles(sch, target) -> str | None:
    """None when ``tvm.compile`` lowers and generates CUDA for the scheduled kernel, else the error."""
    try:
        tvm.compile(sch.mod, target=target)
    except Exception as err:  # a candidate that fails to lower is skipped, not fatal
        return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
    return None


class ScheduleUntuned:
    """Module pass: schedule the kernels that have no tuning record.

    GEMM kernels get the first sampled schedule of their tensor-core design space that compiles (a valid,
    untuned WMMA kernel); kernels whose reductions are short windows (pooling, 7x7 means) get one thread per
    output; the others get ``dlight``'s default GPU schedules (reduction, general reduction, fallback).
    """

    def __init__(self, target: tvm.target.Target, seed: int = 0, tries: int = 8):
        self.target, self.seed, self.tries = target, seed, tries

    def __call__(self, mod: tvm.IRModule) -> tvm.IRModule:
        from tvm.s_tir import dlight as dl

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
    with target, tvm.transform.PassContext(opt_level=3):
        return relax.build(prepared, target=target)


def lift_constants(mod: tvm.IRModule, min_bytes: int = 1 << 16) -> tuple[tvm.IRModule, list]:
    """Turn the large constants of ``main`` (weights) into trailing parameters.

    For benchmarks that ship libraries to a GPU host: the kernels are the same, the library is small, and the
    weights are fed (or drawn at random) at run time. ``main`` keeps ``num_input`` for the real inputs.

    Returns
    -------
    (tvm.IRModule, list of numpy.ndarray)
        The module and the lifted values, in parameter order.
    """
    from tvm import relax

    from .._compat import const_value, is_const
    from .._relax import BindingRewriter

    class _Lift(BindingRewriter):
        def begin(self, func):
            self.lifted, self.params = [], []
            self.by_id: dict = {}

            def visit(expr):
                if is_const(expr) and expr.value.numpy().nbytes >= min_bytes and expr not in self.by_id:
                    array = const_value(expr)
                    var = relax.Var(f"weight{len(self.params)}", expr.ty)
                    self.by_id[expr] = var
                    self.params.append(var)
                    self.lifted.append(array)

            relax.analysis.post_order_visit(func.body, visit)

        def extra_params(self, func):
            return list(self.params)

        def remap(self, expr):
            if is_const(expr) and expr in self.by_id:
                return self.by_id[expr]
            return super().remap(expr)

    num_input = len(mod["main"].params)
    lifter = _Lift()
    out = lifter.transform_module(mod)
    out["main"] = out["main"].with_attr("num_input", num_input)
    return out, lifter.lifted


def apply_database(prepared: tvm.IRModule, target: tvm.target.Target, db_dir: str | None) -> tvm.IRModule:
    """The best record of ``db_dir`` applied to every kernel of a :func:`prepare`-d module that has one
    (the module itself when ``db_dir`` is None). :func:`build` takes the result with ``prepared=True``."""
    from tvm import relax

    if db_dir is None:
        return prepared
    from tvm.s_tir.tensor_intrin import cuda as _wmma  # noqa: F401  records replay tensorize() by name

    database = ms.database.JSONDatabase(work_dir=db_dir, module_equality="structural")
    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)


def untuned_kernels(applied: tvm.IRModule) -> list[str]:
    """The GEMM kernels of a module (after :func:`apply_database`) that got no tuned schedule."""
    return sorted(
        gvar.name_hint
        for gvar, func in applied.functions.items()
        if isinstance(func, tvm.tirx.PrimFunc) and not is_scheduled(func) and _gemm_dtypes(func) is not None
    )
