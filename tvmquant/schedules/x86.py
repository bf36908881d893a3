"""Tuned INT8 kernels for x86 CPUs (AVX512-VNNI, AVX-512BW, AVX2).

What this module does, in pipeline order (:func:`optimize_int8_for_x86` returns the sequence):

1. :class:`ExpandClip` rewrites ``R.clip`` into ``R.minimum(R.maximum(x, lo), hi)``. ``relax.clip`` has no
   layout-inference rule, so without this the requantize epilogue would stop the blocked layout and force a
   round trip to NCHW between every pair of convs.
2. :class:`ConvertInt8ConvLayout` runs Relax's ``ConvertLayout`` on the u8 x s8 -> s32 convs only, asking for
   ``NCHW16c`` data / ``OIHW16i16o`` weights. ``ConvertLayout`` propagates the blocked layout through the
   elementwise epilogue (bias add, requantize, relu, cast) and cancels the transforms between consecutive
   blocked convs, so a chain stays blocked.
3. :class:`BlockInt8Conv2d` replaces each u8 x s8 -> s32 ``R.nn.conv2d`` by a ``call_tir`` of the VNNI-shaped
   compute (``conv2d_NCHWc_int8``: data u8 ``[N, C/cb, H, W, cb]``, kernel s8
   ``[K/16, C/cb, R, S, cb/4, 16, 4]``, out s32 ``[N, K/16, OH, OW, 16]``). Weights are packed in numpy at
   compile time. Spatial padding is a separate ``R.nn.pad`` (a separate kernel, so meta-schedule never
   inlines it into the conv, which would stop tensorization). Convs ``ConvertInt8ConvLayout`` left in NCHW
   (channels not multiples of 16, grouped convs) get explicit transforms with zero channel padding around
   the blocked conv. Depthwise convs with whole 16-channel blocks become a blocked widening multiply-add
   (:func:`depthwise_nchwc_int8`; VNNI's 4-deep reduction has nothing to reduce there), other depthwise convs
   stay generic.
4. :class:`PackInt8Dense` does the same for ``R.matmul(u8 [.., K], s8 const [K, N], out_dtype="int32")``
   with weights packed ``[N/16, K/4, 16, 4]``.

5. :class:`~tvmquant.schedules.layout.SinkLayoutTransform` moves the transforms that ``ConvertLayout`` left
   in front of ops it has no rule for (``quantize``/``dequantize`` of a residual add, max pooling after an
   NCHW-only conv) below them, and cancels the round trips, so residual blocks stay blocked.
6. :class:`GatherLayoutTransform` lowers the remaining ``R.layout_transform`` ops to injective gathers, so
   ``FuseOps`` can fuse them with neighbouring pads and epilogues (TVM's own lowering is opaque to fusion).

Then :func:`prepare` runs the usual Relax lowering (``LegalizeOps``, ``FoldConstant``, ``FuseOps``,
``FuseTIR``), which fuses each conv with its epilogue, and :class:`ScheduleDataMovement`, which gives the
kernels without a reduction (pads, layout transforms) a fixed schedule so that they are not tuned.
:func:`tune` tunes the remaining kernels with meta-schedule and :func:`build` applies the tuning database,
scheduling kernels without a record from meta-schedule's first design-space sketch
(:class:`ScheduleUntunedFromSketch`). Meta-schedule's default x86 rules tensorize the blocked compute with
``dot_16x4_vnni`` when the target has AVX512-VNNI and ``dot_16x4_avx512`` when it has AVX-512BW only (both
re-registered by :mod:`tvmquant.schedules.intrinsics`: the stock ones fail LLVM 22's verifier, resp.
saturate); on AVX2 the same blocked kernels are vectorised without an intrinsic.

Input contract (what the quantization passes produce): ``R.nn.conv2d(x_q: uint8 NCHW, w_q: int8 OIHW
constant, out_dtype="int32")`` and ``R.matmul(x_q: uint8, w_q: int8 constant [K, N], out_dtype="int32")``.
Signed activations are left alone (shift them to uint8 first). Run these passes after the quantization
passes and before ``LegalizeOps``; :func:`tune` and :func:`build` run them for you.

Version-sensitive imports (TVM 0.27: ``tvm.s_tir.meta_schedule``, ``tvm.ir.GenericConst``,
``tvm.ir.utils.derived_object``, ``tvm.relax.backend.cpu_generic.pipeline``, ``tvm.target.codegen.llvm_*``,
the builder worker helpers of ``meta_schedule.builder.local_builder``) are gathered at the top of this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.ir import GenericConst  # TVM 0.27: relax constants are ``tvm.ir.GenericConst``
from tvm.ir.utils import derived_object

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.relax.backend.cpu_generic import pipeline as _cpu_backend
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.utils import fork_seed
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind
from tvm.target import codegen as _llvm_codegen

from .._compat import structural_equal, structural_hash
from ..target import cpu_flags, host_mcpu, x86_target
from . import fusion_passes, intrinsics, is_scheduled
from ._ms_worker import build_candidate
from .layout import SinkLayoutTransform

logger = logging.getLogger(__name__)

__all__ = [
    "BlockInt8Conv2d",
    "ConvertInt8ConvLayout",
    "ExpandClip",
    "GatherLayoutTransform",
    "Int8Isa",
    "PackInt8Dense",
    "PooledBuilder",
    "ScheduleDataMovement",
    "ScheduleUntunedFromSketch",
    "StripUnregisteredScheduleRules",
    "TuningProgress",
    "build",
    "conv2d_nchwc_int8",
    "cpu_flags",
    "dense_packed_int8",
    "depthwise_nchwc_int8",
    "extract_tasks",
    "host_mcpu",
    "int8_isa",
    "layout_transform_gather",
    "meta_schedule_logs",
    "optimize_int8_for_x86",
    "plan_trials",
    "prepare",
    "records_for_target",
    "search_strategy",
    "strip_unregistered_schedule_rules",
    "tune",
    "untuned_functions",
    "x86_target",
]

#: Output channels per block: the lanes of one ``vpdpbusd`` (16 x int32).
OC_BLOCK = 16
#: Input channels reduced per lane by one ``vpdpbusd``.
IC_QUAD = 4
#: Input-channel block of the blocked data layout when the channel count allows it.
IC_BLOCK = 16
#: Data-movement kernels with fewer iterations than this run serially (see schedule_data_movement).
PARALLEL_MIN_ELEMENTS = 1 << 20

Int8Isa = Literal["amx", "vnni", "avx512", "avx2", "generic"]


# ----------------------------------------------------------------------------------------------------------
# Targets
def _target_features(target: tvm.target.Target) -> frozenset[str]:
    return frozenset(str(f) for f in _llvm_codegen.llvm_get_cpu_features(target))


def int8_isa(target: tvm.target.Target | None = None) -> Int8Isa:
    """The best INT8 dot-product instruction set an LLVM target enables.

    Parameters
    ----------
    target : tvm.target.Target, optional
        Defaults to :func:`x86_target` for the host.

    Returns
    -------
    {"amx", "vnni", "avx512", "avx2", "generic"}
        ``"amx"`` means AMX-INT8 *and* AVX512-VNNI (the tuned kernels here use VNNI; TVM 0.27 has no AMX
        intrinsic), ``"avx512"`` means AVX-512BW without VNNI (``dot_16x4_avx512``).
    """
    target = x86_target() if target is None else target
    if target.kind.name != "llvm":
        return "generic"
    features = _target_features(target)
    if "avx512vnni" in features:
        return "amx" if "amx-int8" in features else "vnni"
    if "avx512bw" in features:
        return "avx512"
    if "avx2" in features:
        return "avx2"
    return "generic"


def _warn_if_not_runnable_here(target: tvm.target.Target) -> None:
    """Warn when ``target`` enables instruction-set features the host lacks (the module would SIGILL)."""
    if target.kind.name != "llvm":
        return
    host = _target_features(tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()}))
    # Only ISA extensions matter; tuning flags such as "prefer-256-bit" differ between CPUs harmlessly.
    isa_prefixes = (
        "avx",
        "amx",
        "sse",
        "fma",
        "f16c",
        "bmi",
        "vpclmul",
        "gfni",
        "vaes",
        "movdir",
        "serialize",
    )
    missing = sorted(f for f in _target_features(target) - host if f.startswith(isa_prefixes))
    if missing:
        warnings.warn(
            f"target mcpu={target.attrs.get('mcpu')} enables {', '.join(missing)}, which this CPU "
            f"({host_mcpu()}) lacks: modules built for it crash here with SIGILL, and tuning measures "
            "nothing. Use x86_target() for the host, or tune on the deployment CPU.",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------------
# TE computes (what the Relax rewrites call through ``call_te``)
def conv2d_nchwc_int8(
    data: te.Tensor,
    kernel: te.Tensor,
    strides: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
) -> te.Tensor:
    """u8 x s8 -> s32 conv2d in the blocked layouts of VNNI, on pre-padded data.

    Parameters
    ----------
    data : te.Tensor
        uint8 ``[N, C/cb, H, W, cb]`` with ``cb`` a multiple of 4, spatial padding already applied.
    kernel : te.Tensor
        int8 ``[K/16, C/groups/cb, R, S, cb/4, 16, 4]``: the innermost ``16 x 4`` is one ``vpdpbusd``.
    strides, dilation : sequence of 2 ints
    groups : int
        Groups; each group's input channels must be whole ``cb`` blocks and its outputs whole 16-blocks.

    Returns
    -------
    te.Tensor
        int32 ``[N, K/16, OH, OW, 16]``.

    Notes
    -----
    The same compute as topi's ``conv2d_NCHWc_int8`` minus its built-in padding: keeping the pad in a
    separate kernel is what lets meta-schedule tensorize every candidate.
    """
    batch, _, in_h, in_w, ic_block = (int(v) for v in data.shape)
    out_blocks, blocks_per_group, k_h, k_w, ic_quads, oc_block, quad = (int(v) for v in kernel.shape)
    if ic_quads * quad != ic_block:
        raise ValueError(f"conv2d_nchwc_int8: kernel block {ic_quads}x{quad} does not match data block {ic_block}")
    stride_h, stride_w = (int(s) for s in strides)
    dil_h, dil_w = (int(d) for d in dilation)
    out_h = (in_h - (k_h - 1) * dil_h - 1) // stride_h + 1
    out_w = (in_w - (k_w - 1) * dil_w - 1) // stride_w + 1
    out_blocks_per_group = out_blocks // groups

    r_h = te.reduce_axis((0, k_h), name="kh")
    r_w = te.reduce_axis((0, k_w), name="kw")
    r_block = te.reduce_axis((0, blocks_per_group), name="ic_outer")
    r_quad = te.reduce_axis((0, ic_quads), name="ic_f_inner")
    r_elem = te.reduce_axis((0, quad), name="ic_s_inner")

    def in_block(ob):
        if groups == 1:
            return r_block
        return (ob // out_blocks_per_group) * blocks_per_group + r_block

    return te.compute(
        (batch, out_blocks, out_h, out_w, oc_block),
        lambda n, ob, oh, ow, oi: te.sum(
            data[
                n,
                in_block(ob),
                oh * stride_h + r_h * dil_h,
                ow * stride_w + r_w * dil_w,
                r_quad * quad + r_elem,
            ].astype("int32")
            * kernel[ob, r_block, r_h, r_w, r_quad, oi, r_elem].astype("int32"),
            axis=[r_h, r_w, r_block, r_quad, r_elem],
        ),
        name="conv2d_NCHWc_int8",
    )


def depthwise_nchwc_int8(
    data: te.Tensor, kernel: te.Tensor, strides: Sequence[int], dilation: Sequence[int]
) -> te.Tensor:
    """u8 x s8 -> s32 depthwise conv2d in the blocked layout, on pre-padded data.

    Parameters
    ----------
    data : te.Tensor
        uint8 ``[N, C/16, H, W, 16]``, spatial padding already applied.
    kernel : te.Tensor
        int8 ``[C/16, R, S, 16]`` (:func:`pack_depthwise_weight`).
    strides, dilation : sequence of 2 ints

    Returns
    -------
    te.Tensor
        int32 ``[N, C/16, OH, OW, 16]``: the 16 channels of a block are the 16 int32 lanes of a 512-bit
        vector. VNNI has nothing to reduce here (one input channel per output), so this is a widening
        multiply-add that meta-schedule vectorizes; what it saves is the NCHW round trip around each
        depthwise conv of a blocked network.
    """
    batch, blocks, in_h, in_w, block = (int(v) for v in data.shape)
    k_blocks, k_h, k_w, k_block = (int(v) for v in kernel.shape)
    if (k_blocks, k_block) != (blocks, block):
        raise ValueError(f"depthwise_nchwc_int8: kernel {tuple(kernel.shape)} does not match data {tuple(data.shape)}")
    stride_h, stride_w = (int(v) for v in strides)
    dil_h, dil_w = (int(v) for v in dilation)
    out_h = (in_h - (k_h - 1) * dil_h - 1) // stride_h + 1
    out_w = (in_w - (k_w - 1) * dil_w - 1) // stride_w + 1
    r_h = te.reduce_axis((0, k_h), name="kh")
    r_w = te.reduce_axis((0, k_w), name="kw")
    return te.compute(
        (batch, blocks, out_h, out_w, block),
        lambda n, cb, oh, ow, ci: te.sum(
            data[n, cb, oh * stride_h + r_h * dil_h, ow * stride_w + r_w * dil_w, ci].astype("int32")
            * kernel[cb, r_h, r_w, ci].astype("int32"),
            axis=[r_h, r_w],
        ),
        name="depthwise_NCHWc_int8",
    )


def dense_packed_int8(data: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """u8 x s8 -> s32 matmul with weights packed for VNNI.

    Parameters
    ----------
    data : te.Tensor
        uint8 ``[..., K]``, ``K`` a multiple of 4.
    weight : te.Tensor
        int8 ``[N/16, K/4, 16, 4]``: ``weight[n // 16, k // 4, n % 16, k % 4] = w[k, n]``.

    Returns
    -------
    te.Tensor
        int32 ``[..., N]``.
    """
    *batch, depth = (int(v) for v in data.shape)
    n_blocks, k_quads, oc_block, quad = (int(v) for v in weight.shape)
    if k_quads * quad != depth:
        raise ValueError(f"dense_packed_int8: packed weight covers K={k_quads * quad}, data has K={depth}")
    r_quad = te.reduce_axis((0, k_quads), name="k_outer")
    r_elem = te.reduce_axis((0, quad), name="k_inner")

    def compute(*idx):
        col = idx[-1]
        return te.sum(
            data[(*idx[:-1], r_quad * quad + r_elem)].astype("int32")
            * weight[col // oc_block, r_quad, col % oc_block, r_elem].astype("int32"),
            axis=[r_quad, r_elem],
        )

    return te.compute((*batch, n_blocks * oc_block), compute, name="dense_packed_int8")


# ----------------------------------------------------------------------------------------------------------
# Helpers for the Relax rewrites
def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if ty is not None and hasattr(ty, "dtype") else None


def _static_shape(expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(v) for v in shape.values)
    except (TypeError, AttributeError):
        return None


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _ic_block_for(channels_per_group: int, groups: int) -> int | None:
    """Data block ``cb`` for the blocked conv: 16 when possible, else 8 or 4 (after padding C to 4)."""
    if groups == 1:
        padded = _round_up(channels_per_group, IC_QUAD)
    elif channels_per_group % IC_QUAD == 0:
        padded = channels_per_group  # groups cannot be padded independently through one layout_transform
    else:
        return None
    for block in (IC_BLOCK, 8, IC_QUAD):
        if padded % block == 0:
            return block
    return None


def _is_u8s8_int32(call, out_dtype) -> bool:
    return _dtype(call.args[0]) == "uint8" and _dtype(call.args[1]) == "int8" and str(out_dtype) == "int32"


def pack_conv2d_weight(weight_oihw: np.ndarray, groups: int, ic_block: int) -> np.ndarray:
    """Pack an OIHW int8 weight into ``[K/16, C/groups/cb, R, S, cb/4, 16, 4]``, zero-padding K and C.

    Parameters
    ----------
    weight_oihw : numpy.ndarray
        int8 ``[K, C/groups, R, S]``.
    groups : int
    ic_block : int
        ``cb``, a multiple of 4.

    Returns
    -------
    numpy.ndarray
        The packed int8 weight (``K`` padded to 16 only when ``groups == 1``).

    Examples
    --------
    >>> w = np.arange(16 * 4 * 1 * 1).reshape(16, 4, 1, 1).astype("int8")
    >>> p = pack_conv2d_weight(w, groups=1, ic_block=4)
    >>> p.shape, int(p[0, 0, 0, 0, 0, 5, 2]) == int(w[5, 2, 0, 0])
    ((1, 1, 1, 1, 1, 16, 4), True)
    """
    out_ch, in_per_group, k_h, k_w = weight_oihw.shape
    out_pad = _round_up(out_ch, OC_BLOCK) if groups == 1 else out_ch
    in_pad = _round_up(in_per_group, ic_block)
    padded = np.zeros((out_pad, in_pad, k_h, k_w), dtype=np.int8)
    padded[:out_ch, :in_per_group] = weight_oihw
    blocked = padded.reshape(out_pad // OC_BLOCK, OC_BLOCK, in_pad // ic_block, ic_block // IC_QUAD, IC_QUAD, k_h, k_w)
    # -> [ob, icb, kh, kw, quad_index, oc_in_block, elem_in_quad]
    return np.ascontiguousarray(blocked.transpose(0, 2, 5, 6, 3, 1, 4))


def pack_depthwise_weight(weight_oihw: np.ndarray, block: int = OC_BLOCK) -> np.ndarray:
    """Depthwise weight ``[C, 1, R, S]`` -> ``[C/block, R, S, block]`` (channels innermost)."""
    channels, per_group, k_h, k_w = weight_oihw.shape
    if per_group != 1 or channels % block != 0:
        raise ValueError(f"pack_depthwise_weight: expected [C, 1, R, S] with C a multiple of {block}")
    return np.ascontiguousarray(weight_oihw.reshape(channels // block, block, k_h, k_w).transpose(0, 2, 3, 1))


def pack_dense_weight(weight_kn: np.ndarray) -> np.ndarray:
    """Pack a ``[K, N]`` int8 weight into ``[N/16, K/4, 16, 4]``, zero-padding N to 16 and K to 4.

    Examples
    --------
    >>> w = np.arange(8 * 16).reshape(8, 16).astype("int8")
    >>> p = pack_dense_weight(w)
    >>> p.shape, int(p[0, 1, 3, 2]) == int(w[6, 3])
    ((1, 2, 16, 4), True)
    """
    depth, cols = weight_kn.shape
    depth_pad, cols_pad = _round_up(depth, IC_QUAD), _round_up(cols, OC_BLOCK)
    padded = np.zeros((depth_pad, cols_pad), dtype=np.int8)
    padded[:depth, :cols] = weight_kn
    blocked = padded.reshape(depth_pad // IC_QUAD, IC_QUAD, cols_pad // OC_BLOCK, OC_BLOCK)
    return np.ascontiguousarray(blocked.transpose(2, 0, 3, 1))


# ----------------------------------------------------------------------------------------------------------
# Passes
@tvm.transform.module_pass(opt_level=0, name="ExpandClip")
class ExpandClip:
    """Rewrite ``R.clip(x, lo, hi)`` as ``R.minimum(R.maximum(x, lo), hi)``.

    ``relax.clip`` has no layout-inference rule (``FRelaxInferLayout``), so ``ConvertLayout`` stops at it
    and converts back to NCHW; ``maximum``/``minimum`` propagate any layout. The result is identical for
    every non-NaN input. Clips with non-constant bounds are left alone. Run before
    :class:`ConvertInt8ConvLayout`.

    Examples
    --------
    >>> mod = ExpandClip()(mod)  # doctest: +SKIP
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from tvm.relax.dpl import is_op, rewrite_call, wildcard

        pattern = is_op("relax.clip")(wildcard(), wildcard(), wildcard())

        def rewriter(expr, _matches):
            data, low, high = expr.args
            dtype = _dtype(data)
            if dtype is None or not all(isinstance(b, tirx.IntImm | tirx.FloatImm) for b in (low, high)):
                return expr
            cast = float if "float" in dtype else int
            low_const = relax.const(cast(low.value), dtype)
            high_const = relax.const(cast(high.value), dtype)
            return relax.op.minimum(relax.op.maximum(data, low_const), high_const)

        updated = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function) and not _is_primitive(func):
                updated[gvar] = rewrite_call(pattern, rewriter, func)
        mod = mod.clone()  # IRModule.__setitem__ mutates in place: never touch the caller's module
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod


