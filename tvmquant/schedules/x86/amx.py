"""AMX-INT8 kernels: u8 x s8 -> s32 GEMMs on Intel's tile unit (Sapphire, Emerald, Granite Rapids).

What is here, in the order a model meets it:

- :func:`choose_int8_unit`: per kernel, AMX or VNNI, from the target and the GEMM's shape (AMX where the
  GEMM fills whole 32 x 32 tiles with little padding, VNNI for small, depthwise or odd-shaped ones; the
  choice is logged).
- The computes: :func:`im2col_int8` (the blocked, pre-padded conv input as a ``[M, K]`` u8 matrix, a
  data-movement kernel of its own) and :func:`gemm_amx_int8` (``C[M, N] = A[M, K] x W[K, N]`` with the
  weight packed ``[N/32, K/4, 32, 4]`` at compile time, :func:`pack_amx_weight`, followed in the same kernel by the
  gather into the layout the rest of the graph uses: blocked ``[N, K/16, OH, OW, 16]`` for a conv, ``[M, N]``
  for a dense; the requantize epilogue fuses after it).
- The intrinsic :func:`register_amx_intrinsic`: one 32 x 32 x K block of tiles (four int32 C tiles stay in
  tile registers over the whole K loop; ``ldtilecfg`` once per call), written with LLVM's plain AMX
  intrinsics (``llvm.x86.tileloadd64``, ``llvm.x86.tdpbusd``, ``llvm.x86.tilestored64``: TVM cannot
  express the ``x86_amx`` type of the ``.internal`` ones). Tile numbers are compile-time constants.
- Scheduling: the GEMM block is annotated ``schedule_rule = "tvmquant_amx_gemm"``, the custom rule
  :func:`amx_schedule_rule` (registered for meta-schedule's ``ApplyCustomRule``, which is part of the
  default x86 rules) tiles it around the intrinsic and samples the outer tiles, so the design space that
  tuning searches holds the AMX tensorize step; the untuned default path uses :func:`schedule_amx_kernel`
  (fixed tiles, no search).

Running an AMX kernel needs the process to have asked Linux for the tile state
(:func:`tvmquant.threads.request_amx_permission`; without it the first tile instruction dies with SIGILL).

:func:`emulated` (tests only) swaps the intrinsic's implementation for plain TIR that performs the same tile
loads, dot products and stores with the same offsets and strides, so the layouts, packing and tiling are
checked bit-exact on any CPU; only the instructions themselves need AMX hardware.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ...target import target_has_amx
from .compute import conv_output_size

logger = logging.getLogger(__name__)

#: Rows and columns of the block of tiles one intrinsic call computes (2 x 2 tiles of 16 x 16 int32).
TILE_M = 32
TILE_N = 32
#: Bytes of K one ``tdpbusd`` consumes per row (a 16 x 64 u8 A tile times a 16 x 64 s8 B tile).
TILE_K = 64
#: Name of the custom meta-schedule rule the GEMM block is annotated with.
SCHEDULE_RULE = "tvmquant_amx_gemm"
#: Block names of the computes (the rule and the fixed schedule look them up).
GEMM_BLOCK = "amx_gemm_int8"
IM2COL_BLOCK = "im2col_int8"
#: Annotation of the im2col block: ``[R, S, channels, channel block, dilation along W]``.
IM2COL_LAYOUT = "tvmquant.im2col_layout"
#: Below these, a GEMM goes to VNNI: AMX pays a tile configuration per 32 x 32 block and pads M, N, K.
MIN_M = 32
MIN_N = 32
MIN_K = 64
#: Largest share of padded (wasted) multiply-adds AMX may compute before VNNI is preferred.
MAX_PADDING = 0.35

_MB, _NB = TILE_M // 16, TILE_N // 16
_C_TILES = _MB * _NB


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def choose_int8_unit(m: int, n: int, k: int, target, what: str = "kernel") -> str:
    """``"amx"`` or ``"vnni"`` for a u8 x s8 GEMM of ``m x n x k`` (a conv: pixels x out channels x C*R*S).

    AMX when the target has it, the GEMM is at least ``MIN_M x MIN_N x MIN_K`` and padding M, N to 32 and
    K to 64 wastes at most ``MAX_PADDING`` of the work. The choice and its reason are logged (INFO).
    """
    if not amx_enabled(target):
        return "vnni"
    padded = _round_up(m, TILE_M) * _round_up(n, TILE_N) * _round_up(k, TILE_K)
    waste = 1.0 - (m * n * k) / padded
    if m < MIN_M or n < MIN_N or k < MIN_K:
        logger.info("%s (GEMM %dx%dx%d): VNNI, too small for AMX tiles", what, m, n, k)
        return "vnni"
    if waste > MAX_PADDING:
        logger.info("%s (GEMM %dx%dx%d): VNNI, AMX would pad %.0f%% of the work", what, m, n, k, 100 * waste)
        return "vnni"
    logger.info("%s (GEMM %dx%dx%d): AMX", what, m, n, k)
    return "amx"


# ----------------------------------------------------------------------------------------------------------
# Weight packing and computes
def pack_amx_weight(weight_kn: np.ndarray) -> np.ndarray:
    """``[K, N]`` int8 -> ``[N/32, K/4, 32, 4]`` (K padded to 64, N to 32, with zeros): per block of 32
    output columns, the rows of its B tiles one after the other.

    A block's whole K is one contiguous stream (the intrinsic's B tile rows are 128 bytes apart), which the
    hardware prefetchers follow; in a ``[K/4, N, 4]`` layout the rows were ``4 N`` bytes apart (2 KB for 512
    columns: two cache lines per page), and a kernel whose weights do not stay in L2 between runs (ResNet's
    last stage: 1-2.4 MB a conv) waited on each line.

    Examples
    --------
    >>> w = np.arange(64 * 64).reshape(64, 64).astype("int8")
    >>> p = pack_amx_weight(w)
    >>> p.shape, int(p[1, 3, 5, 2]) == int(w[14, 32 + 5])
    ((2, 16, 32, 4), True)
    """
    depth, cols = weight_kn.shape
    depth_pad, cols_pad = _round_up(depth, TILE_K), _round_up(cols, TILE_N)
    padded = np.zeros((depth_pad, cols_pad), dtype=np.int8)
    padded[:depth, :cols] = weight_kn
    blocks = padded.reshape(depth_pad // 4, 4, cols_pad // TILE_N, TILE_N)
    return np.ascontiguousarray(blocks.transpose(2, 0, 3, 1))


def conv_weight_as_gemm(weight_oihw: np.ndarray, channels: int) -> np.ndarray:
    """OIHW ``[K, C, R, S]`` -> ``[R*S*channels, K]``, the order :func:`im2col_int8` lays out (taps outer,
    channels inner; ``channels >= C``, the extra ones zero)."""
    out_ch, in_ch, k_h, k_w = weight_oihw.shape
    padded = np.zeros((out_ch, channels, k_h, k_w), dtype=np.int8)
    padded[:, :in_ch] = weight_oihw
    return np.ascontiguousarray(padded.transpose(2, 3, 1, 0).reshape(k_h * k_w * channels, out_ch))


def conv_gemm_shape(data_shape, kernel_hw, strides, dilation) -> tuple[int, int, int, int]:
    """``(M, K, OH, OW)`` of a conv on pre-padded blocked data ``[N, C/cb, H, W, cb]``."""
    batch, blocks, in_h, in_w, block = (int(v) for v in data_shape)
    k_h, k_w = kernel_hw
    out_h, out_w = conv_output_size((in_h, in_w), (k_h, k_w), strides, dilation)
    return batch * out_h * out_w, k_h * k_w * blocks * block, out_h, out_w


def im2col_int8(data: te.Tensor, kernel_hw, strides, dilation) -> te.Tensor:
    """Blocked pre-padded conv input ``[N, C/cb, H, W, cb]`` u8 -> ``[M_pad, K_pad]`` u8.

    Row ``m = (n * OH + oh) * OW + ow`` is one output pixel, column ``k = (r * S + s) * C + c`` one tap and
    input channel; M is padded to 32 and K to 64 with zeros (rows and columns of no output).
    """
    batch, blocks, _, _, block = (int(v) for v in data.shape)
    k_h, k_w = (int(v) for v in kernel_hw)
    s_h, s_w = (int(v) for v in strides)
    d_h, d_w = (int(v) for v in dilation)
    rows, depth, out_h, out_w = conv_gemm_shape(data.shape, (k_h, k_w), (s_h, s_w), (d_h, d_w))
    channels = blocks * block
    rows_pad, depth_pad = _round_up(rows, TILE_M), _round_up(depth, TILE_K)
    zero = tirx.const(0, "uint8")

    def gather(m, k):
        n, pix = m // (out_h * out_w), m % (out_h * out_w)
        oh, ow = pix // out_w, pix % out_w
        tap, c = k // channels, k % channels
        r, s = tap // k_w, tap % k_w
        value = data[n, c // block, oh * s_h + r * d_h, ow * s_w + s * d_w, c % block]
        if rows_pad == rows and depth_pad == depth:
            return value
        return tirx.if_then_else(tirx.all(m < rows, k < depth), value, zero)

    del batch
    # The schedule splits K along these (taps, channel blocks, channels) so no index needs a division.
    layout = {IM2COL_LAYOUT: [k_h, k_w, channels, block, d_w]}
    return te.compute((rows_pad, depth_pad), gather, name=IM2COL_BLOCK, attrs=layout)


def _gemm(data: te.Tensor, weight: te.Tensor) -> te.Tensor:
    rows, depth = (int(v) for v in data.shape)
    col_blocks, quads, block, quad = (int(v) for v in weight.shape)
    cols = col_blocks * block
    if quads * quad != depth or rows % TILE_M or block != TILE_N or depth % TILE_K:
        raise ValueError(
            f"gemm_amx_int8: data {rows}x{depth} and weight {list(weight.shape)} do not fill whole AMX tiles "
            f"(M a multiple of {TILE_M}, K of {TILE_K}, weight [N/{TILE_N}, K/4, {TILE_N}, 4])"
        )
    r_quad = te.reduce_axis((0, quads), name="k_outer")
    r_elem = te.reduce_axis((0, quad), name="k_inner")
    return te.compute(
        (rows, cols),
        lambda i, j: te.sum(
            data[i, r_quad * quad + r_elem].astype("int32")
            * weight[j // TILE_N, r_quad, j % TILE_N, r_elem].astype("int32"),
            axis=[r_quad, r_elem],
        ),
        name=GEMM_BLOCK,
        attrs={"schedule_rule": SCHEDULE_RULE},
    )


def conv2d_amx_int8(data: te.Tensor, weight: te.Tensor, kernel_hw, strides, dilation, out_shape) -> te.Tensor:
    """The conv as an AMX GEMM on the im2col matrix of ``data`` (:func:`im2col_int8`, in the same kernel:
    the schedule builds each 32-row block of it right before its tiles are loaded), gathered into the blocked
    output.

    Parameters
    ----------
    data : te.Tensor
        u8 ``[N, C/cb, H, W, cb]``, pre-padded.
    weight : te.Tensor
        s8 ``[N_pad/32, K_pad/4, 32, 4]`` (:func:`pack_amx_weight` of :func:`conv_weight_as_gemm`).
    kernel_hw, strides, dilation : pairs of int
    out_shape : tuple of int
        ``(N, K/16, OH, OW, 16)``: the layout of the VNNI conv (``conv2d_nchwc_int8``), so either kernel
        fits the same graph.
    """
    gemm = _gemm(im2col_int8(data, kernel_hw, strides, dilation), weight)
    batch, blocks, out_h, out_w, block = (int(v) for v in out_shape)
    del batch, blocks
    return te.compute(
        tuple(int(v) for v in out_shape),
        lambda n, ob, oh, ow, oi: gemm[(n * out_h + oh) * out_w + ow, ob * block + oi],
        name="amx_unpack",
    )


def dense_amx_int8(data: te.Tensor, weight: te.Tensor, rows: int, cols: int) -> te.Tensor:
    """u8 ``[M_pad, K_pad]`` x packed s8 ``[N_pad/32, K_pad/4, 32, 4]`` -> s32 ``[rows, cols]`` (padding
    dropped)."""
    gemm = _gemm(data, weight)
    return te.compute((rows, cols), lambda i, j: gemm[i, j], name="amx_unpack")


# ----------------------------------------------------------------------------------------------------------
# The intrinsic
def intrinsic_name(depth: int, configure: str = "always") -> str:
    """Name of the 32 x 32 x ``depth`` intrinsic (``depth`` a multiple of 64); ``configure="first-column"``
    names the variant that loads the tile configuration only for the first column block of a row of blocks
    (see :func:`_impl`)."""
    name = f"tvmquant_amx_u8s8s32_{TILE_M}x{TILE_N}x{depth}"
    return name if configure == "always" else f"{name}_rowcfg"


#: Tile configuration (64 bytes as 16 int32 words): palette 1, tiles 0-7 of 16 rows x 64 bytes.
_CONFIG_WORDS = [1, 0, 0, 0] + [0x00400040] * 4 + [0] * 4 + [0x10101010] * 2 + [0, 0]


def _desc(depth: int):
    quads = depth // 4

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (TILE_M, depth), "uint8", offset_factor=1)
        B = T.match_buffer(b, (quads, TILE_N, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (TILE_M, TILE_N), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:TILE_M, 0:TILE_N], A[0:TILE_M, 0:depth], B[0:quads, 0:TILE_N, 0:4])
            T.writes(C[0:TILE_M, 0:TILE_N])
            for i, j, k4, ki in T.grid(TILE_M, TILE_N, quads, 4):
                with T.sblock("update"):
                    vi, vj, vk4, vki = T.axis.remap("SSRR", [i, j, k4, ki])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk4 * 4 + vki], "int32") * T.cast(B[vk4, vj, vki], "int32")

    return desc


def _impl(depth: int, configure: str = "always"):
    """The hardware implementation: ``ldtilecfg``, zero the C tiles, per 64 bytes of K load 2 A and 2 B
    tiles and issue 4 ``tdpbusd``, store the C tiles. Tiles 0-3: C, 4-5: A, 6-7: B.

    The C tiles start from zero, not from ``C``: one call covers the whole K of its 32 x 32 block (the
    intrinsic's depth is the GEMM's), so the block's zero-fill before it (``decompose_reduction``; TVM's
    tensorize takes no block with an init) is all ``C`` can hold.

    ``ldtilecfg`` costs about as much as a K = 64 block's four ``tdpbusd`` (18% of a low-K 1x1 conv, measured).
    With ``configure="first-column"`` it runs only when ``C`` starts a row of the int32 result (its offset a
    multiple of the row stride: the first 32-column block of a row of blocks). The configuration is the
    thread's state and every AMX kernel loads the same one, so this is right for a schedule that, per
    thread, walks a row of blocks from its first column in order (:func:`_schedule_fused`)."""
    quads = depth // 4
    every_block = T.bool(configure == "always")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (TILE_M, depth), "uint8", offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (quads, TILE_N, 4), "int8", offset_factor=1, strides=[sb, 4, 1])
        C = T.match_buffer(c, (TILE_M, TILE_N), "int32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(C[0:TILE_M, 0:TILE_N], A[0:TILE_M, 0:depth], B[0:quads, 0:TILE_N, 0:4])
            T.writes(C[0:TILE_M, 0:TILE_N])
            cfg = T.decl_buffer((16,), "int32", scope="local")
            for w in T.unroll(16):
                cfg[w] = T.Select(
                    w == 0, 1, T.Select(w >= 4 and w < 8, 0x00400040, T.Select(w >= 12 and w < 14, 0x10101010, 0))
                )
            if every_block or C.elem_offset % sc == 0:
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", cfg.access_ptr("r")))
            for t in T.unroll(_C_TILES):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(t)))
            for kk in T.serial(depth // TILE_K):
                for mb in T.unroll(_MB):
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void",
                            "llvm.x86.tileloadd64",
                            T.int8(_C_TILES + mb),
                            A.access_ptr("r", offset=mb * 16 * sa + kk * 64),
                            T.int64(sa),
                        )
                    )
                for nb in T.unroll(_NB):
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void",
                            "llvm.x86.tileloadd64",
                            T.int8(_C_TILES + _MB + nb),
                            B.access_ptr("r", offset=kk * 16 * sb + nb * 64),
                            T.int64(sb),
                        )
                    )
                for mb in T.unroll(_MB):
                    for nb in T.unroll(_NB):
                        T.evaluate(
                            T.call_llvm_intrin(
                                "void",
                                "llvm.x86.tdpbusd",
                                T.int8(mb * _NB + nb),
                                T.int8(_C_TILES + mb),
                                T.int8(_C_TILES + _MB + nb),
                            )
                        )
            for mb in T.unroll(_MB):
                for nb in T.unroll(_NB):
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void",
                            "llvm.x86.tilestored64",
                            T.int8(mb * _NB + nb),
                            C.access_ptr("w", offset=mb * 16 * sc + nb * 16),
                            T.int64(sc * 4),
                        )
                    )

    return impl


#: The zero-fill of a 32 x 32 block of C that the intrinsic's ``tilezero`` makes redundant (see :func:`_impl`).
SKIP_INIT = "tvmquant_amx_skip_zero_fill_32x32"


def _zero_fill_desc():
    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (TILE_M, TILE_N), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:TILE_M, 0:TILE_N])
            for i, j in T.grid(TILE_M, TILE_N):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = 0

    return desc


def _skip_zero_fill_impl():
    """Writes nothing: the intrinsic that follows the zero-fill starts its C tiles from zero (``tilezero``; the
    emulated one from zeroed local tiles) and stores every element of ``C``."""

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (TILE_M, TILE_N), "int32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:TILE_M, 0:TILE_N])
            T.evaluate(0)

    return impl


def _emulated_impl(depth: int):
    """The same instruction stream as :func:`_impl` in plain TIR: tile registers are local arrays, and every
    ``tileloadd``/``tilestored`` reads or writes 16 rows at the flat offset and row stride the hardware
    version passes (so a wrong offset or stride gives wrong results here too); ``tdpbusd`` is
    ``C[m][n] += sum_q sum_i A[m][4q + i] * B[q][4n + i]``, u8 x s8 into int32."""
    quads = depth // 4

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (TILE_M, depth), "uint8", offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (quads, TILE_N, 4), "int8", offset_factor=1, strides=[sb, 4, 1])
        C = T.match_buffer(c, (TILE_M, TILE_N), "int32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(C[0:TILE_M, 0:TILE_N], A[0:TILE_M, 0:depth], B[0:quads, 0:TILE_N, 0:4])
            T.writes(C[0:TILE_M, 0:TILE_N])
            a_flat = T.decl_buffer((TILE_M * sa,), "uint8", data=A.data, elem_offset=A.elem_offset)
            b_flat = T.decl_buffer((quads * sb,), "int8", data=B.data, elem_offset=B.elem_offset)
            c_flat = T.decl_buffer((TILE_M * sc,), "int32", data=C.data, elem_offset=C.elem_offset)
            c_tiles = T.decl_buffer((_C_TILES, 16, 16), "int32", scope="local")
            a_tiles = T.decl_buffer((_MB, 16, 64), "uint8", scope="local")
            b_tiles = T.decl_buffer((_NB, 16, 64), "int8", scope="local")
            for t, row, col in T.grid(_C_TILES, 16, 16):
                c_tiles[t, row, col] = 0
            for kk in T.serial(depth // TILE_K):
                for mb, row, byte in T.grid(_MB, 16, 64):
                    a_tiles[mb, row, byte] = a_flat[mb * 16 * sa + kk * 64 + row * sa + byte]
                for nb, row, byte in T.grid(_NB, 16, 64):
                    b_tiles[nb, row, byte] = b_flat[kk * 16 * sb + nb * 64 + row * sb + byte]
                for mb, nb, m, n, q, i in T.grid(_MB, _NB, 16, 16, 16, 4):
                    c_tiles[mb * _NB + nb, m, n] = c_tiles[mb * _NB + nb, m, n] + T.cast(
                        a_tiles[mb, m, q * 4 + i], "int32"
                    ) * T.cast(b_tiles[nb, q, n * 4 + i], "int32")
            for mb, nb, row, col in T.grid(_MB, _NB, 16, 16):
                c_flat[mb * 16 * sc + nb * 16 + row * sc + col] = c_tiles[mb * _NB + nb, row, col]

    return impl


_EMULATE = False
_REGISTERED: dict[int, bool] = {}  # depth -> registered as emulated


def register_amx_intrinsic(depth: int) -> str:
    """Register (idempotently) the 32 x 32 x ``depth`` AMX intrinsic; returns its name.

    Tuning records store only the intrinsic's name, so it must be registered in every process that designs,
    tunes or replays an AMX kernel; :func:`tvmquant.schedules.x86.prepare` registers the ones its kernels use.
    """
    if depth % TILE_K:
        raise ValueError(f"AMX intrinsic: K={depth} is not a multiple of {TILE_K}")
    name = intrinsic_name(depth)
    if _REGISTERED.get(depth) is not _EMULATE:
        for configure in ("always", "first-column"):
            impl = _emulated_impl(depth) if _EMULATE else _impl(depth, configure)
            TensorIntrin.register(intrinsic_name(depth, configure), _desc(depth), impl, override=True)
        if not _REGISTERED:
            TensorIntrin.register(SKIP_INIT, _zero_fill_desc(), _skip_zero_fill_impl(), override=True)
        _REGISTERED[depth] = _EMULATE
    return name


@contextlib.contextmanager
def emulated():
    """For tests on CPUs without AMX: inside the ``with``, every target counts as having AMX and the
    intrinsics are registered with :func:`_emulated_impl` (plain TIR, runs anywhere). Never use it for a
    library that is deployed: it is slow and has no AMX instructions."""
    global _EMULATE
    saved = _EMULATE
    _EMULATE = True
    for depth in list(_REGISTERED):
        register_amx_intrinsic(depth)
    try:
        yield
    finally:
        _EMULATE = saved
        for depth in list(_REGISTERED):
            register_amx_intrinsic(depth)


def emulating() -> bool:
    """Whether :func:`emulated` is in force (schedules made now hold the emulated intrinsic's body)."""
    return _EMULATE


def amx_enabled(target) -> bool:
    """Whether kernels for ``target`` may use AMX (the target has it, or :func:`emulated` is in force)."""
    return _EMULATE or target_has_amx(target)


# ----------------------------------------------------------------------------------------------------------
# Finding and scheduling AMX kernels
def _gemm_block(sch):
    try:
        return sch.get_sblock(GEMM_BLOCK)
    except Exception:  # noqa: BLE001  (no such block)
        return None


def block_names(func) -> list[str]:
    """The names of ``func``'s blocks (a PrimFunc, scheduled or not), in a fixed order of its body: the names
    a schedule's trace looks its blocks up by."""
    names = []
    todo = [func.body]
    while todo:
        node = todo.pop()
        if isinstance(node, tvm.s_tir.stmt.SBlock):
            names.append(str(node.name_hint))
            todo.append(node.body)
            if node.init is not None:
                todo.append(node.init)
        elif isinstance(node, tvm.s_tir.stmt.SBlockRealize):
            todo.append(node.block)
        elif isinstance(node, tirx.stmt.SeqStmt):
            todo.extend(node.seq)
        elif isinstance(node, tirx.stmt.IfThenElse):
            todo.extend(n for n in (node.then_case, node.else_case) if n is not None)
        elif hasattr(node, "body"):
            todo.append(node.body)
    return names


def is_amx_kernel(func) -> bool:
    """Whether ``func`` (a PrimFunc, scheduled or not) holds the AMX GEMM compute or its tensorized form."""
    return isinstance(func, tirx.PrimFunc) and any(name.startswith(GEMM_BLOCK) for name in block_names(func))


def _blockize_for_intrinsic(sch, block):
    """Tile the GEMM ``block`` by 32 x 32 x K (the intrinsic of its K, registered) and blockize the tile;
    returns the outer block and the intrinsic's name."""
    depth = int(np.prod([int(sch.get(loop).extent) for loop in sch.get_loops(block)[-2:]]))
    name = register_amx_intrinsic(depth)
    loop = tvm.s_tir.schedule.transform.tile_with_tensor_intrin(sch, block, name)
    if loop is None:
        raise ValueError(f"AMX: the GEMM block does not match {name}")
    return sch.blockize(loop), name


def _tile_gemm(sch, block, tiles=None):
    """Tile ``block`` around the intrinsic; ``tiles`` = ``(i_outer, i_inner, j_outer, j_inner)`` factors of
    the 32-blocks (sampled when None). Returns the blockized block and the two outer loops."""
    outer, name = _blockize_for_intrinsic(sch, block)
    sch.annotate(outer, "meta_schedule.auto_tensorize", name)
    io, jo = sch.get_loops(outer)[:2]
    if tiles is None:
        i_tiles = sch.sample_perfect_tile(io, n=2, max_innermost_factor=4)
        j_tiles = sch.sample_perfect_tile(jo, n=2, max_innermost_factor=4)
    else:
        i_tiles, j_tiles = tiles[:2], tiles[2:]
    i0, i1 = sch.split(io, i_tiles)
    j0, j1 = sch.split(jo, j_tiles)
    sch.reorder(i0, j0, i1, j1)
    return outer, (i0, j0)


def amx_schedule_rule(sch, block):
    """Meta-schedule custom rule for the ``amx_gemm_int8`` block: tile around the AMX intrinsic (blockize,
    ``meta_schedule.auto_tensorize``) and sample the outer tiles; meta-schedule's postprocessors tensorize it
    and parallelize the outer loops. Meta-schedule's ``MultiLevelTilingWithIntrin`` refuses this intrinsic
    (its applicability check rejects two reduction loops over the same buffers), hence a rule of our own."""
    sch = sch.copy()
    try:
        _tile_gemm(sch, block)
    except Exception as err:  # noqa: BLE001  (the block does not match the intrinsic: nothing to tile)
        logger.debug("AMX rule: %s", err)
        return [sch]
    return [sch]


def register_schedule_rule() -> None:
    """Register :func:`amx_schedule_rule` as meta-schedule's custom rule ``tvmquant_amx_gemm`` for CPUs."""
    name = f"s_tir.meta_schedule.cpu.{SCHEDULE_RULE}"
    if tvm.get_global_func(name, allow_missing=True) is None:
        tvm.register_global_func(name, amx_schedule_rule)


def schedule_amx_kernel(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc | None:
    """The untuned default schedule of an AMX kernel (None when ``func`` is not one): :func:`amx_schedule`'s
    function."""
    sch = amx_schedule(func, num_cores)
    return None if sch is None else sch.mod["main"].with_attr("tirx.is_scheduled", True)


def amx_schedule(func: tirx.PrimFunc, num_cores: int) -> tvm.s_tir.Schedule | None:
    """The schedule of :func:`schedule_amx_kernel` (its ``trace`` replays it; None when ``func`` is not an AMX
    kernel).

    Per block of 32 output pixels (rows of the GEMM; the blocks run in parallel): build those 32 rows of the
    im2col matrix (16-byte copies of the blocked input, one channel block at a time), run the 32 x 32 x K
    intrinsic over every block of 32 output channels, then requantize that block of rows into the output
    (the gather and the fused epilogue, 16 channels a vector). The int32 accumulators and the im2col rows of
    a block stay in cache; no kernel writes a whole im2col matrix or int32 result to memory. A kernel whose
    epilogue changes the output's layout gets :func:`_amx_schedule_unfused` instead.
    """
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    if _gemm_block(sch) is None:
        return None
    try:
        _schedule_fused(sch, num_cores)
        return sch
    except (tvm.s_tir.schedule.ScheduleError, ValueError, tvm.error.InternalError) as err:
        logger.debug("AMX: per-block schedule does not apply (%s); whole-matrix schedule", str(err).splitlines()[0])
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    _amx_schedule_unfused(sch, num_cores)
    return sch


def _inline_elementwise(sch, keep) -> list:
    """Inline every block but ``keep`` (names) and the outputs; returns the output blocks."""
    root = sch.get_sblock("root")
    outputs = [b for b in sch.get_output_blocks(root)]
    names = {str(sch.get(b).name_hint) for b in outputs} | set(keep)
    for child in sch.get_child_blocks(root):
        if str(sch.get(child).name_hint) in names:
            continue
        with contextlib.suppress(Exception):
            sch.compute_inline(child)
    return outputs


def _schedule_fused(sch, num_cores: int) -> None:
    outputs = _inline_elementwise(sch, (GEMM_BLOCK, IM2COL_BLOCK))
    if len(outputs) != 1:
        raise ValueError(f"{len(outputs)} output blocks")
    out = outputs[0]
    gemm = _gemm_block(sch)
    # The output's loops as (block of 32 rows, the rest): a conv's blocked [N, K/16, OH, OW, 16] walks
    # pixels (rows of the GEMM) outside channel blocks; a dense's [..., cols] its leading axes.
    # The block iterates over GEMM rows (pixels) directly, so that a block of 32 of them reads exactly 32 rows
    # of the GEMM (with fused loops, the row index (p // OW) * OW + p % OW is relaxed to whole image rows).
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(out)]
    if len(extents) == 5:
        _, _, out_h, out_w, _ = extents
        sch.transform_block_layout(out, lambda n, ob, oh, ow, oi: ((n * out_h + oh) * out_w + ow, ob, oi))
        rows, ob, oi = sch.get_loops(out)
        inner = [ob, oi]
    elif len(extents) >= 2:
        if len(extents) > 2:
            sch.transform_block_layout(out, lambda *idx: (_flat_index(idx[:-1], extents[:-1]), idx[-1]))
        rows, col = sch.get_loops(out)
        inner = [col]
    else:
        raise ValueError("a 1-D output")
    block_rows, row = sch.split(rows, [None, TILE_M])
    group = _column_group(sch, gemm, extents) if len(inner) == 1 else None
    if group is not None:  # dense with large weights: columns in groups outside the blocks of rows
        col_group, inner[0] = sch.split(inner[0], [None, group])
        sch.reorder(col_group, block_rows, row, inner[0])
    else:
        col_group = None
        sch.reorder(block_rows, *inner[:-1], row, inner[-1])
    if len(inner) == 1:  # dense: 16 output columns a vector
        _, lanes = sch.split(inner[-1], [None, 16])
    else:
        lanes = inner[-1]
    # The GEMM's blocks of 32 x 32 tiles, computed for one block of rows at a time.
    tiles, name = _blockize_for_intrinsic(sch, gemm)
    sch.compute_at(tiles, block_rows)
    try:
        cols = sch.get_sblock(IM2COL_BLOCK)
    except Exception:  # noqa: BLE001  (a dense reads its input as it is)
        cols = None
    if cols is not None:
        sch.compute_at(cols, block_rows)
        _schedule_im2col(sch, cols)
    sch.vectorize(lanes)
    if col_group is not None:
        block_rows = sch.fuse(col_group, block_rows)
    if num_cores > 1:
        sch.parallel(block_rows)  # before tensorizing: the tensorized block is no longer a reduction block
    # The zero-fill of each 32 x 32 block (decomposed above a unit loop of its own) becomes a no-op: the
    # intrinsic zeroes its tiles itself.
    init = sch.decompose_reduction(tiles, sch.add_unit_loop(tiles))
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], SKIP_INIT)
    sch.tensorize(tiles, name + "_rowcfg")  # each thread walks a row of blocks from its first column


