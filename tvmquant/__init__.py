"""tvmquant: INT8 quantization for Apache TVM (Relax).

>>> import tvmquant
>>> qmodel = tvmquant.quantize("model.onnx", calib_data=calibration_batches)  # doctest: +SKIP
>>> print(qmodel.summary())  # doctest: +SKIP
>>> run = qmodel.compile()  # doctest: +SKIP

Importing tvmquant imports TVM but neither onnx nor torch (frontends load lazily).
"""

__version__ = "0.1.0"

from .api import CompiledModel, QuantizedModel, load, pipeline, quantize  # noqa: E402
from .config import (  # noqa: E402
    MSE,
    PRESETS,
    Entropy,
    Max,
    PerChannel,
    Percentile,
    PerTensor,
    QuantConfig,
    SkipName,
    SkipOpType,
    SkipPredicate,
    TensorSpec,
)
from .passes import AnnotateQuant, BindQuantParams, RealizeQuant  # noqa: E402

__all__ = [
    "quantize",
    "pipeline",
    "load",
    "QuantizedModel",
    "CompiledModel",
    "QuantConfig",
    "TensorSpec",
    "PerTensor",
    "PerChannel",
    "Max",
    "Percentile",
    "Entropy",
    "MSE",
    "SkipName",
    "SkipOpType",
    "SkipPredicate",
    "PRESETS",
    "AnnotateQuant",
    "BindQuantParams",
    "RealizeQuant",
]
