"""Tests of tvmquant.calibration: observers, streaming histograms and the threshold searches.

Exact hand-computed cases, streaming == one-shot, count-preserving re-binning, an independent reference
(NVIDIA's TensorRT entropy loop, ported below) and ONNX Runtime's calibrators on the same data.
"""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest

from tvmquant.calibration import (
    CalibrationError,
    CalibrationWarning,
    EntropyObserver,
    MaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelMaxObserver,
    PerChannelObserver,
    StreamingHistogram,
    make_observer,
)
from tvmquant.calibration.histogram import (
    candidate_windows,
    entropy_divergences,
    entropy_window,
    fit_exponent,
    histogram_quantile,
    mse_errors,
)
from tvmquant.config import MSE, Entropy, Max, Percentile, PerChannel, TensorSpec
from tvmquant.quant_math import MIN_SCALE, compute_qparams, fake_quantize, sqnr_db


def _outlier_batches(seed: int, num_batches: int = 12, size: int = 5000) -> list[np.ndarray]:
    """Batches whose range keeps growing (both tails), with a zero batch and a tiny one first."""
    rng = np.random.default_rng(seed)
    batches = [np.zeros(7, np.float32), np.float32(1e-3) * rng.standard_normal(50).astype(np.float32)]
    for i in range(num_batches):
        batch = rng.standard_normal(size).astype(np.float32) * np.float32(1.0 + i)
        batch[rng.integers(size)] = np.float32(30.0 * (i + 1) * (-1) ** i)  # outliers on alternating sides
        batches.append(batch.reshape(50, -1) if i % 3 == 0 else batch)
    return batches


def _observers_all_methods():
    return [
        lambda: MaxObserver(symmetric=False, name="t"),
        lambda: MaxObserver(symmetric=True, name="t"),
        lambda: PercentileObserver(99.9, 256, symmetric=True, name="t"),
        lambda: PercentileObserver(99.9, 256, symmetric=False, name="t"),
        lambda: EntropyObserver(256, 128, 128, symmetric=True, name="t"),
        lambda: EntropyObserver(256, 128, 128, symmetric=False, name="t"),
        lambda: MSEObserver(256, symmetric=True, name="t"),
        lambda: MSEObserver(256, symmetric=False, name="t"),
    ]


# ------------------------------------------------------------------------------------------------------------
# Import hygiene
def test_import_does_not_load_tvm_or_onnx():
    """The calibration code (and the config it reads) imports neither TVM nor ONNX.

    ``tvmquant/__init__.py`` imports TVM by design, and Python runs it before any subpackage; so the
    subprocess registers a bare ``tvmquant`` package first and imports ``tvmquant.calibration`` alone.
    """
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('tvmquant')\n"
        "package = types.ModuleType('tvmquant')\n"
        "package.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['tvmquant'] = package\n"
        "import tvmquant.calibration\n"
        "tvmquant.calibration.make_observer(tvmquant.config.TensorSpec(), 'x').collect([1.0])\n"
        "heavy = ('tvm', 'tvm_ffi', 'onnx', 'onnxruntime', 'torch')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", f"importing tvmquant.calibration loaded {result.stdout.strip()}"


# ------------------------------------------------------------------------------------------------------------
# Hand-computed cases
def test_max_observer_exact():
    observer = MaxObserver(name="x")
    observer.collect(np.array([0.5, -1.25], np.float32))
    observer.collect(np.array([[2.0, 0.0]], np.float32))
    observer.collect(np.array([], np.float32))
    assert observer.compute() == (-1.25, 2.0)
    symmetric = MaxObserver(symmetric=True, name="x")
    symmetric.collect(np.array([0.5, -3.0, 2.0], np.float16))
    symmetric.collect(np.array([1, 2], np.int32))
    assert symmetric.compute() == (-3.0, 3.0)


