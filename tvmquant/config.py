"""The one configuration type of tvmquant.

Everything that changes how a model is quantized lives in a frozen dataclass here, validated when it is
built, and serialisable to JSON through :meth:`QuantConfig.to_dict` / :meth:`QuantConfig.from_dict` with a
version field. Granularities, calibration methods and skip rules are small typed values, never free-form
option dicts, so a misspelled key or value fails loudly.

This module imports no TVM (only :mod:`tvmquant.quant_math`, for the integer ranges), so that configs load
cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .quant_math import QUANT_DTYPES, SCHEMES, qrange

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what is allowed."""


# --------------------------------------------------------------------------------------------------------------
# Granularity
@dataclass(frozen=True)
class PerTensor:
    """One (scale, zero_point) for the whole tensor."""

    def to_dict(self) -> dict:
        return {"kind": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    """A (scale, zero_point) per index of ``axis`` (the output-channel axis of a weight: 0 for OIHW)."""

    axis: int = 0

    def __post_init__(self):
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ConfigError(f"PerChannel.axis must be an int, got {self.axis!r}")

    def to_dict(self) -> dict:
        return {"kind": "per_channel", "axis": self.axis}


Granularity = Union[PerTensor, PerChannel]


# --------------------------------------------------------------------------------------------------------------
# Calibration methods
@dataclass(frozen=True)
class Max:
    """The observed minimum and maximum (max ``|x|`` for symmetric schemes)."""

    def to_dict(self) -> dict:
        return {"kind": "max"}


@dataclass(frozen=True)
class Percentile:
    """The ``percentile``-th percentile of ``|x|`` (symmetric) or of each tail (affine), from a histogram."""

    percentile: float = 99.99
    num_bins: int = 2048

    def __post_init__(self):
        if not (50.0 < float(self.percentile) <= 100.0):
            raise ConfigError(f"Percentile.percentile must be in (50, 100], got {self.percentile!r}")
        _check_bins("Percentile", self.num_bins)

    def to_dict(self) -> dict:
        return {"kind": "percentile", "percentile": float(self.percentile), "num_bins": self.num_bins}


@dataclass(frozen=True)
class Entropy:
    """TensorRT-style KL-divergence threshold search over a ``num_bins`` histogram, from ``start_bins`` up."""

    num_bins: int = 2048
    start_bins: int = 128

    def __post_init__(self):
        _check_bins("Entropy", self.num_bins)
        if not (isinstance(self.start_bins, int) and 2 <= self.start_bins <= self.num_bins):
            raise ConfigError(
                f"Entropy.start_bins must be an int in [2, num_bins={self.num_bins}], got {self.start_bins!r}"
            )

    def to_dict(self) -> dict:
        return {"kind": "entropy", "num_bins": self.num_bins, "start_bins": self.start_bins}


@dataclass(frozen=True)
class MSE:
    """The clipping threshold minimising the mean squared quantization error over a histogram."""

    num_bins: int = 2048

    def __post_init__(self):
        _check_bins("MSE", self.num_bins)

    def to_dict(self) -> dict:
        return {"kind": "mse", "num_bins": self.num_bins}


@dataclass(frozen=True)
class Dynamic:
    """Dynamic quantization: no calibration; each activation's range is computed at run time, per row.

    The input of a matmul gets one (scale, zero_point) per row (per token: the min and max over the reduced axis
    ``K``), the second operand of an activation x activation matmul (attention ``QK^T``, ``PV``) one per column,
    a conv input one per tensor. Weights stay per channel. Only linear layers (matmul, conv2d) are quantized:
    adds, pools and concats have no run-time range to share. The integer model runs the same INT8 matmuls as a
    static one, with the scales and zero-point corrections computed by small reductions before them.
    """

    def to_dict(self) -> dict:
        return {"kind": "dynamic"}


CalibMethod = Union[Max, Percentile, Entropy, MSE, Dynamic]
_METHODS = {"max": Max, "percentile": Percentile, "entropy": Entropy, "mse": MSE, "dynamic": Dynamic}


def _check_bins(owner: str, num_bins: Any) -> None:
    if not (isinstance(num_bins, int) and not isinstance(num_bins, bool) and 16 <= num_bins <= 1 << 16):
        raise ConfigError(f"{owner}.num_bins must be an int in [16, 65536], got {num_bins!r}")


# --------------------------------------------------------------------------------------------------------------
# Skip rules (partial quantization)
@dataclass(frozen=True)
class SkipName:
    """Keep in FP32 the layer whose name equals ``name`` (see ``QuantizedModel.summary()`` for names)."""

    name: str

    def to_dict(self) -> dict:
        return {"kind": "name", "name": self.name}


@dataclass(frozen=True)
class SkipOpType:
    """Keep in FP32 every layer of an op type, e.g. ``"conv2d"``, ``"matmul"``, ``"add"``."""

    op_type: str

    def to_dict(self) -> dict:
        return {"kind": "op_type", "op_type": self.op_type}


@dataclass(frozen=True)
class SkipPredicate:
    """Keep in FP32 every layer for which ``predicate(layer_info) -> bool`` is true. Not serialisable."""

    predicate: Callable[[Any], bool]
    description: str = "predicate"

    def to_dict(self) -> dict:
        raise ConfigError(
            f"skip predicate {self.description!r} is a Python callable and cannot be saved to JSON; "
            "use SkipName or SkipOpType in configs that must be saved"
        )


SkipRule = Union[SkipName, SkipOpType, SkipPredicate]


def _as_skip_rule(entry: Any) -> SkipRule:
    if isinstance(entry, (SkipName, SkipOpType, SkipPredicate)):
        return entry
    if isinstance(entry, str):
        if entry.startswith("op:"):
            return SkipOpType(entry[3:])
        return SkipName(entry)
    if callable(entry):
        return SkipPredicate(entry, getattr(entry, "__name__", "predicate"))
    raise ConfigError(
        f"skip entry {entry!r} is not a layer name, 'op:TYPE', SkipName/SkipOpType/SkipPredicate or a callable"
    )


@dataclass(frozen=True)
class AutoSkip:
    """Automatic partial quantization: keep the most sensitive layers in FP32 until the simulated model's
    output SQNR (vs FP32, on calibration data) reaches ``target_sqnr_db``, skipping at most ``max_layers``.

    A layer's sensitivity is the output SQNR with that layer alone quantized, measured on ``batches``
    calibration batches.
    """

    target_sqnr_db: float = 20.0
    max_layers: int = 8
    batches: int = 4

    def __post_init__(self):
        if not (0.0 < float(self.target_sqnr_db) < 200.0):
            raise ConfigError(f"AutoSkip.target_sqnr_db must be in (0, 200) dB, got {self.target_sqnr_db!r}")
        if not (isinstance(self.max_layers, int) and self.max_layers >= 1):
            raise ConfigError(f"AutoSkip.max_layers must be an int >= 1, got {self.max_layers!r}")
        if not (isinstance(self.batches, int) and self.batches >= 1):
            raise ConfigError(f"AutoSkip.batches must be an int >= 1, got {self.batches!r}")

    def to_dict(self) -> dict:
        return {"target_sqnr_db": float(self.target_sqnr_db), "max_layers": self.max_layers, "batches": self.batches}


@dataclass(frozen=True)
class OpMethod:
    """Calibrate the activation inputs of one op type with another method than ``QuantConfig.activation``'s.

    The default preset calibrates matmul inputs with :class:`Max`: a transformer's activations carry a few
    outlier channels (LayerNorm outputs, GELU outputs of trained BERT-class models) that are signal, not noise,
    and a percentile clips them (a trained MiniLM's embeddings: cosine 0.912 vs FP32 with the 99.99th
    percentile, 0.992 with max; bench/results/accuracy_bert.json), while conv inputs keep the percentile that
    serves CNNs best.
    """

    op_type: str
    method: CalibMethod = field(default_factory=Max)

    def __post_init__(self):
        from .op_table import LAYER_OP_TYPES

        if self.op_type not in LAYER_OP_TYPES:
            raise ConfigError(f"OpMethod.op_type must be one of {LAYER_OP_TYPES}, got {self.op_type!r}")
        if not isinstance(self.method, (Max, Percentile, Entropy, MSE)):
            raise ConfigError(f"OpMethod.method must be Max(), Percentile(p), Entropy() or MSE(), got {self.method!r}")

    def to_dict(self) -> dict:
        return {"op_type": self.op_type, "method": self.method.to_dict()}


# --------------------------------------------------------------------------------------------------------------
# Tensor specs and the config
@dataclass(frozen=True)
class TensorSpec:
    """How one class of tensors (activations or weights) is quantized."""

    dtype: str = "int8"
    scheme: str = "symmetric"
    granularity: Granularity = field(default_factory=PerTensor)
    bits: int = 8
    method: CalibMethod = field(default_factory=Max)

    def __post_init__(self):
        if self.dtype not in QUANT_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(QUANT_DTYPES)}, got {self.dtype!r}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            raise ConfigError(f"granularity must be PerTensor() or PerChannel(axis), got {self.granularity!r}")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ConfigError(f"bits must be an int in [2, 8], got {self.bits!r}")
        if not isinstance(self.method, (Max, Percentile, Entropy, MSE, Dynamic)):
            raise ConfigError(
                f"method must be Max(), Percentile(p), Entropy(), MSE() or Dynamic(), got {self.method!r}"
            )
        if self.scheme == "symmetric" and self.dtype == "uint8":
            raise ConfigError("a symmetric scheme needs a signed dtype: use dtype='int8' or scheme='affine'")

    @property
    def qmin(self) -> int:
        """Smallest quantized value (symmetric drops the most negative one)."""
        return qrange(self.dtype, self.scheme, self.bits)[0]

    @property
    def qmax(self) -> int:
        """Largest quantized value."""
        return qrange(self.dtype, self.scheme, self.bits)[1]

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "scheme": self.scheme,
            "granularity": self.granularity.to_dict(),
            "bits": self.bits,
            "method": self.method.to_dict(),
        }

    @staticmethod
    def from_dict(data: dict, where: str = "spec") -> "TensorSpec":
        data = dict(data)
        _reject_unknown(data, {"dtype", "scheme", "granularity", "bits", "method"}, where)
        if "granularity" in data:
            data["granularity"] = _granularity_from_dict(data["granularity"], f"{where}.granularity")
        if "method" in data:
            data["method"] = _method_from_dict(data["method"], f"{where}.method")
        return TensorSpec(**data)


