"""The quantization parameters of one tensor: :class:`QParams`, a frozen value with a typed :class:`Role`.

Calibration computes them (:meth:`QParams.from_range`), the QDQ frontend reads them off a pre-quantized model,
:class:`~tvmquant.passes.BindQuantParams` writes them into the graph and artifacts store them (the manifest's
``quant_table``, through :meth:`QParams.to_dict` / :meth:`QParams.from_dict`).

Below the stages (``frontend/``, ``passes/``): numpy only, no TVM.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .quant_math import DTYPE_RANGES, SCHEMES, compute_qparams, qrange

if TYPE_CHECKING:
    from .config import TensorSpec


class Role(str, enum.Enum):
    """What a quantized tensor is to its layer. A ``str``: ``Role.WEIGHT == "weight"``."""

    ACTIVATION = "activation"  # computed at run time; its range is calibrated on data
    WEIGHT = "weight"  # a constant; its range comes from its own values

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, eq=False)
class QParams:
    """Quantization parameters of one tensor: ``q = clip(round(x / scale) + zero_point, qmin, qmax)``.

    Frozen, and ``scale``/``zero_point`` are read-only copies, so a table handed to a pass or saved in an
    artifact cannot change under it; make a changed copy with ``dataclasses.replace(params, name=...)``.
    Validated when built: a role, dtype or scheme outside the allowed values, a range outside the dtype, or a
    scale that is not positive and finite is an error.

    Attributes
    ----------
    name : str
        The tensor's name (``conv2d_3.in0``, ``conv2d_3.weight``).
    role : Role
        ``Role.ACTIVATION`` or ``Role.WEIGHT`` (the strings ``"activation"``/``"weight"`` are accepted).
    dtype : str
        A key of :data:`tvmquant.quant_math.DTYPE_RANGES`.
    scheme : str
        One of :data:`tvmquant.quant_math.SCHEMES`.
    scale : np.ndarray of float32
        0-d per tensor; one per channel of ``axis`` otherwise.
    zero_point : np.ndarray of int32
    qmin, qmax : int
        The quantized range, inside the range of ``dtype``.
    axis : int or None
        The channel axis of per-channel parameters.
    a_min, a_max : np.ndarray or None
        The calibrated real range (absent for parameters read off a QDQ model).

    Examples
    --------
    >>> from tvmquant.config import TensorSpec
    >>> params = QParams.from_range("conv2d_0.in0", Role.ACTIVATION, TensorSpec("uint8", "affine"), -1.0, 3.0)
    >>> float(params.scale), int(params.zero_point), (params.qmin, params.qmax)
    (0.01568627543747425, 64, (0, 255))
    >>> QParams.from_dict(params.to_dict()) == params
    True
    """

    name: str
    role: Role
    dtype: str
    scheme: str
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None = None
    a_min: np.ndarray | None = None
    a_max: np.ndarray | None = None

    def __post_init__(self):
        where = f"quantization parameters of {self.name!r}"
        if self.role not in tuple(Role):
            raise ValueError(f"{where}: role must be one of {[role.value for role in Role]}, got {self.role!r}")
        if self.dtype not in DTYPE_RANGES:
            raise ValueError(f"{where}: dtype must be one of {sorted(DTYPE_RANGES)}, got {self.dtype!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"{where}: scheme must be one of {SCHEMES}, got {self.scheme!r}")
        low, high = DTYPE_RANGES[self.dtype]
        if not low <= int(self.qmin) < int(self.qmax) <= high:
            raise ValueError(
                f"{where}: [qmin, qmax] = [{self.qmin}, {self.qmax}] must be a range inside {self.dtype}'s "
                f"[{low}, {high}]"
            )
        scale, zero_point = _read_only(self.scale, np.float32), _read_only(self.zero_point, np.int64)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"{where}: scale must be positive and finite, got {scale.ravel()[:4]}")
        if np.any(zero_point < low) or np.any(zero_point > high):
            raise ValueError(f"{where}: zero point {zero_point.ravel()[:4]} is outside the {self.dtype} range")
        if self.axis is None and scale.size != 1:
            raise ValueError(f"{where}: {scale.size} scales (per channel) need a channel axis")
        fields = {
            "role": Role(self.role),
            "scale": scale,
            "zero_point": _read_only(zero_point, np.int32),
            "qmin": int(self.qmin),
            "qmax": int(self.qmax),
            "axis": int(self.axis) if self.axis is not None else None,
            "a_min": _read_only(self.a_min) if self.a_min is not None else None,
            "a_max": _read_only(self.a_max) if self.a_max is not None else None,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)  # the frozen dataclass's own way to set its fields

    def __eq__(self, other) -> bool:
        # The generated __eq__ would compare arrays (ambiguous truth value): equal means "saves the same".
        return isinstance(other, QParams) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """The JSON form stored in artifacts (manifest ``quant_table``) and library metadata."""
        return {
            "name": self.name,
            "role": self.role.value,
            "dtype": self.dtype,
            "scheme": self.scheme,
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
            "a_min": self.a_min.tolist() if self.a_min is not None else None,
            "a_max": self.a_max.tolist() if self.a_max is not None else None,
        }

    @staticmethod
    def from_dict(data: dict) -> QParams:
        """The parameters :meth:`to_dict` wrote (every artifact written so far reads back)."""
        known = {field.name for field in dataclasses.fields(QParams)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in quantization parameters; allowed: {sorted(known)}")
        return QParams(**data)

    @staticmethod
    def from_range(name: str, role: Role, spec: TensorSpec, a_min, a_max, axis: int | None = None) -> QParams:
        """The parameters of ``spec`` for the real range ``[a_min, a_max]`` (arrays for per-channel)."""
        scale, zero_point = compute_qparams(a_min, a_max, spec.dtype, spec.scheme, spec.bits)
        qmin, qmax = qrange(spec.dtype, spec.scheme, spec.bits)
        return QParams(name, role, spec.dtype, spec.scheme, scale, zero_point, qmin, qmax, axis, a_min, a_max)

    def scale_per_output(self, out_channels: int) -> np.ndarray:
        """The input scale each output channel of a depthwise conv sees (float32, ``[out_channels]``).

        For the per-channel input of a depthwise conv with ``out_channels = channels * multiplier``: output
        channel ``o`` reads input channel ``o // multiplier``. A per-tensor scale comes back as it is (0-d).
        """
        if self.axis is None:
            return self.scale.reshape(())
        if out_channels % self.scale.size:
            raise ValueError(
                f"{self.name!r}: {self.scale.size} channel scales do not divide {out_channels} output channels"
            )
        return np.repeat(self.scale.reshape(-1), out_channels // self.scale.size).astype(np.float32)


def _read_only(value, dtype=None) -> np.ndarray:
    array = np.array(value, dtype=dtype)  # a copy: the caller's array stays the caller's
    array.setflags(write=False)
    return array


__all__ = ["QParams", "Role"]
