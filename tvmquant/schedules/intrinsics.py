"""x86 INT8 tensor intrinsics that compile with the LLVM bundled in TVM 0.27.

:func:`register_x86_intrinsics` registers (or re-registers) the 16x4 u8 x s8 -> s32 dot-product
intrinsics that meta-schedule's x86 rules tensorize with:

- ``dot_16x4_vnni`` (AVX512-VNNI ``vpdpbusd``). TVM 0.27's stock implementation passes three
  ``int32x16`` operands to ``llvm.x86.avx512.vpdpbusd.512``; LLVM 21+ declares that intrinsic as
  ``(<16 x i32>, <64 x i8>, <64 x i8>)`` and its verifier rejects every tensorized candidate
  ("Call parameter type does not match function signature"). Meta-schedule then silently keeps the
  scalar candidates (about 30x slower). The implementation here reinterprets the broadcast data as
  ``uint8x64`` and loads the weights as ``int8x64``.
- ``dot_16x4_avx512`` (AVX-512BW, no VNNI). TVM's stock implementation is one ``vpmaddubsw`` +
  ``vpmaddwd``, but ``vpmaddubsw`` adds its two u8 x s8 products into an int16 *with saturation*:
  255 * 127 * 2 = 64770 does not fit, so full-range activations give wrong sums (seen here: 98% of a conv's
  outputs off). The implementation here splits the data bytes into 4-bit halves (each pair sum then fits
  easily: 15 * 128 * 2 = 3840), runs ``vpmaddubsw``/``vpmaddwd`` on both halves and weights the high half
  by 16 inside ``vpmaddwd``: exact, at about twice the stock instruction count.

Ordering rule: the stock modules (``tvm.s_tir.tensor_intrin``) must be imported *before* the override,
because importing them later would try to register ``dot_16x4_vnni`` again without ``override`` and fail.
:func:`register_x86_intrinsics` imports them first. That import parses every TVMScript intrinsic TVM ships
(~25 s on the 2-core machines here, 17 s of it CUDA), so it happens on first use, not when this module is
imported. Tuning records store only the intrinsic's name, so the override must be registered in every
process that tunes *or* replays a database (``tvmquant.schedules.x86.tune`` and ``build`` call it).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .._compat import fast_tvmscript_parsing

fast_tvmscript_parsing()  # before the T.prim_func below: 1.7 s of this import was inspect.stack()

#: Name of the AVX512-VNNI 16x4 intrinsic (the name meta-schedule's x86 "vnni" rules look up).
VNNI_DOT_16X4 = "dot_16x4_vnni"
#: Name of the AVX-512BW fallback intrinsic (meta-schedule's x86 "avx512" rules).
AVX512_DOT_16X4 = "dot_16x4_avx512"
#: Output lanes of one intrinsic call: the blocked output channel size.
LANES = 16
#: u8/s8 pairs reduced per lane per call: the innermost input-channel block.
REDUCE = 4


@T.prim_func(s_tir=True)
def dot_product_16x4_u8i8i32_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    # The same description as tvm.s_tir.tensor_intrin.x86's (that module is slow to import; see above).
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


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


@T.prim_func(s_tir=True)
def dot_product_16x4_u8i8i32_avx512_exact(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        A_u8x4 = A.vload([0], "uint8x4")
        A_i32 = T.reinterpret(A_u8x4, dtype="int32")
        A_u8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="uint8x64")
        # 4-bit halves of the data: vpmaddubsw's int16 pair sums can no longer saturate.
        A_low = T.bitwise_and(A_u8x64, T.broadcast(T.uint8(15), 64))
        A_high = T.shift_right(A_u8x64, T.broadcast(T.uint8(4), 64))
        B_i8x64 = B.vload([0, 0], dtype="int8x64")
        low_pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"), A_low, B_i8x64, dtype="int16x32"
        )
        high_pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"), A_high, B_i8x64, dtype="int16x32"
        )
        C[T.ramp(T.int32(0), 1, 16)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddw.d.512"),
            low_pairs,
            T.int16x32(1),
            dtype="int32x16",
        ) + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddw.d.512"),
            high_pairs,
            T.int16x32(16),
            dtype="int32x16",
        )


def _import_stock_x86_intrinsics() -> None:
    """Import TVM's stock x86 intrinsics (``tvm.s_tir.tensor_intrin.x86``) without its package's other ones
    (:func:`enter_intrinsic_package`, then the x86 module).
    """
    import importlib

    enter_intrinsic_package()
    importlib.import_module("tvm.s_tir.tensor_intrin.x86")


def enter_intrinsic_package() -> None:
    """Enter ``tvm.s_tir.tensor_intrin`` as a package whose ``__init__`` (every target's intrinsics) never runs.

    ``tvm/s_tir/tensor_intrin/__init__.py`` imports every target's intrinsics: 23 s on 2 cores (16.5 s of it
    CUDA's TVMScript), and meta-schedule's ``TuneContext`` imports that package on every construction. So
    every process that built a model for x86 paid 23 s before its first kernel (``tvmquant run``,
    ``compile``). When nothing has imported the package yet, it is entered here as a plain package object
    whose ``__init__`` does not run: its submodules still import as usual (``tvm.s_tir.tensor_intrin.cuda``,
    which tvmquant's CUDA code imports by name before it needs the WMMA intrinsics), and the x86 module
    takes about a second (:func:`_import_stock_x86_intrinsics`).
    """
    import importlib.util
    import sys
    import types

    package_name = "tvm.s_tir.tensor_intrin"
    if package_name not in sys.modules:
        spec = importlib.util.find_spec(package_name)
        package = types.ModuleType(package_name, "TVM's tensor intrinsics; submodules import on demand (tvmquant).")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        sys.modules[package_name] = package
        import tvm.s_tir

        tvm.s_tir.tensor_intrin = package


def register_x86_intrinsics() -> None:
    """(Re-)register ``dot_16x4_vnni`` (LLVM-22 operand types) and ``dot_16x4_avx512`` (exact), after
    TVM's stock intrinsics.

    Idempotent. The first call in a process imports ``tvm.s_tir.tensor_intrin`` (slow, see the module
    docstring); later calls only re-register.

    Examples
    --------
    >>> from tvmquant.schedules.intrinsics import register_x86_intrinsics, VNNI_DOT_16X4
    >>> register_x86_intrinsics()
    >>> from tvm.s_tir import TensorIntrin
    >>> TensorIntrin.get(VNNI_DOT_16X4) is not None
    True
    """
    _import_stock_x86_intrinsics()
    TensorIntrin.register(
        VNNI_DOT_16X4, dot_product_16x4_u8i8i32_desc, dot_product_16x4_u8i8i32_vnni_llvm22, override=True
    )
    TensorIntrin.register(
        AVX512_DOT_16X4, dot_product_16x4_u8i8i32_desc, dot_product_16x4_u8i8i32_avx512_exact, override=True
    )
