"""Observers: streaming calibration statistics with ``collect / compute / reset``.

An observer watches one tensor. The calibration runner calls :meth:`Observer.collect` with every batch
that reaches the tensor (any number of batches, of any size and shape), then :meth:`Observer.compute`
gives the real range ``(a_min, a_max)`` to hand to :func:`tvmquant.quant_math.compute_qparams`, which
widens it to contain 0 and derives ``scale`` and ``zero_point``. Observers keep bounded state (a min/max
or a histogram), never the activations, and never modify the arrays they are given.

Symmetric observers return ``(-threshold, threshold)``; affine ones return the clipped ``[a_min, a_max]``.
A range that comes out of a histogram is clipped to the observed ``[min, max]``, so no method returns a
range wider than the data.

Bad data: NaN and +-Inf are counted (:attr:`Observer.num_nan`, :attr:`Observer.num_inf`) and dropped
with one :class:`CalibrationWarning` per observer under ``nan_policy="warn"``; ``nan_policy="error"``
raises :class:`CalibrationError` naming the tensor. :meth:`Observer.compute` on an observer that saw no
finite value raises :class:`CalibrationError`.

Nothing here imports TVM or ONNX.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np

from ..config import MSE, Entropy, Max, Percentile, PerChannel, TensorSpec
from .histogram import (
    StreamingHistogram,
    candidate_windows,
    entropy_window,
    histogram_quantile,
    mse_window,
)

NAN_POLICIES = ("warn", "error")


#: A compiled ``kernel(values) -> (min, max)`` when one is installed (:func:`set_range_kernel`); None: numpy.
_RANGE_KERNEL = [None]


def set_range_kernel(kernel) -> None:
    """Install ``kernel(array) -> (min, max)`` for the observers' batch extremes (None puts numpy back).

    It returns what ``array.min(), array.max()`` return: NaN or an infinity when the array has one (the
    observers then screen the batch), or None for arrays it does not take. :mod:`tvmquant.passes.binning`
    installs a TVM-compiled one: one pass on every core instead of numpy's two on one.
    """
    _RANGE_KERNEL[0] = kernel


class CalibrationError(ValueError):
    """Calibration cannot produce a range for a tensor; the message names the tensor and what to do."""


class CalibrationWarning(UserWarning):
    """Calibration data of a tensor had NaN/Inf values, which were dropped."""


def _as_float_array(array, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiub":
        raise CalibrationError(
            f"calibration data for tensor {name!r} has dtype {array.dtype}; expected a float or integer array"
        )
    if array.dtype == np.float16:
        return array.astype(np.float32)  # exact; numpy reductions and binning are faster in float32
    if array.dtype.kind != "f":
        return array.astype(np.float64)
    return array


class Observer:
    """Base class of the observers: NaN/Inf screening, counters and the ``collect / compute / reset`` API.

    Parameters
    ----------
    symmetric : bool
        Return ``(-threshold, threshold)`` from a statistic of ``|x|`` (symmetric schemes) rather than a
        range of ``x`` (affine schemes).
    name : str
        The tensor observed; every warning and error names it.
    nan_policy : str
        ``"warn"``: drop NaN/Inf with one warning per observer; ``"error"``: raise on the first one.

    Attributes
    ----------
    num_batches : int
        Calls to :meth:`collect` since the last :meth:`reset`.
    num_values, num_nan, num_inf : int
        Finite values used, and NaN / Inf values dropped.
    """

    def __init__(self, symmetric: bool, *, name: str = "tensor", nan_policy: str = "warn"):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.symmetric = bool(symmetric)
        self.name = str(name)
        self.nan_policy = nan_policy
        self.reset()

    def reset(self) -> None:
        """Forget all collected data (counters, state and the warning already given)."""
        self.num_batches = 0
        self.num_values = 0
        self.num_nan = 0
        self.num_inf = 0
        self._warned = False
        self._reset_state()

    def collect(self, array) -> None:
        """Add one batch of values of the tensor (any shape; not modified)."""
        raise NotImplementedError

    def compute(self):
        """The calibrated real range ``(a_min, a_max)``."""
        raise NotImplementedError

    def _reset_state(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, symmetric={self.symmetric}, "
            f"batches={self.num_batches}, values={self.num_values})"
        )

    # -- shared helpers ------------------------------------------------------------------------------------
    def _screen(self, array: np.ndarray, finite: np.ndarray | None = None) -> np.ndarray | None:
        """Count a batch's NaN/Inf and apply the policy; return the finite mask (None if all are finite)."""
        if finite is None:
            finite = np.isfinite(array)
        num_bad = int(array.size - np.count_nonzero(finite))
        if num_bad == 0:
            return None
        num_nan = int(np.count_nonzero(np.isnan(array)))
        num_inf = num_bad - num_nan
        where = f"batch {self.num_batches} (counting from 0; {array.size} values, shape {tuple(array.shape)})"
        if self.nan_policy == "error":
            raise CalibrationError(
                f"calibration data for tensor {self.name!r} has {num_nan} NaN and {num_inf} Inf values in "
                f"{where}; fix the model or the calibration inputs, or set nan_policy='warn' to drop them"
            )
        self.num_nan += num_nan
        self.num_inf += num_inf
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"calibration data for tensor {self.name!r} has {num_nan} NaN and {num_inf} Inf values in "
                f"{where}; they are dropped from calibration (later ones are dropped without a warning "
                "and counted in the observer's num_nan / num_inf)",
                CalibrationWarning,
                stacklevel=4,
            )
        return finite

    def _finite_values(self, array) -> tuple[np.ndarray, float, float] | None:
        """The batch's finite values, flat, with their min and max; None if there are none."""
        array = _as_float_array(array, self.name)
        if array.size == 0:
            self.num_batches += 1
            return None
        extremes = _RANGE_KERNEL[0](array) if _RANGE_KERNEL[0] is not None else None
        vmin, vmax = extremes if extremes is not None else (array.min(), array.max())
        # np.min/np.max propagate NaN and see +-Inf, so finite extremes prove the batch clean: no extra pass.
        if np.isfinite(vmin) and np.isfinite(vmax):
            values = array.reshape(-1)
        else:
            finite = self._screen(array)  # raises under nan_policy="error", before any state changes
            values = array[finite]
        self.num_batches += 1
        if values.size == 0:
            return None
        if values.size != array.size:
            vmin, vmax = values.min(), values.max()
        self.num_values += int(values.size)
        return values, float(vmin), float(vmax)

    def _no_data_error(self) -> CalibrationError:
        dropped = ""
        if self.num_nan or self.num_inf:
            dropped = f" ({self.num_nan} NaN and {self.num_inf} Inf values were dropped)"
        return CalibrationError(
            f"no finite calibration data reached tensor {self.name!r}: {self.num_batches} batch(es) "
            f"collected{dropped}. Run calibration with at least one batch that produces finite values for "
            "this tensor, check that the calibration data reach it, or skip this layer from quantization"
        )