def test_per_channel_max_observer_exact():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)  # OIHW, axis 1 = 5 channels
    observer = PerChannelMaxObserver(axis=1, symmetric=False, name="w")
    observer.collect(weight[:1])
    observer.collect(weight[1:])
    a_min, a_max = observer.compute()
    np.testing.assert_array_equal(a_min, weight.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(a_max, weight.max(axis=(0, 2, 3)))
    symmetric = PerChannelMaxObserver(axis=-3, name="w")
    symmetric.collect(weight)
    neg, pos = symmetric.compute()
    np.testing.assert_array_equal(pos, np.abs(weight).max(axis=(0, 2, 3)))
    np.testing.assert_array_equal(neg, -pos)
    with pytest.raises(CalibrationError, match="'w'.*4 channels"):
        symmetric.collect(weight[:, :4])


def test_percentile_hand_cases():
    # One value per bin [k, k+1): width 1 (20 bins fit the 2 * 16 capacity, 40 half-width bins do not).
    symmetric = PercentileObserver(90.0, num_bins=16, symmetric=True, name="x")
    symmetric.collect(-(np.arange(20, dtype=np.float32) + 0.5))
    assert symmetric.histogram.bin_width == 1.0
    # 90% of 20 = 18 values lie below 18.0: bins 0..17 hold exactly 18.
    assert symmetric.compute() == (-18.0, 18.0)
    affine = PercentileObserver(90.0, num_bins=16, symmetric=False, name="x")
    affine.collect(np.arange(-10, 10, dtype=np.float32) + 0.5)  # -9.5 .. 9.5, bins k = -10 .. 9
    # 10% (2 values) below -8.0 and 90% (18 values) below 8.0: 10% clipped from each tail.
    assert affine.compute() == (-8.0, 8.0)
    # Interpolation inside a bin: a quarter of the data in bin 1 -> 1.25 bins.
    assert histogram_quantile(np.array([0, 4, 0, 0]), 0.25) == 1.25
    assert histogram_quantile(np.array([0, 4, 0, 0]), 0.0) == 1.0


def test_entropy_divergences_hand_case():
    counts = np.array([4, 2, 1, 1])  # T = 8, two quantization levels
    starts, stops = np.zeros(3, np.int64), np.array([2, 3, 4])
    # stop=2: P = [4, 2+2]/8, Q = [4, 2]/6 (one bin per level).
    kl_2 = 0.5 * math.log(0.5 / (4 / 6)) + 0.5 * math.log(0.5 / (2 / 6))
    # stop=3: levels {0, 1} -> 6 over 2 bins, {2} -> 1; P = [4, 2, 1+1]/8, Q = [3, 3, 1]/7.
    kl_3 = 0.5 * math.log(0.5 / (3 / 7)) + 0.25 * math.log(0.25 / (3 / 7)) + 0.25 * math.log(0.25 / (1 / 7))
    # stop=4: levels {0, 1} -> 3, 3 and {2, 3} -> 1, 1; P = [4, 2, 1, 1]/8, Q = [3, 3, 1, 1]/8.
    kl_4 = 0.5 * math.log(0.5 / (3 / 8)) + 0.25 * math.log(0.25 / (3 / 8))
    divergences = entropy_divergences(counts, starts, stops, num_levels=2)
    np.testing.assert_allclose(divergences, [kl_2, kl_3, kl_4], rtol=1e-13, atol=0)
    assert entropy_window(counts, starts, stops, num_levels=2) == 2
    # An empty last bin with values clipped into it: P > 0 = Q there, divergence inf.
    assert entropy_divergences(np.array([3, 0, 5]), np.array([0]), np.array([2]), 2)[0] == np.inf


def test_mse_errors_hand_case():
    counts = np.array([3, 0, 0, 1])
    # Window [0, 1): scale 1 bin, 3 values * 1/12 of noise; the value in bin 3 is clipped from 2 bins out:
    # mean of (x - 1)^2 over [3, 4) = 4 + 2 + 1/3.  Window [0, 4): scale 4, 4 values * 16/12.
    errors = mse_errors(counts, 0, np.array([0, 0]), np.array([1, 4]), num_steps=1)
    np.testing.assert_allclose(errors, [(3 / 12 + 4 + 2 + 1 / 3) / 4, (4 * 16 / 12) / 4], rtol=1e-15, atol=0)
    # Exact zeros are not rounded: with all 3 in bin 0 at exactly 0, window [0, 1) only pays the clip.
    errors = mse_errors(counts, 0, np.array([0]), np.array([1]), num_steps=1, num_zeros=3)
    np.testing.assert_allclose(errors, [(4 + 2 + 1 / 3) / 4], rtol=1e-15, atol=0)
    # Left tail of a signed histogram: bins k = -2..1, window [k=-1, k=1) clips bin k=-2 from 0 bins out.
    errors = mse_errors(np.array([2, 0, 0, 0]), -2, np.array([1]), np.array([3]), num_steps=2)
    np.testing.assert_allclose(errors, [2 * (1 / 3) / 2], rtol=1e-15, atol=0)


def test_candidate_windows():
    starts, stops = candidate_windows(-2, 5, signed=True)  # bins k = -2..2
    assert starts.tolist() == [1, 0, 0] and stops.tolist() == [3, 4, 5]
    starts, stops = candidate_windows(0, 5, signed=False, min_width=3)
    assert stops.tolist() == [3, 4, 5] and starts.tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------------------------------------
# The streaming histogram
def test_fit_exponent_is_smallest():
    cases = [(0.0, 19.5, 32), (-1.0, 1.0, 4), (-3e38, 3e38, 4096), (0.0, 1e-44, 16), (-5.0, 0.0, 8)]
    for lo, hi, capacity in cases:
        exponent = fit_exponent(lo, hi, capacity)
        needed = math.floor(math.ldexp(hi, -exponent)) - math.floor(math.ldexp(lo, -exponent)) + 1
        needed_finer = math.floor(math.ldexp(hi, 1 - exponent)) - math.floor(math.ldexp(lo, 1 - exponent)) + 1
        assert capacity // 2 < needed <= capacity < needed_finer


def test_rebinning_preserves_counts_and_matches_direct_binning():
    """Counts survive every growth exactly, and equal binning all the data on the final grid."""
    for signed in (True, False):
        hist = StreamingHistogram(64, signed=signed)
        everything = []
        for batch in _outlier_batches(1):
            values = batch.reshape(-1) if signed else np.abs(batch.reshape(-1))
            before = hist.total
            hist.add(values)
            everything.append(values)
            assert int(hist.counts.sum()) == hist.total == before + values.size
            assert 64 < len(hist.counts) <= 128 or hist.exponent is None
        data = np.concatenate(everything).astype(np.float64)
        expected, _ = np.histogram(data, bins=hist.edges())
        np.testing.assert_array_equal(hist.counts, expected)
        assert hist.edges()[0] <= min(data.min(), 0.0) and data.max() < hist.edges()[-1]


def test_histogram_zeros_then_growth_and_subnormals():
    hist = StreamingHistogram(16, signed=True)
    hist.add(np.zeros(5, np.float32))
    assert hist.exponent is None and hist.counts.tolist() == [5]
    # A negative subnormal next to values near float32's max: x / width underflows to -0.0 in float32,
    # yet it must land in bin -1, [-width, 0), not with the zeros.
    batches = [np.array([-1e-44, 3e38, -1e-30], np.float32), np.array([-3e38, 2.0], np.float32)]
    for batch in batches:
        hist.add(batch)
    assert int(hist.counts.sum()) == 10
    assert hist.counts[0 - hist.first_bin] == 6 and hist.counts[-1 - hist.first_bin] == 2
    everything = np.concatenate([np.zeros(5)] + [b.astype(np.float64) for b in batches])
    np.testing.assert_array_equal(hist.counts, np.histogram(everything, bins=hist.edges())[0])
    tiny = StreamingHistogram(16, signed=False)
    tiny.add(np.array([1e-45, 3e-45, 0.0], np.float32))  # subnormal range: binned through ldexp
    assert int(tiny.counts.sum()) == 3 and tiny.bin_width < 1e-45


# ------------------------------------------------------------------------------------------------------------
# Streaming equals one-shot
@pytest.mark.parametrize("make", _observers_all_methods())
def test_streaming_equals_one_shot(make):
    """Many batches give exactly the range one batch of all the data gives (the grids nest, see histogram.py).

    The contract asks for agreement within one bin for histogram methods; power-of-two bins make it exact.
    """
    batches = _outlier_batches(2)
    streamed = make()
    for batch in batches:
        streamed.collect(batch)
    one_shot = make()
    one_shot.collect(np.concatenate([b.reshape(-1) for b in batches]))
    assert streamed.compute() == one_shot.compute()
    reordered = make()
    for batch in batches[::-1]:
        reordered.collect(batch)
    assert reordered.compute() == one_shot.compute()


def test_observers_do_not_modify_inputs():
    batch = np.array([-2.0, 0.5, np.nan, 3.0], np.float32)
    copy = batch.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        for make in _observers_all_methods():
            make().collect(batch)
    np.testing.assert_array_equal(batch, copy)


# ------------------------------------------------------------------------------------------------------------
# Against the raw data and an independent implementation
def test_percentile_within_one_bin_of_numpy():
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.standard_normal(100_000), 50.0 * rng.standard_normal(20)]).astype(np.float32)
    for symmetric in (True, False):
        observer = PercentileObserver(99.9, 512, symmetric=symmetric, name="x")
        for batch in np.array_split(data, 7):
            observer.collect(batch)
        a_min, a_max = observer.compute()
        width = observer.histogram.bin_width
        if symmetric:
            assert abs(a_max - np.percentile(np.abs(data), 99.9)) <= width
        else:
            assert abs(a_max - np.percentile(data, 99.9)) <= width
            assert abs(a_min - np.percentile(data, 0.1)) <= width