@dataclass(frozen=True)
class QuantConfig:
    """Complete description of a quantization.

    Parameters
    ----------
    activation : TensorSpec
        How activations (inputs of quantized ops) are quantized; calibrated on data. Default: uint8 affine,
        per tensor, 99.99th percentile.
    weight : TensorSpec
        How constant weights are quantized; their ranges come from the weights themselves.
    skip : tuple of SkipRule
        Partial quantization: layers kept in FP32. Strings are layer names (``"op:conv2d"`` is an op type);
        callables are predicates. An entry that matches no layer is an error at annotation time.
    nan_policy : str
        NaN/Inf that arise *inside* the model during calibration (an overflowing tensor): ``"warn"`` counts and
        drops them with one warning per tensor; ``"error"`` stops. NaN/Inf in the calibration inputs themselves
        are always refused, naming the batch and input.
    auto_skip : AutoSkip or None
        Automatic, sensitivity-driven partial quantization (on top of ``skip``).
    op_methods : tuple of OpMethod
        Per op type calibration methods for activations, overriding ``activation.method`` (the default preset
        :data:`X86_VNNI` calibrates matmul inputs with max; a plain ``QuantConfig()`` has none).
    quantize_output_ops : tuple of str
        Op types whose outputs are quantized (residual ``add``, ``concat``, pooling) when their producers are.
    bias_correction : bool
        After calibration, cancel the mean error quantization adds to each conv2d/matmul output channel on the
        calibration data, through the layer's bias (one is added where a layer has none); layers are corrected
        in graph order, and a correction is kept only if it lowers the model's output error on the calibration
        data. See :mod:`tvmquant.passes.bias_correction`. CLI ``--bias-correction``. It helps most where the
        default loses most: MobileNetV2 logits 13.0 -> 17.6 dB, EfficientNet-Lite0 15.6 -> 20.0 dB
        (``bench/results/accuracy_imagenet_recovery.json``); at 4 bits it recovers most of the loss
        (``bench/results/accuracy_fmnist_bits.json``), so the ``W4A8``/``W4A4`` presets turn it on. Off by
        default for its cost: one forward pass of the simulated model over the calibration data per
        conv/matmul layer (MobileNetV2 on 84 images: 15 s -> about 4.5 minutes on 2 cores).
    equalize : bool
        Before annotation, cross-layer equalization (Nagel et al. 2019): rescale the output channels of a conv
        and the matching input channels of the conv after it (through ReLU, ReLU6 or nothing) so that their
        weight ranges match; the FP32 function is unchanged. See :mod:`tvmquant.passes.equalize`.
        CLI ``--equalize``. Off by default (per-channel weight scales already absorb most of what it evens
        out; see ``bench/results/accuracy_imagenet_recovery.json``).
    depthwise_per_channel : bool
        Give the input of each depthwise conv one activation scale per channel instead of one per tensor
        (``docs/quant_math.md``, section 4). A depthwise conv's output channel reads
        only its own input channel, so each channel's scale folds into that channel's requantize multiplier:
        the integer kernels are the same, at the same speed. Applies where the input feeds depthwise convs only
        and its zero points are all 0 (non-negative ReLU/ReLU6 outputs with ``uint8`` affine activations, any
        input with symmetric ones); other tensors keep one scale. CLI ``--depthwise-per-channel``. Off by
        default.

    Examples
    --------
    >>> from tvmquant.config import QuantConfig, TensorSpec, Percentile, PerChannel
    >>> cfg = QuantConfig(activation=TensorSpec("uint8", "affine", method=Percentile(99.99)))
    >>> QuantConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    activation: TensorSpec = field(
        default_factory=lambda: TensorSpec(dtype="uint8", scheme="affine", method=Percentile(99.99))
    )
    weight: TensorSpec = field(
        default_factory=lambda: TensorSpec(dtype="int8", scheme="symmetric", granularity=PerChannel(0))
    )
    skip: tuple = ()
    nan_policy: str = "warn"
    auto_skip: AutoSkip | None = None
    bias_correction: bool = False
    equalize: bool = False
    op_methods: tuple = ()
    depthwise_per_channel: bool = False

    def __post_init__(self):
        for flag in ("bias_correction", "equalize", "depthwise_per_channel"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        op_methods = (self.op_methods,) if isinstance(self.op_methods, OpMethod) else tuple(self.op_methods)
        if not all(isinstance(entry, OpMethod) for entry in op_methods):
            raise ConfigError(f"op_methods must be OpMethod(op_type, method) entries, got {self.op_methods!r}")
        op_types = [entry.op_type for entry in op_methods]
        if len(set(op_types)) != len(op_types):
            raise ConfigError(f"op_methods names an op type twice: {op_types}")
        object.__setattr__(self, "op_methods", op_methods)
        if self.auto_skip is not None and not isinstance(self.auto_skip, AutoSkip):
            raise ConfigError(f"auto_skip must be AutoSkip(...) or None, got {self.auto_skip!r}")
        if not isinstance(self.activation, TensorSpec) or not isinstance(self.weight, TensorSpec):
            raise ConfigError("activation and weight must be TensorSpec instances")
        if isinstance(self.activation.granularity, PerChannel):
            raise ConfigError("per-channel activations are not supported: use PerTensor() for activations")
        if isinstance(self.weight.method, Dynamic):
            raise ConfigError("weights are constants: Dynamic() applies to activations only")
        if isinstance(self.activation.method, Dynamic) and self.auto_skip is not None:
            raise ConfigError("auto_skip measures calibrated layers; with Dynamic() activations use skip=... instead")
        if self.weight.dtype != "int8":
            raise ConfigError("weights must be int8 (u8 x s8 and s8 x s8 are what INT8 hardware multiplies)")
        if self.nan_policy not in ("warn", "error"):
            raise ConfigError(f"nan_policy must be 'warn' or 'error', got {self.nan_policy!r}")
        skip = self.skip
        if isinstance(skip, (str, SkipName, SkipOpType, SkipPredicate)) or callable(skip):
            skip = (skip,)
        object.__setattr__(self, "skip", tuple(_as_skip_rule(s) for s in skip))

    @property
    def dynamic(self) -> bool:
        """True when activations are quantized at run time (:class:`Dynamic`): no calibration data needed."""
        return isinstance(self.activation.method, Dynamic)

    def activation_spec(self, op_type: str | None = None) -> TensorSpec:
        """The activation spec for inputs of ``op_type`` (``activation`` with its ``op_methods`` method)."""
        for entry in self.op_methods:
            if entry.op_type == op_type and not self.dynamic:
                return dataclasses.replace(self.activation, method=entry.method)
        return self.activation

    def replace(self, **changes) -> "QuantConfig":
        """A copy with some fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "version": CONFIG_VERSION,
            "activation": self.activation.to_dict(),
            "weight": self.weight.to_dict(),
            "skip": [s.to_dict() for s in self.skip],
            "nan_policy": self.nan_policy,
            "auto_skip": self.auto_skip.to_dict() if self.auto_skip is not None else None,
            "bias_correction": self.bias_correction,
            "equalize": self.equalize,
            "op_methods": [entry.to_dict() for entry in self.op_methods],
            "depthwise_per_channel": self.depthwise_per_channel,
        }

    @staticmethod
    def from_dict(data: dict) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", None)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version {version!r} is not supported (this tvmquant reads {CONFIG_VERSION})")
        _reject_unknown(
            data,
            {
                "activation",
                "weight",
                "skip",
                "nan_policy",
                "auto_skip",
                "bias_correction",
                "equalize",
                "op_methods",
                "depthwise_per_channel",
            },
            "config",
        )
        kwargs: dict[str, Any] = {}
        if "activation" in data:
            kwargs["activation"] = TensorSpec.from_dict(data["activation"], "activation")
        if "weight" in data:
            kwargs["weight"] = TensorSpec.from_dict(data["weight"], "weight")
        if "skip" in data:
            kwargs["skip"] = tuple(_skip_from_dict(s) for s in data["skip"])
        if "nan_policy" in data:
            kwargs["nan_policy"] = data["nan_policy"]
        if data.get("auto_skip") is not None:
            _reject_unknown(data["auto_skip"], {"target_sqnr_db", "max_layers", "batches"}, "config.auto_skip")
            kwargs["auto_skip"] = AutoSkip(**data["auto_skip"])
        for flag in ("bias_correction", "equalize", "depthwise_per_channel"):
            if flag in data:
                kwargs[flag] = data[flag]
        if "op_methods" in data:
            entries = []
            for entry in data["op_methods"]:
                if not isinstance(entry, dict):
                    raise ConfigError(f"config.op_methods entries must be objects, got {entry!r}")
                _reject_unknown(entry, {"op_type", "method"}, "config.op_methods entry")
                method = _method_from_dict(entry.get("method", {"kind": "max"}), "config.op_methods.method")
                entries.append(OpMethod(entry.get("op_type"), method))
            kwargs["op_methods"] = tuple(entries)
        return QuantConfig(**kwargs)

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2)

    @staticmethod
    def from_json(text: str) -> "QuantConfig":
        import json

        return QuantConfig.from_dict(json.loads(text))


