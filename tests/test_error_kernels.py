"""The summary's SQNR kernels (tvmquant.passes.error_kernels) and its reuse of calibration's FP32 runs."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tvmquant.passes import error_kernels
from tvmquant.quant_math import fake_quantize

PARAMS = [(np.float32(0.05), 3, -128, 127), (np.float32(0.02), 0, 0, 255)]


def _values(rng, size=300_001):
    x = (rng.standard_normal(size) * 2).astype(np.float32)
    x[:2000] = (np.arange(2000, dtype=np.float32) - 1000 + 0.5) * np.float32(0.05)  # ties of x / scale
    x[2000:2100] = 1e4  # clipped
    return x


@pytest.mark.parametrize("params", PARAMS, ids=["int8", "uint8"])
def test_fake_quantize_in_the_kernel_is_bit_exact_and_sums_are_float64(params):
    rng = np.random.default_rng(31)
    x = _values(rng)
    ref = x + rng.standard_normal(x.size).astype(np.float32) * np.float32(0.01)
    y = x.copy()
    signal, noise = error_kernels.fake_quantize_error(y, ref, params, write=True)
    expected = fake_quantize(x, *params)
    np.testing.assert_array_equal(y.view(np.int32), expected.view(np.int32))
    ref64, y64 = ref.astype(np.float64), expected.astype(np.float64)
    assert signal == pytest.approx(np.dot(ref64, ref64), rel=1e-12)
    assert noise == pytest.approx(np.dot(ref64 - y64, ref64 - y64), rel=1e-12)
    # Not written: the same sums, x untouched.
    kept = x.copy()
    assert error_kernels.fake_quantize_error(x, ref, params) == pytest.approx((signal, noise), rel=1e-12)
    np.testing.assert_array_equal(x, kept)
    # No parameters: the error of x itself.
    _, plain = error_kernels.fake_quantize_error(x, ref)
    assert plain == pytest.approx(np.sum((ref64 - x.astype(np.float64)) ** 2), rel=1e-12)


def test_numpy_takes_what_the_kernel_does_not():
    """Per-channel parameters, a written array that shares memory with the reference, small and float64
    arrays: numpy's fake_quantize, the same values."""
    rng = np.random.default_rng(32)
    x = rng.standard_normal((4, 100_000)).astype(np.float32)
    scale = np.array([0.01, 0.02, 0.03, 0.04], np.float32)
    per_channel = (scale, np.zeros(4, np.int32), -127, 127, 0)
    y = x.copy()
    error_kernels.fake_quantize_error(y, x.copy(), per_channel, write=True)
    np.testing.assert_array_equal(y, fake_quantize(x, *per_channel))
    same = x.copy()
    signal, noise = error_kernels.fake_quantize_error(same, same, PARAMS[0], write=True)
    np.testing.assert_array_equal(same, fake_quantize(x, *PARAMS[0]))
    assert signal > 0 and noise == 0.0  # compared with itself after the write
    small = x[0, :100].copy()
    error_kernels.fake_quantize_error(small, x[0, :100], PARAMS[0], write=True)
    np.testing.assert_array_equal(small, fake_quantize(x[0, :100], *PARAMS[0]))


def test_summary_reuses_calibrations_fp32_runs_with_the_same_sqnr(monkeypatch):
    """quantize keeps the FP32 activations of the summary's batches as calibration runs them: the summary then
    runs only the simulated model, and its SQNR is what it measures running both."""
    from models import calibration_images, residual_cnn_dynamic_batch

    import tvmquant
    from tvmquant import api

    calib = calibration_images(16)
    counted = {"on": False, "runs": 0}
    run_vm, measure = api.run_vm, api.QuantizedModel.measure_sqnr

    def counting_run(*args, **kwargs):
        counted["runs"] += counted["on"]
        return run_vm(*args, **kwargs)

    def counting_measure(*args, **kwargs):
        counted["on"] = True
        try:
            return measure(*args, **kwargs)
        finally:
            counted["on"] = False

    monkeypatch.setattr(api, "run_vm", counting_run)
    monkeypatch.setattr(api.QuantizedModel, "measure_sqnr", counting_measure)
    model = residual_cnn_dynamic_batch()
    reused = tvmquant.quantize(model, calib_data=calib, progress=False, calib_batch=4).sqnr
    assert counted["runs"] == 2  # 8 images in batches of 4: the simulated runs only
    counted["runs"] = 0
    kept_nothing = functools.partial(api.ReferenceRuns, max_bytes=0)
    monkeypatch.setattr(api, "ReferenceRuns", kept_nothing)
    measured = tvmquant.quantize(model, calib_data=calib, progress=False, calib_batch=4).sqnr
    assert counted["runs"] == 4  # nothing kept (over the memory budget): FP32 and simulated runs
    assert set(measured) == set(reused) and len(reused) > 5
    for name, value in reused.items():
        assert value == pytest.approx(measured[name], abs=1e-6), name