class MaxObserver(Observer):
    """The observed minimum and maximum (``max |x|`` when symmetric); exact and order-independent.

    Examples
    --------
    >>> observer = MaxObserver(name="conv1.out")
    >>> observer.collect(np.array([0.5, -1.0], np.float32))
    >>> observer.collect(np.array([[2.0]], np.float32))
    >>> observer.compute()
    (-1.0, 2.0)
    >>> symmetric = MaxObserver(symmetric=True)
    >>> symmetric.collect(np.array([0.5, -3.0, 2.0]))
    >>> symmetric.compute()
    (-3.0, 3.0)
    """

    def __init__(self, symmetric: bool = False, *, name: str = "tensor", nan_policy: str = "warn"):
        super().__init__(symmetric, name=name, nan_policy=nan_policy)

    def _reset_state(self) -> None:
        self.min = math.inf
        self.max = -math.inf

    def collect(self, array) -> None:
        batch = self._finite_values(array)
        if batch is None:
            return
        _, vmin, vmax = batch
        self.min = min(self.min, vmin)
        self.max = max(self.max, vmax)

    def compute(self) -> tuple[float, float]:
        """``(min, max)``; if symmetric ``(-threshold, threshold)``, ``threshold = max(|min|, |max|)``."""
        if self.num_values == 0:
            raise self._no_data_error()
        if self.symmetric:
            threshold = max(abs(self.min), abs(self.max))
            return -threshold, threshold
        return self.min, self.max


