"""TE computes of the blocked kernels (INT8 conv2d NCHWc, depthwise, packed dense; floating-point conv2d NCHWc and
depthwise) and the weight packing the Relax rewrites use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tvm import te

# Not imported by tvm.relax.backend itself, and its __init__ omits dataflow_lower_passes (TVM 0.27).
from .target import IC_BLOCK, IC_QUAD, OC_BLOCK


def conv_output_size(in_hw, kernel_hw, strides, dilation) -> tuple[int, int]:
    """``(OH, OW)`` of a conv on pre-padded input of spatial size ``in_hw``."""
    return tuple(
        (int(size) - (int(k) - 1) * int(d) - 1) // int(s) + 1
        for size, k, s, d in zip(in_hw, kernel_hw, strides, dilation)
    )


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
    out_h, out_w = conv_output_size((in_h, in_w), (k_h, k_w), strides, dilation)
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
    return _depthwise_nchwc(data, kernel, strides, dilation, "int32", "depthwise_NCHWc_int8")


def _depthwise_nchwc(data, kernel, strides, dilation, accumulate: str | None, name: str) -> te.Tensor:
    """The depthwise multiply-add on ``[N, C/b, H, W, b]`` data and a ``[C/b, R, S, b]`` kernel, both cast to
    ``accumulate`` (None: no cast)."""
    batch, blocks, in_h, in_w, block = (int(v) for v in data.shape)
    k_blocks, k_h, k_w, k_block = (int(v) for v in kernel.shape)
    if (k_blocks, k_block) != (blocks, block):
        raise ValueError(f"{name}: kernel {tuple(kernel.shape)} does not match data {tuple(data.shape)}")
    stride_h, stride_w = (int(v) for v in strides)
    dil_h, dil_w = (int(v) for v in dilation)
    out_h, out_w = conv_output_size((in_h, in_w), (k_h, k_w), strides, dilation)
    r_h = te.reduce_axis((0, k_h), name="kh")
    r_w = te.reduce_axis((0, k_w), name="kw")

    def cast(value):
        return value if accumulate is None else value.astype(accumulate)

    return te.compute(
        (batch, blocks, out_h, out_w, block),
        lambda n, cb, oh, ow, ci: te.sum(
            cast(data[n, cb, oh * stride_h + r_h * dil_h, ow * stride_w + r_w * dil_w, ci])
            * cast(kernel[cb, r_h, r_w, ci]),
            axis=[r_h, r_w],
        ),
        name=name,
    )


def conv2d_nchwc_float(
    data: te.Tensor, kernel: te.Tensor, strides: Sequence[int], dilation: Sequence[int]
) -> te.Tensor:
    """Floating-point conv2d in blocked layouts, on pre-padded data (the FP32 convs of host graphs).

    Parameters
    ----------
    data : te.Tensor
        ``[N, C/ib, H, W, ib]``, spatial padding already applied.
    kernel : te.Tensor
        ``[K/ob, C/ib, R, S, ib, ob]`` (:func:`pack_float_conv2d_weight`).
    strides, dilation : sequence of 2 ints

    Returns
    -------
    te.Tensor
        ``[N, K/ob, OH, OW, ob]``, the data's dtype. The ``ob`` output channels of a block are the lanes of
        one vector register: in NCHW the vector runs along the output row, which at 28, 14 or 7 pixels is a
        vector and a remainder (a 128-channel 3x3 conv at 28x28, batch 4, Zen 3: 35.8 ms in NCHW, 14.0 ms in
        this layout with its layout transforms).
    """
    batch, _, in_h, in_w, ic_block = (int(v) for v in data.shape)
    out_blocks, in_blocks, k_h, k_w, k_ib, oc_block = (int(v) for v in kernel.shape)
    if k_ib != ic_block:
        raise ValueError(f"conv2d_nchwc_float: kernel block {k_ib} does not match data block {ic_block}")
    stride_h, stride_w = (int(s) for s in strides)
    dil_h, dil_w = (int(d) for d in dilation)
    out_h, out_w = conv_output_size((in_h, in_w), (k_h, k_w), strides, dilation)
    r_block = te.reduce_axis((0, in_blocks), name="ic_outer")
    r_h = te.reduce_axis((0, k_h), name="kh")
    r_w = te.reduce_axis((0, k_w), name="kw")
    r_inner = te.reduce_axis((0, ic_block), name="ic_inner")
    return te.compute(
        (batch, out_blocks, out_h, out_w, oc_block),
        lambda n, ob, oh, ow, oi: te.sum(
            data[n, r_block, oh * stride_h + r_h * dil_h, ow * stride_w + r_w * dil_w, r_inner]
            * kernel[ob, r_block, r_h, r_w, r_inner, oi],
            axis=[r_block, r_h, r_w, r_inner],
        ),
        name="conv2d_NCHWc_float",
    )


def depthwise_nchwc_float(
    data: te.Tensor, kernel: te.Tensor, strides: Sequence[int], dilation: Sequence[int]
) -> te.Tensor:
    """Floating-point depthwise conv2d in the blocked layout, on pre-padded data: ``[N, C/b, H, W, b]`` data, a
    ``[C/b, R, S, b]`` kernel (:func:`pack_depthwise_weight`), ``[N, C/b, OH, OW, b]`` out, the block's channels
    the lanes of a vector."""
    return _depthwise_nchwc(data, kernel, strides, dilation, None, "depthwise_NCHWc_float")


def pack_float_conv2d_weight(weight_oihw: np.ndarray, ic_block: int, oc_block: int) -> np.ndarray:
    """``[K, C, R, S]`` -> ``[K/ob, C/ib, R, S, ib, ob]`` (K and C whole blocks).

    Examples
    --------
    >>> w = np.arange(16 * 8 * 1 * 1, dtype="float32").reshape(16, 8, 1, 1)
    >>> p = pack_float_conv2d_weight(w, ic_block=8, oc_block=8)
    >>> p.shape, p[1, 0, 0, 0, 3, 2] == w[8 + 2, 3, 0, 0]
    ((2, 1, 1, 1, 8, 8), True)
    """
    split, perm = float_conv2d_packing(weight_oihw.shape, ic_block, oc_block)
    return np.ascontiguousarray(weight_oihw.reshape(split).transpose(perm))


def float_conv2d_packing(shape, ic_block: int, oc_block: int) -> tuple[tuple, tuple]:
    """``(split, perm)`` of :func:`pack_float_conv2d_weight`: ``packed = w.reshape(split).transpose(perm)``."""
    out_ch, in_ch, k_h, k_w = (int(v) for v in shape)
    return (out_ch // oc_block, oc_block, in_ch // ic_block, ic_block, k_h, k_w), (0, 2, 4, 5, 3, 1)


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


def pack_dense_operand(operand: te.Tensor) -> te.Tensor:
    """Pack an int8 ``[..., K, N]`` tensor computed at run time (attention's ``K^T`` or ``V``) as
    :func:`pack_dense_weight` packs a constant: ``[..., N/16, K/4, 16, 4]``, zeros past ``K`` and ``N``."""
    *batch, depth, cols = (int(v) for v in operand.shape)
    quads, blocks = _round_up(depth, IC_QUAD) // IC_QUAD, _round_up(cols, OC_BLOCK) // OC_BLOCK

    def compute(*idx):
        *outer, block, quad, lane, elem = idx
        k, n = quad * IC_QUAD + elem, block * OC_BLOCK + lane
        inside = te.all(k < depth, n < cols) if (depth % IC_QUAD or cols % OC_BLOCK) else None
        value = operand[(*outer, te.min(k, depth - 1), te.min(n, cols - 1)) if inside is not None else (*outer, k, n)]
        return value if inside is None else te.if_then_else(inside, value, te.const(0, "int8"))

    return te.compute((*batch, blocks, quads, OC_BLOCK, IC_QUAD), compute, name="pack_dense_operand")


def batch_dense_packed_int8(data: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """u8 x s8 -> s32 batched matmul of two run-time tensors: ``data [..., M, K]`` (K a multiple of 4) times
    the :func:`pack_dense_operand` of ``[..., K, N]``, ``weight [..., N/16, K/4, 16, 4]`` (same batch dims).
    Per batch index, the compute of :func:`dense_packed_int8`; returns int32 ``[..., M, N/16 * 16]``."""
    *batch, rows, depth = (int(v) for v in data.shape)
    *wbatch, n_blocks, k_quads, oc_block, quad = (int(v) for v in weight.shape)
    if k_quads * quad != depth or wbatch != batch:
        raise ValueError(
            f"batch_dense_packed_int8: packed operand {list(weight.shape)} does not match data {list(data.shape)}"
        )
    r_quad = te.reduce_axis((0, k_quads), name="k_outer")
    r_elem = te.reduce_axis((0, quad), name="k_inner")

    def compute(*idx):
        *outer, row, col = idx
        return te.sum(
            data[(*outer, row, r_quad * quad + r_elem)].astype("int32")
            * weight[(*outer, col // oc_block, r_quad, col % oc_block, r_elem)].astype("int32"),
            axis=[r_quad, r_elem],
        )

    return te.compute((*batch, rows, n_blocks * oc_block), compute, name="dense_packed_int8")


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
    split, perm = depthwise_packing(weight_oihw.shape, block)
    return np.ascontiguousarray(weight_oihw.reshape(split).transpose(perm))


def depthwise_packing(shape, block: int = OC_BLOCK) -> tuple[tuple, tuple]:
    """``(split, perm)`` of :func:`pack_depthwise_weight`: ``packed = w.reshape(split).transpose(perm)``."""
    channels, _, k_h, k_w = (int(v) for v in shape)
    return (channels // block, block, k_h, k_w), (0, 2, 3, 1)


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
