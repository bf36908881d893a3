"""The QDQ export describes the model tvmquant computes: ONNX Runtime running the exported file gives
tvmquant's integer outputs (issue 17: within one output step, or >= 40 dB on FP32 logits; in practice bit for bit).

ONNX Runtime sessions are :func:`tvmquant.testing.ort.ort_session` (default graph optimizations, so its fused
integer kernels QLinearConv/QGemm run, with ``exact_int8`` so that they accumulate exactly on CPUs without VNNI).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from models import calibration_images, residual_cnn, resnet_style, transformer_block
from onnx import numpy_helper

import tvmquant
from tvmquant.testing.ort import ort_session

# The ImageNet exports are git-ignored (bench/models/export_imagenet.py writes them); TVMQUANT_BENCH may name
# another checkout's bench/ that has them.
BENCH = os.environ.get("TVMQUANT_BENCH", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    return np.inf if noise == 0 else 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def _export_and_compare(qmodel, path, inputs, fused_adds=False) -> list:
    qmodel.export_onnx(path, fused_adds=fused_adds)
    onnx.checker.check_model(onnx.load(path))
    integer, session = qmodel.compile(), ort_session(str(path))
    name = session.get_inputs()[0].name
    return [(integer(x[None]), session.run(None, {name: x[None]})[0]) for x in inputs]


def _small_resnet():
    """A projection and an identity shortcut; the stem conv has a dead (all-zero) and a nearly dead output
    channel, as BatchNorm folding leaves in EfficientNet-Lite0."""
    model = resnet_style(stages=((2, 4),), size=16)
    stem = next(init for init in model.graph.initializer if init.name == model.graph.node[0].input[1])
    weight = numpy_helper.to_array(stem).copy()
    weight[0] = 0
    weight[1] *= 1e-7  # nearly dead: a weight scale near MIN_SCALE, whose INT32 bias would overflow
    stem.CopyFrom(numpy_helper.from_array(weight, stem.name))
    bias_init = next(init for init in model.graph.initializer if init.name == model.graph.node[0].input[2])
    bias = numpy_helper.to_array(bias_init).copy()
    bias[1] = 5.0  # / (scale_x * 1e-8) would overflow INT32
    bias_init.CopyFrom(numpy_helper.from_array(bias, bias_init.name))
    return model


@pytest.mark.parametrize(
    "build",
    [
        _small_resnet,
        pytest.param(residual_cnn, marks=pytest.mark.slow),
        pytest.param(transformer_block, marks=pytest.mark.slow),
    ],
    ids=["resnet", "cnn", "transformer"],
)
def test_ort_runs_the_export_as_tvmquant_computes_it(tmp_path, build):
    model = build()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = np.random.default_rng(0).standard_normal([8, *shape[1:]]).astype(np.float32)
    if len(shape) == 4:
        data = calibration_images(8, size=shape[-1])
    qmodel = tvmquant.quantize(model, calib_data=data, progress=False, report_batches=0)
    for expected, got in _export_and_compare(qmodel, tmp_path / "qdq.onnx", data[:3]):
        assert sqnr_db(expected, got) >= 40
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # exact for the CNNs; FP32 ops round
    adds = sum(1 for layer in qmodel.layers if layer.op_type == "add" and layer.quantized)
    ops = [node.op_type for node in onnx.load(tmp_path / "qdq.onnx").graph.node]
    assert ops.count("Sum") == adds  # residual adds as Sum, which ONNX Runtime runs as defined
    if build is _small_resnet:
        assert adds == 2 and "Add" not in ops
        # the dead channel gets the widest scale of its weight (not 1e-8), the nearly dead one a scale its bias
        # fits at, so the stem's bias is INT32 in tvmquant and in the export (ORT quantizing it itself overflowed)
        scale = np.asarray(qmodel.table["conv2d_0.weight"].scale)
        assert scale[0] == scale.max() and scale[1] > 1e-8
        assert "b2_int8" in {init.name for init in onnx.load(tmp_path / "qdq.onnx").graph.initializer}
        qmodel.export_onnx(tmp_path / "fused.onnx", fused_adds=True)
        fused = [node.op_type for node in onnx.load(tmp_path / "fused.onnx").graph.node]
        assert fused.count("Add") == adds and "Sum" not in fused


@pytest.mark.slow
def test_fmnist_export_matches_integer_model(tmp_path):
    from tvmquant.examples import fmnist_model_path, load_fmnist_example

    calib, test_x, _ = load_fmnist_example()
    qmodel = tvmquant.quantize(fmnist_model_path(), calib_data=calib[:64], progress=False, report_batches=0)
    for expected, got in _export_and_compare(qmodel, tmp_path / "fmnist_qdq.onnx", test_x[:8]):
        assert sqnr_db(expected, got) >= 40 and np.argmax(expected) == np.argmax(got)
        assert np.array_equal(expected, got)


def _imagenet(name: str):
    model = os.path.join(BENCH, "models", "onnx", f"{name}.onnx")
    data = os.path.join(BENCH, "data", "imagenet_eval.npz")
    if not (os.path.isfile(model) and os.path.isfile(data)):
        pytest.skip(f"{name}: bench/models/onnx/{name}.onnx or bench/data/imagenet_eval.npz is absent")
    sys.path.insert(0, os.path.join(BENCH, "models"))
    try:
        from imagenet_data import preprocess
    finally:
        sys.path.pop(0)
    with np.load(data) as arrays:
        return model, preprocess(arrays["calib_u8"][:8], name), preprocess(arrays["labelled_u8"][:4], name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v2",
        "efficientnet_lite0",  # its bottom/right pads once came out of a fused conv epilogue half-written
    ],
)
def test_imagenet_export_matches_integer_model(tmp_path, name):
    model, calib, images = _imagenet(name)
    qmodel = tvmquant.quantize(model, calib_data=calib, progress=False, report_batches=0)
    results = _export_and_compare(qmodel, tmp_path / "qdq.onnx", images)
    for expected, got in results:
        assert sqnr_db(expected, got) >= 40  # was 22.3 dB on MobileNetV2 before adds were written as Sum