class PerChannelMaxObserver(Observer):
    """Minimum and maximum per index of ``axis`` (the output-channel axis of a weight).

    Parameters
    ----------
    axis : int
        The channel axis (negative counts from the end); every batch must have the same number of channels.
    symmetric : bool
        Return ``(-threshold, threshold)`` per channel, ``threshold = max |x|`` over the channel.

    Examples
    --------
    >>> weight = np.array([[1.0, -2.0], [0.5, 0.25], [-4.0, 3.0]], np.float32)  # 3 output channels
    >>> observer = PerChannelMaxObserver(axis=0, name="fc.weight")
    >>> observer.collect(weight)
    >>> a_min, a_max = observer.compute()
    >>> a_max.tolist()
    [2.0, 0.5, 4.0]
    """

    def __init__(self, axis: int = 0, symmetric: bool = True, *, name: str = "tensor", nan_policy: str = "warn"):
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise ValueError(f"axis must be an int, got {axis!r}")
        self.axis = int(axis)
        super().__init__(symmetric, name=name, nan_policy=nan_policy)

    def _reset_state(self) -> None:
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self._values_per_channel: np.ndarray | None = None

    def collect(self, array) -> None:
        array = _as_float_array(array, self.name)
        axis = _channel_axis(array, self.axis, self.name)
        num_channels = array.shape[axis]
        if self.min is not None and num_channels != len(self.min):
            raise CalibrationError(
                f"tensor {self.name!r}: batch {self.num_batches} has {num_channels} channels along axis "
                f"{self.axis} (shape {tuple(array.shape)}), earlier batches had {len(self.min)}"
            )
        if array.size == 0:
            self.num_batches += 1
            return
        reduce_axes = tuple(i for i in range(array.ndim) if i != axis)
        batch_min = array.min(axis=reduce_axes)
        batch_max = array.max(axis=reduce_axes)
        per_channel = array.size // num_channels
        if np.all(np.isfinite(batch_min)) and np.all(np.isfinite(batch_max)):
            finite_per_channel = np.full(num_channels, per_channel, dtype=np.int64)
        else:
            finite = self._screen(array)
            # Replace the dropped values by the reduction's identity so they cannot win.
            batch_min = np.where(finite, array, np.inf).min(axis=reduce_axes)
            batch_max = np.where(finite, array, -np.inf).max(axis=reduce_axes)
            finite_per_channel = np.count_nonzero(finite, axis=reduce_axes).astype(np.int64)
        self.num_batches += 1
        if self.min is None:
            self.min = np.full(num_channels, np.inf)
            self.max = np.full(num_channels, -np.inf)
            self._values_per_channel = np.zeros(num_channels, dtype=np.int64)
        np.minimum(self.min, batch_min, out=self.min)
        np.maximum(self.max, batch_max, out=self.max)
        self._values_per_channel += finite_per_channel
        self.num_values += int(finite_per_channel.sum())

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a_min, a_max)`` as float64 arrays with one entry per channel."""
        if self.num_values == 0:
            raise self._no_data_error()
        empty = np.flatnonzero(self._values_per_channel == 0)
        if len(empty):
            raise CalibrationError(
                f"tensor {self.name!r}: channel(s) {_list_preview(empty)} along axis {self.axis} have no "
                "finite value (all NaN/Inf); fix the weights, or quantize this tensor per tensor or skip it"
            )
        if self.symmetric:
            threshold = np.maximum(np.abs(self.min), np.abs(self.max))
            return -threshold, threshold
        return self.min.copy(), self.max.copy()


class PerChannelObserver(Observer):
    """Any per-tensor observer applied to each index of ``axis`` separately (e.g. per-channel percentile).

    Parameters
    ----------
    axis : int
        The channel axis.
    make_channel_observer : callable
        ``make_channel_observer(name) -> Observer``, called once per channel with a name such as
        ``"conv.weight[channel 3]"``.

    Examples
    --------
    >>> def make_channel(name):
    ...     return PercentileObserver(100.0, 16, symmetric=True, name=name)
    >>> observer = PerChannelObserver(0, make_channel, name="conv.weight")
    >>> observer.collect(np.array([[1.0, -2.0], [0.5, 0.25]], np.float32))
    >>> observer.compute()[1].tolist()
    [2.0, 0.5]
    """

    def __init__(
        self,
        axis: int,
        make_channel_observer: Callable[[str], Observer],
        *,
        name: str = "tensor",
        nan_policy: str = "warn",
    ):
        self.axis = int(axis)
        self._make_channel_observer = make_channel_observer
        probe = make_channel_observer(f"{name}[channel 0]")
        super().__init__(probe.symmetric, name=name, nan_policy=nan_policy)

    def _reset_state(self) -> None:
        self.channels: list[Observer] = []

    def collect(self, array) -> None:
        array = _as_float_array(array, self.name)
        axis = _channel_axis(array, self.axis, self.name)
        num_channels = array.shape[axis]
        if self.channels and num_channels != len(self.channels):
            raise CalibrationError(
                f"tensor {self.name!r}: batch {self.num_batches} has {num_channels} channels along axis "
                f"{self.axis} (shape {tuple(array.shape)}), earlier batches had {len(self.channels)}"
            )
        if array.size == 0:
            self.num_batches += 1
            return
        moved = np.moveaxis(array, axis, 0).reshape(num_channels, -1)
        finite = None
        if not (np.isfinite(moved.min()) and np.isfinite(moved.max())):
            finite = self._screen(moved)
        self.num_batches += 1
        if not self.channels:
            # The channel observers get finite data only: the NaN policy is applied here, once per tensor.
            self.channels = [self._make_channel_observer(f"{self.name}[channel {c}]") for c in range(num_channels)]
        for channel, observer in enumerate(self.channels):
            values = moved[channel] if finite is None else moved[channel][finite[channel]]
            observer.collect(values)
            self.num_values += int(values.size)

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a_min, a_max)`` as float64 arrays, one entry per channel."""
        if self.num_values == 0:
            raise self._no_data_error()
        ranges = [observer.compute() for observer in self.channels]
        return (
            np.array([r[0] for r in ranges], dtype=np.float64),
            np.array([r[1] for r in ranges], dtype=np.float64),
        )


