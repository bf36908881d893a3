"""Quantization-aware fine-tuning: STE/LSQ gradients against numpy, finetune lowering the distillation loss with
the integer model still equal to the simulated one, and bad input."""

import os

import numpy as np
import pytest
import tvm
from models import calibration_images, tiny_cnn, tiny_linear
from test_passes import _realized_vs_simulated
from tvm import relax

import tvmquant
from tvmquant.config import PerChannel, QuantConfig, TensorSpec
from tvmquant.frontend.prepare import ModelError
from tvmquant.passes.qat import register_gradients, training_module
from tvmquant.training import FinetuneError

W4A4 = QuantConfig(
    activation=TensorSpec("uint8", "affine", bits=4), weight=TensorSpec("int8", "symmetric", PerChannel(0), bits=4)
)


def _fake_quant_numpy(x, scale, zero, qmin, qmax, grad_scale):
    """(x_hat, d x_hat/dx (STE mask), d x_hat/d scale (LSQ, before the gradient scale), d x_hat/d zero).

    The quotient is taken in float32 with the scale as the graph computes it (s*g + (s - s*g)), so that values on
    a clamp bound land on the same side as in TVM.
    """
    scale32 = np.float32(scale)
    scaled = (scale32 * np.float32(grad_scale)).astype(np.float32)
    scale32 = (scaled + (scale32 - scaled)).astype(np.float32)
    v = (np.float32(x) / scale32).astype(np.float64) + zero
    scale = scale32.astype(np.float64)
    inside = (v >= qmin) & (v <= qmax)
    clamped = np.clip(v, qmin, qmax)
    rounded = np.round(clamped)
    x_hat = (rounded - zero) * scale
    d_scale = np.where(inside, rounded - v, clamped - zero)
    d_zero = np.where(inside, 0.0, -scale)
    return x_hat, inside.astype(np.float64), d_scale, d_zero


def test_ste_and_lsq_gradients_match_numpy():
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((8, 6)).astype(np.float32)
    qmodel = tvmquant.quantize(tiny_linear(), W4A4, calib, progress=False, report_batches=0)
    graph = training_module(qmodel.annotated, qmodel.table, "mse", learn_scales=True)
    names = [p.name for p in graph.parameters]
    assert sorted(names) == [
        "matmul_0.bias",
        "matmul_0.in0.scale",
        "matmul_0.in0.zero_point",
        "matmul_0.weight",
        "matmul_0.weight.scale",
    ]
    vm = relax.VirtualMachine(tvm.compile(graph.mod, target="llvm"), tvm.cpu())
    x = (2.0 * rng.standard_normal((8, 6))).astype(np.float32)  # wider than calibrated: some inputs clip
    target = rng.standard_normal((8, 4)).astype(np.float32)
    values = {p.name: p.value for p in graph.parameters}
    loss, grads = vm["main_adjoint"](*[tvm.runtime.tensor(a) for a in [x, target, *values.values()]])
    grads = dict(zip(names, [g.numpy() for g in grads]))

    act, wgt = qmodel.table["matmul_0.in0"], qmodel.table["matmul_0.weight"]
    s_x, z_x = values["matmul_0.in0.scale"].astype(np.float64), values["matmul_0.in0.zero_point"].astype(np.float64)
    weight, s_w = values["matmul_0.weight"].astype(np.float64), values["matmul_0.weight.scale"].astype(np.float64)
    g_w = 1.0 / np.sqrt(6 * wgt.qmax)  # elements per output channel x Qp
    g_x = 1.0 / np.sqrt(6 * act.qmax)  # features per sample x Qp
    x_hat, dx_mask, dx_scale, dx_zero = _fake_quant_numpy(x, s_x, z_x, act.qmin, act.qmax, g_x)
    w_hat, dw_mask, dw_scale, _ = _fake_quant_numpy(weight, s_w, 0.0, wgt.qmin, wgt.qmax, g_w)
    assert 0 < dx_mask.mean() < 1  # both branches of the clamp are exercised
    # the bias on the accumulator grid (scale_x * scale_w), rounded straight-through
    bias_scale = s_x * s_w.reshape(-1)
    bias_steps = values["matmul_0.bias"] / bias_scale
    bias_hat = np.round(bias_steps) * bias_scale
    y = x_hat @ w_hat + bias_hat
    np.testing.assert_allclose(float(loss.numpy()), np.mean((y - target) ** 2), rtol=1e-5)
    d_y = 2.0 * (y - target) / y.size
    d_what = x_hat.T @ d_y
    d_xhat = d_y @ w_hat.T
    np.testing.assert_allclose(grads["matmul_0.weight"], d_what * dw_mask, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads["matmul_0.bias"], d_y.sum(axis=0), rtol=1e-4, atol=1e-7)
    d_bias_scale = d_y.sum(axis=0) * (np.round(bias_steps) - bias_steps)  # d bias_hat / d (scale_x * scale_w)
    np.testing.assert_allclose(
        grads["matmul_0.weight.scale"],
        g_w * ((d_what * dw_scale).sum(axis=0) + d_bias_scale * s_x).reshape(1, -1),
        rtol=1e-4,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        grads["matmul_0.in0.scale"],
        g_x * (np.sum(d_xhat * dx_scale) + np.sum(d_bias_scale * s_w.reshape(-1))),
        rtol=1e-4,
        atol=1e-7,
    )
    np.testing.assert_allclose(grads["matmul_0.in0.zero_point"], np.sum(d_xhat * dx_zero), rtol=1e-4, atol=1e-7)


