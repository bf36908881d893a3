"""Calibration: streaming observers that turn activations and weights into real ranges.

Pure numpy: importing this package imports neither TVM nor ONNX (a test checks it), so the algorithms can
be used, tested and benchmarked on their own. The calibration runner feeds each observed tensor's batches
to an observer made by :func:`make_observer` from the tensor's :class:`~tvmquant.config.TensorSpec`, then
passes ``observer.compute()`` to :func:`tvmquant.quant_math.compute_qparams`.

Examples
--------
>>> import numpy as np
>>> from tvmquant.calibration import make_observer
>>> from tvmquant.config import TensorSpec, Percentile
>>> from tvmquant.quant_math import compute_qparams
>>> spec = TensorSpec("uint8", "affine", method=Percentile(99.99))
>>> observer = make_observer(spec, "relu1", nan_policy="warn")
>>> for batch in np.random.default_rng(0).random((4, 1000), dtype=np.float32):
...     observer.collect(batch)
>>> a_min, a_max = observer.compute()
>>> scale, zero_point = compute_qparams(a_min, a_max, spec.dtype, spec.scheme, spec.bits)
>>> int(zero_point)
0
"""

from .histogram import StreamingHistogram
from .observers import (
    CalibrationError,
    CalibrationWarning,
    EntropyObserver,
    HistogramObserver,
    MaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    PerChannelMaxObserver,
    PerChannelObserver,
    make_observer,
)

__all__ = [
    "CalibrationError",
    "CalibrationWarning",
    "EntropyObserver",
    "HistogramObserver",
    "MaxObserver",
    "MSEObserver",
    "Observer",
    "PerChannelMaxObserver",
    "PerChannelObserver",
    "PercentileObserver",
    "StreamingHistogram",
    "make_observer",
]