def _channel_axis(array: np.ndarray, axis: int, name: str) -> int:
    if array.ndim == 0 or not -array.ndim <= axis < array.ndim:
        raise CalibrationError(
            f"tensor {name!r} has shape {tuple(array.shape)}, which has no channel axis {axis}; "
            "set PerChannel(axis=...) to the tensor's output-channel axis"
        )
    return axis % array.ndim


def _list_preview(indices: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


# ------------------------------------------------------------------------------------------------------------
# Histogram observers
class HistogramObserver(Observer):
    """Base of the histogram methods: a :class:`StreamingHistogram` of ``|x|`` (symmetric) or ``x`` (affine).

    Memory is bounded by ``2 * num_bins`` int64 counts plus fixed-size temporaries, whatever the number
    and size of the batches. Subclasses implement :meth:`_threshold_bins`.
    """

    _count_zeros = False

    def __init__(self, num_bins: int, symmetric: bool, *, name: str = "tensor", nan_policy: str = "warn"):
        if not (isinstance(num_bins, (int, np.integer)) and num_bins >= 2):
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
        self.num_bins = int(num_bins)
        super().__init__(symmetric, name=name, nan_policy=nan_policy)

    def _reset_state(self) -> None:
        self.histogram = StreamingHistogram(self.num_bins, signed=not self.symmetric, count_zeros=self._count_zeros)

    def collect(self, array) -> None:
        batch = self._finite_values(array)
        if batch is None:
            return
        values, vmin, vmax = batch
        if self.symmetric:
            # |x| is taken chunk by chunk inside the histogram's binning loop, bounding the temporaries.
            abs_min = 0.0 if vmin <= 0.0 <= vmax else min(abs(vmin), abs(vmax))
            self.histogram.add(values, abs_min, max(abs(vmin), abs(vmax)), absolute=True)
        else:
            self.histogram.add(values, vmin, vmax)

    def compute(self):
        """``(-threshold, threshold)`` if symmetric, else ``(a_min, a_max)``; within the observed range."""
        if self.num_values == 0:
            raise self._no_data_error()
        hist = self.histogram
        if hist.min == hist.max:
            # Constant data (or constant |x|): nothing to clip, and no bins to search.
            lower, upper = hist.min, hist.max
        else:
            lower_bins, upper_bins = self._threshold_bins(hist)
            width = hist.bin_width
            lower = max((hist.first_bin + lower_bins) * width, hist.min)
            upper = min((hist.first_bin + upper_bins) * width, hist.max)
        if self.symmetric:
            return (-upper if upper else 0.0), upper
        return lower, upper

    def _threshold_bins(self, hist: StreamingHistogram) -> tuple[float, float]:
        """Clipping range in bin units from the left edge of ``hist.counts[0]``."""
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    """The ``percentile``-th percentile of ``|x|`` (symmetric) or of each tail of ``x`` (affine).

    Affine ranges follow ``QUANT_MATH.md`` literally: ``a_max`` is the ``percentile``-th percentile of ``x``
    and ``a_min`` the ``(100 - percentile)``-th, so ``100 - percentile`` percent is clipped from *each*
    tail. (ONNX Runtime splits it in half between the tails instead.) Percentiles are read from a
    streaming histogram with linear interpolation inside the bin, within one bin width of the exact
    percentile of all the data.

    Parameters
    ----------
    percentile : float
        In ``(50, 100]``; 99.99 or 99.999 are typical.
    num_bins : int
        Histogram resolution (see :class:`StreamingHistogram`).

    Examples
    --------
    >>> observer = PercentileObserver(90.0, num_bins=16, symmetric=True, name="relu1")
    >>> observer.collect(np.arange(20, dtype=np.float32) + 0.5)  # one value per bin [k, k+1)
    >>> observer.compute()  # 18 of the 20 values are below 18.0
    (-18.0, 18.0)
    """

    def __init__(
        self,
        percentile: float = 99.99,
        num_bins: int = 2048,
        *,
        symmetric: bool = False,
        name: str = "tensor",
        nan_policy: str = "warn",
    ):
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)
        super().__init__(num_bins, symmetric, name=name, nan_policy=nan_policy)

    def _threshold_bins(self, hist):
        fraction = self.percentile / 100.0
        upper = histogram_quantile(hist.counts, fraction)
        lower = 0.0 if self.symmetric else histogram_quantile(hist.counts, 1.0 - fraction)
        return lower, upper


