"""Fixed schedules for kernels that are never tuned (data movement, blocked depthwise convs), and dropping
schedule-rule tags no CPU rule is registered for."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import tvm
from tvm import tirx

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from ..common import is_scheduled

logger = logging.getLogger(__name__)


#: Data-movement kernels with fewer iterations than this run serially (see schedule_data_movement), unless
#: they compute at least PARALLEL_MIN_FLOPS (TVM's estimate).
PARALLEL_MIN_ELEMENTS = 1 << 20
PARALLEL_MIN_FLOPS = 8 << 20


def _block_has_reduction(sch, block) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars)  # 0: data parallel


def schedule_data_movement(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc | None:
    """A fixed schedule for a kernel without reductions (layout transforms, pads, fused epilogues).

    Intermediate blocks are inlined into the output block. Blocks of at least ``PARALLEL_MIN_ELEMENTS``
    iterations run their outermost non-trivial loop in parallel; smaller ones stay serial (on the shared
    2-core machines here a parallel 200k-element transform measured 2x slower than serial: the thread
    pool waits for a descheduled worker), unless the kernel computes ``PARALLEL_MIN_FLOPS`` (a GELU of
    BERT-base's 128 x 3072 FFN activations, with its polynomial ``erf``: 0.14 ms serial, 0.08 ms on two
    cores). Inner loops stay as they are, so LLVM vectorizes them where the access is contiguous.

    Returns
    -------
    tvm.tirx.PrimFunc or None
        The scheduled function marked ``tirx.is_scheduled``, or None if ``func`` has a reduction.

    Notes
    -----
    Why not meta-schedule: its x86 rules fuse *all* loops of such a kernel and vectorize 64 lanes of the
    fused index, so each lane recomputes div/mod chains of the layout map. For the NCHW -> NCHW16c
    transform + pad in front of a 64-channel 56x56 conv that ran at 684 us against 45 us unscheduled, and
    tuning cannot escape it (that sketch is the whole design space).
    """
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    if not _has_root_block(sch):
        return None
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if not blocks or any(_block_has_reduction(sch, block) for block in blocks):
        return None
    outputs = {str(sch.get(b).name_hint) for b in sch.get_output_blocks(root)}
    for block in blocks:
        if str(sch.get(block).name_hint) in outputs:
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001  (not inlinable: keep it as its own loop nest)
            pass
    heavy = num_cores > 1 and tvm.s_tir.analysis.estimate_tir_flops(sch.mod) >= PARALLEL_MIN_FLOPS
    for block in sch.get_child_blocks(root):
        if num_cores <= 1 or (_block_elements(sch, block) < PARALLEL_MIN_ELEMENTS and not heavy):
            continue
        # Parallelize the outermost loop that has work, without fusing: fused loops recompute their
        # indices with int64 div/mod every iteration, which made a 5-D pad 10x slower than serial.
        for loop in sch.get_loops(block):
            extent = sch.get(loop).extent
            if isinstance(extent, tirx.IntImm) and int(extent) > 1:
                sch.parallel(loop)
                break
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_depthwise(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc | None:
    """A fixed schedule for a fused :func:`depthwise_nchwc_int8` kernel (conv plus elementwise epilogue).

    Each output pixel's 16 channels are one vector: the 3x3 (R x S) taps are unrolled, the widening
    multiply-adds run on 16 int32 lanes, and the epilogue (requantize, clip, cast) runs on the same vector
    right after, so the int32 result never goes to memory. Rows of output blocks run in parallel.

    Returns
    -------
    tvm.tirx.PrimFunc or None
        The scheduled function marked ``tirx.is_scheduled``; None when ``func`` is not such a kernel.

    Notes
    -----
    Why not meta-schedule: the kernel is memory-bound and its design space (multi-level tiling of a
    reduction over 9 taps) found 50-80 GOP/s in 16 trials on MobileNetV2's depthwise layers.
    """
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        conv = sch.get_sblock("depthwise_NCHWc_int8")
    except Exception:  # noqa: BLE001  (no such block)
        return None
    try:
        _schedule_depthwise(sch, conv, num_cores)
    except (tvm.s_tir.schedule.ScheduleError, ValueError) as err:  # e.g. an epilogue that changes the layout
        logger.debug("schedule_depthwise: leaving %s to meta-schedule (%s)", func, str(err).splitlines()[0])
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_depthwise(sch, conv, num_cores: int) -> None:
    root = sch.get_sblock("root")
    outputs = sch.get_output_blocks(root)
    if len(outputs) != 1:
        raise ValueError("more than one output block")
    output = outputs[0]
    for block in sch.get_child_blocks(root):
        name = str(sch.get(block).name_hint)
        if name not in (str(sch.get(conv).name_hint), str(sch.get(output).name_hint)):
            sch.compute_inline(block)
    n, cb, oh, ow, ci, kh, kw = sch.get_loops(conv)
    sch.reorder(n, cb, oh, ow, kh, kw, ci)
    if not output.same_as(conv):
        sch.reverse_compute_at(output, ow)
        sch.vectorize(sch.get_loops(output)[-1])
    sch.vectorize(ci)  # the init stays in the block: with kh and kw unrolled its guard folds away
    sch.unroll(kh)
    sch.unroll(kw)
    rows = sch.fuse(n, cb, oh)
    if num_cores > 1:
        sch.parallel(rows)


def schedule_row_reductions(func: tirx.PrimFunc, num_cores: int, lanes: int) -> tirx.PrimFunc | None:
    """A fixed schedule for a kernel of reductions along the last axis of its element-wise output: softmax,
    LayerNorm (and what FuseOps fused after them: a quantize, a scale); or of one such reduction written out
    (dynamic quantization's per-row min, max, absolute max).

    One row at a time (rows in parallel): each reduction is split into ``lanes`` partial results
    (``rfactor``) reduced by vector instructions, then the lanes are added up; the output and the
    intermediate element-wise values read by more than one block (softmax's exponentials, LayerNorm's mean)
    are computed once per row, into a row-sized buffer, one vector at a time; every other element-wise
    block is inlined. The partial sums change the order of the float additions (a last-bit difference).

    Returns
    -------
    tvm.tirx.PrimFunc or None
        The scheduled function marked ``tirx.is_scheduled``; None when ``func`` is not such a kernel.

    Notes
    -----
    Why not meta-schedule: its sketch inlines softmax's exponentials into both the sum and the quotient
    (computed twice) and runs each reduction as one serial scalar chain. BERT-base's softmax + quantize
    kernel (12 x 128 x 128, one Zen 5 core): 0.76 ms with it, 0.10 ms here; LayerNorm (128 x 768) 0.17 ms,
    0.02 ms here; the per-row max of BERT-base's dynamic preset (128 x 768) 0.056 ms, 0.010 ms here.
    """
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    if not _has_root_block(sch):
        return None
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    outputs = sch.get_output_blocks(root)
    if len(outputs) != 1:
        return None
    out = outputs[0]
    # The rows and the row's length: the output's loops (element-wise output) or its spatial loops and its
    # reduction (a reduction written out: dynamic quantization's per-row min, max and absolute max).
    reduced_output = _block_has_reduction(sch, out)
    extents = _loop_extents(sch, out)
    if extents is None or len(extents) < 2 or extents[-1] % lanes:
        return None
    reductions = [b for b in blocks if _block_has_reduction(sch, b)]
    if not reductions:
        return None
    for block in reductions:
        iters = sch.get(block).iter_vars
        kinds = [int(iv.iter_type) for iv in iters]
        # Spatial over the rows, one reduction over the row's elements, in that loop order.
        if kinds != [0] * (len(extents) - 1) + [2] or _loop_extents(sch, block) != extents:
            return None
        if not _reduces_along_last_axis(sch.get(block)):
            return None  # a matmul, or a sum over another axis (mean pooling over the tokens)
    try:
        out_name = str(sch.get(out).name_hint)
        keep = []  # element-wise blocks computed once per row
        for block in blocks:
            name = str(sch.get(block).name_hint)
            if name == out_name or _block_has_reduction(sch, block):
                continue
            if len(sch.get_consumers(block)) > 1:
                keep.append(name)
            else:
                sch.compute_inline(block)
        partial = {}
        for block in reductions:
            loops = sch.get_loops(block)
            _, inner = sch.split(loops[-1], [None, lanes])
            partial[str(sch.get(block).name_hint)] = sch.rfactor(inner, len(loops) - 1)
        row = sch.fuse(*sch.get_loops(out)[:-1])
        if num_cores > 1:
            sch.parallel(row)
        if not reduced_output:  # else its last loop adds up the lanes
            _split_vectorize(sch, sch.get_loops(out)[-1], lanes)
        # Producers last to first, so that each lands before its consumers in the row.
        order = [str(sch.get(b).name_hint) for b in sch.get_child_blocks(root)]
        by_name = {str(sch.get(rf).name_hint): rf for rf in partial.values()}
        for name in reversed(order):
            if name != out_name:
                sch.compute_at(by_name[name] if name in by_name else sch.get_sblock(name), row)
        for name in keep:
            loops = sch.get_loops(sch.get_sblock(name))
            if len(loops) > 1:
                _split_vectorize(sch, loops[-1], lanes)
        for rf in partial.values():
            loops = sch.get_loops(rf)  # row, lanes, steps: the lanes go inside and become the vector
            sch.reorder(loops[-1], loops[-2])
            sch.vectorize(loops[-2])
            sch.decompose_reduction(rf, loops[-1])
    except (tvm.s_tir.schedule.ScheduleError, ValueError, RuntimeError) as err:
        logger.debug("schedule_row_reductions: leaving %s to meta-schedule (%s)", func, str(err).splitlines()[0])
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _reduces_along_last_axis(block) -> bool:
    """Whether every buffer ``block`` reads with its reduction variable has that variable as its last index,
    and nowhere else (softmax's max reads ``x[i, j, k]``; a matmul reads ``b[i, k, j]``)."""
    k = block.iter_vars[-1].var
    for region in block.reads:
        uses = [any(v.same_as(k) for v in tirx.analysis.undefined_vars(r.min)) for r in region.region]
        if any(uses) and (not uses[-1] or any(uses[:-1]) or not region.region[-1].min.same_as(k)):
            return False
    return True


def _split_vectorize(sch, loop, lanes: int) -> None:
    extent = int(sch.get(loop).extent)
    if extent > lanes:
        _, loop = sch.split(loop, [None, lanes])
    sch.vectorize(loop)


def _loop_extents(sch, block) -> list[int] | None:
    extents = []
    for loop in sch.get_loops(block):
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm):
            return None
        extents.append(int(extent))
    return extents


def _block_elements(sch, block) -> int:
    total = 1
    for loop in sch.get_loops(block):
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm):
            return 1 << 62  # dynamic: assume large
        total *= int(extent)
    return total


