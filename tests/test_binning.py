"""The compiled histogram-binning kernel (tvmquant.passes.binning) counts exactly what numpy's loop counts."""

from __future__ import annotations

import numpy as np
import pytest

from tvmquant.calibration import PercentileObserver, StreamingHistogram
from tvmquant.calibration import histogram as histogram_module
from tvmquant.calibration import observers as observers_module
from tvmquant.passes import binning


@pytest.fixture
def numpy_bins():
    """Bin (and find extremes) with numpy inside the block, whatever was installed; put the kernels back after."""
    previous = histogram_module._KERNEL[0], observers_module._RANGE_KERNEL[0]
    histogram_module.set_binning_kernel(None)
    observers_module.set_range_kernel(None)
    yield
    histogram_module.set_binning_kernel(previous[0])
    observers_module.set_range_kernel(previous[1])


def _batches(kind: str, rng) -> list:
    if kind == "relu6":  # MobileNetV2's activations: a spike at 0 and one at 6
        return [np.clip(rng.standard_normal(300_000).astype(np.float32) * 3, 0, 6) for _ in range(3)]
    if kind == "growing":  # the range grows batch after batch: the bins re-grow in between
        return [rng.standard_normal(70_001).astype(np.float32) * np.float32(2.0**i) for i in range(4)]
    if kind == "tiny":
        return [rng.standard_normal(5).astype(np.float32), np.zeros(3, np.float32)]
    return [rng.standard_normal(100_003).astype(np.float32) - 0.3]


@pytest.mark.parametrize("kind", ["relu6", "growing", "tiny", "normal"])
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_counts_equal_numpy(kind, signed, numpy_bins):
    rng = np.random.default_rng(7)
    batches = _batches(kind, rng)
    results = []
    for kernel in (None, binning.bin_counts):
        histogram_module.set_binning_kernel(kernel)
        hist = StreamingHistogram(1024, signed=signed)
        for batch in batches:
            hist.add(batch, absolute=not signed)
        results.append((hist.counts.copy(), hist.first_bin, hist.exponent, hist.total))
    numpy_result, kernel_result = results
    assert numpy_result[1:] == kernel_result[1:]
    np.testing.assert_array_equal(numpy_result[0], kernel_result[0])
    assert int(kernel_result[0].sum()) == sum(batch.size for batch in batches)


def test_observer_thresholds_are_the_same_with_the_kernel(numpy_bins):
    batches = _batches("relu6", np.random.default_rng(3)) + _batches("growing", np.random.default_rng(4))
    batches.append(np.random.default_rng(5).standard_normal(1 << 20).astype(np.float32))  # big: the range kernel
    ranges = []
    for kernel in (None, binning.bin_counts):
        histogram_module.set_binning_kernel(kernel)
        observers_module.set_range_kernel(None if kernel is None else binning.value_range)
        observer = PercentileObserver(99.99, 2048, symmetric=False, name="relu")
        for batch in batches:
            observer.collect(batch.reshape(-1, 1))
        ranges.append(observer.compute())
    assert ranges[0] == ranges[1]


@pytest.mark.parametrize("size", [(1 << 20) + 13, 1 << 21])
def test_value_range_equals_numpy_and_flags_nan_and_inf(size):
    values = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    assert binning.value_range(values) == (values.min(), values.max())
    square = values[: 1 << 20].reshape(1 << 10, 1 << 10)  # any contiguous shape is taken
    assert binning.value_range(square) == (square.min(), square.max())
    for bad in (np.nan, np.inf, -np.inf):
        for where in (7, size - 1):  # in the kernel's part, and in the tail numpy takes
            broken = values.copy()
            broken[where] = bad
            assert all(np.isnan(v) for v in binning.value_range(broken)), (bad, where)
    assert binning.value_range(values[:1000]) is None  # small: numpy's own is faster
    assert binning.value_range(values.astype(np.float64)) is None


def test_kernel_leaves_what_it_does_not_take_to_numpy():
    values = np.arange(10, dtype=np.float64)
    assert binning.bin_counts(values, 1.0, 0, 10, False) is None  # float64
    strided = np.arange(20, dtype=np.float32)[::2]
    assert binning.bin_counts(strided, 1.0, 0, 20, False) is None  # not one contiguous block
    # An unaligned start (numpy's allocations are not 64-byte aligned) is taken.
    counts = binning.bin_counts(np.arange(21, dtype=np.float32)[1:], 1.0, 0, 21, False)
    np.testing.assert_array_equal(counts, [0] + [1] * 20)


def test_kernel_never_writes_outside_the_bins():
    values = np.array([0.5, 3.5, -7.0, 100.0], np.float32)
    with pytest.raises(AssertionError, match="outside the grown range"):
        binning.bin_counts(values, np.float32(1.0), 0, 4, False)


def test_importing_the_passes_installs_the_kernel():
    import tvmquant.passes  # noqa: F401

    assert histogram_module._KERNEL[0] is binning.bin_counts


def test_kernels_compiled_ahead_are_used_and_a_failed_ahead_compile_is_redone_where_it_raises(monkeypatch):
    from tvmquant.passes import host_kernels

    make = binning._KERNELS["bin_signed"]
    host_kernels.compile_ahead({"test_ahead_bin": make}).join()
    compiled = host_kernels.function("test_ahead_bin", lambda: pytest.fail("compiled again"))
    values = np.array([0.5, 1.5, 1.7, 3.2], np.float32)
    partial = np.empty((1, binning._WAYS, 4), np.int32)
    from tvmquant._compat import tensor_view

    compiled(tensor_view(values), tensor_view(partial), np.float32(1.0), 0)
    assert partial.sum(axis=(0, 1)).tolist() == [1, 2, 0, 1]

    real = host_kernels._compile
    calls = []

    def failing_once(prims):
        calls.append(sorted(prims))
        if len(calls) == 1:
            raise RuntimeError("LLVM failed in the background")
        return real(prims)

    monkeypatch.setattr(host_kernels, "_compile", failing_once)
    host_kernels.compile_ahead({"test_ahead_retry": make}).join()
    assert callable(host_kernels.function("test_ahead_retry", make))  # compiled again, on this thread
    assert calls == [["test_ahead_retry"], ["test_ahead_retry"]]

    monkeypatch.setattr(host_kernels, "_compile", lambda prims: (_ for _ in ()).throw(RuntimeError("no LLVM")))
    host_kernels.compile_ahead({"test_ahead_broken": make}).join()
    with pytest.raises(RuntimeError, match="no LLVM"):
        host_kernels.function("test_ahead_broken", make)
    assert host_kernels.compile_ahead({"test_ahead_bin": make}) is None  # already compiled: nothing to do


def test_calibration_compiles_ahead_only_the_kernels_its_tensors_will_call(monkeypatch):
    from tvmquant.passes import error_kernels, host_kernels

    asked = []
    monkeypatch.setattr(host_kernels, "compile_ahead", lambda kernels: asked.append(sorted(kernels)))
    binning.compile_ahead(binning._RANGE_MIN - 1, histograms=False)  # small tensors, max observers: none
    binning.compile_ahead(binning._RANGE_MIN, histograms=True)
    error_kernels.compile_ahead(error_kernels._KERNEL_MIN - 1)  # numpy sums these
    assert asked == [[], ["bin_absolute", "bin_signed", "value_range"]]
