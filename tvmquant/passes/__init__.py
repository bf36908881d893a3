"""Graph passes over Relax: AnnotateQuant -> calibrate -> BindQuantParams -> RealizeQuant.

Run :func:`tvmquant.frontend.prepare.prepare` first (constant weights, BatchNorm folded, canonical clips).
"""

from .annotate import AnnotateQuant, LayerInfo, layers_of
from .calibrate import BindQuantParams, QParams, calibrate
from .realize import ExposeQuantizedTensors, RealizeQuant

__all__ = [
    "AnnotateQuant",
    "BindQuantParams",
    "RealizeQuant",
    "ExposeQuantizedTensors",
    "LayerInfo",
    "QParams",
    "calibrate",
    "layers_of",
]