def _reject_unknown(data: dict, known: set, where: str) -> None:
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(known)}")


def _granularity_from_dict(data: dict, where: str) -> Granularity:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == "per_tensor":
        _reject_unknown(data, set(), where)
        return PerTensor()
    if kind == "per_channel":
        _reject_unknown(data, {"axis"}, where)
        return PerChannel(**data)
    raise ConfigError(f"{where}.kind must be 'per_tensor' or 'per_channel', got {kind!r}")


def _method_from_dict(data: dict, where: str) -> CalibMethod:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _METHODS:
        raise ConfigError(f"{where}.kind must be one of {sorted(_METHODS)}, got {kind!r}")
    cls = _METHODS[kind]
    _reject_unknown(data, {f.name for f in dataclasses.fields(cls)}, where)
    return cls(**data)


def _skip_from_dict(data: dict) -> SkipRule:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == "name":
        _reject_unknown(data, {"name"}, "skip entry")
        return SkipName(**data)
    if kind == "op_type":
        _reject_unknown(data, {"op_type"}, "skip entry")
        return SkipOpType(**data)
    raise ConfigError(f"skip entry kind must be 'name' or 'op_type', got {kind!r}")


def method_from_name(name: str, percentile: float = 99.99) -> CalibMethod:
    """The calibration method for a CLI name (``max``, ``percentile``, ``entropy``, ``mse``)."""
    if name == "percentile":
        return Percentile(percentile)
    if name not in _METHODS:
        raise ConfigError(f"calibration method must be one of {sorted(_METHODS)}, got {name!r}")
    return _METHODS[name]()


