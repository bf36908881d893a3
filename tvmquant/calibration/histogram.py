"""Streaming histograms and the clipping-threshold searches that run on them.

Pure numpy; nothing here imports TVM or ONNX.

The grid
--------
A :class:`StreamingHistogram` counts values on bins of width ``2**exponent`` anchored at 0: bin ``k`` is the
half-open interval ``[k * width, (k + 1) * width)``. Two facts follow and everything else rests on them:

* Growing the range is exact. When a later batch falls outside the bins held, the width doubles (``m``
  times) and bin ``k`` becomes bin ``k >> m``: every old bin lies inside exactly one new bin, so no count is
  split, guessed or lost.
* Binning is exact. ``x * 2**-exponent`` only changes the floating-point exponent of ``x``, so
  ``floor(x / width)`` is computed without rounding. The width is always the smallest power of two that
  fits the whole observed range (0 included) into ``2 * num_bins`` bins, so streaming the data in any
  number of batches ends with exactly the histogram that one batch of all the data gives.

The price of the power-of-two width is resolution: the observed range spans more than ``num_bins`` and at
most ``2 * num_bins`` bins (never fewer than ``num_bins``, as the configs promise).

Threshold searches
------------------
:func:`histogram_quantile`, :func:`entropy_divergences` / :func:`entropy_window` (TensorRT's KL method) and
:func:`mse_errors` / :func:`mse_window` take the counts of a histogram and return thresholds in bin units;
the observers in :mod:`tvmquant.calibration.observers` turn them into real ranges. Candidate clipping
ranges are *windows* of whole bins, ``[start, stop)`` in array indices, built by :func:`candidate_windows`:

* a histogram of ``|x|`` (symmetric schemes) has windows ``[0, stop)``: clip ``|x|`` at ``stop * width``;
* a histogram of ``x`` (affine schemes) has windows ``[max(lo, -r), min(hi, r))`` for ``r = 1, 2, ...``
  (``lo``, ``hi`` the first and one-past-last bin index): both tails are clipped at the same magnitude
  ``r * width`` until one runs out of data, then only the other. This is the one-parameter family that
  ONNX Runtime's entropy calibrator also searches; a two-parameter search (each tail on its own) would cost
  the square of the candidates for little gain, and for one-sided data (ReLU outputs) it is exactly
  TensorRT's search on ``x``.
"""

from __future__ import annotations

import math

import numpy as np

#: Values binned per step: bounds the temporaries of :meth:`StreamingHistogram.add` (about 3 MiB) however
#: large the batch is.
CHUNK_SIZE = 1 << 18

#: Candidate windows evaluated together by the vectorised searches (bounds their temporaries too).
_CANDIDATE_CHUNK = 256

#: A compiled binning kernel, when one is installed (:func:`set_binning_kernel`); None: numpy bins.
_KERNEL = [None]


def set_binning_kernel(kernel) -> None:
    """Install ``kernel`` to count values into bins instead of numpy (None puts numpy back).

    ``kernel(values, factor, first_bin, num_bins, absolute)`` returns the int64 counts of
    ``floor(v * factor) - first_bin`` over ``values`` (of ``|v| * factor`` when ``absolute``): exactly what
    the numpy loop of :meth:`StreamingHistogram.add` counts; or None for values it does not take (numpy then
    bins them). It is not called where a negative product can underflow to -0.0 (bins 2 or more wide).
    This package imports no TVM: :mod:`tvmquant.passes.binning` installs a TVM-compiled kernel, several
    times faster than the numpy passes and the ``np.bincount`` that holds the GIL.
    """
    _KERNEL[0] = kernel


