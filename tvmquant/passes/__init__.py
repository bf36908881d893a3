"""Graph passes over Relax: AnnotateQuant -> calibrate -> BindQuantParams -> RealizeQuant.

Run :func:`tvmquant.frontend.prepare.prepare` first (constant weights, BatchNorm folded, canonical clips).
Every pass is a ``tvm.transform.Pass``: call it on a module (``AnnotateQuant(config)(mod)``) or compose it in a
``tvm.transform.Sequential``; either way its errors reach the caller as tvmquant's own (``SkipRuleError``, ...).

``LayerInfo`` (:mod:`tvmquant.op_table`) and ``QParams`` (:mod:`tvmquant.qparams`) live below the stages and
are re-exported here.
"""

from ..op_table import LayerInfo
from ..qparams import QParams, Role
from .annotate import AnnotateQuant, SkipRuleError, layers_of
from .calibrate import BindQuantParams, calibrate
from .realize import ExposeQuantizedTensors, RealizeQuant

__all__ = [
    "AnnotateQuant",
    "BindQuantParams",
    "RealizeQuant",
    "ExposeQuantizedTensors",
    "LayerInfo",
    "QParams",
    "Role",
    "SkipRuleError",
    "calibrate",
    "layers_of",
]
