"""QParams: a frozen, validated value that round-trips through the artifact JSON unchanged."""

import dataclasses
import json

import numpy as np
import pytest

from tvmquant.config import TensorSpec
from tvmquant.qparams import QParams, Role

#: A ``quant_table`` entry as artifacts before QParams was frozen wrote it (keys, order and values).
OLD_ACTIVATION = {
    "name": "conv2d_0.in0",
    "role": "activation",
    "dtype": "uint8",
    "scheme": "affine",
    "scale": 0.01568627543747425,
    "zero_point": 64,
    "qmin": 0,
    "qmax": 255,
    "axis": None,
    "a_min": -1.0,
    "a_max": 3.0,
}
OLD_WEIGHT = {
    "name": "conv2d_0.weight",
    "role": "weight",
    "dtype": "int8",
    "scheme": "symmetric",
    "scale": [0.003937007859349251, 0.007874015718698502],
    "zero_point": [0, 0],
    "qmin": -127,
    "qmax": 127,
    "axis": 0,
    "a_min": [-0.5, -1.0],
    "a_max": [0.25, 0.75],
}


def test_from_range_gives_what_old_artifacts_hold():
    activation = QParams.from_range("conv2d_0.in0", Role.ACTIVATION, TensorSpec("uint8", "affine"), -1.0, 3.0)
    assert activation.to_dict() == OLD_ACTIVATION
    weight_spec = TensorSpec("int8", "symmetric")
    weight = QParams.from_range("conv2d_0.weight", "weight", weight_spec, np.array([-0.5, -1.0]), [0.25, 0.75], 0)
    assert weight.to_dict() == OLD_WEIGHT
    assert weight.role is Role.WEIGHT  # a role given as a string is stored as the Role


@pytest.mark.parametrize("entry", [OLD_ACTIVATION, OLD_WEIGHT], ids=["per-tensor", "per-channel"])
def test_round_trip_through_json(entry):
    params = QParams.from_dict(json.loads(json.dumps(entry)))
    assert params.to_dict() == entry and list(params.to_dict()) == list(entry)
    assert QParams.from_dict(params.to_dict()) == params
    assert params.scale.dtype == np.float32 and params.zero_point.dtype == np.int32
    assert json.loads(json.dumps(params.to_dict())) == entry


def test_immutable():
    scale = np.array([0.5, 0.25], np.float32)
    params = QParams("w", Role.WEIGHT, "int8", "symmetric", scale, np.zeros(2, np.int32), -127, 127, axis=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.scale = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="read-only"):
        params.scale[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        params.zero_point[...] = 3
    scale[0] = 9.0  # the caller's array is the caller's: QParams holds a copy
    assert params.scale[0] == np.float32(0.5)
    renamed = dataclasses.replace(params, name="conv2d_1.weight")
    assert renamed.name == "conv2d_1.weight" and params.name == "w" and renamed.scale is not params.scale
    assert not renamed.scale.flags.writeable


@pytest.mark.parametrize(
    "change, message",
    [
        ({"role": "bias"}, "role must be one of"),
        ({"dtype": "int16"}, "dtype must be one of"),
        ({"scheme": "asymmetric"}, "scheme must be one of"),
        ({"qmin": -129}, "must be a range inside int8"),
        ({"qmin": 5, "qmax": 5}, "must be a range inside int8"),
        ({"scale": 0.0}, "scale must be positive and finite"),
        ({"scale": np.nan}, "scale must be positive and finite"),
        ({"zero_point": 200}, "outside the int8 range"),
        ({"scale": [0.1, 0.2], "zero_point": [0, 0]}, "need a channel axis"),
    ],
)
def test_bad_values_fail_loudly_naming_the_tensor(change, message):
    good = dict(
        name="x", role="activation", dtype="int8", scheme="affine", scale=0.1, zero_point=0, qmin=-128, qmax=127
    )
    with pytest.raises(ValueError, match=message) as error:
        QParams(**{**good, **change})
    assert "'x'" in str(error.value)
    with pytest.raises(ValueError, match="unknown key"):
        QParams.from_dict({**OLD_ACTIVATION, "bits": 8})


def test_role_is_a_string():
    assert Role("weight") is Role.WEIGHT and Role.WEIGHT == "weight"
    assert str(Role.ACTIVATION) == f"{Role.ACTIVATION}" == "activation"
    assert json.dumps(Role.WEIGHT) == '"weight"'
