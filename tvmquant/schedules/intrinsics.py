"""x86 INT8 tensor intrinsics that compile with the LLVM bundled in TVM 0.27.

Importing this module registers (or re-registers) the 16x4 u8 x s8 -> s32 dot-product intrinsics that
meta-schedule's x86 rules tensorize with:

- ``dot_16x4_vnni`` (AVX512-VNNI ``vpdpbusd``). TVM 0.27's stock implementation passes three
  ``int32x16`` operands to ``llvm.x86.avx512.vpdpbusd.512``; LLVM 21+ declares that intrinsic as
  ``(<16 x i32>, <64 x i8>, <64 x i8>)`` and its verifier rejects every tensorized candidate
  ("Call parameter type does not match function signature"). Meta-schedule then silently keeps the
  scalar candidates (about 30x slower). The implementation here reinterprets the broadcast data as
  ``uint8x64`` and loads the weights as ``int8x64``.
- ``dot_16x4_avx512`` (AVX-512BW ``vpmaddubsw`` + ``vpmaddwd``) is the stock one; it already uses the
  ``<64 x i8>`` operand types, so it is left as registered.

Ordering rule: the stock modules (``tvm.s_tir.tensor_intrin``) must be imported *before* the override,
because importing them later would try to register ``dot_16x4_vnni`` again without ``override`` and fail.
This module imports them itself, so importing it first is always safe. Tuning records store only the
intrinsic's name, so the override must be registered in every process that tunes *or* replays a database
(``tvmquant.schedules.x86.build`` imports this module for that reason).
"""

from __future__ import annotations

import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the stock intrinsics first; see module docstring)
from tvm.s_tir import TensorIntrin
from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc
from tvm.script import tirx as T

#: Name of the AVX512-VNNI 16x4 intrinsic (the name meta-schedule's x86 "vnni" rules look up).
VNNI_DOT_16X4 = "dot_16x4_vnni"
#: Name of the AVX-512BW fallback intrinsic (meta-schedule's x86 "avx512" rules).
AVX512_DOT_16X4 = "dot_16x4_avx512"
#: Output lanes of one intrinsic call: the blocked output channel size.
LANES = 16
#: u8/s8 pairs reduced per lane per call: the innermost input-channel block.
REDUCE = 4


@T.prim_func(s_tir=True)
def dot_product_16x4_u8i8i32_vnni_llvm22(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        A_u8x4 = A.vload([0], "uint8x4")
        A_i32 = T.reinterpret(A_u8x4, dtype="int32")
        # vpdpbusd's operands are <64 x i8> in LLVM >= 21: broadcast the 4 data bytes as one i32 to all
        # 16 lanes, then view the vector as bytes.
        A_u8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="uint8x64")
        B_i8x64 = B.vload([0, 0], dtype="int8x64")
        C_i32x16 = C.vload([0], dtype="int32x16")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C_i32x16,
            A_u8x64,
            B_i8x64,
            dtype="int32x16",
        )


def register_x86_intrinsics() -> None:
    """(Re-)register the LLVM-22-compatible ``dot_16x4_vnni`` intrinsic.

    Idempotent; called when this module is imported. Call it again only if some other code re-registered
    the stock (broken) implementation afterwards.

    Examples
    --------
    >>> from tvmquant.schedules.intrinsics import register_x86_intrinsics, VNNI_DOT_16X4
    >>> register_x86_intrinsics()
    >>> from tvm.s_tir import TensorIntrin
    >>> TensorIntrin.get(VNNI_DOT_16X4) is not None
    True
    """
    TensorIntrin.register(
        VNNI_DOT_16X4, dot_product_16x4_u8i8i32_desc, dot_product_16x4_u8i8i32_vnni_llvm22, override=True
    )


register_x86_intrinsics()
