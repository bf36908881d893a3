"""Relax passes that turn a quantized model into blocked INT8 kernels (see the package docstring for their order),
and :func:`prepare`, which runs them and fuses the result."""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.ir import GenericConst  # TVM 0.27: relax constants are ``tvm.ir.GenericConst``

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from tvm.relax.backend.cpu_generic import pipeline as _cpu_backend
from tvm.target import codegen as _llvm_codegen

from ..._relax import MarkerLayout, dps_marker, parse_dps_marker
from ...target import x86_target
from ..common import fusion_passes
from ..layout import SinkLayoutTransform
from ..reshapes import FoldRowReshapes
from . import amx, fast_math
from .compute import (
    _dtype,
    _ic_block_for,
    _is_u8s8_int32,
    _round_up,
    _static_shape,
    batch_dense_packed_int8,
    conv2d_nchwc_float,
    conv2d_nchwc_int8,
    dense_packed_int8,
    depthwise_nchwc_float,
    depthwise_nchwc_int8,
    depthwise_packing,
    float_conv2d_packing,
    pack_conv2d_weight,
    pack_dense_operand,
    pack_dense_weight,
    pack_depthwise_weight,
)
from .fixed import ScheduleDataMovement, StripUnregisteredScheduleRules
from .target import IC_BLOCK, IC_QUAD, OC_BLOCK

