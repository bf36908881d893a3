"""tvmquant: INT8 quantization for Apache TVM (Relax).

>>> import tvmquant
>>> qmodel = tvmquant.quantize("model.onnx", calib_data=calibration_batches)  # doctest: +SKIP
>>> print(qmodel.summary())  # doctest: +SKIP
>>> run = qmodel.compile()  # doctest: +SKIP

Importing tvmquant imports TVM but neither onnx nor torch (frontends load lazily).
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    MSE,
    PRESETS,
    AutoSkip,
    Entropy,
    Max,
    Percentile,
    PerChannel,
    PerTensor,
    QuantConfig,
    SkipName,
    SkipOpType,
    SkipPredicate,
    TensorSpec,
)

_LAZY = {
    "quantize": "api",
    "pipeline": "api",
    "load": "api",
    "QuantizedModel": "api",
    "CompiledModel": "api",
    "tune": "tuning",
    "finetune": "training",
    "AnnotateQuant": "passes",
    "BindQuantParams": "passes",
    "RealizeQuant": "passes",
}


def __getattr__(name):
    # TVM-dependent names load on first use, so that `tvmquant.config` and `tvmquant.calibration` stay
    # importable (and cheap) without TVM.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'tvmquant' has no attribute {name!r}")


__all__ = [
    "quantize",
    "tune",
    "finetune",
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
    "AutoSkip",
    "PRESETS",
    "AnnotateQuant",
    "BindQuantParams",
    "RealizeQuant",
]