def test_training_forward_equals_the_simulated_model():
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((8, 6)).astype(np.float32)
    qmodel = tvmquant.quantize(tiny_linear(), W4A4, calib, progress=False, report_batches=0)
    graph = training_module(qmodel.annotated, qmodel.table, "mse", learn_scales=False)
    vm = relax.VirtualMachine(tvm.compile(graph.mod, target="llvm"), tvm.cpu())
    zeros = np.zeros((8, 4), np.float32)
    loss, _ = vm["main_adjoint"](*[tvm.runtime.tensor(a) for a in [calib, zeros, *[p.value for p in graph.parameters]]])
    simulated = qmodel.compile(mode="simulated")(calib)
    np.testing.assert_allclose(float(loss.numpy()), np.mean(simulated.astype(np.float64) ** 2), rtol=1e-5)


def test_clip_gradient_against_finite_differences():
    register_gradients()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.clip(relax.op.multiply(x, x), 0.5, 6.0))
            out = bb.emit_output(relax.op.sum(relax.op.multiply(y, x)))
        bb.emit_func_output(out)
    mod = relax.transform.Gradient("main")(bb.get())
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    values = np.linspace(-3.1, 3.1, 16).astype(np.float64)
    _, (grad,) = vm["main_adjoint"](tvm.runtime.tensor(values.astype(np.float32)))

    def f(v):
        return np.sum(np.clip(v * v, 0.5, 6.0) * v)

    eps = 1e-4
    numeric = [(f(values + eps * e) - f(values - eps * e)) / (2 * eps) for e in np.eye(16)]
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_w4a4():
    data = calibration_images(64, size=8)
    qmodel = tvmquant.quantize(tiny_cnn(), W4A4, data, progress=False, report_batches=0, batch_size=16)
    return qmodel, data


def _distillation_mse(reference, qmodel, data):
    """MSE of ``qmodel``'s integer outputs against the FP32 outputs ``reference``."""
    int8 = qmodel.compile(mode="int8")(data)
    return float(np.mean((reference.astype(np.float64) - int8) ** 2))


