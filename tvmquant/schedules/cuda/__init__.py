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
installed ``nvcc`` where a driver is present; it is set around each build (:func:`nvcc_compile_mode`), never at
import.

Version-sensitive imports (TVM 0.27: ``tvm.s_tir.meta_schedule``, ``tvm.s_tir.tensor_intrin``,
``tvm.support.nvcc``) are gathered at the top of this module; the intrinsic modules (slow to import: they
parse every CUDA intrinsic) are imported by :func:`int8_rules`."""

from __future__ import annotations

from ...cuda_binaries import nvcc_arch  # noqa: F401, E402  (its home: the runtime side uses it)
from .build import (  # noqa: F401
    WINDOW_REDUCTION,
    ScheduleUntuned,
    _largest_reduction,
    apply_database,
    build,
    untuned_kernels,
)
from .compute import (  # noqa: F401
    int8_conv2d_nhwc,
    int8_matmul,
)
from .passes import (  # noqa: F401
    lift_constants,
    prepare,
    to_fp16,
)
from .target import (  # noqa: F401
    VECTOR_LOAD_LENS,
    Int8Kind,
    compile_cuda_source,
    cuda_source,
    cuda_target,
    have_gpu,
    have_nvcc,
    nvcc_compile_mode,
)
from .tune import (  # noqa: F401
    BuiltCandidate,
    _compiles,
    _sample,
    design_space,
    extract_tasks,
    int8_rules,
    int8_space,
    sample_and_build,
    space_kind,
)
