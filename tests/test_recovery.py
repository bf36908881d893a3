"""Post-training recovery: bias correction, cross-layer equalization, and 4-bit values on the int8 kernels."""

import numpy as np
import onnx
import pytest
from models import _Graph, calibration_images, inverted_residual_cnn, residual_cnn
from onnx import TensorProto, helper
from test_passes import _realized_vs_simulated, _well_formed

from tvmquant import QuantConfig, load, quantize
from tvmquant._compat import const_value, op_name, to_tensor
from tvmquant.api import load_model
from tvmquant.config import ConfigError, PerChannel, TensorSpec
from tvmquant.passes.bias_correction import ApplyBiasCorrection, bias_corrections
from tvmquant.passes.calibrate import compile_vm, run_vm
from tvmquant.passes.equalize import EqualizeCrossLayer, find_pairs
from tvmquant.qparams import Role
from tvmquant.quant_math import fake_quantize, sqnr_db
from tvmquant.testing.ort import ort_session

W4 = TensorSpec("int8", "symmetric", PerChannel(0), bits=4)
A4 = TensorSpec("uint8", "affine", bits=4)


def _outputs(mod, batches, inputs):
    vm = compile_vm(mod)
    return np.concatenate([run_vm(vm, batch, inputs).numpy() for batch in batches])


def _batches(data):
    return [{"input": data[i : i + 1]} for i in range(len(data))]


# ----------------------------------------------------------------------------------------------------------
# Bias correction
def test_bias_correction_cancels_mean_error_and_improves_sqnr(tmp_path):
    data = calibration_images(24)
    config = QuantConfig(weight=W4)
    plain = quantize(residual_cnn(), config, data, progress=False, report_batches=0)
    corrected = quantize(residual_cnn(), config.replace(bias_correction=True), data, progress=False, report_batches=0)
    layers = [layer.name for layer in corrected.layers if layer.weight and layer.quantized]
    batches = _batches(data)
    fp32 = _outputs(plain.fp32, batches, plain.inputs)
    before = _outputs(plain.simulated, batches, plain.inputs)
    after = _outputs(corrected.simulated, batches, corrected.inputs)
    # every layer's correction measured (check_output=False): the per-channel mean error of the output (the
    # last, corrected layer) is cancelled
    every = bias_corrections(plain.annotated, plain.table, data, plain.inputs, check_output=False)
    assert list(every) == layers
    everywhere = _outputs(_corrected_simulation(plain, every), batches, plain.inputs)
    mean_before = np.abs((before - fp32).mean(axis=0))
    assert np.abs((everywhere - fp32).mean(axis=0)).mean() < 0.2 * mean_before.mean()
    # the default keeps a correction only where the output gets closer to FP32: some, not all, here, and the
    # output is far closer to FP32 than without (17 -> 32 dB)
    kept = list(corrected.bias_corrections)
    assert 0 < len(kept) < len(layers) and set(kept) <= set(layers)
    assert sqnr_db(fp32, after) > sqnr_db(fp32, before) + 10
    # the integer model carries the corrected biases too
    int8 = corrected.compile(mode="int8")
    assert sqnr_db(fp32, np.concatenate([int8(b["input"]) for b in batches])) > sqnr_db(fp32, before)
    # stored in the artifact: the loaded model runs the same integers, and keeps the vectors
    corrected.save(tmp_path / "bc.tvmq")
    loaded = load(tmp_path / "bc.tvmq")
    assert loaded.config.bias_correction is True
    assert sorted(loaded.bias_corrections) == sorted(corrected.bias_corrections)
    for name, vector in corrected.bias_corrections.items():
        np.testing.assert_array_equal(loaded.bias_corrections[name], vector)
    np.testing.assert_array_equal(loaded.compile(mode="int8")(data[:1]), int8(data[:1]))
    # the QDQ export carries the corrected biases: ONNX Runtime running it gives tvmquant's integer outputs
    corrected.export_onnx(str(tmp_path / "bc.onnx"))
    session = ort_session(str(tmp_path / "bc.onnx"))
    for batch in batches[:3]:
        assert sqnr_db(np.asarray(int8(batch["input"])), session.run(None, batch)[0]) > 40
    # the annotated model rebuilt from the source applies the stored corrections again
    loaded._annotated = None
    np.testing.assert_array_equal(_outputs(loaded.simulated, batches[:2], loaded.inputs), after[:2])


def _corrected_simulation(qmodel, corrections):
    from tvmquant.passes import BindQuantParams

    return BindQuantParams(qmodel.table)(ApplyBiasCorrection(corrections)(qmodel.annotated))


