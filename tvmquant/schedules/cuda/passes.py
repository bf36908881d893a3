"""The CUDA model pipeline before scheduling: NHWC layout with fused requantize epilogues, the FP16 baseline,
lifting weights to parameters."""

from __future__ import annotations

import tvm

from ..common import fusion_passes
from .target import cuda_target


def prepare(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Lower a Relax model to fused TIR kernels for a CUDA target (what :func:`tune_offline` tunes).

    Convs go to NHWC x OHWI (the channel axis is the GEMM reduction axis, contiguous for the tensor-core
    loads); the requantize epilogue (bias add, scale, round, clip, cast) follows them into NHWC through
    :class:`~tvmquant.schedules.layout.SinkLayoutTransform`, so that ``FuseOps`` fuses it into the conv
    kernel. Works for the INT8 model and for an FP16 one (see :func:`to_fp16`).

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module, weights bound as constants.
    target : tvm.target.Target, optional
        A CUDA target (default :func:`cuda_target`).

    Returns
    -------
    tvm.IRModule
        Relax ``main`` calling fused, unscheduled PrimFuncs.
    """
    from tvm import relax

    from ..layout import SinkLayoutTransform

    target = cuda_target() if target is None else target
    passes = [
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
        SinkLayoutTransform(),
        relax.transform.DeadCodeElimination(),
        *fusion_passes(),
    ]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def to_fp16(mod: tvm.IRModule) -> tvm.IRModule:
    """The FP16 baseline of an FP32 Relax model: convs and matmuls in float16 with float32 accumulation
    (``ToMixedPrecision``), as TVM users deploy FP16 on tensor cores."""
    from tvm import relax

    with tvm.transform.PassContext(opt_level=3):
        return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)


def lift_constants(mod: tvm.IRModule, min_bytes: int = 1 << 16) -> tuple[tvm.IRModule, list]:
    """Turn the large constants of ``main`` (weights) into trailing parameters.

    For benchmarks that ship libraries to a GPU host: the kernels are the same, the library is small, and the
    weights are fed (or drawn at random) at run time. ``main`` keeps ``num_input`` for the real inputs.

    Returns
    -------
    (tvm.IRModule, list of numpy.ndarray)
        The module and the lifted values, in parameter order.
    """
    from tvm import relax

    from ..._compat import const_value, is_const
    from ..._relax import BindingRewriter

    class _Lift(BindingRewriter):
        def begin(self, func):
            self.lifted, self.params = [], []
            self.by_id: dict = {}

            def visit(expr):
                if is_const(expr) and expr.value.numpy().nbytes >= min_bytes and expr not in self.by_id:
                    array = const_value(expr)
                    var = relax.Var(f"weight{len(self.params)}", expr.ty)
                    self.by_id[expr] = var
                    self.params.append(var)
                    self.lifted.append(array)

            relax.analysis.post_order_visit(func.body, visit)

        def extra_params(self, func):
            return list(self.params)

        def remap(self, expr):
            if is_const(expr) and expr in self.by_id:
                return self.by_id[expr]
            return super().remap(expr)

    num_input = len(mod["main"].params)
    lifter = _Lift()
    out = lifter.transform_module(mod)
    out["main"] = out["main"].with_attr("num_input", num_input)
    return out, lifter.lifted