class EntropyObserver(HistogramObserver):
    """TensorRT's KL-divergence calibration: the clipping threshold whose quantized histogram is closest.

    Symmetric: a histogram of ``|x|``; for every threshold from ``start_bins`` bins up to the whole
    range, the histogram clipped there is compared with its quantization to ``num_quantized_bins``
    levels (:func:`~tvmquant.calibration.histogram.entropy_divergences`), and the threshold of smallest
    ``KL(P || Q)`` wins. This is the GTC 2017 algorithm as NVIDIA's ``pytorch_quantization`` implements it,
    including its ``bins[0] = bins[1]``: the bin holding 0 gets its neighbour's count, so that the spike of
    exact zeros after a ReLU does not dominate the divergence (without it, post-ReLU thresholds collapse to a
    fraction of the range: 55% instead of 91% accuracy on the bundled Fashion-MNIST model).

    Affine: a histogram of ``x`` over ``[min(x, 0), max(x, 0)]``, searched over windows that clip both tails
    at the same magnitude until one tail runs out of data (see
    :func:`~tvmquant.calibration.histogram.candidate_windows`), each quantized to
    ``2 * num_quantized_bins`` levels (``2**bits``: an affine grid spends all its levels on the window).
    The affine grid has one offset (the zero point) and one step, so searching one magnitude keeps the
    search as cheap as TensorRT's, and for one-sided data (ReLU outputs) it is TensorRT's search on ``x``.

    Parameters
    ----------
    num_bins : int
        Histogram resolution (see :class:`StreamingHistogram`): thresholds are searched bin by bin.
    start_bins : int
        Narrowest window searched, in bins (TensorRT: 128 of 2048).
    num_quantized_bins : int
        Quantization levels on ``[0, threshold]``, ``2**(bits - 1)`` (128 for int8).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> observer = EntropyObserver(symmetric=True, name="fc1.out")
    >>> for _ in range(4):
    ...     observer.collect(rng.standard_normal(10_000).astype(np.float32))
    >>> a_min, a_max = observer.compute()
    >>> round(a_max, 3), round(observer.histogram.max, 3)  # the threshold clips the Gaussian's tail
    (4.023, 4.732)
    """

    def __init__(
        self,
        num_bins: int = 2048,
        start_bins: int = 128,
        num_quantized_bins: int = 128,
        *,
        symmetric: bool = False,
        name: str = "tensor",
        nan_policy: str = "warn",
    ):
        if not (isinstance(num_quantized_bins, (int, np.integer)) and num_quantized_bins >= 2):
            raise ValueError(f"num_quantized_bins must be an int >= 2, got {num_quantized_bins!r}")
        if not (isinstance(start_bins, (int, np.integer)) and 2 <= start_bins):
            raise ValueError(f"start_bins must be an int >= 2, got {start_bins!r}")
        self.start_bins = int(start_bins)
        self.num_quantized_bins = int(num_quantized_bins)
        super().__init__(num_bins, symmetric, name=name, nan_policy=nan_policy)

    @property
    def num_levels(self) -> int:
        """Quantization levels across a candidate window."""
        return self.num_quantized_bins if self.symmetric else 2 * self.num_quantized_bins

    def _threshold_bins(self, hist):
        num_levels = self.num_levels
        starts, stops = candidate_windows(
            hist.first_bin, len(hist.counts), hist.signed, min_width=max(self.start_bins, num_levels)
        )
        if stops[0] - starts[0] < num_levels:
            # Fewer bins than levels in the whole range: quantizing loses nothing to clip for; keep it all.
            return float(starts[-1]), float(stops[-1])
        best = entropy_window(without_zero_spike(hist), starts, stops, num_levels)
        return float(starts[best]), float(stops[best])