def fit_exponent(lo: float, hi: float, capacity: int) -> int:
    """Smallest ``e`` such that bins of width ``2**e`` anchored at 0 cover ``[lo, hi]`` in ``capacity`` bins.

    Parameters
    ----------
    lo, hi : float
        The range, with ``lo <= 0 <= hi`` and ``lo < hi``.
    capacity : int
        The most bins allowed.

    Examples
    --------
    >>> fit_exponent(0.0, 19.5, 32)  # bins [0,1), [1,2), ..., [19,20): 20 bins of width 1
    0
    >>> fit_exponent(-1.0, 1.0, 4)   # [-1,0), [0,1), [1,2) fits in 4 bins; width 1/2 would need 5
    0
    """
    span = hi - lo
    if not (lo <= 0.0 <= hi and span > 0.0):
        raise ValueError(f"fit_exponent needs lo <= 0 <= hi and lo < hi, got [{lo}, {hi}]")
    # Start one below the estimate and walk up: the bin count at least halves with every doubling.
    exponent = math.floor(math.log2(span / capacity)) - 1
    while _bins_needed(lo, hi, exponent) > capacity:
        exponent += 1
    return exponent


def _bins_needed(lo: float, hi: float, exponent: int) -> int:
    # ldexp scales by a power of two exactly, so the floors are exact.
    return math.floor(math.ldexp(hi, -exponent)) - math.floor(math.ldexp(lo, -exponent)) + 1