logger = logging.getLogger(__name__)


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

    def __init__(self, mod: tvm.IRModule, convs: bool, dense: bool, target: tvm.target.Target | None = None):
        super().__init__(mod)
        self.mod_ = mod
        self.convs = convs
        self.dense = dense
        self.target = target
        self.rewritten = 0
        self.amx = 0

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
        padded = self._spatial_pad(data, 5, (pad_top, pad_bottom, pad_left, pad_right))
        self.rewritten += 1
        return self._blocked_conv(padded, weight_np, block, strides, dilation, 1)

    def _blocked_conv(self, padded, weight_np, ic_block, strides, dilation, groups):
        """The u8 x s8 -> s32 conv on blocked, pre-padded data as a ``call_te``, output
        ``[N, K/16, OH, OW, 16]``: the AMX GEMM on the im2col matrix (built in the same kernel) where
        :func:`amx.choose_int8_unit` says so, else the VNNI-shaped :func:`conv2d_nchwc_int8`. Weights are packed
        here, once."""
        shape = _static_shape(padded)
        out_ch, _, k_h, k_w = weight_np.shape
        if groups == 1 and shape is not None and self.target is not None and amx.amx_enabled(self.target):
            rows, depth, out_h, out_w = amx.conv_gemm_shape(shape, (k_h, k_w), strides, dilation)
            what = f"conv2d {shape[1] * shape[4]}->{out_ch} {k_h}x{k_w}/{strides[0]} at {out_h}x{out_w}"
            if amx.choose_int8_unit(rows, out_ch, depth, self.target, what) == "amx":
                packed = amx.pack_amx_weight(amx.conv_weight_as_gemm(weight_np, shape[1] * shape[4]))
                amx.register_amx_intrinsic(packed.shape[1] * packed.shape[3])
                out_shape = (shape[0], _round_up(out_ch, OC_BLOCK) // OC_BLOCK, out_h, out_w, OC_BLOCK)
                self.amx += 1
                return self.builder_.call_te(
                    amx.conv2d_amx_int8,
                    padded,
                    relax.const(packed, "int8"),
                    (k_h, k_w),
                    strides,
                    dilation,
                    out_shape,
                    primfunc_name_hint="conv2d_int8_amx",
                )
        packed = pack_conv2d_weight(weight_np, groups=groups, ic_block=ic_block)
        return self.builder_.call_te(
            conv2d_nchwc_int8,
            padded,
            relax.const(packed, "int8"),
            strides,
            dilation,
            groups,
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
        conv = self.builder_.emit(self._blocked_conv(padded, weight_np, ic_block, strides, dilation, groups))
        self.rewritten += 1
        out = relax.op.layout_transform(conv, lambda n, cb, h, w, ci: (n, cb * OC_BLOCK + ci, h, w))
        if _static_shape(conv)[1] * OC_BLOCK != out_channels:
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
        data, weight = call.args
        data_shape = _static_shape(data)
        if data_shape is None or str(call.attrs.out_dtype) != "int32":
            return call
        if not isinstance(weight, GenericConst) and _dtype(weight) == "int8" and _dtype(data) in ("uint8", "int8"):
            out = self._rewrite_activation_matmul(data, weight, data_shape)
            return call if out is None else out
        if not _is_u8s8_int32(call, call.attrs.out_dtype):
            return call
        weight_np = weight.value.numpy()
        if weight_np.ndim != 2 or len(data_shape) < 2:
            return call  # vector-matrix products are rare in quantized graphs; keep the generic op
        depth, cols = weight_np.shape
        rows = 1
        for extent in data_shape[:-1]:
            rows *= extent
        if self.target is not None and amx.amx_enabled(self.target):
            what = f"matmul {rows}x{depth} @ {depth}x{cols}"
            if amx.choose_int8_unit(rows, cols, depth, self.target, what) == "amx":
                return self._amx_matmul(data, weight_np, data_shape, rows)
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

    def _rewrite_activation_matmul(self, data, operand, data_shape):
        """u8 or s8 ``[..., M, K]`` x s8 ``[..., K, N]`` computed at run time (attention): the second operand
        packed by a kernel of its own (:func:`pack_dense_operand`, which fuses with the transpose that makes it),
        then :func:`batch_dense_packed_int8`. Batch dims must match (no broadcasting). An int8 first operand
        (dynamic quantization's symmetric rows) runs as ``u = a + 128`` (exact in uint8):
        ``a @ b = u @ b - 128 * colsum(b)``."""
        operand_shape = _static_shape(operand)
        if operand_shape is None or len(operand_shape) != len(data_shape) or len(data_shape) < 2:
            return None
        if operand_shape[:-2] != data_shape[:-2] or operand_shape[-2] != data_shape[-1]:
            return None
        signed = _dtype(data) == "int8"
        if signed:
            shifted = relax.op.add(relax.op.astype(data, "int32"), relax.const(np.int32(128)))
            data = self.builder_.emit(relax.op.astype(shifted, "uint8"))
        depth, cols = operand_shape[-2:]
        depth_pad = _round_up(depth, IC_QUAD)
        if depth_pad != depth:
            width = [0, 0] * (len(data_shape) - 1) + [0, depth_pad - depth]
            data = self.builder_.emit(relax.op.nn.pad(data, width, pad_value=0.0))
        packed = self.builder_.emit_te(pack_dense_operand, operand, primfunc_name_hint="pack_dense_operand")
        self.rewritten += 1
        out = self.builder_.call_te(batch_dense_packed_int8, data, packed, primfunc_name_hint="batch_dense_int8_packed")
        if _round_up(cols, OC_BLOCK) != cols:
            out = relax.op.strided_slice(self.builder_.emit(out), axes=[len(data_shape) - 1], begin=[0], end=[cols])
        if signed:
            sums = self.builder_.emit(relax.op.sum(relax.op.astype(operand, "int32"), axis=[-2], keepdims=True))
            out = relax.op.subtract(self.builder_.emit(out), relax.op.multiply(sums, relax.const(np.int32(128))))
        return out

    def _amx_matmul(self, data, weight_np, data_shape, rows):
        depth, cols = weight_np.shape
        flat = data if len(data_shape) == 2 else self.builder_.emit(relax.op.reshape(data, (rows, depth)))
        rows_pad, depth_pad = _round_up(rows, amx.TILE_M), _round_up(depth, amx.TILE_K)
        if (rows_pad, depth_pad) != (rows, depth):
            flat = self.builder_.emit(relax.op.nn.pad(flat, [0, rows_pad - rows, 0, depth_pad - depth], pad_value=0.0))
        packed = amx.pack_amx_weight(weight_np)
        amx.register_amx_intrinsic(depth_pad)
        self.rewritten += 1
        self.amx += 1
        out = self.builder_.call_te(
            amx.dense_amx_int8, flat, relax.const(packed, "int8"), rows, cols, primfunc_name_hint="dense_int8_amx"
        )
        if len(data_shape) == 2:
            return out
        return relax.op.reshape(self.builder_.emit(out), (*data_shape[:-1], cols))


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

    def __init__(self, target: tvm.target.Target | None = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Int8Rewriter(mod, convs=True, dense=False, target=self.target)
        out = rewriter.transform()
        logger.debug("BlockInt8Conv2d: rewrote %d conv2d (%d on AMX)", rewriter.rewritten, rewriter.amx)
        return out


@tvm.transform.module_pass(opt_level=0, name="PackInt8Dense")
class PackInt8Dense:
    """Replace ``R.matmul(u8 [..., K], s8 const [K, N], out_dtype="int32")`` by :func:`dense_packed_int8`.

    The weight is packed ``[N/16, K/4, 16, 4]`` in numpy at compile time (zero padding K to 4 and N to 16;
    the activation is padded on K by ``R.nn.pad`` and the output sliced back to N when needed). Run before
    ``LegalizeOps``.
    """

    def __init__(self, target: tvm.target.Target | None = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Int8Rewriter(mod, convs=False, dense=True, target=self.target)
        out = rewriter.transform()
        logger.debug("PackInt8Dense: rewrote %d matmul (%d on AMX)", rewriter.rewritten, rewriter.amx)
        return out


def float_lanes(target: tvm.target.Target | None) -> int:
    """FP32 lanes of the target's widest vector register: 16 with AVX-512, else 8."""
    if target is None or target.kind.name != "llvm":
        return 8
    features = {str(f) for f in _llvm_codegen.llvm_get_cpu_features(target)}
    return 16 if "avx512f" in features else 8


def float_block(channels: int, lanes: int) -> int | None:
    """Channel block of a blocked FP32 conv: a whole vector (``lanes``) where it divides ``channels``, else half
    a 512-bit one (8 lanes: MobileNetV2's 24-channel layers; they ran in NCHW, 40 of its calibration graph's 70
    ms a batch of 4 on the AMX Xeon, and the graph takes 27 ms with them blocked), else None (NCHW)."""
    for block in (lanes, 8) if lanes > 8 else (lanes,):
        if channels % block == 0:
            return block
    return None


@relax.expr_functor.mutator
class _FloatConvRewriter(_Int8Rewriter._cls):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod, convs=False, dense=False)
        self.lanes = lanes

    def visit_call_(self, call):  # noqa: D102  (PyExprMutator hook)
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d":
            return self._rewrite_float_conv2d(call)
        return call

    def _rewrite_float_conv2d(self, call):
        attrs = call.attrs
        data, weight = call.args
        dtype = _dtype(data)
        if dtype not in ("float32", "float64") or _dtype(weight) != dtype:
            return call
        if str(attrs.out_dtype) not in ("", "None", "void", dtype):
            return call
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW"):
            return call
        # A constant weight, or the observe marker of one (the graphs tvmquant calibrates and simulates with): the
        # marker moves onto the packed constant, its role saying how it is packed. Other weights (computed at
        # run time) would be packed at every run: those convs stay NCHW.
        weight_np, origin = self._constant_weight(weight)
        marker = None
        if weight_np is None and isinstance(weight, relax.Var):
            marker = parse_dps_marker(self.lookup_binding(weight))
            if marker is not None and isinstance(marker[0], GenericConst) and "@" not in marker[2]:
                weight_np, origin = marker[0].value.numpy(), "direct"
        data_shape = _static_shape(data)
        if weight_np is None or origin != "direct" or data_shape is None or len(data_shape) != 4:
            return call
        out_channels, channels, groups = weight_np.shape[0], data_shape[1], int(attrs.groups)
        oc_block = float_block(out_channels, self.lanes)
        if oc_block is None:
            return call
        if groups == channels == out_channels and weight_np.shape[1] == 1:
            ic_block, compute, hint = oc_block, depthwise_nchwc_float, "depthwise_nchwc_float"
            split, perm = depthwise_packing(weight_np.shape, oc_block)
        elif groups == 1 and (float_block(channels, self.lanes) is not None or channels < self.lanes):
            ic_block = float_block(channels, self.lanes) or channels
            compute, hint = conv2d_nchwc_float, "conv2d_nchwc_float"
            split, perm = float_conv2d_packing(weight_np.shape, ic_block, oc_block)
        else:
            return call
        packing = MarkerLayout(weight_np.shape, split, perm)
        packed = relax.const(np.ascontiguousarray(packing.block(weight_np)), dtype)
        if marker is not None:
            _, name, role = marker
            packed = self.builder_.emit(dps_marker(packed, name, packing.encode(role)))
        blocked = self.builder_.emit(
            relax.op.layout_transform(data, lambda n, c, h, w: (n, c // ic_block, h, w, c % ic_block))
        )
        pad_top, pad_left, pad_bottom, pad_right = (int(p) for p in attrs.padding)
        padded = self._spatial_pad(blocked, 5, (pad_top, pad_bottom, pad_left, pad_right))
        conv = self.builder_.emit(
            self.builder_.call_te(
                compute,
                padded,
                packed,
                [int(v) for v in attrs.strides],
                [int(v) for v in attrs.dilation],
                primfunc_name_hint=hint,
            )
        )
        self.rewritten += 1
        return relax.op.layout_transform(conv, lambda n, cb, h, w, ci: (n, cb * oc_block + ci, h, w))


@tvm.transform.module_pass(opt_level=0, name="BlockFloatConv2d")
class BlockFloatConv2d:
    """Replace FP32 NCHW ``R.nn.conv2d`` (``groups == 1`` or depthwise, output channels in whole vector-width blocks) by
    :func:`conv2d_nchwc_float`, between layout transforms that :class:`SinkLayoutTransform` cancels where
    two such convs meet through elementwise ops.

    These are the convs of the graphs tvmquant runs in FP32 itself (calibration, the summary's SQNR,
    AutoSkip, bias correction, fine-tuning's forward pass, FP32 mode) and the layers a quantized model
    keeps in FP32. A constant weight is packed in numpy; any other weight (an observe marker's output) by a
    ``layout_transform`` at run time. Depthwise convs get :func:`depthwise_nchwc_float`; other grouped convs
    keep TVM's NCHW compute.
    """

    def __init__(self, target: tvm.target.Target | None = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _FloatConvRewriter(mod, float_lanes(self.target))
        out = rewriter.transform()
        logger.debug("BlockFloatConv2d: rewrote %d conv2d", rewriter.rewritten)
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
        # (shape, dtype, index map, pad value) -> the call_tir of the gather kernel made for it: a model has a
        # few distinct transforms and hundreds of uses (MobileNetV2's calibration graph: 247, 0.3 s of TE).
        self.kernels: dict = {}

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
        index_map = call.attrs.index_map  # call_te cannot pass an IndexMap through: close over it
        key = (_static_shape(call.args[0]), str(call.args[0].ty.dtype), str(index_map), pad_value)
        known = self.kernels.get(key)
        if known is not None:
            return relax.call_tir(known.args[0], [call.args[0]], known.ty_args[0])
        try:
            gather = self.builder_.call_te(
                lambda data: layout_transform_gather(data, index_map, pad_value),
                call.args[0],
                primfunc_name_hint="layout_transform",
            )
        except (RuntimeError, ValueError) as err:  # e.g. a map IndexMap cannot invert (InternalError)
            logger.debug("GatherLayoutTransform: keeping %s (%s)", call, err)
            return call
        self.kernels[key] = gather
        return gather


def optimize_int8_for_x86(block: int = IC_BLOCK, target: tvm.target.Target | None = None) -> tvm.transform.Pass:
    """The graph-level INT8 passes for x86, in order (run before ``LegalizeOps``).

    Parameters
    ----------
    block : int
        Channel block of the blocked layout.
    target : tvm.target.Target, optional
        Where it has AMX-INT8, GEMMs large enough for AMX tiles become AMX kernels
        (:func:`tvmquant.schedules.x86.amx.choose_int8_unit`); without a target every kernel is VNNI-shaped.

    Returns
    -------
    tvm.transform.Pass
        ``Sequential([FoldRowReshapes, ExpandClip, ConvertInt8ConvLayout, BlockInt8Conv2d, PackInt8Dense,
        BlockFloatConv2d, SinkLayoutTransform, GatherLayoutTransform, DeadCodeElimination])``.

    Examples
    --------
    >>> mod = optimize_int8_for_x86()(mod)  # doctest: +SKIP
    """
    return tvm.transform.Sequential(
        [
            FoldRowReshapes(),
            ExpandClip(),
            ConvertInt8ConvLayout(block),
            BlockInt8Conv2d(target),
            PackInt8Dense(target),
            BlockFloatConv2d(target),
            SinkLayoutTransform(),
            GatherLayoutTransform(),
            # ConvertLayout's layout_transform of each original weight is dead once the weight is packed.
            relax.transform.DeadCodeElimination(),
        ],
        name="OptimizeInt8ForX86",
    )


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
    amx.register_schedule_rule()  # before StripUnregisteredScheduleRules, which keeps registered rules only
    passes = [optimize_int8_for_x86(target=target), *_cpu_backend.library_dispatch_passes(target)]
    cores = int(target.attrs.get("num-cores", 1) or 1)
    passes += [*fusion_passes(fast_math.LEGALIZE_MAP), ScheduleDataMovement(cores, float_lanes(target))]
    passes += [StripUnregisteredScheduleRules(target)]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)
