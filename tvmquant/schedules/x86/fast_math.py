"""Vectorizable float32 ``exp``, ``erf``, ``sigmoid`` and ``softmax`` for the x86 pipeline.

LLVM lowers TIR's ``exp`` and ``erf`` to calls of libm's scalar ``expf`` / ``erff``, even in a loop TVM
vectorizes: sixteen calls per 512-bit vector. On a BERT-base encoder (batch 1, sequence 128) the GELU and
softmax kernels took 57 of 132 ms of INT8 time on a Zen 5 core, more than the INT8 matmuls. The expressions
here are polynomials of plain arithmetic, which vectorize:

``exp``
    Cephes' ``expf``: ``x = n ln2 + r`` with ``ln2`` split in two constants (so ``r`` stays exact),
    a degree-6 polynomial on ``|r| <= ln2 / 2``, ``2^n`` built in the exponent bits. Within 1.01 ulp of
    the exact value on [-87, 88] (measured on 2 million points); below -87.3, where the exact value leaves
    the normal range, at most 1.2e-38 (denormal or 0); between 88.38 and 88.72 it stays at 2.4e38, above
    it is +inf.
``erf``
    Eigen's rational approximation on [-4, 4] (odd degree-13 numerator, even degree-8 denominator), +-1
    outside (and for NaN). Within 3.4e-7 of the exact value everywhere (erf is at most 1 in magnitude),
    relative error 2e-7 near 0.
``sigmoid``
    ``1 / (1 + exp(-x))`` with the ``exp`` above.

NaN stays NaN in ``exp`` and ``softmax``; ``erf`` and ``sigmoid`` keep no select for it (see
:func:`exp_expr`), which a model notices anyway: GELU and SiLU multiply by ``x``.

:data:`LEGALIZE_MAP` is the ``LegalizeOps`` override of the x86 pipeline
(:func:`tvmquant.schedules.x86.passes.prepare`): float32 ``relax.exp``, ``relax.erf``, ``relax.sigmoid`` and
``relax.nn.softmax`` legalize to these; other dtypes keep TVM's legalization. Every model the x86 pipeline
compiles gets them, the float graphs tvmquant runs itself (calibration, SQNR) as much as the INT8 library.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln2 = _LN2_HI + _LN2_LO; n * _LN2_HI is exact for |n| <= 128
_LN2_LO = -2.12194440e-4
#: Cephes expf: exp(r) ~ 1 + r + r^2 (c0 r^5 + c1 r^4 + ... + c5) on |r| <= ln2 / 2.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_HI = 88.3762626647949  # n = 128 from here on: 2^n overflows to inf
_EXP_LO = -88.3762626647949  # n = -127: 2^n is 0 (biased exponent 0)
_EXP_OVERFLOW = 88.72283935546875  # the largest float32 whose exp is finite

#: Eigen's erf for float: x p(x^2) / q(x^2) on [-4, 4].
_ERF_NUM = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03)
_ERF_DEN_LAST = -1.42647390514189e-02


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _horner(x: tirx.PrimExpr, coefficients) -> tirx.PrimExpr:
    result = _f32(coefficients[0])
    for coefficient in coefficients[1:]:
        result = result * x + _f32(coefficient)
    return result


def exp_expr(x: tirx.PrimExpr, limits: bool = True) -> tirx.PrimExpr:
    """``exp(x)`` of a float32 expression, as arithmetic LLVM vectorizes (see the module docstring).

    ``limits=False`` leaves out the select that gives +inf above the overflow threshold and NaN for NaN (the
    result then stays at 2.4e38, and NaN becomes a number): meta-schedule does not inline a block with a
    select into its consumer, and a sigmoid does not need it (1 / (1 + 2.4e38) is 0 as 1 / (1 + inf) is).
    """
    c = tirx.max(tirx.min(x, _f32(_EXP_HI)), _f32(_EXP_LO))
    n = tirx.floor(c * _f32(_LOG2E) + _f32(0.5))
    r = c - n * _f32(_LN2_HI) - n * _f32(_LN2_LO)
    y = _horner(r, _EXP_POLY) * r * r + r + _f32(1.0)
    exponent = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    value = y * tirx.reinterpret("float32", exponent)
    if not limits:
        return value
    # Past the clamp: inf above the overflow threshold, and NaN stays NaN (x + inf is NaN for NaN).
    return tirx.Select(x < _f32(_EXP_OVERFLOW), value, x + _f32(float("inf")))


def erf_expr(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``erf(x)`` of a float32 expression, as arithmetic LLVM vectorizes (see the module docstring)."""
    c = tirx.max(tirx.min(x, _f32(4.0)), _f32(-4.0))
    c2 = c * c
    numerator = c * _horner(c2, _ERF_NUM)
    denominator = _horner(c2, _ERF_DEN) * c2 + _f32(_ERF_DEN_LAST)
    # No select for NaN (the clamp makes it +-1): meta-schedule's AutoInline does not inline a block with a
    # select, which kept BERT's GELU out of the matmul's register tile. GELU, x * (1 + erf(x / sqrt 2)) / 2,
    # still gives NaN for NaN.
    return numerator / denominator


