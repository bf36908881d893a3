"""Pre-quantized QDQ models from ONNX Runtime: imported with their own scales, realized onto integer compute."""

import numpy as np
import onnx
import pytest
from models import calibration_images, residual_cnn, transformer_block
from onnx import numpy_helper

import tvmquant
from tvmquant import cli
from tvmquant.frontend.prepare import ModelError
from tvmquant.testing.ort import ort_quantize, ort_session


def output_step(qdq_path: str) -> float:
    """The quantization step of the model output (ORT quantizes it: Q/DQ right before the output)."""
    model = onnx.load(qdq_path)
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    node = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    assert node.op_type == "DequantizeLinear"
    return float(inits[node.input[1]])


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdq") / "cnn.onnx"
    onnx.save(residual_cnn(), str(path))
    return str(path)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_ort_qdq_models_realize_to_integers_and_match_ort(tmp_path, cnn_path, per_channel, activation_type):
    qdq_path = ort_quantize(
        cnn_path,
        calibration_images(8),
        "minmax",
        per_channel=per_channel,
        activation_type=activation_type,
        out_dir=str(tmp_path),
    )
    qmodel = tvmquant.quantize(qdq_path, progress=False)  # no calibration data needed
    assert qmodel.qdq is not None
    convs = [
        b.value
        for b in qmodel.mod["main"].body.blocks[0].bindings
        if getattr(b.value.op, "name", "") == "relax.nn.conv2d"
    ]
    assert len(convs) == 6 and all(str(c.attrs["out_dtype"]) == "int32" for c in convs)
    assert all(str(c.args[0].ty.dtype) == activation_type for c in convs)
    session = ort_session(qdq_path)
    run = qmodel.compile()
    images = calibration_images(6, seed=11)
    step = output_step(qdq_path)
    for image in images:
        expected = session.run(None, {"input": image[None]})[0]
        got = run(image[None])
        assert np.max(np.abs(got - expected)) <= step * 1.01  # within one output quantization step
    summary = qmodel.summary()
    assert sum(row["status"] == "int8" for row in summary.rows) >= 7


def test_qdq_weights_stay_the_same_integers(tmp_path, cnn_path):
    qdq_path = ort_quantize(cnn_path, calibration_images(8), "minmax", out_dir=str(tmp_path))
    qdq = onnx.load(qdq_path)
    originals = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    int8_weights = sorted(v.tobytes() for v in originals.values() if v.dtype == np.int8 and v.ndim == 4)
    qmodel = tvmquant.quantize(qdq_path, progress=False)
    realized = [
        b.value.args[1].value.numpy()
        for b in qmodel.mod["main"].body.blocks[0].bindings
        if getattr(b.value.op, "name", "") == "relax.nn.conv2d"
    ]
    assert sorted(w.tobytes() for w in realized) == int8_weights


def test_qdq_transformer_block(tmp_path):
    path = tmp_path / "tf.onnx"
    onnx.save(transformer_block(), str(path))
    data = np.random.default_rng(0).standard_normal((8, 1, 16, 32)).astype(np.float32).reshape(8, 16, 32)
    qdq_path = ort_quantize(str(path), data, "minmax", out_dir=str(tmp_path))
    qmodel = tvmquant.quantize(qdq_path, progress=False)
    matmuls = [
        b.value for b in qmodel.mod["main"].body.blocks[0].bindings if getattr(b.value.op, "name", "") == "relax.matmul"
    ]
    assert sum(str(m.attrs["out_dtype"]) == "int32" for m in matmuls) >= 6
    got = qmodel.compile()(data[:1])
    np.testing.assert_array_equal(got, qmodel.compile(mode="simulated")(data[:1]))  # realized == QDQ graph
    # ONNX Runtime running the graph as written (its fused attention/LayerNorm kernels round differently)
    expected = ort_session(qdq_path, optimize=False).run(None, {"input": data[:1]})[0]
    assert np.max(np.abs(expected - got)) <= output_step(qdq_path) * 1.01