def _tensorrt_entropy_reference(bins, num_quantized_bins, start_bin):
    """NVIDIA pytorch_quantization's ``_compute_amax_entropy`` loop, ported (with its ``bins[0] = bins[1]``).

    Returns the number of bins kept and the divergence of every candidate, ``inf`` where P > 0 = Q.
    """
    bins = np.asarray(bins, dtype=np.float64).copy()
    bins[0] = bins[1]
    divergences = []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=num_quantized_bins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        density_counts = np.zeros(num_quantized_bins)
        for idx, level in enumerate(digitized):
            if level != -1:
                density_counts[level] += bins[idx]
        for level, count in Counter(digitized).items():
            if level != -1:
                density_counts[level] /= count
        candidate = np.array([density_counts[level] if level != -1 else 0.0 for level in digitized])
        reference = bins[:i].copy()
        reference[-1] += bins[i:].sum()
        p, q = reference / reference.sum(), candidate / candidate.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / q), 0.0)
        divergences.append(np.inf if np.any((p > 0) & (q == 0)) else terms.sum())
    divergences = np.array(divergences)
    return start_bin + len(divergences) - 1 - int(np.argmin(divergences[::-1])), divergences


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_matches_tensorrt_reference_exactly(seed):
    """Same chosen bin, and divergences within 1e-12, as the TensorRT loop (sparse tails: inf cases)."""
    rng = np.random.default_rng(seed)
    data = np.abs(rng.laplace(size=30_000)).astype(np.float32)
    observer = EntropyObserver(96, start_bins=64, num_quantized_bins=64, symmetric=True, name="x")
    observer.collect(data)
    counts = observer.histogram.counts
    kept, reference = _tensorrt_entropy_reference(counts, 64, 64)
    starts, stops = candidate_windows(0, len(counts), signed=False, min_width=64)
    tweaked = counts.copy()
    tweaked[0] = tweaked[1]
    mine = entropy_divergences(tweaked, starts, stops, 64)
    np.testing.assert_array_equal(np.isinf(mine), np.isinf(reference))
    finite = np.isfinite(reference)
    np.testing.assert_allclose(mine[finite], reference[finite], rtol=0, atol=1e-12)
    assert observer.compute()[1] == min(kept * observer.histogram.bin_width, float(data.max()))