def fast_exp(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: exp_expr(x(*i)), name="T_fast_exp", tag="elemwise")


def fast_erf(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: erf_expr(x(*i)), name="T_fast_erf", tag="elemwise")


def fast_sigmoid(x: te.Tensor) -> te.Tensor:
    one = _f32(1.0)
    return te.compute(
        x.shape, lambda *i: one / (one + exp_expr(-x(*i), limits=False)), name="T_fast_sigmoid", tag="elemwise"
    )


def fast_softmax(x: te.Tensor, axis: int = -1) -> te.Tensor:
    """Softmax along ``axis`` with :func:`exp_expr`, each exponential computed once (``topi.nn.softmax``
    computes it twice: for the sum and for the quotient)."""
    axis = axis % len(x.shape)
    reduced = [extent for dim, extent in enumerate(x.shape) if dim != axis]

    def full(index, k):
        return (*index[:axis], k, *index[axis:])

    def row(index):
        return (*index[:axis], *index[axis + 1 :])

    k_max = te.reduce_axis((0, x.shape[axis]), name="k")
    maxelem = te.compute(reduced, lambda *i: te.max(x(*full(i, k_max)), axis=k_max), name="T_softmax_maxelem")
    exp = te.compute(x.shape, lambda *i: exp_expr(x(*i) - maxelem(*row(i))), name="T_softmax_exp")
    k_sum = te.reduce_axis((0, x.shape[axis]), name="k")
    expsum = te.compute(reduced, lambda *i: te.sum(exp(*full(i, k_sum)), axis=k_sum), name="T_softmax_expsum")
    return te.compute(x.shape, lambda *i: exp(*i) / expsum(*row(i)), name="T_softmax_norm", attrs={"axis": axis})


def _float32(call) -> bool:
    return getattr(call.args[0].ty, "dtype", None) == "float32"


def _default(op_name: str, bb, call):
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")(bb, call)


def _unary(op_name: str, te_func, name: str):
    def legalize(bb, call):
        if not _float32(call):
            return _default(op_name, bb, call)
        return bb.call_te(te_func, call.args[0], primfunc_name_hint=name)

    return legalize


def _softmax(bb, call):
    if not _float32(call):
        return _default("relax.nn.softmax", bb, call)
    return bb.call_te(fast_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")


#: ``relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE_MAP)``: float32 exp, erf, sigmoid and
#: softmax as the vectorizable expressions above (primfunc names as TVM's: ``tir_exp``, ``erf``, ...).
LEGALIZE_MAP = {
    "relax.exp": _unary("relax.exp", fast_exp, "tir_exp"),
    "relax.erf": _unary("relax.erf", fast_erf, "erf"),
    "relax.sigmoid": _unary("relax.sigmoid", fast_sigmoid, "tir_sigmoid"),
    "relax.nn.softmax": _softmax,
}

__all__ = ["LEGALIZE_MAP", "erf_expr", "exp_expr", "fast_erf", "fast_exp", "fast_sigmoid", "fast_softmax"]