def test_checked_bias_correction_lowers_the_output_error_with_each_correction_it_keeps():
    # MobileNetV2-style, 4-bit weights: each kept correction, applied in graph order on top of the kept ones
    # before it, lowers the output error on the calibration data; some corrections are refused
    data = calibration_images(32)
    qmodel = quantize(inverted_residual_cnn(), QuantConfig(weight=W4), data, progress=False, report_batches=0)
    batches = _batches(data)
    fp32 = _outputs(qmodel.fp32, batches, qmodel.inputs).astype(np.float64)

    def error(corrections):
        return float(np.sum((_outputs(_corrected_simulation(qmodel, corrections), batches, qmodel.inputs) - fp32) ** 2))

    kept = bias_corrections(qmodel.annotated, qmodel.table, data, qmodel.inputs)
    every = bias_corrections(qmodel.annotated, qmodel.table, data, qmodel.inputs, check_output=False)
    assert 0 < len(kept) < len(every) and [name for name in every if name in kept] == list(kept)
    errors = [error({})]
    names = list(kept)
    for count in range(1, len(names) + 1):
        errors.append(error({name: kept[name] for name in names[:count]}))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    # the first layer's correction needs nothing before it: both ways measure the same vector
    first = next(iter(every))
    if first in kept:
        np.testing.assert_allclose(kept[first], every[first], rtol=1e-5, atol=1e-7)
    assert errors[-1] < 0.5 * errors[0]


def _no_bias_cnn():
    g = _Graph(3)
    h = g.node("Relu", [g.conv("input", 3, 8, bias=False)])
    h = g.conv(h, 8, 8, bias=False)
    g.node("Flatten", [g.node("GlobalAveragePool", [h])])
    g.nodes[-1].output[0] = "logits"
    return g.model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
    )


def _count(mod, name):
    return sum(op_name(b.value) == name for block in mod["main"].body.blocks for b in block.bindings)


def test_a_layer_without_bias_gets_one_and_the_pass_is_idempotent(tmp_path):
    data = calibration_images(6)
    qmodel = quantize(_no_bias_cnn(), QuantConfig(weight=W4), data, progress=False, report_batches=0)
    annotated = qmodel.annotated
    assert _count(annotated, "relax.add") == 0
    corrections = bias_corrections(annotated, qmodel.table, data, qmodel.inputs, check_output=False)
    assert sorted(corrections) == ["conv2d_0", "conv2d_1"] and corrections["conv2d_1"].shape == (8,)
    fixed = ApplyBiasCorrection(corrections)(annotated)
    _well_formed(fixed)
    assert _count(fixed, "relax.add") == 2
    added = [
        const_value(b.value.args[1])
        for block in fixed["main"].body.blocks
        for b in block.bindings
        if op_name(b.value) == "relax.add"
    ]
    np.testing.assert_array_equal(added[1].reshape(-1), corrections["conv2d_1"])
    again = ApplyBiasCorrection(corrections)(fixed)
    assert again.same_as(fixed)
    with pytest.raises(ValueError, match="no quantized conv2d/matmul"):
        ApplyBiasCorrection({"conv2d_9": np.zeros(8)})(annotated)
    # the QDQ export gives a corrected conv without a bias the correction as its bias: ONNX Runtime running it
    # gives tvmquant's integer outputs
    corrected = quantize(
        _no_bias_cnn(), QuantConfig(weight=W4, bias_correction=True), data, progress=False, report_batches=0
    )
    assert corrected.bias_corrections
    path = str(tmp_path / "no_bias.onnx")
    corrected.export_onnx(path)
    int8, session = corrected.compile(mode="int8"), ort_session(path)
    for x in data[:3]:
        assert sqnr_db(np.asarray(int8(x[None])), session.run(None, {"input": x[None]})[0]) > 40
    with pytest.raises(ValueError, match="has 3 entries; the layer has 8 output channels"):
        ApplyBiasCorrection({"conv2d_1": np.zeros(3)})(annotated)


# ----------------------------------------------------------------------------------------------------------
# Cross-layer equalization
def _precision(r1, r2):
    """Nagel et al.'s objective: sum over channels of (r1_c / R1) * (r2_c / R2)."""
    return float(np.sum((r1 / r1.max()) * (r2 / r2.max())))