def test_affine_entropy_on_one_sided_data_is_tensorrt_on_x():
    """ReLU-like data: the affine windows are [0, r), so the search is TensorRT's on x with 2 * 128 levels."""
    rng = np.random.default_rng(4)
    data = np.maximum(rng.standard_normal(20_000), 0).astype(np.float32)
    observer = EntropyObserver(256, start_bins=128, num_quantized_bins=128, symmetric=False, name="relu")
    observer.collect(data)
    kept, _ = _tensorrt_entropy_reference(observer.histogram.counts, 256, 256)
    a_min, a_max = observer.compute()
    assert a_min == 0.0 and a_max == min(kept * observer.histogram.bin_width, float(data.max()))


def test_mse_threshold_near_brute_force_optimum():
    """The histogram model's range costs at most 1% more real MSE than the best of a fine threshold grid."""
    rng = np.random.default_rng(5)
    data = np.concatenate([rng.laplace(size=60_000), [40.0, -35.0]]).astype(np.float32)
    for dtype, scheme in (("int8", "symmetric"), ("uint8", "affine")):
        qmin, qmax = (-127, 127) if scheme == "symmetric" else (0, 255)
        observer = MSEObserver(1024, qmin=qmin, qmax=qmax, symmetric=scheme == "symmetric", name="x")
        for batch in np.array_split(data, 5):
            observer.collect(batch)
        a_min, a_max = observer.compute()
        mse = _real_mse_function(data, dtype, scheme)
        thresholds = np.linspace(1.0, 40.0, 400)
        best = min(mse(max(-t, float(data.min())), min(t, float(data.max()))) for t in thresholds)
        assert mse(a_min, a_max) <= 1.01 * best