# --------------------------------------------------------------------------------------------------------------
# Presets
#: x86 with VNNI: uint8 affine activations (vpdpbusd is u8 x s8) calibrated to the 99.99th percentile,
#: per-channel symmetric int8 weights. The default: it beat max calibration on MobileNetV2 and matched it on the
#: Fashion-MNIST CNN (bench/results/accuracy_*.json). Matmul inputs are calibrated with max (see OpMethod):
#: a transformer's outlier channels are signal (trained MiniLM: cosine 0.912 -> 0.992).
X86_VNNI = QuantConfig(op_methods=(OpMethod("matmul", Max()),))
#: Same as X86_VNNI with max-calibrated activations (no clipping at all).
X86_VNNI_MAX = QuantConfig(activation=TensorSpec("uint8", "affine", method=Max()))
#: X86_VNNI plus automatic partial quantization: the most sensitive layers stay FP32 until the output SQNR
#: reaches 20 dB (hard models such as MobileNetV2).
X86_VNNI_AUTO = X86_VNNI.replace(auto_skip=AutoSkip(target_sqnr_db=20.0, max_layers=8))
#: Symmetric int8 activations and weights (CUDA dp4a / tensor cores take s8 x s8).
SYMMETRIC_INT8 = QuantConfig(activation=TensorSpec("int8", "symmetric", method=Max()))
#: NVIDIA GPUs: int8 x int8 tensor cores (WMMA s8s8s32) need signed activations, so activations are symmetric
#: int8 (zero point 0), calibrated to the 99.99th percentile; weights per-channel symmetric int8.
CUDA_INT8 = QuantConfig(activation=TensorSpec("int8", "symmetric", method=Percentile(99.99)))
#: Per-tensor weights everywhere (for runtimes without per-channel support).
PER_TENSOR = QuantConfig(weight=TensorSpec("int8", "symmetric", PerTensor()))
#: 4-bit per-channel symmetric weights (values in [-7, 7]) with the default 8-bit activations, run on the int8
#: kernels; bias correction on (it recovers most of what 4-bit weights lose, bench/results/accuracy_fmnist_bits.json).
W4A8 = QuantConfig(weight=TensorSpec("int8", "symmetric", PerChannel(0), bits=4), bias_correction=True)
#: 4-bit weights and 4-bit uint8 affine activations (values in [0, 15]), on the int8 kernels; bias correction on.
W4A4 = W4A8.replace(activation=TensorSpec("uint8", "affine", bits=4, method=Percentile(99.99)))

