"""Design spaces and tuning: the WMMA s8s8s32 / dp4a rules, each kernel's space, sampling candidates, tasks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import tvm
from tvm.s_tir import meta_schedule as ms

from .passes import prepare
from .target import (
    VECTOR_LOAD_LENS,
    Int8Kind,
    compile_cuda_source,
    cuda_source,
    cuda_target,
    have_nvcc,
    nvcc_compile_mode,
)

logger = logging.getLogger(__name__)


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
                with nvcc_compile_mode():
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
        with nvcc_compile_mode():
            tvm.compile(sch.mod, target=target)
    except Exception as err:  # a candidate that fails to lower is skipped, not fatal
        return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
    return None
