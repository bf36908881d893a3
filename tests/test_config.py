"""Config validation and JSON round trips."""

import json

import pytest

from tvmquant import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_round_trip_through_json(name):
    preset = C.PRESETS[name]
    data = json.loads(json.dumps(preset.to_dict()))
    assert data["version"] == C.CONFIG_VERSION
    assert C.QuantConfig.from_dict(data) == preset


def test_every_method_and_skip_rule_round_trips():
    for method in (C.Max(), C.Percentile(99.9, 1024), C.Entropy(2048, 256), C.MSE(512)):
        cfg = C.QuantConfig(
            activation=C.TensorSpec("int8", "symmetric", method=method, bits=6),
            skip=("conv_0", "op:matmul", C.SkipOpType("add")),
        )
        assert C.QuantConfig.from_json(cfg.to_json()) == cfg


def test_default_is_vnni_preset():
    cfg = C.QuantConfig()
    assert cfg.activation.dtype == "uint8" and cfg.activation.scheme == "affine"
    assert cfg.weight.dtype == "int8" and cfg.weight.scheme == "symmetric"
    assert cfg.weight.granularity == C.PerChannel(0)


def test_qrange_of_specs():
    assert (C.TensorSpec("int8", "symmetric").qmin, C.TensorSpec("int8", "symmetric").qmax) == (-127, 127)
    assert (C.TensorSpec("uint8", "affine").qmin, C.TensorSpec("uint8", "affine").qmax) == (0, 255)
    spec4 = C.TensorSpec("int8", "affine", bits=4)
    assert (spec4.qmin, spec4.qmax) == (-8, 7)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: C.TensorSpec(dtype="int16"), "dtype must be one of"),
        (lambda: C.TensorSpec(scheme="asym"), "scheme must be one of"),
        (lambda: C.TensorSpec(bits=9), "bits must be an int in"),
        (lambda: C.TensorSpec("uint8", "symmetric"), "symmetric scheme needs a signed dtype"),
        (lambda: C.Percentile(20), "percentile must be in"),
        (lambda: C.Entropy(num_bins=8), "num_bins must be an int"),
        (lambda: C.QuantConfig(nan_policy="ignore"), "nan_policy must be"),
        (lambda: C.QuantConfig(skip=(3,)), "skip entry 3"),
        (lambda: C.QuantConfig(activation=C.TensorSpec("uint8", "affine", C.PerChannel(1))), "per-channel"),
    ],
)
def test_invalid_values_fail_loudly(build, message):
    with pytest.raises(C.ConfigError, match=message):
        build()


def test_misspelled_keys_fail_loudly():
    data = C.QuantConfig().to_dict()
    data["activation"]["shceme"] = "affine"
    with pytest.raises(C.ConfigError, match="shceme"):
        C.QuantConfig.from_dict(data)
    data = C.QuantConfig().to_dict()
    data["version"] = 99
    with pytest.raises(C.ConfigError, match="version"):
        C.QuantConfig.from_dict(data)


def test_predicate_skips_work_but_refuse_serialisation():
    cfg = C.QuantConfig(skip=(lambda layer: layer.op_type == "add",))
    assert isinstance(cfg.skip[0], C.SkipPredicate)
    with pytest.raises(C.ConfigError, match="cannot be saved"):
        cfg.to_dict()


def test_configs_are_frozen():
    cfg = C.QuantConfig()
    with pytest.raises(AttributeError):
        cfg.nan_policy = "error"
    assert cfg.replace(nan_policy="error").nan_policy == "error"


def test_op_methods_and_dynamic_round_trip_and_errors():
    cfg = C.QuantConfig(op_methods=(C.OpMethod("matmul", C.Percentile(99.9)), C.OpMethod("conv2d", C.MSE())))
    assert C.QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.activation_spec("matmul").method == C.Percentile(99.9)
    assert cfg.activation_spec("add") == cfg.activation
    assert C.X86_VNNI.activation_spec("matmul").method == C.Max()
    assert C.QuantConfig().op_methods == ()  # a plain config has no overrides; the default preset has one
    assert C.QuantConfig.from_dict(C.DYNAMIC.to_dict()).dynamic and not C.X86_VNNI.dynamic
    with pytest.raises(C.ConfigError, match="op_type must be one of"):
        C.OpMethod("softmax")
    with pytest.raises(C.ConfigError, match="names an op type twice"):
        C.QuantConfig(op_methods=(C.OpMethod("matmul"), C.OpMethod("matmul", C.MSE())))
    with pytest.raises(C.ConfigError, match="Dynamic\\(\\) applies to activations only"):
        C.QuantConfig(weight=C.TensorSpec("int8", "symmetric", C.PerChannel(0), method=C.Dynamic()))
    with pytest.raises(C.ConfigError, match="auto_skip"):
        C.DYNAMIC.replace(auto_skip=C.AutoSkip())
    with pytest.raises(C.ConfigError, match="unknown key"):
        C.QuantConfig.from_dict({**C.X86_VNNI.to_dict(), "op_methods": [{"op_type": "matmul", "methd": {}}]})