#: Dynamic quantization: no calibration data; matmul inputs get per-row (per-token) uint8 ranges computed at run
#: time, attention's activation x activation matmuls int8 per row / per column, weights per-channel int8. Only
#: matmul and conv2d run in INT8. The usual choice for transformers (bench/results/accuracy_bert.json).
DYNAMIC = QuantConfig(activation=TensorSpec("uint8", "affine", method=Dynamic()))

#: BERT-class encoders: dynamic per-token activations (no calibration data), per-channel int8 weights, every
#: linear layer and the attention QK^T / PV batch matmuls in INT8. FP32: the embeddings (gathers and their adds),
#: the attention-mask arithmetic (its -3.4e38 fill cannot share a grid with the scores), softmax, LayerNorm, GELU
#: and the residual adds (their outlier channels). Measured on trained all-MiniLM-L6-v2, 197 sentences
#: (bench/results/accuracy_bert.json): mean cosine vs FP32 0.9986 (static default 0.992); keeping the FFN
#: down-projections FP32 as well gained only 0.0003 (40 sentences), so they stay INT8.
BERT_INT8 = DYNAMIC

PRESETS = {
    "x86_vnni": X86_VNNI,
    "x86_vnni_max": X86_VNNI_MAX,
    "x86_vnni_auto": X86_VNNI_AUTO,
    "symmetric_int8": SYMMETRIC_INT8,
    "cuda_int8": CUDA_INT8,
    "per_tensor": PER_TENSOR,
    "w4a8": W4A8,
    "w4a4": W4A4,
    "dynamic": DYNAMIC,
    "bert_int8": BERT_INT8,
}
DEFAULT = X86_VNNI