class StreamingHistogram:
    """Counts of finite values on power-of-two bins anchored at 0, grown without losing counts.

    Parameters
    ----------
    num_bins : int
        Resolution: the observed range (0 included) is covered by more than ``num_bins`` and at most
        ``2 * num_bins`` bins.
    signed : bool
        ``True`` for a histogram of ``x`` (affine schemes), ``False`` for a histogram of values the caller
        has already made non-negative (``|x|``, symmetric schemes).
    count_zeros : bool
        Also count values that are exactly 0 (:attr:`num_zeros`), which the MSE search treats as exact.

    Attributes
    ----------
    counts : np.ndarray of int64
        ``counts[j]`` is the number of values in bin ``first_bin + j``.
    first_bin : int
        Index ``k`` of ``counts[0]``: it covers ``[first_bin * bin_width, (first_bin + 1) * bin_width)``.
    exponent : int or None
        ``bin_width == 2**exponent``; ``None`` while every value seen is 0 (any width fits).
    total, num_zeros : int
        Number of values added, and how many of them were exactly 0 (when ``count_zeros``).
    min, max : float
        Smallest and largest value added (``inf`` / ``-inf`` before any).

    Examples
    --------
    >>> hist = StreamingHistogram(num_bins=2, signed=False)
    >>> hist.add(np.array([0.5, 1.5, 2.5], np.float32))
    >>> hist.bin_width, hist.counts.tolist()
    (1.0, [1, 1, 1])
    >>> hist.add(np.array([7.0], np.float32))  # range grows: width doubles, bins [0,1) and [1,2) merge
    >>> hist.bin_width, hist.counts.tolist(), int(hist.counts.sum())
    (2.0, [2, 1, 0, 1], 4)
    """

    def __init__(self, num_bins: int, signed: bool, count_zeros: bool = False):
        if not (isinstance(num_bins, (int, np.integer)) and num_bins >= 2):
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
        self.num_bins = int(num_bins)
        self.capacity = 2 * self.num_bins
        self.signed = bool(signed)
        self.count_zeros = bool(count_zeros)
        self.reset()

    def reset(self) -> None:
        """Forget everything added."""
        self.counts = np.zeros(0, dtype=np.int64)
        self.first_bin = 0
        self.exponent: int | None = None
        self.total = 0
        self.num_zeros = 0
        self.min = math.inf
        self.max = -math.inf

    @property
    def bin_width(self) -> float:
        """Width of every bin (0.0 while only zeros were added)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    def edges(self) -> np.ndarray:
        """Bin edges in float64, ``len(counts) + 1`` of them (exact multiples of :attr:`bin_width`)."""
        index = np.arange(self.first_bin, self.first_bin + len(self.counts) + 1, dtype=np.float64)
        return index * self.bin_width

    def add(
        self, values: np.ndarray, vmin: float | None = None, vmax: float | None = None, absolute: bool = False
    ) -> None:
        """Count ``values`` (a 1-D array of finite floats; non-negative unless ``signed``).

        ``absolute=True`` counts ``|values|`` instead (unsigned histograms only), taking the absolute value
        chunk by chunk so that no full-size copy is made. ``vmin`` / ``vmax`` may pass the extremes of what
        is counted (of ``|values|`` when ``absolute``) when the caller already knows them: saves a pass.
        The values are not modified.
        """
        values = np.asarray(values)
        if values.size == 0:
            return
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        if absolute and self.signed:
            raise ValueError("absolute=True is for unsigned histograms (of |x|)")
        if vmin is None or vmax is None:
            low, high = float(values.min()), float(values.max())
            if absolute:
                magnitude_min = 0.0 if low <= 0.0 <= high else min(abs(low), abs(high))
                low, high = magnitude_min, max(abs(low), abs(high))
            vmin, vmax = low, high
        vmin, vmax = float(vmin), float(vmax)
        if not self.signed and vmin < 0.0:
            raise ValueError("an unsigned histogram takes non-negative values (pass |x| or absolute=True)")
        self.min = min(self.min, vmin)
        self.max = max(self.max, vmax)
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if lo == hi:
            # Only zeros so far: they sit in bin 0 whatever the width turns out to be.
            self._grow(None)
            self.counts[0 - self.first_bin] += values.size
        else:
            exponent = fit_exponent(lo, hi, self.capacity)
            if self.exponent is not None:
                exponent = max(exponent, self.exponent)
            self._grow(exponent, lo, hi)
            self._bin(values, absolute)
        self.total += int(values.size)
        if self.count_zeros:
            self.num_zeros += int(values.size - np.count_nonzero(values))

    def _grow(self, exponent: int | None, lo: float = 0.0, hi: float = 0.0) -> None:
        """Re-bin to width ``2**exponent`` and bins covering ``[lo, hi]``, keeping every count."""
        if exponent is None:
            new_first, new_last = 0, 0
        else:
            new_first = math.floor(math.ldexp(lo, -exponent))
            new_last = math.floor(math.ldexp(hi, -exponent))
        old_last = self.first_bin + len(self.counts) - 1
        if (exponent, new_first, new_last) == (self.exponent, self.first_bin, old_last):
            return
        new_counts = np.zeros(new_last - new_first + 1, dtype=np.int64)
        if len(self.counts):
            old_index = np.arange(self.first_bin, self.first_bin + len(self.counts), dtype=np.int64)
            if self.exponent is None:
                new_index = old_index  # only bin 0 is held, and bin 0 stays bin 0
            else:
                # Arithmetic right shift is floor division by 2**m, for negative bin indices too.
                new_index = np.right_shift(old_index, exponent - self.exponent)
            np.add.at(new_counts, new_index - new_first, self.counts)
        self.counts = new_counts
        self.first_bin = new_first
        self.exponent = exponent

    def _bin(self, values: np.ndarray, absolute: bool) -> None:
        factor_exponent = -self.exponent
        # Multiplying by a normal power of two is exact; outside float32's normal range fall back to ldexp.
        normal_exponents = (-126, 127) if values.dtype == np.float32 else (-1022, 1023)
        use_multiply = normal_exponents[0] <= factor_exponent <= normal_exponents[1]
        factor = values.dtype.type(math.ldexp(1.0, factor_exponent)) if use_multiply else None
        # A negative x with |x| < 2**-150 * width (possible only when width >= 2) scales to -0.0, whose floor
        # is bin 0 instead of bin -1: those few values are moved back.
        fix_underflow = self.signed and self.exponent >= 1
        num_bins = len(self.counts)
        kernel = _KERNEL[0]
        if kernel is not None and use_multiply and not fix_underflow:
            counts = kernel(values, factor, self.first_bin, num_bins, absolute)
            if counts is not None:
                self.counts += counts
                return
        for begin in range(0, values.size, CHUNK_SIZE):
            chunk = values[begin : begin + CHUNK_SIZE]
            if absolute:
                chunk = np.abs(chunk)
            if use_multiply:
                scaled = np.multiply(chunk, factor, out=chunk if absolute else None)
            else:
                scaled = np.ldexp(chunk, factor_exponent)
            if self.signed:
                np.floor(scaled, out=scaled)  # astype truncates towards 0; negative bins need floor
            index = scaled.astype(np.int64)
            if fix_underflow:
                underflow = scaled == 0
                underflow &= chunk < 0
                index -= underflow
            if self.first_bin:
                index -= self.first_bin
            binned = np.bincount(index, minlength=num_bins)
            if len(binned) != num_bins:  # cannot happen: the bins were grown to cover [min, max] first
                raise AssertionError("histogram binning fell outside the grown range")
            self.counts += binned


# ------------------------------------------------------------------------------------------------------------
# Threshold searches on a histogram (counts only; thresholds come back in bin units)
def histogram_quantile(counts: np.ndarray, fraction: float) -> float:
    """The ``fraction`` quantile of histogrammed data, in bin units from the left edge of ``counts[0]``.

    The quantile falls in the first bin where the cumulative count reaches ``fraction * total``; within
    that bin the data are taken as uniformly spread (linear interpolation), so the result is within one
    bin of the quantile of the raw data.

    Examples
    --------
    >>> histogram_quantile(np.array([1, 1, 1, 1]), 0.5)  # half the data lies left of edge 2
    2.0
    >>> histogram_quantile(np.array([0, 4, 0, 0]), 0.25)  # a quarter into bin 1
    1.25
    """
    counts = np.asarray(counts, dtype=np.int64)
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    if total <= 0:
        raise ValueError("histogram_quantile needs a non-empty histogram")
    target = min(max(float(fraction), 0.0), 1.0) * total
    if target <= 0.0:
        return float(np.flatnonzero(counts)[0])  # left edge of the first non-empty bin
    index = int(np.searchsorted(cumulative, target, side="left"))
    before = float(cumulative[index - 1]) if index else 0.0
    # counts[index] > 0 here: cumulative[index] >= target > cumulative[index - 1].
    return index + (target - before) / float(counts[index])


def candidate_windows(first_bin: int, num_bins: int, signed: bool, min_width: int = 1):
    """Candidate clipping windows ``[starts, stops)`` (array indices) of a histogram, narrowest first.

    See the module docstring for the families searched. Windows narrower than ``min_width`` bins are
    dropped, except that the widest window (no clipping) is always kept.

    Examples
    --------
    >>> starts, stops = candidate_windows(0, 4, signed=False, min_width=2)
    >>> starts.tolist(), stops.tolist()
    ([0, 0, 0], [2, 3, 4])
    >>> starts, stops = candidate_windows(-2, 3, signed=True)  # bins k = -2, -1, 0
    >>> starts.tolist(), stops.tolist()
    ([1, 0], [3, 3])
    """
    last_bin = first_bin + num_bins - 1
    if signed:
        radius = np.arange(1, max(-first_bin, last_bin + 1) + 1, dtype=np.int64)
        starts = np.maximum(first_bin, -radius) - first_bin
        stops = np.minimum(last_bin, radius - 1) - first_bin + 1
    else:
        stops = np.arange(1, num_bins + 1, dtype=np.int64)
        starts = np.zeros_like(stops)
    keep = stops - starts >= min_width
    keep[-1] = True
    return starts[keep], stops[keep]


def _xlogx(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(values)
    positive = values > 0
    out[positive] = values[positive] * np.log(values[positive])
    return out


def entropy_divergences(counts: np.ndarray, starts: np.ndarray, stops: np.ndarray, num_levels: int) -> np.ndarray:
    """KL divergence ``KL(P || Q)`` of each candidate window, TensorRT's definition.

    For a window of ``W >= num_levels`` bins ``[start, stop)``:

    * the reference ``P`` is the window's counts with everything left of it added to its first bin and
      everything right of it added to its last bin (clipped values land on the clipping threshold);
    * the candidate ``Q`` merges the window's own counts (outliers not included) into ``num_levels``
      groups, bin ``t`` going to group ``floor(t * num_levels / W)``, and spreads each group's sum evenly
      over the group's non-empty bins; empty bins stay empty.

    ``P`` and ``Q`` are normalised and no smoothing is applied: a window whose first or last bin is
    empty while values are clipped into it has ``P > 0 = Q`` there and divergence ``inf``. This is the
    algorithm of the GTC 2017 talk as NVIDIA's ``pytorch_quantization`` implements it
    (``_compute_amax_entropy``), generalised to windows that do not start at bin 0. It is evaluated from
    prefix sums in ``O(num_levels)`` per window instead of ``O(W)``: within a group ``Q`` is constant, so
    ``sum(P log Q)`` over a group is ``G log(G / N)`` (group sum ``G``, non-empty bins ``N``), plus the
    outlier terms at the two ends.

    Parameters
    ----------
    counts : np.ndarray of int
        The histogram.
    starts, stops : np.ndarray of int
        Candidate windows (see :func:`candidate_windows`); each must be at least ``num_levels`` bins wide.
    num_levels : int
        Quantization levels across a window (TensorRT: 128 for ``|x|`` and int8).

    Returns
    -------
    np.ndarray of float64
        One divergence per window.

    Examples
    --------
    >>> counts = np.array([4, 2, 1, 1])
    >>> kl = entropy_divergences(counts, np.array([0, 0]), np.array([2, 4]), num_levels=2)
    >>> np.round(kl, 6).tolist()  # [0.5 log(1.125), 0.5 log(4/3) + 0.25 log(2/3)]
    [0.058892, 0.042475]
    """
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    widths = stops - starts
    if np.any(widths < num_levels) or np.any(widths < 2):
        raise ValueError(f"every window must span at least num_levels={num_levels} (and 2) bins")
    counts_f = counts.astype(np.float64)
    prefix = np.concatenate(([0.0], np.cumsum(counts_f)))
    prefix_nonzero = np.concatenate(([0], np.cumsum(counts > 0)))
    prefix_xlogx = np.concatenate(([0.0], np.cumsum(_xlogx(counts_f))))
    total = prefix[-1]
    divergences = np.empty(len(starts), dtype=np.float64)
    levels = np.arange(num_levels + 1, dtype=np.int64)
    for begin in range(0, len(starts), _CANDIDATE_CHUNK):
        start = starts[begin : begin + _CANDIDATE_CHUNK, None]
        stop = stops[begin : begin + _CANDIDATE_CHUNK, None]
        width = stop - start
        # Group g holds window bins t with ceil(g W / L) <= t < ceil((g + 1) W / L).
        bounds = start + (levels * width + num_levels - 1) // num_levels
        group_sum = prefix[bounds[:, 1:]] - prefix[bounds[:, :-1]]
        group_nonzero = prefix_nonzero[bounds[:, 1:]] - prefix_nonzero[bounds[:, :-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            group_q = np.where(group_sum > 0, group_sum / np.maximum(group_nonzero, 1), 0.0)
            sum_p_log_q = np.sum(np.where(group_sum > 0, group_sum * np.log(group_q), 0.0), axis=1)
        start, stop = start[:, 0], stop[:, 0]
        left_out = prefix[start]
        right_out = total - prefix[stop]
        first_count = counts_f[start]
        last_count = counts_f[stop - 1]
        # Q at the window's ends: its group's value if the bin is non-empty, else 0.
        q_first = np.where(first_count > 0, group_q[:, 0], 0.0)
        q_last = np.where(last_count > 0, group_q[:, -1], 0.0)
        infinite = ((left_out > 0) & (q_first == 0)) | ((right_out > 0) & (q_last == 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            sum_p_log_q = sum_p_log_q + np.where(left_out > 0, left_out * np.log(q_first), 0.0)
            sum_p_log_q = sum_p_log_q + np.where(right_out > 0, right_out * np.log(q_last), 0.0)
        interior = prefix_xlogx[stop - 1] - prefix_xlogx[start + 1]
        sum_p_log_p = interior + _xlogx(first_count + left_out) + _xlogx(last_count + right_out)
        window_total = prefix[stop] - prefix[start]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = (sum_p_log_p - sum_p_log_q) / total + np.log(window_total / total)
        kl[infinite | (window_total <= 0)] = np.inf
        divergences[begin : begin + len(start)] = kl
    return divergences


def entropy_window(counts: np.ndarray, starts: np.ndarray, stops: np.ndarray, num_levels: int) -> int:
    """Index of the window with the smallest KL divergence (the widest among equals, as TensorRT).

    Examples
    --------
    >>> entropy_window(np.array([4, 2, 1, 1]), np.array([0, 0, 0]), np.array([2, 3, 4]), num_levels=2)
    2
    """
    divergences = entropy_divergences(counts, starts, stops, num_levels)
    return int(len(divergences) - 1 - np.argmin(divergences[::-1]))


def mse_errors(
    counts: np.ndarray,
    first_bin: int,
    starts: np.ndarray,
    stops: np.ndarray,
    num_steps: int,
    num_zeros: int = 0,
) -> np.ndarray:
    """Expected squared quantization error of each candidate window, in units of ``bin_width**2``.

    Values are taken as uniformly spread inside each bin. For a window ``[start, stop)`` covering the real
    range ``[(first_bin + start) w, (first_bin + stop) w]`` quantized with ``num_steps`` steps of
    ``scale = (stop - start) w / num_steps``:

    * a value inside the window is rounded, with the uniform-noise error ``scale**2 / 12``; values that
      are exactly 0 (``num_zeros`` of them) are exact, as 0 is always on the grid;
    * a value clipped from a bin ``d`` bins beyond the window's edge has the error
      ``w**2 (d**2 + d + 1/3)`` (the mean of ``(x - edge)**2`` over the bin).

    Returns the mean error per value (sums of ``count * j**p`` via prefix sums: ``O(1)`` per window).

    Examples
    --------
    >>> err = mse_errors(np.array([3, 0, 0, 1]), 0, np.array([0, 0]), np.array([1, 4]), num_steps=1)
    >>> err.tolist()  # [3 values * 1/12 + 1 clipped 2 bins away: 4 + 2 + 1/3] / 4 ; [4 values * 16/12] / 4
    [1.6458333333333333, 1.3333333333333333]
    """
    counts_f = np.asarray(counts, dtype=np.float64)
    index = np.arange(len(counts_f), dtype=np.float64)
    zero = np.zeros(1)
    prefix0 = np.concatenate((zero, np.cumsum(counts_f)))
    prefix1 = np.concatenate((zero, np.cumsum(counts_f * index)))
    prefix2 = np.concatenate((zero, np.cumsum(counts_f * index * index)))
    total = prefix0[-1]
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    start_f = starts.astype(np.float64)
    stop_f = stops.astype(np.float64)
    # Right tail: sum over j >= stop of c_j ((j - stop)^2 + (j - stop) + 1/3).
    r0 = total - prefix0[stops]
    r1 = prefix1[-1] - prefix1[stops]
    r2 = prefix2[-1] - prefix2[stops]
    right = r2 + (1.0 - 2.0 * stop_f) * r1 + (stop_f * stop_f - stop_f + 1.0 / 3.0) * r0
    # Left tail: sum over j < start of c_j ((start - 1 - j)^2 + (start - 1 - j) + 1/3).
    l0, l1, l2 = prefix0[starts], prefix1[starts], prefix2[starts]
    left = l2 - (2.0 * start_f - 1.0) * l1 + (start_f * start_f - start_f + 1.0 / 3.0) * l0
    scale = (stop_f - start_f) / num_steps  # in bin widths
    inside = prefix0[stops] - prefix0[starts]
    # Exact zeros sit in bin k = 0, which every window contains when 0 is in the histogram's range.
    zero_index = -first_bin
    if 0 <= zero_index < len(counts_f) and num_zeros:
        holds_zero = (starts <= zero_index) & (zero_index < stops)
        inside = inside - np.where(holds_zero, float(num_zeros), 0.0)
    noise = np.maximum(inside, 0.0) * scale * scale / 12.0
    return (noise + np.maximum(right, 0.0) + np.maximum(left, 0.0)) / total


def mse_window(counts, first_bin, starts, stops, num_steps, num_zeros=0) -> int:
    """Index of the window with the smallest :func:`mse_errors` (the narrowest among equals).

    Examples
    --------
    >>> mse_window(np.array([3, 0, 0, 1]), 0, np.array([0, 0]), np.array([1, 4]), num_steps=1)
    1
    """
    return int(np.argmin(mse_errors(counts, first_bin, starts, stops, num_steps, num_zeros)))