def without_zero_spike(hist) -> np.ndarray:
    """The histogram's counts with the bin that holds 0 set to its right neighbour's count (TensorRT)."""
    counts = hist.counts.copy()
    zero = -hist.first_bin
    if 0 <= zero < len(counts) - 1:
        counts[zero] = counts[zero + 1]
    return counts


class MSEObserver(HistogramObserver):
    """The clipping range minimising the expected squared quantization error over the histogram.

    The error model (see :func:`~tvmquant.calibration.histogram.mse_errors`): uniform rounding noise
    ``scale**2 / 12`` inside the range (exact zeros excluded, 0 is always on the grid) plus the exact mean
    clipping error of each clipped bin. Candidates are the same windows as for the entropy method, every
    width from one bin up. Symmetric: thresholds on ``|x|`` with ``qmax`` steps on ``[0, threshold]``;
    affine: windows of ``x`` with ``qmax - qmin`` steps.

    Parameters
    ----------
    num_bins : int
        Histogram resolution.
    bits : int
        Used when ``qmin`` / ``qmax`` are not given: symmetric ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``,
        affine ``[0, 2**bits - 1]``.
    qmin, qmax : int, optional
        The quantized range (``TensorSpec.qmin`` / ``qmax``); only ``qmax`` (symmetric) or
        ``qmax - qmin`` (affine) matters.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> observer = MSEObserver(symmetric=True, name="fc1.out")
    >>> observer.collect(rng.standard_normal(400_000).astype(np.float32))
    >>> a_min, a_max = observer.compute()
    >>> 3.7 < a_max < 4.1  # int8 MSE-optimal clipping of a unit Gaussian: about 3.9 sigma (ACIQ)
    True
    """

    _count_zeros = True

    def __init__(
        self,
        num_bins: int = 2048,
        *,
        bits: int = 8,
        qmin: int | None = None,
        qmax: int | None = None,
        symmetric: bool = False,
        name: str = "tensor",
        nan_policy: str = "warn",
    ):
        if (qmin is None) != (qmax is None):
            raise ValueError("give both qmin and qmax, or neither (then bits sets them)")
        if qmin is None:
            if not (isinstance(bits, (int, np.integer)) and 2 <= bits <= 16):
                raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
            qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        if not qmin < qmax or (symmetric and qmax <= 0):
            raise ValueError(f"need qmin < qmax (and qmax > 0 when symmetric), got qmin={qmin}, qmax={qmax}")
        self.qmin, self.qmax = int(qmin), int(qmax)
        super().__init__(num_bins, symmetric, name=name, nan_policy=nan_policy)

    @property
    def num_steps(self) -> int:
        """Quantization steps across a candidate window."""
        return self.qmax if self.symmetric else self.qmax - self.qmin

    def _threshold_bins(self, hist):
        starts, stops = candidate_windows(hist.first_bin, len(hist.counts), hist.signed)
        best = mse_window(hist.counts, hist.first_bin, starts, stops, self.num_steps, hist.num_zeros)
        return float(starts[best]), float(stops[best])


