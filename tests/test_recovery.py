"""Post-training recovery: bias correction, cross-layer equalization, and 4-bit values on the int8 kernels."""

import numpy as np
import onnx
import pytest
from models import _Graph, calibration_images, residual_cnn
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
from tvmquant.quant_math import sqnr_db

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
    assert sorted(corrected.bias_corrections) == sorted(
        layer.name for layer in corrected.layers if layer.weight and layer.quantized
    )
    batches = _batches(data)
    fp32 = _outputs(plain.fp32, batches, plain.inputs)
    before = _outputs(plain.simulated, batches, plain.inputs)
    after = _outputs(corrected.simulated, batches, corrected.inputs)
    # the per-channel mean error of the output (the last, corrected layer) is cancelled ...
    mean_before = np.abs((before - fp32).mean(axis=0))
    mean_after = np.abs((after - fp32).mean(axis=0))
    assert mean_after.mean() < 0.2 * mean_before.mean()
    # ... and the output is closer to FP32 overall
    assert sqnr_db(fp32, after) > sqnr_db(fp32, before) + 0.5
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
    # the annotated model rebuilt from the source applies the stored corrections again
    loaded._annotated = None
    np.testing.assert_array_equal(_outputs(loaded.simulated, batches[:2], loaded.inputs), after[:2])


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


def test_a_layer_without_bias_gets_one_and_the_pass_is_idempotent():
    data = calibration_images(6)
    qmodel = quantize(_no_bias_cnn(), QuantConfig(weight=W4), data, progress=False, report_batches=0)
    annotated = qmodel.annotated
    assert _count(annotated, "relax.add") == 0
    corrections = bias_corrections(annotated, qmodel.table, data, qmodel.inputs)
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
    assert main(args + ["--weight-bits", "4", "--activation-bits", "4", "--bias-correction", "--equalize"]) == 0
    config = load(out).config
    assert (config.weight.bits, config.activation.bits, config.bias_correction, config.equalize) == (4, 4, True, True)
    bad = tmp_path / "bad.tvmq"
    assert main(args[:-3] + ["-o", str(bad), "-q", "--weight-bits", "9"]) == 2
    assert not bad.exists()