def _real_mse_function(data, dtype, scheme):
    qmin, qmax = (-127, 127) if scheme == "symmetric" else (0, 255)

    def mse(a_min, a_max):
        scale, zero_point = compute_qparams(a_min, a_max, dtype, scheme)
        return float(np.mean((fake_quantize(data, scale, zero_point, qmin, qmax) - data) ** 2))

    return mse


# ------------------------------------------------------------------------------------------------------------
# ONNX Runtime's calibrators on the same data
def _identity_model(path):
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


class _Reader:
    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"x": batch}


@pytest.mark.parametrize("symmetric", [False, True])
def test_max_matches_onnxruntime_minmax_exactly(tmp_path, symmetric):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    batches = [b.reshape(-1) for b in _outlier_batches(6, num_batches=5, size=2000)]
    _identity_model(tmp_path / "identity.onnx")
    calibrator = create_calibrator(
        tmp_path / "identity.onnx",
        augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"symmetric": symmetric},
    )
    calibrator.collect_data(_Reader(batches))
    ort_min, ort_max = (np.asarray(v).item() for v in calibrator.compute_data()["x"].range_value)
    observer = MaxObserver(symmetric=symmetric, name="x")
    for batch in batches:
        observer.collect(batch)
    assert observer.compute() == (ort_min, ort_max)


def _ort_collector(method, symmetric, num_bins, num_quantized_bins=128, percentile=99.99):
    from onnxruntime.quantization.calibrate import HistogramCollector

    return HistogramCollector(method, symmetric, num_bins, num_quantized_bins, percentile, "same")


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_against_onnxruntime(symmetric):
    """Tolerance: one ORT bin plus one of ours.

    Definitions differ in two ways. (1) ORT returns the left edge of the bin where the cumulative count
    reaches the percentile; we interpolate inside our bin. Both are within a bin of the true percentile.
    (2) Affine: ORT clips ``(100 - p) / 2`` percent from each tail, QUANT_MATH.md clips ``100 - p`` percent
    from each, so ORT is run with ``p_ort = 2 p - 100``. ORT also keeps its first batch's bin width and
    appends bins as the range grows (a histogram of |x|), or widens a histogram of x over
    ``[-max|x|, max|x|]``: its final width is read from its edges.
    """
    rng = np.random.default_rng(7)
    batches = [rng.laplace(size=50_000).astype(np.float32) * np.float32(1 + i % 3) for i in range(4)]
    p = 99.9
    collector = _ort_collector("percentile", symmetric, 2048, percentile=p if symmetric else 2 * p - 100)
    observer = PercentileObserver(p, 2048, symmetric=symmetric, name="x")
    with contextlib.redirect_stdout(io.StringIO()):
        for batch in batches:
            collector.collect({"x": batch})
            observer.collect(batch)
        ort = collector.compute_collection_result()["x"]
    ort_edges = collector.histogram_dict["x"][1]
    tolerance = float(ort_edges[1] - ort_edges[0]) + observer.histogram.bin_width
    a_min, a_max = observer.compute()
    assert abs(a_max - float(ort[1])) <= tolerance
    assert abs(a_min - float(ort[0])) <= tolerance