# ------------------------------------------------------------------------------------------------------------
def make_observer(spec: TensorSpec, name: str, nan_policy: str = "warn") -> Observer:
    """The observer that calibrates a tensor quantized as ``spec``.

    ``spec.method`` picks the statistic, ``spec.scheme`` symmetric or affine, ``spec.bits`` the levels of
    the entropy and MSE searches, ``spec.granularity`` per tensor or per channel (``Max`` per channel uses
    the fast :class:`PerChannelMaxObserver`, other methods one observer per channel).

    Parameters
    ----------
    spec : TensorSpec
        How the tensor is quantized.
    name : str
        The tensor's name, used in every warning and error.
    nan_policy : str
        ``"warn"`` or ``"error"`` (``QuantConfig.nan_policy``).

    Examples
    --------
    >>> from tvmquant.config import TensorSpec, Percentile, PerChannel
    >>> make_observer(TensorSpec("uint8", "affine", method=Percentile(99.9)), "relu1")
    PercentileObserver(name='relu1', symmetric=False, batches=0, values=0)
    >>> make_observer(TensorSpec("int8", "symmetric", PerChannel(0)), "conv1.weight")
    PerChannelMaxObserver(name='conv1.weight', symmetric=True, batches=0, values=0)
    """
    if not isinstance(spec, TensorSpec):
        raise TypeError(f"make_observer needs a TensorSpec, got {type(spec).__name__}")
    symmetric = spec.scheme == "symmetric"
    method = spec.method

    def per_tensor(observer_name: str) -> Observer:
        common = {"symmetric": symmetric, "name": observer_name, "nan_policy": nan_policy}
        if isinstance(method, Max):
            return MaxObserver(**common)
        if isinstance(method, Percentile):
            return PercentileObserver(method.percentile, method.num_bins, **common)
        if isinstance(method, Entropy):
            return EntropyObserver(method.num_bins, method.start_bins, 2 ** (spec.bits - 1), **common)
        if isinstance(method, MSE):
            return MSEObserver(method.num_bins, qmin=spec.qmin, qmax=spec.qmax, **common)
        raise TypeError(f"unknown calibration method {method!r} for tensor {observer_name!r}")

    if isinstance(spec.granularity, PerChannel):
        axis = spec.granularity.axis
        if isinstance(method, Max):
            return PerChannelMaxObserver(axis, symmetric, name=name, nan_policy=nan_policy)
        return PerChannelObserver(axis, per_tensor, name=name, nan_policy=nan_policy)
    return per_tensor(name)
