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
scheduling kernels without a record from meta-schedule's design space with the decisions of
:mod:`tvmquant.schedules.x86.defaults` (:class:`ScheduleUntunedFromSketch`). Meta-schedule's default x86 rules
tensorize the blocked compute with ``dot_16x4_vnni`` when the target has AVX512-VNNI and ``dot_16x4_avx512``
when it has AVX-512BW only (both re-registered by :mod:`tvmquant.schedules.intrinsics`: the stock ones fail
LLVM 22's verifier, resp. saturate); on AVX2 the same blocked kernels are vectorised without an intrinsic.

Input contract (what the quantization passes produce): ``R.nn.conv2d(x_q: uint8 NCHW, w_q: int8 OIHW
constant, out_dtype="int32")`` and ``R.matmul(x_q: uint8, w_q: int8 constant [K, N], out_dtype="int32")``.
Signed activations are left alone (shift them to uint8 first). Run these passes after the quantization
passes and before ``LegalizeOps``; :func:`tune` and :func:`build` run them for you.

Version-sensitive imports (TVM 0.27: ``tvm.s_tir.meta_schedule``, ``tvm.ir.GenericConst``,
``tvm.ir.utils.derived_object``, ``tvm.relax.backend.cpu_generic.pipeline``, ``tvm.target.codegen.llvm_*``,
the builder worker helpers of ``meta_schedule.builder.local_builder``) are gathered at the top of this module."""

from __future__ import annotations

from tvm.s_tir import meta_schedule as ms  # noqa: E402, F401  (tests patch ms.tune)

from ...target import cpu_flags, host_mcpu, target_has_amx, x86_target  # noqa: E402, F401
from .. import intrinsics  # noqa: E402, F401  (tests patch x86.intrinsics)
from ..common import is_scheduled  # noqa: E402, F401
from . import amx  # noqa: E402, F401  (registers the AMX schedule rule)
from .build import (  # noqa: F401
    _SKETCH_CACHE,
    ScheduleUntunedFromSketch,
    apply_database,
    build,
    default_schedule,
    untuned_functions,
)
from .compute import (  # noqa: F401
    conv2d_nchwc_int8,
    dense_packed_int8,
    depthwise_nchwc_int8,
    pack_conv2d_weight,
    pack_dense_weight,
    pack_depthwise_weight,
)
from .database import (  # noqa: F401
    _is_tuned,
    records_for_target,
)
from .fixed import (  # noqa: F401
    PARALLEL_MIN_ELEMENTS,
    ScheduleDataMovement,
    StripUnregisteredScheduleRules,
    schedule_data_movement,
    schedule_depthwise,
    strip_unregistered_schedule_rules,
)
from .measure import (  # noqa: F401
    MS_LOGGER,
    XGB_WARMUP_SAMPLES,
    PooledBuilder,
    TuningProgress,
    meta_schedule_logs,
)
from .passes import (  # noqa: F401
    BlockInt8Conv2d,
    ConvertInt8ConvLayout,
    ExpandClip,
    GatherLayoutTransform,
    PackInt8Dense,
    layout_transform_gather,
    optimize_int8_for_x86,
    prepare,
)
from .target import (  # noqa: F401
    IC_BLOCK,
    IC_QUAD,
    OC_BLOCK,
    Int8Isa,
    int8_isa,
)
from .tune import (  # noqa: F401
    extract_tasks,
    plan_trials,
    search_strategy,
    seed_default_schedules,
    tune,
)