def test_entropy_against_onnxruntime_same_histogram():
    """Same (mirrored) histogram into ORT's ``get_entropy_threshold``; tolerance: 64 bins (its grid step).

    ORT implements MXNet's variant of the KL search on a histogram of x over ``[-T, T]``: windows of
    ``2 i + 1`` bins around 0, merged into ``num_quantized_bins`` groups of ``(2 i + 1) // L`` bins with the
    remainder added to the last group's sum but left at ``Q = 0`` when expanded, eps-smoothing of P and Q,
    ``Q`` truncated to int64 and KL in float32. The ``Q = 0`` remainder makes every window whose width is not
    1 modulo ``L`` pay a smoothing penalty, so ORT's threshold lands on (or next to) a multiple of ``L / 2``
    bins: a grid with a step of ``L / 2 = 128`` bins here. We follow TensorRT (groups of ``i / L`` bins, no
    smoothing, see ``test_entropy_matches_tensorrt_reference_exactly``). We allow one ORT grid step.
    The histogram is dense with huge counts so that ORT's int64 and float32 rounding do not matter.
    """
    num_bins, top = 1024, 6.0
    edges = np.linspace(0.0, top, num_bins + 1)
    for cdf in (np.array([math.erf(e / math.sqrt(2.0)) for e in edges]), 1.0 - np.exp(-edges * 14.0 / 6.0)):
        counts = np.round(np.diff(cdf) * 1e12).astype(np.int64)
        starts, stops = candidate_windows(0, num_bins, signed=False, min_width=128)
        mine = stops[entropy_window(counts, starts, stops, 128)] * top / num_bins
        mirrored = np.concatenate([counts[::-1], counts])
        signed_edges = np.linspace(-top, top, 2 * num_bins + 1).astype(np.float32)
        collector = _ort_collector("entropy", True, 2 * num_bins, num_quantized_bins=256)
        with contextlib.redirect_stdout(io.StringIO()):
            _, ort = collector.get_entropy_threshold(
                (mirrored, signed_edges, np.float32(-top), np.float32(top), np.float32(top)), 256
            )
        assert abs(mine - float(ort)) <= 128 * top / num_bins


def test_entropy_against_onnxruntime_end_to_end():
    """Gaussian, 10^6 values, ORT's collector with 2048 bins over [-T, T] and 256 groups (128 per side).

    Tolerance: one step of ORT's threshold grid (``T * 256 / 2048``, see the test above) plus one of our
    bins; and the int8 SQNR at our threshold within 0.5 dB of ORT's.
    """
    data = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    collector = _ort_collector("entropy", True, 2048, num_quantized_bins=256)
    observer = EntropyObserver(2048, 128, 128, symmetric=True, name="x")
    with contextlib.redirect_stdout(io.StringIO()):
        collector.collect({"x": data})
        ort = float(collector.compute_collection_result()["x"][1])
    observer.collect(data)
    _, mine = observer.compute()
    top = float(np.abs(data).max())
    assert abs(mine - ort) <= top * 256 / 2048 + observer.histogram.bin_width

    def sqnr(threshold):
        scale, zero_point = compute_qparams(-threshold, threshold, "int8", "symmetric")
        return sqnr_db(data, fake_quantize(data, scale, zero_point, -127, 127))

    assert sqnr(mine) >= sqnr(ort) - 0.5


# ------------------------------------------------------------------------------------------------------------
# Bad data, empty observers, constant tensors
@pytest.mark.parametrize("make", _observers_all_methods() + [lambda: PerChannelMaxObserver(0, name="t")])
def test_nan_warns_once_and_is_excluded(make):
    clean = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    dirty = np.array([[np.nan, -2.0], [np.inf, 4.0]], np.float32)
    reference = make()
    reference.collect(clean)
    reference.collect(clean[:, 1:])
    observer = make()
    observer.collect(clean)
    with pytest.warns(CalibrationWarning) as record:
        observer.collect(dirty)
        observer.collect(np.array([[-np.inf], [np.nan]], np.float32))
    assert len(record) == 1
    message = str(record[0].message)
    assert "'t'" in message and "1 NaN and 1 Inf" in message
    assert (observer.num_nan, observer.num_inf) == (2, 2)
    _assert_same_range(observer.compute(), reference.compute())


def _assert_same_range(got, expected):
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))


def test_nan_policy_error_names_tensor_and_keeps_state():
    observer = PercentileObserver(99.0, 64, symmetric=True, name="conv3.out", nan_policy="error")
    observer.collect(np.array([1.0, 2.0], np.float32))
    with pytest.raises(CalibrationError, match=r"'conv3\.out'.*1 NaN and 0 Inf.*nan_policy='warn'"):
        observer.collect(np.array([np.nan, 100.0], np.float32))
    assert observer.compute() == (-2.0, 2.0) and observer.num_batches == 1  # the refused batch left no trace
    assert issubclass(CalibrationError, ValueError)
    per_channel = PerChannelMaxObserver(0, name="fc.weight", nan_policy="error")
    with pytest.raises(CalibrationError, match="'fc.weight'"):
        per_channel.collect(np.array([[np.inf, 1.0]], np.float32))


