"""TE workloads of the INT8 GEMM kernels (matmul, NHWC conv) used by the rule and build tests."""

from __future__ import annotations

import tvm
from tvm import te


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