def test_finetune_lowers_the_distillation_loss_and_realizes_within_one_lsb(tiny_w4a4):
    qmodel, data = tiny_w4a4
    before_table = {name: p.to_dict() for name, p in qmodel.table.items()}
    reference = qmodel.compile(mode="fp32")(data[:16])
    before = _distillation_mse(reference, qmodel, data[:16])
    tuned = tvmquant.finetune(qmodel, data, epochs=30, lr=1e-2, batch_size=16, progress=False, report_batches=0)
    after = _distillation_mse(reference, tuned, data[:16])
    # W4A4 training is chaotic: a last-bit change of one activation scale (FP32 kernels summing in another
    # order) moved this ratio from 0.55 to 0.69; over shuffling seeds it spread 0.38-0.69. Unchanged is 1.
    assert after < 0.8 * before, (before, after)
    assert tuned.finetune_log["loss"][-1] < tuned.finetune_log["loss"][0]
    # the input model is untouched; the new one carries learned scales (what summary and the artifact show)
    assert {name: p.to_dict() for name, p in qmodel.table.items()} == before_table
    assert _distillation_mse(reference, qmodel, data[:16]) == before
    changed = [n for n in qmodel.table if not np.array_equal(qmodel.table[n].scale, tuned.table[n].scale)]
    assert changed and "conv2d_0.weight" in changed
    rows = {row["layer"]: row for row in tuned.summary().rows}
    assert rows["conv2d_0"]["input_scale"] == [float(tuned.table["conv2d_0.in0"].scale)]
    worst, _ = _realized_vs_simulated(tuned, [{"input": data[i : i + 16]} for i in (0, 16)])
    assert worst <= 1


def test_finetune_without_weights_trains_only_biases_and_quantizers(tiny_w4a4):
    """``train_weights=False`` (for a few dozen images): the weights stay as they were, biases and step sizes
    move, the loss still falls, and the ONNX source carries the trained biases."""
    from tvmquant.passes.qat import scan

    qmodel, data = tiny_w4a4
    tuned = tvmquant.finetune(
        qmodel, data, epochs=10, lr=1e-2, batch_size=16, train_weights=False, progress=False, report_batches=0
    )
    assert tuned.finetune_log["loss"][-1] < tuned.finetune_log["loss"][0]
    weights, biases = scan(qmodel.annotated, qmodel.table)
    new_weights, new_biases = scan(tuned.annotated, tuned.table)
    assert weights and all(np.array_equal(weights[n], new_weights[n]) for n in weights)
    assert any(not np.array_equal(biases[n], new_biases[n]) for n in biases)
    assert any(not np.array_equal(qmodel.table[n].scale, tuned.table[n].scale) for n in qmodel.table)
    assert tuned.source is not None and tuned.source != qmodel.source


def test_nothing_to_train_is_one_clear_error():
    """Weights frozen, scales fixed and no bias anywhere: one ValueError before anything compiles."""
    from models import _Graph
    from onnx import TensorProto, helper

    g = _Graph(3)
    out = g.node("Relu", [g.conv("input", 3, 4, bias=False)])
    model = g.model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 3, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [4, 4, 8, 8])],
    )
    data = calibration_images(8, size=8)
    qmodel = tvmquant.quantize(model, QuantConfig(), data, progress=False, report_batches=0, batch_size=4)
    with pytest.raises(ValueError, match="nothing to train"):
        tvmquant.finetune(
            qmodel, data, batch_size=4, train_weights=False, learn_scales=False, progress=False, report_batches=0
        )


def test_finetuned_model_saves_loads_and_exports_learned_scales(tiny_w4a4, tmp_path):
    import onnx
    from onnx import numpy_helper

    qmodel, data = tiny_w4a4
    tuned = tvmquant.finetune(qmodel, data[:32], epochs=1, lr=3e-3, batch_size=16, progress=False, report_batches=0)
    path = tmp_path / "tuned.tvmq"
    tuned.save(path, keep_source=True)
    loaded = tvmquant.load(path)
    assert {n: p.to_dict() for n, p in loaded.table.items()} == {n: p.to_dict() for n, p in tuned.table.items()}
    # the loss of every step travels with the artifact: the report draws it
    from tvmquant.report import _loss_history

    assert len(tuned.finetune_log["loss_history"]) == 2  # 32 samples, batch 16, one epoch
    assert loaded.finetune_log["loss_history"] == tuned.finetune_log["loss_history"]
    assert _loss_history(loaded, {}) == tuned.finetune_log["loss_history"]
    np.testing.assert_array_equal(loaded.compile()(data[:16]), tuned.compile()(data[:16]))
    # the FP32 weights are the trained ones (ONNX source updated), and the QDQ export writes the learned scales
    np.testing.assert_allclose(loaded.compile(mode="fp32")(data[:16]), tuned.compile(mode="fp32")(data[:16]), atol=1e-5)
    onnx_path = tmp_path / "tuned.onnx"
    loaded.export_onnx(onnx_path, {"input": data[:16]})
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    learned = float(tuned.table["conv2d_0.in0"].scale)
    assert any(
        name.endswith("_qdq_scale") and np.float32(value) == np.float32(learned) for name, value in inits.items()
    )