@pytest.mark.parametrize("make", _observers_all_methods() + [lambda: PerChannelMaxObserver(0, name="t")])
def test_empty_observer_raises(make):
    observer = make()
    with pytest.raises(CalibrationError, match="no finite calibration data reached tensor 't'.*0 batch"):
        observer.compute()
    observer.collect(np.zeros((2, 0), np.float32))
    with pytest.warns(CalibrationWarning):
        observer.collect(np.full((2, 3), np.nan, np.float32))
    with pytest.raises(CalibrationError, match="'t'.*6 NaN and 0 Inf values were dropped"):
        observer.compute()
    observer.reset()
    observer.collect(np.ones((2, 1), np.float32))
    observer.compute()


def test_per_channel_all_nan_channel_is_an_error():
    observer = PerChannelMaxObserver(1, name="w")
    with pytest.warns(CalibrationWarning):
        observer.collect(np.array([[1.0, np.nan, 2.0]], np.float32))
    with pytest.raises(CalibrationError, match=r"'w'.*channel\(s\) 1 along axis 1"):
        observer.compute()


@pytest.mark.parametrize("make", _observers_all_methods())
@pytest.mark.parametrize("value", [0.0, 2.5, -0.75])
def test_constant_tensor_gives_valid_range(make, value):
    observer = make()
    observer.collect(np.full((3, 4), value, np.float32))
    observer.collect(np.full(5, value, np.float32))
    a_min, a_max = observer.compute()
    if observer.symmetric:
        assert (a_min, a_max) == (-abs(value), abs(value))
    else:
        assert (a_min, a_max) == (value, value)
    for dtype, scheme in (("int8", "symmetric"), ("uint8", "affine")):
        scale, _ = compute_qparams(a_min, a_max, dtype, scheme)
        assert np.isfinite(scale) and scale > 0
        if value == 0.0:
            assert scale == MIN_SCALE


# ------------------------------------------------------------------------------------------------------------
# make_observer
def test_make_observer_maps_specs():
    affine = make_observer(TensorSpec("uint8", "affine", method=Percentile(99.9, 512)), "a", "error")
    assert isinstance(affine, PercentileObserver) and not affine.symmetric
    assert (affine.percentile, affine.num_bins, affine.name, affine.nan_policy) == (99.9, 512, "a", "error")
    entropy = make_observer(TensorSpec("int8", "symmetric", bits=6, method=Entropy(1024, 64)), "e", "warn")
    assert isinstance(entropy, EntropyObserver) and entropy.symmetric
    assert (entropy.num_bins, entropy.start_bins, entropy.num_quantized_bins) == (1024, 64, 32)
    mse = make_observer(TensorSpec("uint8", "affine", method=MSE(256)), "m", "warn")
    assert isinstance(mse, MSEObserver) and (mse.qmin, mse.qmax, mse.num_steps) == (0, 255, 255)
    mse_sym = make_observer(TensorSpec("int8", "symmetric", method=MSE(256)), "m", "warn")
    assert mse_sym.num_steps == 127
    assert isinstance(make_observer(TensorSpec(method=Max()), "x", "warn"), MaxObserver)
    weight = make_observer(TensorSpec("int8", "symmetric", PerChannel(1)), "w", "warn")
    assert isinstance(weight, PerChannelMaxObserver) and weight.axis == 1 and weight.symmetric


def test_per_channel_histogram_method():
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((4, 300)).astype(np.float32)
    spec = TensorSpec("int8", "symmetric", PerChannel(0), method=Percentile(99.0, 64))
    observer = make_observer(spec, "w", "warn")
    assert isinstance(observer, PerChannelObserver)
    observer.collect(weight)
    _, a_max = observer.compute()
    for channel in range(4):
        single = PercentileObserver(99.0, 64, symmetric=True, name="c")
        single.collect(weight[channel])
        assert a_max[channel] == single.compute()[1]
