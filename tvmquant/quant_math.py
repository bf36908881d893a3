"""Quantization primitives in numpy, exactly as ``shared/QUANT_MATH.md`` defines them.

Conventions (ONNX / TVM): ``scale`` divides.

    q     = clip(round_half_to_even(x / scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

Arithmetic is done in float32, as ONNX ``QuantizeLinear`` and ``relax.op.quantize`` do, so results agree
bit for bit. Nothing here imports TVM.
"""

from __future__ import annotations

import numpy as np

#: The smallest scale handed out: a zero-width range (a constant or all-zero tensor) gets this, never 0/NaN.
MIN_SCALE = np.float32(1e-8)

#: ``(lowest, highest)`` value of each integer dtype in a quantized model: int8/uint8 tensors, int32
#: accumulators and biases. The one such table of tvmquant.
DTYPE_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-(2**31), 2**31 - 1)}
#: The dtypes a tensor is quantized to (int32 only ever holds accumulators and biases).
QUANT_DTYPES = ("int8", "uint8")
#: ``affine``: any zero point; ``symmetric``: zero point 0 and the restricted signed range (int8: [-127, 127]).
SCHEMES = ("affine", "symmetric")


def qrange(dtype: str, scheme: str = "affine", bits: int = 8) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit integer stored in ``dtype``.

    Symmetric schemes use the restricted range (int8: [-127, 127]).

    Examples
    --------
    >>> qrange("int8", "symmetric")
    (-127, 127)
    >>> qrange("uint8", "affine", bits=4)
    (0, 15)
    """
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"dtype must be one of {QUANT_DTYPES}, got {dtype!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    if dtype == "int8":
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        qmin, qmax = 0, (1 << bits) - 1
    if scheme == "symmetric":
        if dtype != "int8":
            raise ValueError("the symmetric scheme needs a signed dtype (int8)")
        qmin += 1
    elif scheme != "affine":
        raise ValueError(f"scheme must be 'affine' or 'symmetric', got {scheme!r}")
    return qmin, qmax


def compute_qparams(a_min, a_max, dtype: str = "int8", scheme: str = "affine", bits: int = 8):
    """Scale and zero point for the real range ``[a_min, a_max]`` (scalars, or arrays for per-channel).

    The range is first widened to contain 0 so that 0.0 is exactly representable.

    Returns
    -------
    scale : np.ndarray of float32
        Same shape as the broadcast of ``a_min`` and ``a_max``; never 0 or NaN.
    zero_point : np.ndarray of int32
        Zero for symmetric schemes; in ``[qmin, qmax]`` otherwise.

    Examples
    --------
    >>> scale, zp = compute_qparams(-1.0, 3.0, "int8", "affine")
    >>> float(scale), int(zp)
    (0.01568627543747425, -64)
    """
    qmin, qmax = qrange(dtype, scheme, bits)
    a_min = np.minimum(np.asarray(a_min, dtype=np.float64), 0.0)
    a_max = np.maximum(np.asarray(a_max, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(a_min)) and np.all(np.isfinite(a_max))):
        raise ValueError(f"calibrated range must be finite, got [{a_min}, {a_max}]")
    if scheme == "symmetric":
        bound = np.maximum(np.abs(a_min), np.abs(a_max))
        scale = (bound / qmax).astype(np.float32)
        scale = np.maximum(scale, MIN_SCALE)
        zero_point = np.zeros(scale.shape, dtype=np.int32)
        return scale, zero_point
    scale = ((a_max - a_min) / (qmax - qmin)).astype(np.float32)
    scale = np.maximum(scale, MIN_SCALE)
    zero_point = qmin - np.round(a_min / scale.astype(np.float64))
    zero_point = np.clip(zero_point, qmin, qmax).astype(np.int32)
    return scale, zero_point


def _broadcast_param(param, ndim: int, axis: int | None):
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    axis = axis % ndim
    shape = [1] * ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


def quantize(x, scale, zero_point, dtype: str = "int8", axis: int | None = None, qmin=None, qmax=None):
    """``clip(round_half_to_even(x / scale) + zero_point, qmin, qmax)`` in float32, as ``dtype``.

    ``axis`` names the channel axis when ``scale``/``zero_point`` are per-channel vectors. ``qmin``/``qmax``
    default to the full range of ``dtype`` (pass the restricted range for symmetric or sub-8-bit schemes).

    Examples
    --------
    >>> quantize(np.array([0.5, 1.5, 2.5, -0.5], np.float32), 1.0, 0)
    array([ 0,  2,  2, -0], dtype=int8)
    """
    lo, hi = DTYPE_RANGES[dtype]
    qmin = lo if qmin is None else qmin
    qmax = hi if qmax is None else qmax
    x = np.asarray(x, dtype=np.float32)
    scale = _broadcast_param(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zero_point = _broadcast_param(np.asarray(zero_point, dtype=np.float32), x.ndim, axis)
    q = np.rint(x / scale) + zero_point
    return np.clip(q, qmin, qmax).astype(dtype)


def dequantize(q, scale, zero_point, axis: int | None = None):
    """``(q - zero_point) * scale`` in float32."""
    q = np.asarray(q)
    scale = _broadcast_param(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    zero_point = _broadcast_param(np.asarray(zero_point, dtype=np.int32), q.ndim, axis)
    return ((q.astype(np.int32) - zero_point).astype(np.float32) * scale).astype(np.float32)


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None):
    """Quantize then dequantize in float32 (simulated quantization)."""
    x = np.asarray(x, dtype=np.float32)
    scale_b = _broadcast_param(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zp_b = _broadcast_param(np.asarray(zero_point, dtype=np.float32), x.ndim, axis)
    # The same float32 operations in the same order as written out, on one buffer (no temporaries).
    q = np.divide(x, scale_b, dtype=np.float32)
    np.rint(q, out=q)
    q += zp_b
    np.clip(q, qmin, qmax, out=q)
    q -= zp_b
    q *= scale_b
    return q


# --------------------------------------------------------------------------------------------------------------
# Requantization
def quantize_multiplier(real_multiplier):
    """Express a positive real multiplier ``M`` as ``multiplier * 2**(-shift)`` with a Q31 multiplier.

    ``multiplier`` is an int32 in ``[2**30, 2**31 - 1]`` (or 0 for ``M == 0``) and ``shift`` an int such
    that ``M ~= multiplier / 2**(31 + shift_right)`` where ``shift_right = shift``; i.e.
    ``M = multiplier * 2**-(31 + shift)``. Works elementwise on arrays (per-channel multipliers).

    Examples
    --------
    >>> quantize_multiplier(0.5)
    (array(1073741824, dtype=int32), array(0, dtype=int32))
    """
    real = np.asarray(real_multiplier, dtype=np.float64)
    if np.any(real < 0) or not np.all(np.isfinite(real)):
        raise ValueError("requantization multipliers must be finite and non-negative")
    mantissa, exponent = np.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    q = np.round(mantissa * (1 << 31)).astype(np.int64)
    carry = q == (1 << 31)
    q = np.where(carry, q // 2, q)
    exponent = np.where(carry, exponent + 1, exponent)
    shift = np.where(real == 0, 0, -exponent).astype(np.int32)
    return q.astype(np.int32), shift


def requantize_fixed_point(acc, multiplier, shift, zero_point, qmin: int, qmax: int, dtype: str):
    """Integer-only requantization of an INT32 accumulator.

    ``out = clip(round_half_away_from_zero(acc * multiplier / 2**(31 + shift)) + zero_point, qmin, qmax)``,
    computed exactly in int64. ``multiplier``/``shift`` come from :func:`quantize_multiplier` and broadcast
    against ``acc`` (pass per-channel vectors shaped for broadcasting).
    """
    acc = np.asarray(acc, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    total_shift = 31 + np.asarray(shift, dtype=np.int64)
    if np.any(total_shift < 1) or np.any(total_shift > 62):
        raise ValueError("requantization shift out of range: the multiplier must be in (2**-31, 1)")
    prod = acc * multiplier
    half = np.left_shift(np.int64(1), total_shift - 1)
    magnitude = np.right_shift(np.abs(prod) + half, total_shift)
    rounded = np.where(prod < 0, -magnitude, magnitude)
    out = rounded + np.asarray(zero_point, dtype=np.int64)
    return np.clip(out, qmin, qmax).astype(dtype)


def requantize(acc, real_multiplier, zero_point, qmin: int, qmax: int, dtype: str):
    """Float requantization ``clip(round_half_to_even(acc * M) + zero_point, qmin, qmax)`` in float32.

    This is what the realized graphs compute (``M = scale_x * scale_w / scale_y``).
    """
    acc = np.asarray(acc, dtype=np.float32)
    scaled = np.rint(acc * np.asarray(real_multiplier, dtype=np.float32))
    out = scaled + np.asarray(zero_point, dtype=np.float32)
    return np.clip(out, qmin, qmax).astype(dtype)


def sqnr_db(reference, approx) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = reference - np.asarray(approx, dtype=np.float64)
    signal_power = float(np.sum(reference * reference))
    noise_power = float(np.sum(noise * noise))
    if noise_power == 0.0:
        return float("inf")
    if signal_power == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal_power / noise_power)
