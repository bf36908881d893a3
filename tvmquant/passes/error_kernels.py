"""Compiled kernels for the summary's SQNR: fake-quantize and sum the error in one pass, on every core.

:meth:`tvmquant.api.QuantizedModel.measure_sqnr` fake-quantizes every activation of a few calibration batches
and sums signal and noise energies. In numpy that is six passes for the fake quantization and three for the
sums (a temporary for the difference, two dot products), one core each: 1 s of the 1.3 s MobileNetV2's summary
took. :func:`fake_quantize_error` does it in one pass, spread over the cores, with the float32 operations of
:func:`tvmquant.quant_math.fake_quantize` in the same order (its values are the same bits) and float64 sums.
"""

from __future__ import annotations

import numpy as np

__all__ = ["compile_ahead", "fake_quantize_error"]

#: Lanes of the float64 accumulators.
_LANES = 8

#: Fewer values than this go to numpy (a kernel call and waking the pool cost tens of microseconds).
_KERNEL_MIN = 1 << 16


def _kernel(quantize: bool, write: bool):
    from tvm.script import tirx as T

    lanes = _LANES

    @T.prim_func(s_tir=True)
    def error_sums(
        x_handle: T.handle,
        ref_handle: T.handle,
        sums_handle: T.handle,
        scale: T.float32,
        zero_point: T.float32,
        qmin: T.float32,
        qmax: T.float32,
    ):
        # noalias holds: a written ``x`` is never ``ref`` (fake_quantize_error), and one only read may be.
        T.func_attr({"global_symbol": "error_sums", "tirx.noalias": True})
        n = T.int64()
        threads = T.int64()
        x = T.match_buffer(x_handle, (n,), "float32", align=4)
        ref = T.match_buffer(ref_handle, (n,), "float32", align=4)
        sums = T.match_buffer(sums_handle, (threads, 2, lanes), "float64", align=4)
        for t in T.parallel(threads):
            for lane in T.vectorized(lanes):
                sums[t, 0, lane] = T.float64(0)
                sums[t, 1, lane] = T.float64(0)
            for i in range(n // (threads * lanes)):
                for lane in T.vectorized(lanes):
                    at = T.meta_var((t * (n // (threads * lanes)) + i) * lanes + lane)
                    if quantize:
                        # quant_math.fake_quantize, operation by operation (float32, same order).
                        y = T.meta_var(
                            (T.min(T.max(T.nearbyint(x[at] / scale) + zero_point, qmin), qmax) - zero_point) * scale
                        )
                    else:
                        y = T.meta_var(x[at])
                    if write:
                        x[at] = y
                    r = T.meta_var(T.Cast("float64", ref[at]))
                    d = T.meta_var(r - T.Cast("float64", y))
                    sums[t, 0, lane] = sums[t, 0, lane] + r * r
                    sums[t, 1, lane] = sums[t, 1, lane] + d * d

    return error_sums


def _name(quantize: bool, write: bool) -> str:
    return f"error_sums_q{int(quantize)}_w{int(write)}"


def _function(quantize: bool, write: bool):
    from . import host_kernels

    return host_kernels.function(_name(quantize, write), lambda: _kernel(quantize, write))


def compile_ahead(largest: int) -> None:
    """Start compiling the kernels the summary's SQNR uses on a background thread
    (:func:`tvmquant.passes.host_kernels.compile_ahead`), if its largest tensor (``largest`` values) reaches
    :data:`_KERNEL_MIN` (smaller ones go to numpy)."""
    from . import host_kernels

    if largest < _KERNEL_MIN:
        return
    host_kernels.compile_ahead(
        {_name(q, w): (lambda q=q, w=w: _kernel(q, w)) for q, w in ((False, False), (True, False), (True, True))}
    )


def _numpy(x, ref, params, write: bool) -> tuple[float, float]:
    from ..quant_math import fake_quantize

    y = x if params is None else fake_quantize(x, *params)
    if write and y is not x:
        x[...] = y
    ref = np.asarray(ref, np.float32).reshape(-1)
    diff = np.subtract(ref, np.asarray(y, np.float32).reshape(-1), dtype=np.float32)
    return float(np.dot(ref, ref)), float(np.dot(diff, diff))


def fake_quantize_error(x: np.ndarray, ref: np.ndarray, params=None, write: bool = False) -> tuple[float, float]:
    """``(sum(ref**2), sum((ref - y)**2))`` with ``y = fake_quantize(x, *params)`` (``x`` itself when
    ``params`` is None); with ``write``, ``y`` is written into ``x``, which must then not share memory with
    ``ref``.

    ``params``: ``(scale, zero_point, qmin, qmax)`` of a per-tensor quantization; per-channel parameters
    (``params`` of five, an axis last), arrays other than float32 and contiguous, and small arrays go through
    numpy (:func:`tvmquant.quant_math.fake_quantize`).
    """
    from .._compat import tensor_view
    from ..threads import use_physical_cores

    per_tensor = params is None or len(params) == 4 or params[4] is None
    if params is not None and len(params) == 5 and params[4] is None:
        params = params[:4]
    arrays = (np.asarray(x), np.asarray(ref))
    if (
        not per_tensor
        or any(a.dtype != np.float32 or not a.flags.c_contiguous for a in arrays)
        or arrays[0].shape != arrays[1].shape
        or arrays[0].size < _KERNEL_MIN
        or (write and (not arrays[0].flags.writeable or np.shares_memory(arrays[0], arrays[1])))
    ):
        return _numpy(x, ref, params, write)
    values, reference = (a.reshape(-1) for a in arrays)
    threads = use_physical_cores()
    step = threads * _LANES
    body = values.size - values.size % step
    sums = np.empty((threads, 2, _LANES), np.float64)
    scale, zero_point, qmin, qmax = params if params is not None else (1.0, 0.0, 0.0, 0.0)
    _function(params is not None, write)(
        tensor_view(values[:body]),
        tensor_view(reference[:body]),
        tensor_view(sums),
        np.float32(np.asarray(scale, np.float32).reshape(-1)[0]),
        np.float32(np.asarray(zero_point, np.float32).reshape(-1)[0]),
        np.float32(qmin),
        np.float32(qmax),
    )
    signal, noise = float(sums[:, 0].sum()), float(sums[:, 1].sum())
    if body < values.size:
        tail_signal, tail_noise = _numpy(values[body:], reference[body:], params, write)
        signal, noise = signal + tail_signal, noise + tail_noise
    return signal, noise