#: A dense whose packed weights are larger than this is computed in groups of columns
#: (:func:`_column_group`).
GROUP_WEIGHT_BYTES = 256 * 1024
#: Columns of a group: its weights (``K x 128`` bytes, 384 KB for K = 3072) and the GEMM's input rows stay in L2
#: while every block of rows passes.
GROUP_COLUMNS = 128


def _column_group(sch, gemm, extents) -> int | None:
    """Columns per group for a dense whose rows span several 32-row blocks and whose weights exceed
    :data:`GROUP_WEIGHT_BYTES`, or None (rows outside, all columns inside).

    With the blocks of rows outermost, each block streams all the weights: BERT-base's 768 x 3072 FFN weights
    (2.4 MB, beyond L2) came from L3 four times per call at sequence 128. In groups of columns (the groups and
    the blocks of rows fused into the parallel loop, groups outside) each group's weights are read once and
    reused from L2 by every block of rows; the rows of the input, which are much fewer bytes, are what is
    re-read. Measured on an AMX Xeon, 1 thread, in the model: the two FFN denses 8.1 + 6.4 -> 6.2 + 5.1 ms per
    run; the 768 x 768 projections did not change (5.7 -> 5.9 ms: still 2.5x their time alone)."""
    loops = [int(sch.get(loop).extent) for loop in sch.get_loops(gemm)]
    cols, depth = loops[1], loops[-2] * loops[-1]
    rows, out_cols = int(np.prod(extents[:-1])), extents[-1]
    if rows <= TILE_M or cols * depth <= GROUP_WEIGHT_BYTES:
        return None
    for group in (GROUP_COLUMNS, GROUP_COLUMNS // 2, TILE_N):
        if out_cols % group == 0 and out_cols > group:
            return group
    return None


def _flat_index(index, extents):
    flat = index[0]
    for value, extent in zip(index[1:], extents[1:]):
        flat = flat * extent + value
    return flat


def _schedule_im2col(sch, cols) -> None:
    """Vector copies for the im2col block ``cols`` (its loops: rows, K): K split into taps and channel blocks
    (copies of one channel block each; no division left in the indices), or, for an input of one channel
    block (the stem's 4 channels), into kernel rows and one copy of ``S x channels`` contiguous bytes."""
    k_h, k_w, channels, block, d_w = (int(v) for v in sch.get(cols).annotations[IM2COL_LAYOUT])
    k = sch.get_loops(cols)[-1]
    if channels == block and d_w == 1:
        sch.vectorize(sch.split(k, [None, k_w * channels])[-1])
    else:
        sch.vectorize(sch.split(k, [None, k_w, channels // block, block])[-1])


def _amx_schedule_unfused(sch, num_cores: int) -> None:
    """The GEMM in 32 x 32 blocks of tiles over the whole matrix (K whole inside the intrinsic), the blocks
    of M in parallel; the im2col matrix before it and the gather into the output layout with the fused
    epilogue after it, each as one parallel loop nest."""
    block = _gemm_block(sch)
    outputs = {str(sch.get(b).name_hint) for b in _inline_elementwise(sch, (GEMM_BLOCK, IM2COL_BLOCK))}
    rows = int(sch.get(sch.get_loops(block)[0]).extent) // TILE_M
    cols = int(sch.get(sch.get_loops(block)[1]).extent) // TILE_N
    j_inner = max(d for d in (1, 2, 4) if cols % d == 0)
    outer, (i0, j0) = _tile_gemm(sch, block, (rows, 1, cols // j_inner, j_inner))
    fused = sch.fuse(i0, j0)
    if num_cores > 1:
        sch.parallel(fused)
    k_loop = sch.get_loops(outer)[-2]  # the (unit) K loops of the block of tiles: init goes above them
    sch.decompose_reduction(outer, k_loop)
    sch.tensorize(outer, str(sch.get(outer).annotations["meta_schedule.auto_tensorize"]))
    sch.unannotate(outer, "meta_schedule.auto_tensorize")
    with contextlib.suppress(Exception):
        im2col = sch.get_sblock(IM2COL_BLOCK)
        if num_cores > 1:
            sch.parallel(sch.get_loops(im2col)[0])
        _schedule_im2col(sch, im2col)
    # The gather into the output layout with the epilogue inlined: rows in parallel, channels as vectors.
    for out_name in outputs:
        out_block = sch.get_sblock(out_name)
        loops = sch.get_loops(out_block)
        if num_cores > 1 and len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-2]) if len(loops) > 2 else loops[0])
        sch.vectorize(sch.get_loops(out_block)[-1])


def space_generator():
    """Meta-schedule's design space for AMX kernels: the target's rules (whose ``ApplyCustomRule`` runs
    :func:`amx_schedule_rule` on the GEMM block) with the x86 postprocessors, tensorizing with
    ``RewriteTensorize(vectorize_init_loop=False)`` (the block's zero-fill is a 32 x 32 loop nest, which the
    init vectorizer refuses)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.PostOrderApply(
        sch_rules="from-target",
        postprocs=[
            ms.postproc.DisallowDynamicLoop(),
            ms.postproc.RewriteParallelVectorizeUnroll(),
            ms.postproc.RewriteReductionBlock(),
            ms.postproc.RewriteTensorize(vectorize_init_loop=False),
        ],
        mutator_probs="from-target",
    )


register_schedule_rule()