def test_nan_loss_stops_and_keeps_the_last_good_weights(tiny_w4a4):
    qmodel, data = tiny_w4a4
    with pytest.raises(FinetuneError, match=r"loss turned (NaN|non-finite) at step \d+ of 8") as info:
        tvmquant.finetune(qmodel, data, epochs=2, lr=1e30, batch_size=16, progress=False, report_batches=0)
    assert info.value.step >= 2
    good = info.value.last_good
    assert good is not None and all(np.all(np.isfinite(p.scale)) for p in good.table.values())
    assert np.all(np.isfinite(good.compile(mode="simulated")(data[:16])))


def test_bad_finetune_input_is_one_clear_error(tiny_w4a4):
    qmodel, data = tiny_w4a4
    run = lambda **kw: tvmquant.finetune(qmodel, kw.pop("data", data), progress=False, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="lr .* must be a finite number > 0"):
        run(lr=0.0)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        run(epochs=0)
    with pytest.raises(ValueError, match=r"has shape \(64, 3, 9, 9\); the model expects \(N, 3, 8, 8\)"):
        run(data=np.zeros((64, 3, 9, 9), np.float32))
    labels = np.arange(64) % 5
    with pytest.raises(ValueError, match="labels has 63 entries but data has 64 samples"):
        run(labels=labels[:63], batch_size=16)
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype float32"):
        run(labels=labels.astype(np.float32), batch_size=16)
    with pytest.raises(ValueError, match=r"labels range over \[0, 5\] but the model has 5 classes"):
        run(labels=np.where(labels == 4, 5, labels), batch_size=16)
    with pytest.raises(ValueError, match="with labels the loss is cross-entropy"):
        run(labels=labels, loss="mse", batch_size=16)
    skipped = tvmquant.quantize(
        tiny_cnn(),
        QuantConfig(skip=("conv2d_0", "conv2d_1", "mean_0", "matmul_0")),
        data[:4],
        progress=False,
        report_batches=0,
    )
    with pytest.raises(ModelError, match="no quantized layer to fine-tune"):
        tvmquant.finetune(skipped, data, progress=False)