def _is_primitive(func) -> bool:
    attrs = func.attrs
    return attrs is not None and "Primitive" in attrs and int(attrs["Primitive"]) != 0


def _blockable_conv2d(call, ic_block: int = IC_BLOCK) -> bool:
    """Whether ``call`` is an NCHW u8 x s8 -> s32 conv, constant weight, channels in whole blocks."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
        return False
    attrs = call.attrs
    if not _is_u8s8_int32(call, attrs.out_dtype) or not isinstance(call.args[1], GenericConst):
        return False
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW":
        return False
    data_shape, weight_shape = _static_shape(call.args[0]), _static_shape(call.args[1])
    if data_shape is None or weight_shape is None:
        return False
    return int(attrs.groups) == 1 and data_shape[1] % ic_block == 0 and weight_shape[0] % OC_BLOCK == 0


@tvm.transform.module_pass(opt_level=0, name="ConvertInt8ConvLayout")
class ConvertInt8ConvLayout:
    """Convert u8 x s8 -> s32 convs to ``NCHW{block}c`` data / ``OIHW{block}i{block}o`` kernels.

    A selective ``relax.transform.ConvertLayout``: only NCHW convs with uint8 data, a constant int8 weight,
    int32 output, ``groups == 1`` and input/output channels that are multiples of ``block`` are converted;
    every other op keeps its layout unless its input's layout propagates to it (elementwise ops, pooling,
    concat). Between two converted convs the layout transforms cancel, so the chain stays blocked. The
    converted convs are not legalizable by TOPI: run :class:`BlockInt8Conv2d` afterwards (the
    :func:`optimize_int8_for_x86` sequence does).

    Parameters
    ----------
    block : int
        Channel block (16: the lanes of one ``vpdpbusd``).
    """

    def __init__(self, block: int = IC_BLOCK):
        if block % OC_BLOCK != 0:
            raise ValueError(f"ConvertInt8ConvLayout: block must be a multiple of {OC_BLOCK}, got {block}")
        self.block = block

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        block = self.block
        desired = {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW{block}i{block}o"]}

        def layout_cb(call):
            if _blockable_conv2d(call, block):
                return desired
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d":
                # Pin every other conv to its own layouts: with no wish, conv2d's layout inference adopts
                # its input's blocked layout and fails on the 4-D weight.
                attrs = call.attrs
                return {"relax.nn.conv2d": [str(attrs.data_layout), str(attrs.kernel_layout)]}
            return {}  # other ops follow their inputs' layouts

        needs_conversion = any(
            isinstance(func, relax.Function) and _has_blockable_conv(func, block) for func in mod.functions.values()
        )
        if not needs_conversion:
            return mod  # idempotent: nothing left to convert
        return relax.transform.ConvertLayout({}, layout_cb=layout_cb)(mod)


def _has_blockable_conv(func, block: int) -> bool:
    found = []

    def visit(expr):
        if isinstance(expr, tvm.ir.Call) and _blockable_conv2d(expr, block):
            found.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


@relax.expr_functor.mutator
class _Int8Rewriter(relax.PyExprMutator):
    """Shared machinery: rewrite calls bottom-up, emitting new bindings through the block builder."""

    def __init__(self, mod: tvm.IRModule, convs: bool, dense: bool):
        super().__init__(mod)
        self.mod_ = mod
        self.convs = convs
        self.dense = dense
        self.rewritten = 0

    def transform(self) -> tvm.IRModule:
        for gvar, func in self.mod_.functions.items():
            if isinstance(func, relax.Function) and not _is_primitive(func):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call):  # noqa: D102  (PyExprMutator hook)
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if self.convs and call.op.name == "relax.nn.conv2d":
            return self._rewrite_conv2d(call)
        if self.dense and call.op.name == "relax.matmul":
            return self._rewrite_matmul(call)
        return call

    # -- conv2d ----------------------------------------------------------------------------------------
    def _constant_weight(self, weight):
        """The constant weight as numpy, looking through ``ConvertLayout``'s transform of a constant."""
        if isinstance(weight, GenericConst):
            return weight.value.numpy(), "direct"
        if isinstance(weight, relax.Var):
            bound = self.lookup_binding(weight)
            if (
                isinstance(bound, tvm.ir.Call)
                and isinstance(bound.op, tvm.ir.Op)
                and bound.op.name == "relax.layout_transform"
                and isinstance(bound.args[0], GenericConst)
            ):
                return bound.args[0].value.numpy(), "oihw_source"
        return None, None

    def _rewrite_conv2d(self, call):
        attrs = call.attrs
        if not _is_u8s8_int32(call, attrs.out_dtype):
            return call
        data, weight = call.args
        weight_np, origin = self._constant_weight(weight)
        data_shape = _static_shape(data)
        if weight_np is None or data_shape is None:
            logger.debug("BlockInt8Conv2d: skipping %s (weight not constant or dynamic shape)", call)
            return call
        groups = int(attrs.groups)
        strides = [int(s) for s in attrs.strides]
        dilation = [int(d) for d in attrs.dilation]
        pad_top, pad_left, pad_bottom, pad_right = (int(p) for p in attrs.padding)
        layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)

        if layouts == ("NCHW", "OIHW", "NCHW") and weight_np.ndim == 4:
            return self._rewrite_nchw_conv2d(
                call,
                weight_np,
                data_shape,
                groups,
                strides,
                dilation,
                (pad_top, pad_bottom, pad_left, pad_right),
            )
        block = _blocked_layout_block(layouts)
        if block is None or groups != 1:
            return call
        if origin == "direct":
            if weight_np.ndim != 6:
                return call
            # OIHW{b}i{b}o -> OIHW
            ob, ib, k_h, k_w, bi, bo = weight_np.shape
            weight_np = weight_np.transpose(0, 5, 1, 4, 2, 3).reshape(ob * bo, ib * bi, k_h, k_w)
        expected = _static_shape(weight)  # [O/b, C/b, R, S, b, b]: the source must be its OIHW original
        if (
            weight_np.ndim != 4
            or expected is None
            or weight_np.shape
            != (
                expected[0] * block,
                expected[1] * block,
                expected[2],
                expected[3],
            )
        ):
            return call
        packed = pack_conv2d_weight(weight_np, groups=1, ic_block=block)
        padded = self._spatial_pad(data, 5, (pad_top, pad_bottom, pad_left, pad_right))
        self.rewritten += 1
        return self.builder_.call_te(
            conv2d_nchwc_int8,
            padded,
            relax.const(packed, "int8"),
            strides,
            dilation,
            1,
            primfunc_name_hint="conv2d_int8_nchwc",
        )

    def _spatial_pad(self, data, ndim: int, pads):
        pad_top, pad_bottom, pad_left, pad_right = pads
        if not any(pads):
            return data
        width = [0, 0] * ndim
        width[4:8] = [pad_top, pad_bottom, pad_left, pad_right]
        # A separate op (and, after FuseOps, a separate kernel): padding inlined into the tensorized conv
        # turns its input access into an if/else and tensorization fails.
        return self.builder_.emit(relax.op.nn.pad(data, width, pad_value=0.0))

    def _rewrite_nchw_conv2d(self, call, weight_np, data_shape, groups, strides, dilation, pads):
        channels = data_shape[1]
        out_channels = weight_np.shape[0]
        per_group = channels // groups
        if per_group == 1 and groups == channels == out_channels and channels % OC_BLOCK == 0:
            return self._rewrite_depthwise(call.args[0], weight_np, strides, dilation, pads)
        if groups > 1 and (per_group == 1 or (out_channels // groups) % OC_BLOCK != 0):
            return call  # other depthwise convs, or output groups that are not whole 16-blocks: generic conv
        ic_block = _ic_block_for(per_group, groups)
        if ic_block is None:
            return call
        channels_pad = _round_up(channels, ic_block)
        blocked = self.builder_.emit(
            relax.op.layout_transform(
                call.args[0],
                lambda n, c, h, w: (n, c // ic_block, h, w, c % ic_block),
                pad_value=0 if channels_pad != channels else None,
            )
        )
        padded = self._spatial_pad(blocked, 5, pads)
        packed = pack_conv2d_weight(weight_np, groups=groups, ic_block=ic_block)
        conv = self.builder_.emit(
            self.builder_.call_te(
                conv2d_nchwc_int8,
                padded,
                relax.const(packed, "int8"),
                strides,
                dilation,
                groups,
                primfunc_name_hint="conv2d_int8_nchwc",
            )
        )
        self.rewritten += 1
        out = relax.op.layout_transform(conv, lambda n, cb, h, w, ci: (n, cb * OC_BLOCK + ci, h, w))
        if packed.shape[0] * OC_BLOCK != out_channels:
            out = relax.op.strided_slice(self.builder_.emit(out), axes=[1], begin=[0], end=[out_channels])
        return out

    def _rewrite_depthwise(self, data, weight_np, strides, dilation, pads):
        # NCHW in and out, blocked inside; SinkLayoutTransform then cancels the transforms against the
        # blocked convs around it.
        blocked = self.builder_.emit(
            relax.op.layout_transform(data, lambda n, c, h, w: (n, c // OC_BLOCK, h, w, c % OC_BLOCK))
        )
        padded = self._spatial_pad(blocked, 5, pads)
        conv = self.builder_.emit(
            self.builder_.call_te(
                depthwise_nchwc_int8,
                padded,
                relax.const(pack_depthwise_weight(weight_np), "int8"),
                strides,
                dilation,
                primfunc_name_hint="depthwise_int8_nchwc",
            )
        )
        self.rewritten += 1
        return relax.op.layout_transform(conv, lambda n, cb, h, w, ci: (n, cb * OC_BLOCK + ci, h, w))

    # -- matmul ----------------------------------------------------------------------------------------
    def _rewrite_matmul(self, call):
        if not _is_u8s8_int32(call, call.attrs.out_dtype):
            return call
        data, weight = call.args
        data_shape = _static_shape(data)
        if not isinstance(weight, GenericConst) or data_shape is None:
            return call
        weight_np = weight.value.numpy()
        if weight_np.ndim != 2 or len(data_shape) < 2:
            return call  # vector-matrix products are rare in quantized graphs; keep the generic op
        depth, cols = weight_np.shape
        depth_pad = _round_up(depth, IC_QUAD)
        if depth_pad != depth:
            width = [0, 0] * (len(data_shape) - 1) + [0, depth_pad - depth]
            data = self.builder_.emit(relax.op.nn.pad(data, width, pad_value=0.0))
        packed = relax.const(pack_dense_weight(weight_np), "int8")
        self.rewritten += 1
        out = self.builder_.call_te(dense_packed_int8, data, packed, primfunc_name_hint="dense_int8_packed")
        cols_pad = _round_up(cols, OC_BLOCK)
        if cols_pad != cols:
            out = relax.op.strided_slice(self.builder_.emit(out), axes=[len(data_shape) - 1], begin=[0], end=[cols])
        return out


def _blocked_layout_block(layouts) -> int | None:
    """The block ``b`` if the layouts are ConvertLayout's ``(NCHW{b}c, OIHW{b}i{b}o, NCHW{b}c)``."""
    data_layout, kernel_layout, out_layout = (str(layout) for layout in layouts)
    if not (data_layout.startswith("NCHW") and data_layout.endswith("c")) or out_layout != data_layout:
        return None
    try:
        block = int(data_layout[4:-1])
    except ValueError:
        return None
    if block % OC_BLOCK != 0 or kernel_layout != f"OIHW{block}i{block}o":
        return None
    return block


@tvm.transform.module_pass(opt_level=0, name="BlockInt8Conv2d")
class BlockInt8Conv2d:
    """Replace u8 x s8 -> s32 ``R.nn.conv2d`` by the blocked VNNI compute (:func:`conv2d_nchwc_int8`).

    Handles the ``NCHW16c``/``OIHW16i16o`` convs made by :class:`ConvertInt8ConvLayout` (output stays
    blocked) and plain NCHW/OIHW convs, including grouped convs whose groups are whole channel blocks
    (explicit layout transforms, zero channel padding, and a slice when the output channels are padded to
    16). Depthwise convs whose channels are whole 16-blocks get :func:`depthwise_nchwc_int8`; other depthwise
    convs, signed activations, non-constant weights and dynamic shapes are left unchanged.
    The weight is packed in numpy, once, at compile time. Idempotent (a rewritten conv is a ``call_tir``).
    Run before ``LegalizeOps``.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Int8Rewriter(mod, convs=True, dense=False)
        out = rewriter.transform()
        logger.debug("BlockInt8Conv2d: rewrote %d conv2d", rewriter.rewritten)
        return out


@tvm.transform.module_pass(opt_level=0, name="PackInt8Dense")
class PackInt8Dense:
    """Replace ``R.matmul(u8 [..., K], s8 const [K, N], out_dtype="int32")`` by :func:`dense_packed_int8`.

    The weight is packed ``[N/16, K/4, 16, 4]`` in numpy at compile time (zero padding K to 4 and N to 16;
    the activation is padded on K by ``R.nn.pad`` and the output sliced back to N when needed). Run before
    ``LegalizeOps``.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Int8Rewriter(mod, convs=False, dense=True)
        out = rewriter.transform()
        logger.debug("PackInt8Dense: rewrote %d matmul", rewriter.rewritten)
        return out


def layout_transform_gather(data: te.Tensor, index_map: tirx.IndexMap, pad_value) -> te.Tensor:
    """``layout_transform`` as a gather over the output (an injective compute FuseOps can fuse).

    Parameters
    ----------
    data : te.Tensor
    index_map : tvm.tirx.IndexMap
        Maps input indices to output indices (as ``R.layout_transform``).
    pad_value : int, float or None
        Value of output elements that no input element maps to (0 when None).

    Returns
    -------
    te.Tensor
    """
    in_shape = list(data.shape)
    inverse, padding = index_map.non_surjective_inverse(in_shape)
    out_shape = index_map.map_shape(in_shape)
    may_pad = not (isinstance(padding, tirx.IntImm) and int(padding.value) == 0)
    fill = tirx.const(0 if pad_value is None else pad_value, data.dtype)

    def compute(*out_idx):
        src = inverse.map_indices(list(out_idx))
        if not may_pad:
            return data[tuple(src)]
        # For the block/unblock maps used here, an output index is padding exactly when its source index
        # falls outside the input (checking that avoids substituting into the inverse's predicate).
        outside = None
        for index, extent in zip(src, in_shape):
            cond = index >= extent
            outside = cond if outside is None else tirx.Or(outside, cond)
        return tirx.if_then_else(outside, fill, data[tuple(src)])

    return te.compute(out_shape, compute, name="layout_transform_gather")


@tvm.transform.module_pass(opt_level=0, name="GatherLayoutTransform")
class GatherLayoutTransform:
    """Lower ``R.layout_transform`` to an injective gather (:func:`layout_transform_gather`) via ``call_te``.

    TVM's legalization of ``relax.layout_transform`` writes through the index map (a scatter), which
    ``AnnotateTIROpPattern`` marks opaque, so every transform stays a kernel of its own. As a gather it is
    injective: ``FuseOps`` fuses the transform into the NCHW epilogue after a conv and into the ``pad`` in
    front of the next one. Transforms whose map cannot be inverted are left to ``LegalizeOps``.
    Run before ``LegalizeOps``.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _GatherLayoutRewriter(mod).transform()


@relax.expr_functor.mutator
class _GatherLayoutRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def transform(self) -> tvm.IRModule:
        for gvar, func in self.mod_.functions.items():
            if isinstance(func, relax.Function) and not _is_primitive(func):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call):  # noqa: D102  (PyExprMutator hook)
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.layout_transform"):
            return call
        if _static_shape(call.args[0]) is None:
            return call
        pad_value = call.attrs.pad_value
        pad_value = None if pad_value is None else pad_value.value
        try:
            index_map = call.attrs.index_map  # call_te cannot pass an IndexMap through: close over it
            return self.builder_.call_te(
                lambda data: layout_transform_gather(data, index_map, pad_value),
                call.args[0],
                primfunc_name_hint="layout_transform",
            )
        except (RuntimeError, ValueError) as err:  # e.g. a map IndexMap cannot invert (InternalError)
            logger.debug("GatherLayoutTransform: keeping %s (%s)", call, err)
            return call


def optimize_int8_for_x86(block: int = IC_BLOCK) -> tvm.transform.Pass:
    """The graph-level INT8 passes for x86, in order (run before ``LegalizeOps``).

    Returns
    -------
    tvm.transform.Pass
        ``Sequential([ExpandClip, ConvertInt8ConvLayout, BlockInt8Conv2d, PackInt8Dense,
        SinkLayoutTransform, GatherLayoutTransform, DeadCodeElimination])``.

    Examples
    --------
    >>> mod = optimize_int8_for_x86()(mod)  # doctest: +SKIP
    """
    return tvm.transform.Sequential(
        [
            ExpandClip(),
            ConvertInt8ConvLayout(block),
            BlockInt8Conv2d(),
            PackInt8Dense(),
            SinkLayoutTransform(),
            GatherLayoutTransform(),
            # ConvertLayout's layout_transform of each original weight is dead once the weight is packed.
            relax.transform.DeadCodeElimination(),
        ],
        name="OptimizeInt8ForX86",
    )


def _block_has_reduction(sch, block) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars)  # 0: data parallel


def schedule_data_movement(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc | None:
    """A fixed schedule for a kernel without reductions (layout transforms, pads, fused epilogues).

    Intermediate blocks are inlined into the output block. Blocks of at least ``PARALLEL_MIN_ELEMENTS``
    iterations run their outermost non-trivial loop in parallel; smaller ones stay serial (on the shared
    2-core machines here a parallel 200k-element transform measured 2x slower than serial: the thread
    pool waits for a descheduled worker). Inner loops stay as they are, so LLVM vectorizes them where
    the access is contiguous.

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
    for block in sch.get_child_blocks(root):
        if num_cores <= 1 or _block_elements(sch, block) < PARALLEL_MIN_ELEMENTS:
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

    Parameters
    ----------
    num_cores : int
    """

    def __init__(self, num_cores: int = 1):
        self.num_cores = num_cores

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = mod.clone()
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            scheduled = schedule_data_movement(func, self.num_cores)
            if scheduled is None:
                scheduled = schedule_depthwise(func, self.num_cores)
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


def prepare(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Run the INT8 x86 passes and the Relax lowering up to fused TIR (what :func:`tune` tunes).

    The fusion sequence is the one ``meta_schedule.relax_integration.compile_relax`` uses, followed by
    :class:`ScheduleDataMovement` and :class:`StripUnregisteredScheduleRules`. :func:`tune` and :func:`build`
    both start here, so their database keys (the structural hash of each fused PrimFunc) match.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module (quantized graph, constant weights bound).
    target : tvm.target.Target, optional
        Defaults to :func:`x86_target`.

    Returns
    -------
    tvm.IRModule
        Relax ``main`` calling fused PrimFuncs (``fused_conv2d_int8_nchwc_add_..._maximum_minimum_astype``).
    """
    target = x86_target() if target is None else target
    passes = [optimize_int8_for_x86(), *_cpu_backend.library_dispatch_passes(target)]
    passes += [*fusion_passes(), ScheduleDataMovement(int(target.attrs.get("num-cores", 1) or 1))]
    passes += [StripUnregisteredScheduleRules(target)]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


# ----------------------------------------------------------------------------------------------------------
# Tuning
def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> list[ms.ExtractedTask]:
    """The meta-schedule tasks of ``mod`` after :func:`prepare`: one per distinct fused kernel that has a
    reduction (data-movement kernels get a fixed schedule in :func:`prepare` and are not tuned)."""
    target = x86_target() if target is None else target
    tasks = ms.relax_integration.extract_tasks(prepare(mod, target), target)
    return [task for task in tasks if not is_scheduled(task.dispatched[0]["main"])]


def _open_database(db_dir: str) -> ms.database.JSONDatabase:
    os.makedirs(db_dir, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=db_dir, module_equality="structural")


def _mcpu(target) -> str:
    return str(target.attrs.get("mcpu", "")) if target is not None else ""


def records_for_target(db_dir: str, target: tvm.target.Target) -> ms.database.MemoryDatabase:
    """The records of the JSON database in ``db_dir`` that were tuned for ``target``'s CPU.

    A database may hold records of several CPUs (``mcpu``); meta-schedule itself ignores the record's
    target when it applies a database, so a schedule tensorized with VNNI would be replayed for an AVX2
    build and fail in LLVM. :func:`tune` and :func:`build` only look at the records this returns.

    Parameters
    ----------
    db_dir : str
    target : tvm.target.Target

    Returns
    -------
    tvm.s_tir.meta_schedule.database.MemoryDatabase
    """
    selected = ms.database.MemoryDatabase(module_equality="structural")
    other = 0
    for record in _open_database(db_dir).get_all_tuning_records():
        if _mcpu(record.target) != _mcpu(target) or record.target.kind.name != target.kind.name:
            other += 1
            continue
        workload = selected.commit_workload(record.workload.mod)
        selected.commit_tuning_record(
            ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
        )
    if other:
        logger.info("%s: ignoring %d records tuned for other CPUs than %s", db_dir, other, _mcpu(target))
    return selected


def _is_tuned(database: ms.Database, task: ms.ExtractedTask, target: tvm.target.Target) -> bool:
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return False
    return database.query_tuning_record(mod, target, task.task_name) is not None


def _report(level: int, message: str, echo: bool) -> None:
    if echo:
        print(message, file=sys.stderr, flush=True)
    # Without any handler configured, logging would print a WARNING a second time (its last-resort handler).
    if not echo or logger.hasHandlers():
        logger.log(level, message)


@derived_object
class TuningProgress(PyMeasureCallback):
    """Meta-schedule measure callback that reports progress: task, trials, best latency, build errors.

    One line per measured batch, through the ``tvmquant.schedules.x86`` logger (and stderr when
    ``echo`` is set), e.g.::

        [tune] task 1/3 fused_conv2d_int8_nchwc_add: 32 trials (total 48/96), best 541.2 us (427 GOP/s)
        [tune] task 1/3 fused_conv2d_int8_nchwc_add: 2/16 candidates failed to build: ...

    Parameters
    ----------
    task_names : list of str
    total_trials : int
        The global trial budget (for the "total" column).
    echo : bool
        Also print to stderr (for interactive use when logging is not configured).
    """

    def __init__(self, task_names: list[str], total_trials: int, echo: bool = True):
        self.task_names = list(task_names)
        self.total_trials = total_trials
        self.echo = echo
        self.trials = [0] * len(task_names)
        self.best_sec = [math.inf] * len(task_names)
        self.build_errors = 0
        self.run_errors = 0

    def _say(self, level: int, message: str) -> None:
        _report(level, message, self.echo)

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        name = self.task_names[task_id]
        prefix = f"[tune] task {task_id + 1}/{len(self.task_names)} {name}"
        failed_builds = [r.error_msg for r in builder_results if r.error_msg]
        failed_runs = [r.error_msg for r in runner_results if r.error_msg]
        if failed_builds:
            self.build_errors += len(failed_builds)
            first = str(failed_builds[0]).strip().splitlines()
            self._say(
                logging.WARNING,
                f"{prefix}: {len(failed_builds)}/{len(builder_results)} candidates failed "
                f"to build (first error: {first[-1] if first else '?'})",
            )
        if failed_runs:
            self.run_errors += len(failed_runs)
            first = str(failed_runs[0]).strip().splitlines()
            self._say(
                logging.WARNING,
                f"{prefix}: {len(failed_runs)}/{len(runner_results)} candidates failed "
                f"to run (first error: {first[-1] if first else '?'})",
            )
        for result in runner_results:
            if result.error_msg is None and result.run_secs:
                secs = float(np.mean([float(s) for s in result.run_secs]))
                self.best_sec[task_id] = min(self.best_sec[task_id], secs)
        if not measure_candidates:
            return  # the scheduler polls finished tasks with empty batches; nothing to report
        self.trials[task_id] += len(measure_candidates)
        best = self.best_sec[task_id]
        flop = float(task_scheduler.tasks_[task_id].flop)
        speed = f"best {best * 1e6:.1f} us ({flop / best / 1e9:.0f} GOP/s)" if best < math.inf else "no valid run yet"
        self._say(
            logging.INFO,
            f"{prefix}: {self.trials[task_id]} trials (total {sum(self.trials)}/{self.total_trials}), {speed}",
        )


@derived_object
class PooledBuilder(PyBuilder):
    """Meta-schedule's ``LocalBuilder`` (same worker function and results), keeping its worker processes for
    ``batches_per_pool`` batches instead of starting new ones for every batch.

    A fresh worker costs ~1.3 s of CPU (``import tvm``) before it compiles a small kernel in ~0.1 s, and a
    budget spread over every kernel means many small batches: `tvmquant tune` with one trial for each of the
    bundled CNN's 10 kernels took 98 s with fresh workers per batch and 41 s with these (2 shared cores,
    under load). ``LocalBuilder`` restarts its pool each batch against a
    memory leak of long-lived workers; this one still replaces its workers every ``batches_per_pool`` batches
    (and the pool replaces a worker that timed out).

    Parameters
    ----------
    timeout_sec : float
        Build timeout per candidate.
    max_workers : int
    f_build : callable
        ``(mod, target, params) -> tvm.runtime.Module``, run in the workers (picklable).
    batches_per_pool : int
    """

    def __init__(self, timeout_sec: float, max_workers: int, f_build, batches_per_pool: int = 16):
        self.timeout_sec = timeout_sec
        self.max_workers = max_workers
        self.f_build = f_build
        self.batches_per_pool = batches_per_pool
        self._pool = None
        self._batches = 0

    def build(self, build_inputs):
        if self._pool is None or self._batches >= self.batches_per_pool:
            self.close()
            self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec)
        self._batches += 1
        jobs = [(self.f_build, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
        results = []
        for result in self._pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
            if result.status == StatusKind.COMPLETE:
                results.append(BuilderResult(result.value, None))
            elif result.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"PooledBuilder: timeout, killed after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"PooledBuilder: an exception occurred\n{result.value}"))
        return results

    def close(self) -> None:
        """Stop the worker processes; the next :meth:`build` starts new ones."""
        if self._pool is not None:
            self._pool.shutdown()
        self._pool = None
        self._batches = 0


#: ``num_warmup_samples`` of meta-schedule's ``XGBModel`` (TVM 0.27 default): it predicts at random below it.
XGB_WARMUP_SAMPLES = 100
#: Meta-schedule's logger. Its children (task scheduler, builder, runner, cost model) propagate to it.
MS_LOGGER = "tvm.s_tir.meta_schedule"
_LOG_FORMAT = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def meta_schedule_logs(log_dir: str, task_names: Sequence[str], verbose: bool = False):
    """Send meta-schedule's logging to files in ``log_dir`` for the ``with`` body; yield one logger per task.

    Files (the names meta-schedule itself uses): ``tvm.s_tir.meta_schedule.logging.task_scheduler.log``
    (the task scheduler's tables, builder and runner messages) and
    ``tvm.s_tir.meta_schedule.logging.task_<i>_<name>.log`` (each task's search). With ``verbose`` the
    scheduler's lines also go to stderr. On exit the loggers are put back as they were.

    Parameters
    ----------
    log_dir : str
        Created if missing.
    task_names : sequence of str
    verbose : bool

    Yields
    ------
    list of logging.Logger
        The per-task loggers, for ``TuneContext(logger=...)``.

    Notes
    -----
    Why not meta-schedule's ``get_loggers_from_work_dir`` (which ``extracted_tasks_to_tune_contexts`` calls):

    - It lists the handlers already on the ``tvm.s_tir.meta_schedule`` logger *by name* and fails with
      ``AttributeError: 'NoneType' object has no attribute 'format'`` (``logging.py:234``) when one has none.
      It also makes that logger non-propagating for good, and pytest >= 9.1 attaches its two (unnamed)
      capture handlers to every non-propagating logger at the start of each test: so the second ``tune`` of a
      pytest session crashed (with ``-p no:logging``, or alone, it did not). Any application that adds a
      plain ``StreamHandler`` to that logger hit the same crash.
    - It configures logging with ``logging.config.dictConfig``, which closes every handler of the process
      (the application's included), and leaves a console handler on ``sys.stdout`` that printed
      ``[INFO] Logging directory: ...`` and the per-task tables into the terminal.
    """
    os.makedirs(log_dir, exist_ok=True)

    def file_handler(logger_name: str) -> logging.Handler:
        handler = logging.FileHandler(os.path.join(log_dir, logger_name + ".log"), mode="a", encoding="utf-8")
        handler.setFormatter(_LOG_FORMAT)
        return handler

    parent = logging.getLogger(MS_LOGGER)
    saved = (parent.level, parent.propagate, list(parent.handlers))
    ours = [file_handler(MS_LOGGER + ".logging.task_scheduler")]
    if verbose:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(_LOG_FORMAT)
        ours.append(console)
    # While tuning, this logger writes only to our handlers: handlers left by an earlier meta-schedule
    # dictConfig would print to a stdout of their time and append to another run's log files, and
    # propagating would put the scheduler's tables into the application's (or pytest's) root handlers.
    for handler in saved[2]:
        parent.removeHandler(handler)
    for handler in ours:
        parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    parent.propagate = False
    width = len(str(max(len(task_names) - 1, 0)))
    task_loggers, task_handlers = [], []
    for i, name in enumerate(task_names):
        logger_name = f"{MS_LOGGER}.logging.task_{i:0{width}d}_{name[:100]}"  # clipped as meta-schedule does
        task_logger = logging.getLogger(logger_name)
        handler = file_handler(logger_name)
        task_logger.addHandler(handler)
        task_logger.setLevel(logging.DEBUG)
        task_logger.propagate = False  # each task's search stays in its file (as with meta-schedule's own set-up)
        task_loggers.append(task_logger)
        task_handlers.append(handler)
    try:
        yield task_loggers
    finally:
        for task_logger, handler in zip(task_loggers, task_handlers):
            task_logger.removeHandler(handler)
            handler.close()
            # Back to a plain child logger: a late message goes to the parent rather than to logging's
            # last-resort handler (stderr).
            task_logger.setLevel(logging.NOTSET)
            task_logger.propagate = True
        for handler in ours:
            parent.removeHandler(handler)
            handler.close()
        for handler in saved[2]:
            parent.addHandler(handler)
        parent.setLevel(saved[0])
        parent.propagate = saved[1]


def plan_trials(
    trials: int,
    num_tasks: int,
    num_trials_per_iter: int = 16,
    trials_per_task: int | None = None,
    min_trials_per_task: int = 4,
) -> tuple[int, int, int, str | None]:
    """How :func:`tune` spreads a trial budget over ``num_tasks`` kernels.

    Meta-schedule's budget is global and its task schedulers give each task whole batches of
    ``num_trials_per_iter`` candidates, first one task after the other: ``--trials 320`` over 39 tasks
    measured 16 candidates for 20 tasks and none for the other 19, which then had no record. So every task
    gets at least ``min_trials_per_task`` (the total is raised when the budget is smaller, and a note says
    so), no task gets more than its share, and batches are no larger than the smallest share, so that the
    first round gives every task a batch.

    Parameters
    ----------
    trials : int
        Requested global budget.
    num_tasks : int
        Kernels to tune (at least 1).
    num_trials_per_iter : int
        Largest batch.
    trials_per_task : int, optional
        Cap per task; default ``ceil(total / num_tasks)``. An explicit cap below ``min_trials_per_task`` is
        also the floor.
    min_trials_per_task : int
        Floor per task.

    Returns
    -------
    total : int
        The global budget to pass to meta-schedule.
    per_task : int
        The cap per task.
    per_iter : int
        The batch size.
    note : str or None
        A one-line explanation when ``total`` differs from ``trials``.
    """
    if trials < 1 or num_tasks < 1 or num_trials_per_iter < 1 or min_trials_per_task < 1:
        raise ValueError(
            f"plan_trials: trials, num_tasks, num_trials_per_iter and min_trials_per_task must be at least 1, "
            f"got {trials}, {num_tasks}, {num_trials_per_iter}, {min_trials_per_task}"
        )
    if trials_per_task is not None and trials_per_task < 1:
        raise ValueError(f"tune: trials_per_task must be at least 1, got {trials_per_task}")
    floor = min_trials_per_task if trials_per_task is None else min(min_trials_per_task, trials_per_task)
    total, note = trials, None
    if trials < floor * num_tasks:
        total = floor * num_tasks
        note = (
            f"{trials} trials over {num_tasks} kernels: giving each kernel at least {floor}; total {total} "
            f"(tune with {16 * num_tasks} or more for fast kernels)"
        )
    per_task = trials_per_task if trials_per_task is not None else math.ceil(total / num_tasks)
    if per_task * num_tasks < total:  # an explicit cap leaves part of the budget unusable
        total = per_task * num_tasks
        note = f"{trials} trials over {num_tasks} kernels at most {per_task} each: total {total}"
    per_iter = max(1, min(num_trials_per_iter, total // num_tasks, per_task))
    return total, per_task, per_iter, note


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target | None = None,
    trials: int = 64,
    db_dir: str = "tvmquant_tuning",
    *,
    trials_per_task: int | None = None,
    min_trials_per_task: int = 4,
    num_trials_per_iter: int = 16,
    builder_timeout_sec: float = 150.0,
    runner_repeat: int = 3,
    task_scheduler: Literal["gradient", "round-robin"] = "gradient",
    cost_model: Literal["xgb", "mlp", "random"] = "xgb",
    strategy: Literal["evolutionary", "replay-trace", "replay-func"] = "evolutionary",
    seed: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> ms.Database:
    """Tune the INT8 kernels of a Relax module with meta-schedule; records go to a JSON database.

    Tasks that already have a valid record in ``db_dir`` are skipped, so a second call with the same
    database only re-runs the (seconds-long) graph passes. The budget is spread over every task still to
    tune (:func:`plan_trials`): each gets at least ``min_trials_per_task`` measured candidates, and a line
    says so when that raises the total.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module with u8 x s8 convs/matmuls (see the module docstring), weights bound as constants.
    target : tvm.target.Target, optional
        Defaults to :func:`x86_target` (host CPU). Tuning measures on this machine, so the target must run
        here (a warning says so when it cannot).
    trials : int
        Global trial budget over the tasks still to tune (raised to ``min_trials_per_task`` per task).
    db_dir : str
        Directory of the JSON database (``database_workload.json``, ``database_tuning_record.json``) and of
        meta-schedule's logs (``logs/``). It may be shared by several CPUs: only records tuned for
        ``target``'s ``mcpu`` count (:func:`records_for_target`).
    trials_per_task : int, optional
        Cap per task; default ``ceil(trials / number_of_tasks)``: the budget is spread evenly.
    min_trials_per_task : int
        Measured candidates every task gets at least.
    num_trials_per_iter : int
        Largest batch of candidates built and measured at once; smaller when a task's share is smaller.
        (Batches of 8 at 16 trials per task, so that the cost model guides each task's second batch, gave the
        same ResNet-50 latency as one batch of 16, in 787 s of tuning instead of 472 s.)
    builder_timeout_sec : float
        Build timeout per candidate. Generous because the 2-core machines here are shared; the builder
        workers use :func:`tvmquant.schedules._ms_worker.build_candidate`, which skips the ~25 s import
        of every TVMScript intrinsic that meta-schedule's default build function does in each fresh worker.
    runner_repeat : int
        Measurement repeats per candidate.
    task_scheduler, cost_model, strategy : str
        Meta-schedule components (gradient task scheduler, XGBoost cost model, evolutionary search).
    seed : int, optional
        Random seed of the search.
    progress : bool
        Print one progress line per measured batch to stderr (always logged at INFO).
    verbose : bool
        Also print meta-schedule's own log (task tables, builder and runner messages) to stderr. Either way
        it is written to ``db_dir/logs`` (:func:`meta_schedule_logs`).

    Returns
    -------
    tvm.s_tir.meta_schedule.Database
        The JSON database in ``db_dir``.

    Examples
    --------
    >>> target = x86_target(num_cores=2)  # doctest: +SKIP
    >>> tune(mod, target, trials=64, db_dir="tuning")  # doctest: +SKIP
    >>> ex = build(mod, target, db_dir="tuning")  # doctest: +SKIP
    """
    target = x86_target() if target is None else target
    _warn_if_not_runnable_here(target)
    start = time.perf_counter()
    intrinsics.register_x86_intrinsics()  # before any TuneContext: its rules look the intrinsic up by name
    database = _open_database(db_dir)
    tuned = records_for_target(db_dir, target)
    tasks = extract_tasks(mod, target)
    todo = [task for task in tasks if not _is_tuned(tuned, task, target)]

    def say(level, message):
        _report(level, message, progress)

    if not todo:
        say(
            logging.INFO,
            f"[tune] all {len(tasks)} tasks already tuned in {db_dir} "
            f"({time.perf_counter() - start:.1f} s); nothing to do",
        )
        return database
    total, per_task, per_iter, note = plan_trials(
        trials, len(todo), num_trials_per_iter, trials_per_task, min_trials_per_task
    )
    if note:
        say(logging.WARNING, f"[tune] {note}")
    say(
        logging.INFO,
        f"[tune] {len(todo)} of {len(tasks)} tasks to tune ({len(tasks) - len(todo)} found in {db_dir}), "
        f"{total} trials (up to {per_task} per task, batches of {per_iter}), target {target}",
    )
    if cost_model == "xgb" and total < XGB_WARMUP_SAMPLES:
        # Until XGBModel has measured num_warmup_samples candidates its predictions are uniform random numbers,
        # yet it retrains after every batch (~5 s on 2 cores, i.e. most of a 10-kernel tune at 4 trials per
        # kernel). Below that many trials the random model searches the same way, without the retraining.
        logger.info("tune: %d trials < XGBModel's %d warm-up samples: random cost model", total, XGB_WARMUP_SAMPLES)
        cost_model = "random"
    log_dir = os.path.join(db_dir, "logs")
    num_threads = int(target.attrs.get("num-cores", 0)) or "physical"
    num_workers = max(1, int(target.attrs.get("num-cores", 1) or 1))
    with meta_schedule_logs(log_dir, [task.task_name for task in todo], verbose) as task_loggers:
        # What ms.relax_integration.extracted_tasks_to_tune_contexts does, with our loggers instead of the
        # ones from its get_loggers_from_work_dir (see meta_schedule_logs for why).
        strategy_obj = search_strategy(strategy, per_task)
        contexts = [
            ms.TuneContext(
                mod=task.dispatched[0],
                target=task.target,
                space_generator="post-order-apply",
                search_strategy=strategy_obj,
                task_name=task.task_name,
                logger=task_logger,
                rand_state=rand_state,
                num_threads=num_threads,
            ).clone()
            for task, task_logger, rand_state in zip(todo, task_loggers, fork_seed(seed, n=len(todo)))
        ]
        callback = TuningProgress([ctx.task_name for ctx in contexts], total, echo=progress)
        # build_candidate skips default_build's ~25 s import of every TVMScript intrinsic per worker.
        builder = PooledBuilder(builder_timeout_sec, num_workers, build_candidate)
        # Measure with as many threads as the target has cores (see tvmquant.threads): left to TVM, the runner's
        # pool would take half the logical CPUs on x86 (1 on a 2-core VM) and the search would favour schedules
        # that are fast on one thread.
        with _environment(TVM_NUM_THREADS=str(num_workers)), contextlib.closing(builder):
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=[task.weight for task in todo],
                work_dir=db_dir,
                max_trials_global=total,
                max_trials_per_task=per_task,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=ms.runner.LocalRunner(
                    evaluator_config=ms.runner.EvaluatorConfig(
                        number=3, repeat=runner_repeat, min_repeat_ms=50, enable_cpu_cache_flush=False
                    )
                ),
                database=database,
                cost_model=cost_model,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
                task_scheduler=task_scheduler,
            )
    tuned = records_for_target(db_dir, target)
    missing = [task.task_name for task in todo if not _is_tuned(tuned, task, target)]
    say(
        logging.INFO,
        f"[tune] done in {time.perf_counter() - start:.0f} s: {sum(callback.trials)} trials, "
        f"{callback.build_errors} build errors, {callback.run_errors} run errors; meta-schedule's log: {log_dir}",
    )
    if missing:
        say(
            logging.WARNING,
            f"[tune] {len(missing)} of {len(todo)} kernels got no valid record (every measured candidate failed; "
            f"see {log_dir}): {', '.join(missing)}. build() gives them an untuned default schedule; run tune() "
            "again with more trials to retry them.",
        )
    return database


def search_strategy(strategy: str, trials_per_task: int):
    """The meta-schedule search strategy for ``strategy`` and a per-task budget.

    ``"evolutionary"`` gets a population sized to the budget (8 candidates per trial, 32 to 512): TVM's
    default of 512, each sampled and post-processed (tensorize checks included) before every batch, costs
    minutes per task on 2 cores when a task gets a few dozen trials. (A population of 128 still took ~9 s
    per task for 4 trials, most of a 10-kernel tune at 4 trials per kernel.) Other names pass through.
    """
    if strategy != "evolutionary":
        return strategy
    population = int(min(512, max(32, 8 * trials_per_task)))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 4)
    )


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables (inherited by the tuner's worker processes) for the ``with`` body."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------------------------------------
# Build
def untuned_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs of ``mod`` without a schedule (after ``MetaScheduleApplyDatabase``)."""
    names = []
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            attrs = func.attrs
            if attrs is None or not ("tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])):
                names.append(gvar.name_hint)
    return sorted(names)


@tvm.transform.module_pass(opt_level=0, name="ScheduleUntunedFromSketch")
class ScheduleUntunedFromSketch:
    """Schedule every PrimFunc that has no schedule yet with meta-schedule's first valid design-space sketch.

    The CPU counterpart of ``DefaultGPUSchedule``: no measurement, just the design space meta-schedule would
    search (multi-level tiling, VNNI tensorization where the target has it, parallel/vectorize/unroll) with
    decisions drawn from a fixed seed, validated by the same postprocessors as tuning candidates. On a
    64-channel 56x56 3x3 conv this gives ~10x the speed of unscheduled TIR (which LLVM compiles to scalar,
    single-threaded loops). PrimFuncs marked ``tirx.is_scheduled`` (tuned) are left alone; a PrimFunc for
    which no sketch survives the postprocessors stays unscheduled. Run after ``MetaScheduleApplyDatabase``.

    Parameters
    ----------
    target : tvm.target.Target
    seed : int
        Seed of the sampled tile sizes (fixed, so builds are reproducible).
    """

    def __init__(self, target: tvm.target.Target, seed: int = 0):
        self.target = target
        self.seed = seed

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        intrinsics.register_x86_intrinsics()
        num_threads = int(self.target.attrs.get("num-cores", 0)) or "physical"
        mod = mod.clone()
        for name in untuned_functions(mod):
            gvar = mod.get_global_var(name)
            scheduled = _first_valid_sketch(mod[gvar], self.target, name, self.seed, num_threads)
            if scheduled is not None:
                mod[gvar] = scheduled
        return mod


#: Default schedules already found in this process: ``{(structural hash, target, seed): [(func, scheduled)]}``.
#: Models repeat kernel shapes (ResNet blocks), and a process often builds the same model more than once
#: (INT8, simulated, FP32; a test suite): a kernel's default schedule is searched for once.
_SKETCH_CACHE: dict = {}


def _first_valid_sketch(func: tirx.PrimFunc, target, name: str, seed: int, num_threads, tries: int = 16):
    """The first design-space sketch (in meta-schedule's order: tensorized first) that passes the
    postprocessors and compiles, trying ``tries`` samples of its decisions before moving to the next sketch.

    Memoised per process on the kernel's structure (:data:`_SKETCH_CACHE`).
    """
    key = (structural_hash(func), str(target), seed, str(num_threads))
    for known, scheduled in _SKETCH_CACHE.get(key, ()):
        if structural_equal(known, func):
            return scheduled
    scheduled = _search_valid_sketch(func, target, name, seed, num_threads, tries)
    _SKETCH_CACHE.setdefault(key, []).append((func, scheduled))
    return scheduled


def _search_valid_sketch(func: tirx.PrimFunc, target, name: str, seed: int, num_threads, tries: int):

    def design_space(rand_state):
        context = ms.TuneContext(
            mod=tvm.IRModule({"main": func}),
            target=target,
            space_generator="post-order-apply",
            search_strategy="replay-trace",
            task_name=name,
            rand_state=rand_state,
            num_threads=num_threads,
        )
        return context, list(context.generate_design_space())

    spaces = [design_space(seed)]  # the other samples are drawn only when a sketch fails (rare)
    for index in range(len(spaces[0][1])):
        for k in range(tries):
            if k == len(spaces):
                spaces.append(design_space(seed + k))
            context, sketches = spaces[k]
            sketch = sketches[index]
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
            return sketch.mod["main"].with_attr("tirx.is_scheduled", True)
    logger.debug("ScheduleUntunedFromSketch: no valid sketch for %s; left unscheduled", name)
    return None


def build(
    mod: tvm.IRModule,
    target: tvm.target.Target | None = None,
    db_dir: str | None = None,
    *,
    fallback: Literal["sketch", "none"] = "sketch",
    warn_untuned: bool = True,
) -> relax.VMExecutable:
    """Compile a Relax module with the INT8 x86 passes and the tuned kernels of ``db_dir``; never fails
    for want of a record.

    Kernels without a record (all of them when ``db_dir`` is None) get a default schedule
    (:class:`ScheduleUntunedFromSketch`, ``fallback="sketch"``) or compile unscheduled (``fallback="none"``:
    correct but scalar and single-threaded). A warning names them.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module (weights bound as constants).
    target : tvm.target.Target, optional
        Defaults to :func:`x86_target` (host CPU).
    db_dir : str, optional
        Directory of the JSON database written by :func:`tune`.
    fallback : {"sketch", "none"}
        What untuned kernels get. ``"sketch"`` (and any ``db_dir``) costs ~25 s once per process: TVM's
        intrinsic registry has to be imported (see :mod:`tvmquant.schedules.intrinsics`).
    warn_untuned : bool
        Warn with the names of the kernels that had no tuning record.

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
    if fallback not in ("sketch", "none"):
        raise ValueError(f"build: fallback must be 'sketch' or 'none', got {fallback!r}")
    target = x86_target() if target is None else target
    prepared = prepare(mod, target)
    if db_dir is not None and not os.path.isfile(os.path.join(db_dir, "database_tuning_record.json")):
        warnings.warn(
            f"build: no tuning database in {db_dir!r}; every kernel gets the {fallback!r} fallback",
            stacklevel=2,
        )
        db_dir = None
    if db_dir is not None:
        intrinsics.register_x86_intrinsics()  # records replay `tensorize("dot_16x4_vnni")` by name
        database = records_for_target(db_dir, target)
        with target, database, tvm.transform.PassContext(opt_level=3):
            prepared = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)
    untuned = untuned_functions(prepared)
    if untuned and warn_untuned and db_dir is not None:
        what = "get an untuned default schedule" if fallback == "sketch" else "compile unscheduled (slow)"
        warnings.warn(
            f"build: {len(untuned)} kernel(s) have no tuning record in {db_dir!r} and {what}: "
            f"{', '.join(untuned)}. Run tvmquant.schedules.x86.tune(...) with the same target and database.",
            stacklevel=2,
        )
    elif untuned and warn_untuned:
        logger.info("build: no tuning database; %d kernel(s) use the %r fallback", len(untuned), fallback)
    if untuned and fallback == "sketch":
        with target:
            prepared = ScheduleUntunedFromSketch(target)(prepared)
    lower = _cpu_backend.dataflow_lower_passes(target) + _cpu_backend.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0, name="TvmquantX86Finalize")
    def finalize(module: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tvm.transform.Sequential(lower)(module)

    with target, tvm.transform.PassContext(opt_level=3):
        return relax.build(prepared, target=target, relax_pipeline=finalize)