def _has_root_block(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


@tvm.transform.module_pass(opt_level=0, name="ScheduleDataMovement")
class ScheduleDataMovement:
    """Give every kernel without a reduction a fixed parallel schedule (:func:`schedule_data_movement`), and
    every depthwise kernel its fixed vector schedule (:func:`schedule_depthwise`).

    They are then marked ``tirx.is_scheduled``, so :func:`tune` does not spend trials on them and
    :func:`build` does not report them as untuned. Run after ``FuseTIR``.

    Kernels of reductions along the last axis (softmax, LayerNorm) get :func:`schedule_row_reductions`.

    Parameters
    ----------
    num_cores : int
    lanes : int
        FP32 lanes of a vector register (16 with AVX-512, 8 with AVX2).
    """

    def __init__(self, num_cores: int = 1, lanes: int = 8):
        self.num_cores = num_cores
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = mod.clone()
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            scheduled = schedule_data_movement(func, self.num_cores)
            if scheduled is None:
                scheduled = schedule_depthwise(func, self.num_cores)
            if scheduled is None:
                scheduled = schedule_row_reductions(func, self.num_cores, self.lanes)
            if scheduled is not None:
                mod[gvar] = scheduled
        return mod


def _custom_rule_name(rule: str, key: str) -> str:
    # The global function meta-schedule's ApplyCustomRule looks up for a block's ``schedule_rule`` annotation
    # (its C++ GetCustomRuleName in TVM 0.27; the warning it prints lists the names it checked).
    return f"s_tir.meta_schedule.{key}.{rule}"


def _child_blocks(sch, block):
    for child in sch.get_child_blocks(block):
        yield child
        yield from _child_blocks(sch, child)


def strip_unregistered_schedule_rules(func: tirx.PrimFunc, target_keys: Sequence[str]) -> tirx.PrimFunc:
    """``func`` without the block annotations ``schedule_rule`` that name no custom rule for ``target_keys``.

    TOPI's C++ pooling computes annotate their block with ``schedule_rule = "meta_schedule.pool_max"`` (and
    ``pool_avg``, ``adaptive_pool_*``), but TVM 0.27 registers no such rule for CPUs. Meta-schedule's
    ``ApplyCustomRule`` then prints ``Warning: Unknown schedule rule "meta_schedule.pool_max" for target keys
    "("cpu",)"`` from C++ (straight to stderr, past Python logging) every time it builds the design space, and
    removes the annotation so that the default rules schedule the block. Removing it here, before any design
    space is built, gives the same design space without the warning. Annotations that do name a registered
    rule (the winograd transforms) are kept.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc
    target_keys : sequence of str
        The target's keys (``target.keys``, e.g. ``["cpu"]``).

    Returns
    -------
    tvm.tirx.PrimFunc
        ``func`` itself when it has nothing to strip.
    """
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    if not _has_root_block(sch):
        return func
    stripped = False
    for block in _child_blocks(sch, sch.get_sblock("root")):
        rule = sch.get(block).annotations.get("schedule_rule")
        if rule is None or str(rule) == "None":  # "None" means no custom rule; ApplyCustomRule skips it
            continue
        if any(tvm.get_global_func(_custom_rule_name(str(rule), key), allow_missing=True) for key in target_keys):
            continue
        sch.unannotate(block, "schedule_rule")
        stripped = True
    return sch.mod["main"] if stripped else func


@tvm.transform.module_pass(opt_level=0, name="StripUnregisteredScheduleRules")
class StripUnregisteredScheduleRules:
    """Apply :func:`strip_unregistered_schedule_rules` to every PrimFunc not yet scheduled (run after
    ``FuseTIR``; :func:`prepare` runs it last, so that tuning and building see the same kernels).

    Parameters
    ----------
    target : tvm.target.Target
    """

    def __init__(self, target: tvm.target.Target):
        self.keys = [str(key) for key in target.keys]

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = mod.clone()
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
                stripped = strip_unregistered_schedule_rules(func, self.keys)
                if stripped is not func:
                    mod[gvar] = stripped
        return mod