def test_cli_finetune_and_its_bad_input(tiny_w4a4, tmp_path, capsys):
    from tvmquant import cli

    qmodel, data = tiny_w4a4
    artifact = tmp_path / "model.tvmq"
    qmodel.save(artifact, keep_source=True)
    np.savez(tmp_path / "x.npz", data[:32])
    out = tmp_path / "tuned.tvmq"
    base = ["finetune", str(artifact), "--data", str(tmp_path / "x.npz"), "-o", str(out)]
    assert cli.main(base + ["--epochs", "1", "--batch", "16", "--lr", "0.01", "--no-train-weights"]) == 0
    printed = capsys.readouterr().out
    assert "loss per epoch:" in printed and f"wrote {out}" in printed
    tuned = tvmquant.load(out)
    assert tuned.table.keys() == qmodel.table.keys()
    from tvmquant.passes.qat import scan

    weights, new_weights = scan(qmodel.annotated, qmodel.table)[0], scan(tuned.annotated, tuned.table)[0]
    assert all(np.array_equal(weights[name], new_weights[name]) for name in weights)  # --no-train-weights
    before = artifact.read_bytes()
    np.savez(tmp_path / "bad_y.npz", np.arange(31) % 5)
    bad_cases = {
        "labels": (base[:-2] + ["--labels", str(tmp_path / "bad_y.npz"), "-o", str(tmp_path / "a.tvmq")], "31 entries"),
        "lr": (base[:-2] + ["--lr", "-1", "-o", str(tmp_path / "b.tvmq")], "lr"),
        "epochs": (base[:-2] + ["--epochs", "0", "-o", str(tmp_path / "c.tvmq")], "epochs"),
        "not tvmq": (
            ["finetune", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"), "-o", str(tmp_path / "d.tvmq")],
            "not a tvmquant artifact",
        ),
    }
    for case, (argv, message) in bad_cases.items():
        assert cli.main(argv) != 0, case
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (case, err)
        assert not os.path.exists(argv[-1]), case
    assert artifact.read_bytes() == before


@pytest.mark.slow
def test_w4a4_fashion_mnist_qat_lsq_recovers_accuracy():
    """W4A4 on the bundled Fashion-MNIST CNN: QAT + LSQ by distillation on 12,800 training images (one epoch)
    comes within 1 point of FP32 on the full 10k test set, where PTQ loses 2.1 (bench/finetune_fmnist.py)."""
    from tvmquant.examples import fmnist_model_path, load_fashion_mnist, load_fmnist_example

    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    calib, _, _ = load_fmnist_example()
    test_x, test_y = load_fashion_mnist("test")
    train_x, _ = load_fashion_mnist("train")
    train_x = train_x[np.random.default_rng(0).permutation(len(train_x))[:12800]]
    config = QuantConfig(
        activation=TensorSpec("uint8", "affine", bits=4), weight=TensorSpec("int8", "symmetric", PerChannel(0), bits=4)
    )
    ptq = tvmquant.quantize(fmnist_model_path(), config, calib, progress=False, report_batches=0, batch_size=100)

    def accuracy(qmodel, mode="int8"):
        run = qmodel.compile(mode=mode)
        preds = [np.argmax(run(test_x[i : i + 100]), axis=1) for i in range(0, len(test_x), 100)]
        return float(np.mean(np.concatenate(preds) == test_y) * 100)

    fp32, before = accuracy(ptq, "fp32"), accuracy(ptq)
    tuned = tvmquant.finetune(ptq, train_x, epochs=1, lr=3e-3, batch_size=64, loss="kl", progress=False)
    after = accuracy(tuned.rebatch(100))
    assert after > before + 1.0, (fp32, before, after)
    assert after >= fp32 - 1.0, (fp32, before, after)  # the goal; bench: 91.06% vs FP32 91.45%


def test_finetune_distils_from_the_fp32_model_not_the_bias_corrected_graph():
    # the annotated graph of a bias-corrected model carries the corrected biases; the teacher must not
    data = calibration_images(16, size=8)
    qmodel = tvmquant.quantize(
        tiny_cnn(), W4A4.replace(bias_correction=True), data, progress=False, report_batches=0, batch_size=16
    )
    assert qmodel.bias_corrections
    from tvmquant.passes.calibrate import compile_vm, run_vm
    from tvmquant.passes.qat import strip_markers

    fp32 = qmodel.compile(mode="fp32")(data).astype(np.float64)
    corrected_fp32 = run_vm(compile_vm(strip_markers(qmodel.annotated)), {"input": data}, qmodel.inputs).numpy()
    simulated = qmodel.compile(mode="simulated")(data).astype(np.float64)
    expected = np.mean((simulated - fp32) ** 2)
    assert abs(np.mean((simulated - corrected_fp32) ** 2) - expected) > 0.05 * expected  # the two teachers differ
    tuned = tvmquant.finetune(qmodel, data, epochs=1, lr=1e-9, batch_size=16, progress=False, report_batches=0)
    np.testing.assert_allclose(tuned.finetune_log["loss_history"][0], expected, rtol=1e-3)