def _pair_ranges(mod, pair):
    values = {b.var: b.value for block in mod["main"].body.blocks for b in block.bindings}
    w1 = const_value(values[pair.conv1].args[1])
    w2 = const_value(values[pair.conv2].args[1])
    groups = int(values[pair.conv2].attrs["groups"])
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    view = np.abs(w2).reshape(groups, w2.shape[0] // groups, w2.shape[1], -1)
    r2 = view.max(axis=(1, 3)).reshape(-1)
    return r1, r2


def test_equalization_keeps_fp32_output_and_evens_out_channel_ranges():
    mod, inputs, _, _ = load_model(residual_cnn())
    equalized = EqualizeCrossLayer()(mod)
    _well_formed(equalized)
    assert EqualizeCrossLayer()(equalized).same_as(equalized)
    pairs = find_pairs(mod["main"])
    # the residual block's conv -> ReLU -> conv, and depthwise -> ReLU6 -> pointwise
    assert len(pairs) == 2 and [pair.high for pair in pairs] == [None, 6.0]
    data = calibration_images(4)
    reference = _outputs(mod, _batches(data), inputs)
    result = _outputs(equalized, _batches(data), inputs)
    assert np.max(np.abs(result - reference)) <= 1e-4 * np.max(np.abs(reference))
    new_pairs = find_pairs(equalized["main"])
    for old, new in zip(pairs, new_pairs):
        r1, r2 = _pair_ranges(equalized, new)
        assert np.allclose(r1, r2, rtol=1e-3)  # both sides of every channel share one range
        assert _precision(r1, r2) > _precision(*_pair_ranges(mod, old))
    # ReLU6's bound became a per-channel minimum (a relax.clip takes only scalar bounds)
    assert _count(equalized, "relax.clip") == _count(mod, "relax.clip") - 1
    assert _count(equalized, "relax.minimum") == 1


def test_equalized_model_quantizes_and_realizes_within_one_lsb():
    data = calibration_images(12)
    qmodel = quantize(residual_cnn(), QuantConfig(equalize=True), data[:8], progress=False, report_batches=0)
    assert "tvmquant.equalized" in qmodel.fp32["main"].attrs
    assert all(layer.quantized for layer in qmodel.layers)
    worst, _ = _realized_vs_simulated(qmodel, _batches(data[8:]))
    assert worst <= 1


def test_recovery_flags_are_validated_and_round_trip():
    config = QuantConfig(bias_correction=True, equalize=True)
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict({"version": 1}).bias_correction is False
    with pytest.raises(ConfigError, match="bias_correction must be True or False"):
        QuantConfig(bias_correction="yes")
    with pytest.raises(ConfigError, match="equalize must be True or False"):
        QuantConfig.from_dict({"version": 1, "equalize": 1})


# ----------------------------------------------------------------------------------------------------------
# 4-bit values on the int8 kernels
@pytest.mark.parametrize("weight, activation", [(W4, QuantConfig().activation), (W4, A4)], ids=["W4A8", "W4A4"])
def test_four_bit_realizes_on_int8_kernels_within_one_lsb(weight, activation):
    data = calibration_images(12)
    config = QuantConfig(weight=weight, activation=activation)
    qmodel = quantize(residual_cnn(), config, data[:8], progress=False, report_batches=0)
    for params in qmodel.table.values():
        spec = weight if params.role == Role.WEIGHT else activation
        assert (params.qmin, params.qmax) == (spec.qmin, spec.qmax)
    worst, realized = _realized_vs_simulated(qmodel, _batches(data[8:]))
    assert worst <= 1
    script = realized.script(show_meta=False)
    assert script.count('out_dtype="int32"') == 7  # the int8 kernels: 6 convs + 1 matmul
    # the weights the kernels read hold 4-bit values only
    for block in realized["main"].body.blocks:
        for binding in block.bindings:
            if op_name(binding.value) in ("relax.nn.conv2d", "relax.matmul"):
                weight_q = const_value(binding.value.args[1])
                assert weight_q.dtype == np.int8 and np.abs(weight_q).max() <= 7
    # activations exchanged between layers stay in the 4-bit range
    vm = compile_vm(__import__("tvmquant").passes.ExposeQuantizedTensors()(qmodel.simulated))
    exposed = vm["main"](to_tensor(data[8:9]))
    for index in range(1, len(exposed)):
        values = exposed[index].numpy().astype(np.int32)
        assert activation.qmin <= values.min() and values.max() <= activation.qmax


def test_cli_bits_and_recovery_flags(tmp_path):
    from tvmquant.cli import main

    path = tmp_path / "cnn.onnx"
    onnx.save(residual_cnn(), str(path))
    np.savez(tmp_path / "calib.npz", input=calibration_images(4))
    out = tmp_path / "q.tvmq"
    args = ["quantize", str(path), "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "-q"]
    flags = [
        "--weight-bits",
        "4",
        "--activation-bits",
        "4",
        "--bias-correction",
        "--equalize",
        "--depthwise-per-channel",
    ]
    assert main(args + flags) == 0
    config = load(out).config
    assert (config.weight.bits, config.activation.bits, config.bias_correction, config.equalize) == (4, 4, True, True)
    assert config.depthwise_per_channel
    bad = tmp_path / "bad.tvmq"
    assert main(args[:-3] + ["-o", str(bad), "-q", "--weight-bits", "9"]) == 2
    assert not bad.exists()


# ----------------------------------------------------------------------------------------------------------
# Per-channel activations at depthwise convs
def test_depthwise_inputs_get_channel_scales_that_realize_export_and_save(tmp_path):

    data = calibration_images(72)
    calib, held_out = data[:64], data[64:]
    plain = quantize(inverted_residual_cnn(), QuantConfig(), calib, progress=False, report_batches=0)
    config = QuantConfig(depthwise_per_channel=True)
    qmodel = quantize(inverted_residual_cnn(), config, calib, progress=False, report_batches=0)
    depthwise = {"conv2d_1.in0": 16, "conv2d_4.in0": 32}  # the two depthwise inputs and their channels
    for name, params in qmodel.table.items():
        if params.role != Role.ACTIVATION:
            continue
        if name in depthwise:
            assert params.axis == 1 and params.scale.shape == (depthwise[name],) and not params.zero_point.any()
        else:
            assert params.axis is None and plain.table[name] == params  # everything else as before
    # the stem's 300x spread of channel ranges: each channel quantized on its own range loses far less (the
    # tensor's total SQNR is its widest channels', alike both ways); the depthwise conv reads each one alone
    model = inverted_residual_cnn()
    stem_out = next(n for n in model.graph.node if any(a.name == "group" and a.i == 16 for a in n.attribute))
    stem_out = stem_out.input[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(stem_out, TensorProto.FLOAT, None))
    session = ort_session(model.SerializeToString())
    values = np.concatenate([session.run(None, {"input": x[None]})[1] for x in held_out])

    def median_channel_sqnr(params):
        approx = fake_quantize(values, params.scale, params.zero_point, params.qmin, params.qmax, params.axis)
        return np.median([sqnr_db(values[:, c], approx[:, c]) for c in range(values.shape[1])])

    gain = median_channel_sqnr(qmodel.table["conv2d_1.in0"]) - median_channel_sqnr(plain.table["conv2d_1.in0"])
    assert gain > 10
    # realized on the int8 kernels (every conv), within one LSB of the simulated model
    worst, realized = _realized_vs_simulated(qmodel, _batches(held_out))
    assert worst <= 1
    assert realized.script(show_meta=False).count('out_dtype="int32"') == 7
    fp32 = _outputs(qmodel.fp32, _batches(held_out), qmodel.inputs)
    int8 = qmodel.compile(mode="int8")
    assert sqnr_db(fp32, np.concatenate([int8(x[None]) for x in held_out])) > 30
    # saved and loaded with its channel scales; the QDQ export quantizes those inputs per axis, and ONNX Runtime
    # running it gives tvmquant's integer outputs
    qmodel.save(tmp_path / "dw.tvmq")
    loaded = load(tmp_path / "dw.tvmq")
    assert loaded.config.depthwise_per_channel and loaded.table["conv2d_4.in0"] == qmodel.table["conv2d_4.in0"]
    path = str(tmp_path / "dw.onnx")
    qmodel.export_onnx(path)
    exported = onnx.load(path)
    per_axis = [n for n in exported.graph.node if n.op_type == "QuantizeLinear" and n.attribute]
    assert len(per_axis) == 2 and all(a.name == "axis" and a.i == 1 for n in per_axis for a in n.attribute)
    session = ort_session(path)
    for x in held_out[:4]:
        ours = np.asarray(int8(x[None]))
        theirs = session.run(None, {"input": x[None]})[0]
        assert sqnr_db(ours, theirs) > 40


def test_depthwise_per_channel_leaves_shared_or_signed_inputs_per_tensor():
    # residual_cnn's depthwise conv reads a tensor a max pool reads too: one scale stays, as without the option
    data = calibration_images(12)
    plain = quantize(residual_cnn(), QuantConfig(), data, progress=False, report_batches=0)
    qmodel = quantize(residual_cnn(), QuantConfig(depthwise_per_channel=True), data, progress=False, report_batches=0)
    assert all(params.axis is None for params in qmodel.table.values() if params.role == Role.ACTIVATION)
    assert all(plain.table[name] == params for name, params in qmodel.table.items())
    # a signed per-channel range would need a zero point per channel: it falls back to one scale over all channels
    from tvmquant.passes.calibrate import activation_qparams

    spec = QuantConfig().activation
    params = activation_qparams("x", spec, np.array([-1.0, 0.0]), np.array([1.0, 3.0]))
    assert params.axis is None and params.a_min == -1.0 and params.a_max == 3.0
    params = activation_qparams("x", spec, np.array([0.0, 0.0, 0.0]), np.array([1.0, 0.0, 3.0]))
    assert params.axis == 1 and params.a_max.tolist() == [1.0, 3.0, 3.0]  # a dead channel takes the widest range
    assert QuantConfig.from_dict(QuantConfig(depthwise_per_channel=True).to_dict()).depthwise_per_channel
    with pytest.raises(ConfigError, match="depthwise_per_channel must be True or False"):
        QuantConfig(depthwise_per_channel=1)