def test_cli_quantizes_qdq_without_calibration(tmp_path, cnn_path):
    qdq_path = ort_quantize(cnn_path, calibration_images(8), "minmax", out_dir=str(tmp_path))
    out = tmp_path / "q.tvmq"
    assert cli.main(["quantize", qdq_path, "-o", str(out), "-q"]) == 0
    loaded = tvmquant.load(out)
    assert loaded.qdq is not None
    x = calibration_images(1, seed=3)
    np.testing.assert_allclose(loaded.compile()(x), ort_session(qdq_path).run(None, {"input": x})[0], atol=1e-5)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda scale, zp: (np.zeros_like(scale), zp), "scale must be positive"),
        (lambda scale, zp: (-scale, zp), "scale must be positive"),
    ],
)
def test_inconsistent_qdq_parameters_are_refused(tmp_path, cnn_path, corrupt, message):
    qdq_path = ort_quantize(cnn_path, calibration_images(8), "minmax", out_dir=str(tmp_path))
    model = onnx.load(qdq_path)
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    inits = {init.name: init for init in model.graph.initializer}
    scale = numpy_helper.to_array(inits[node.input[1]])
    zero_point = numpy_helper.to_array(inits[node.input[2]])
    new_scale, _ = corrupt(scale, zero_point)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32), node.input[1]))
    with pytest.raises(ModelError, match=message):
        tvmquant.quantize(model, progress=False)


def test_per_channel_axis_mismatch_is_refused(tmp_path, cnn_path):
    qdq_path = ort_quantize(cnn_path, calibration_images(8), "minmax", out_dir=str(tmp_path))
    model = onnx.load(qdq_path)
    inits = {i.name: i for i in model.graph.initializer}
    node = next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 4
    )
    for attribute in node.attribute:
        if attribute.name == "axis":
            attribute.i = 1  # weights are OIHW: the scales are along axis 0
    with pytest.raises(ModelError, match="per-channel scales on axis 1"):
        tvmquant.quantize(model, progress=False)


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("build", [residual_cnn, transformer_block], ids=["cnn", "transformer"])
def test_export_qdq_runs_in_ort_and_matches_simulate(tmp_path, build):
    model = build()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = np.random.default_rng(0).standard_normal([8, *shape[1:]]).astype(np.float32)
    qmodel = tvmquant.quantize(model, calib_data=data, progress=False, report_batches=0)
    path = tmp_path / "qdq.onnx"
    qmodel.export_onnx(path)
    exported = onnx.load(path)
    onnx.checker.check_model(exported)
    ops = [n.op_type for n in exported.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and "BatchNormalization" not in ops
    weights = [i for i in exported.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(weights) == sum(1 for layer in qmodel.layers if layer.weight)  # every quantized weight is int8
    per_channel = [
        n for n in exported.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)
    ]
    assert per_channel
    simulated = qmodel.compile(mode="simulated")
    exact, fused = ort_session(str(path), optimize=False), ort_session(str(path))
    for x in data[:3]:
        expected = simulated(x[None])
        np.testing.assert_allclose(exact.run(None, {"input": x[None]})[0], expected, rtol=1e-5, atol=1e-5)
        # Fused: exact for the transformer; close, not exact, for the CNN, whose BatchNorm-folded first conv weight
        # the export keeps in FP32 and ORT's optimizer then quantizes with scales of its own.
        got = fused.run(None, {"input": x[None]})[0]
        noise = np.sum((expected - got) ** 2)
        assert noise == 0 or 10 * np.log10(np.sum(expected**2) / noise) > 30


def test_cli_export_round_trips_through_qdq_import(tmp_path, cnn_path):
    data = calibration_images(8)
    qmodel = tvmquant.quantize(cnn_path, calib_data=data, progress=False, report_batches=0)
    qmodel.save(tmp_path / "m.tvmq")
    assert (
        cli.main(["export", str(tmp_path / "m.tvmq"), "--format", "onnx-qdq", "-o", str(tmp_path / "q.onnx"), "-q"])
        == 0
    )
    reimported = tvmquant.quantize(str(tmp_path / "q.onnx"), progress=False)
    x = data[:1]
    np.testing.assert_allclose(reimported.compile()(x), qmodel.compile()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~25-45 s; kept out of the default suite's 15-minute budget
def test_export_fmnist_model_matches_simulate_within_one_output_step(tmp_path):
    from tvmquant.examples import fmnist_model_path, load_fmnist_example

    calib, test_x, _ = load_fmnist_example()
    qmodel = tvmquant.quantize(fmnist_model_path(), calib_data=calib[:64], progress=False, report_batches=0)
    path = tmp_path / "fmnist_qdq.onnx"
    qmodel.export_onnx(path)
    onnx.checker.check_model(onnx.load(path))
    session, simulated = ort_session(str(path), optimize=False), qmodel.compile(mode="simulated")
    # the output is FP32 logits: bound the difference by one step of the last quantized tensor (the FC input)
    last = qmodel.table["matmul_0.in0"]
    for x in test_x[:8]:
        expected = simulated(x[None])
        got = session.run(None, {"input": x[None]})[0]
        assert np.max(np.abs(got - expected)) <= float(last.scale)
