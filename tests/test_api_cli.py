"""The Python API and the CLI end to end, artifacts, and every bad input the issue lists."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from models import calibration_images, residual_cnn

import tvmquant
from tvmquant import cli
from tvmquant.calibration import CalibrationError
from tvmquant.frontend.prepare import ModelError
from tvmquant.passes.annotate import SkipRuleError
from tvmquant.passes.calibrate import CalibrationDataError


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input=calibration_images(8))
    return str(path)


def test_import_is_cheap_and_lazy():
    code = (
        "import sys, time; import tvm; t = time.time(); import tvmquant, tvmquant.config; tvmquant.QuantConfig; "
        "before = set(sys.modules); tvmquant.quantize; "
        "print(time.time() - t, 'onnx' in set(sys.modules), 'tvmquant.frontend.onnx' in sys.modules)"
    )
    baseline = subprocess.run(
        [sys.executable, "-c", "import sys, tvm; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 2.0
    assert out[1] == "False"  # onnx is not imported by tvmquant
    code_torch = (
        "import sys, tvm; a = 'torch' in sys.modules; import tvmquant; tvmquant.quantize; "
        "print(a, 'torch' in sys.modules)"
    )
    torch_before, torch_after = subprocess.run(
        [sys.executable, "-c", code_torch], capture_output=True, text=True, check=True
    ).stdout.split()
    assert torch_after == torch_before == baseline[0]  # tvmquant adds no torch import beyond TVM's own


def test_cli_quantize_inspect_run(tmp_path, model_file, calib_file):
    out = tmp_path / "cnn.tvmq"
    assert (
        cli.main(
            [
                "quantize",
                model_file,
                "--calib",
                calib_file,
                "--method",
                "percentile",
                "--percentile",
                "99.9",
                "--skip",
                "conv2d_0",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    qmodel = tvmquant.load(out)
    assert qmodel.config.activation.method == tvmquant.Percentile(99.9)
    assert [layer.name for layer in qmodel.layers if not layer.quantized] == ["conv2d_0"]
    assert cli.main(["inspect", str(out)]) == 0
    x = calibration_images(3, seed=5)
    np.savez(tmp_path / "x.npz", input=x)
    assert cli.main(["run", str(out), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz"), "-q"]) == 0
    y = np.load(tmp_path / "y.npz")["logits"]  # the ONNX model's own output name
    assert y.shape == (3, 10)
    np.testing.assert_array_equal(y[1], qmodel.compile()(x[1:2])[0])


def test_cli_config_file_and_flags_match_python(tmp_path, model_file, calib_file):
    config = tvmquant.QuantConfig(activation=tvmquant.TensorSpec("int8", "symmetric", method=tvmquant.Entropy()))
    (tmp_path / "cfg.json").write_text(config.to_json())
    out = tmp_path / "a.tvmq"
    assert (
        cli.main(
            [
                "quantize",
                model_file,
                "--calib",
                calib_file,
                "--config",
                str(tmp_path / "cfg.json"),
                "--per-tensor",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    loaded = tvmquant.load(out).config
    assert loaded == config.replace(weight=tvmquant.TensorSpec("int8", "symmetric", tvmquant.PerTensor()))


def test_artifact_round_trip_is_exact(tmp_path, model_file):
    data = calibration_images(6)
    qmodel = tvmquant.quantize(model_file, calib_data=data, progress=False, report_batches=2)
    qmodel.save(tmp_path / "m.tvmq")
    loaded = tvmquant.load(tmp_path / "m.tvmq")
    np.testing.assert_array_equal(loaded.compile()(data[:1]), qmodel.compile()(data[:1]))
    assert loaded.sqnr == pytest.approx(qmodel.sqnr)
    summary = loaded.summary()
    assert "conv2d_0" in str(summary) and summary.to_dict()["layers"][0]["status"] == "int8"
    manifest = json.loads(__import__("zipfile").ZipFile(tmp_path / "m.tvmq").read("manifest.json"))
    assert {"versions", "inputs", "config", "quant_table", "layers"} <= set(manifest)


def test_iterable_and_dict_calibration_forms_agree(model_file):
    data = calibration_images(4)
    stacked = tvmquant.quantize(model_file, calib_data={"input": data}, progress=False, report_batches=0)
    listed = tvmquant.quantize(
        model_file, calib_data=[{"input": x[None]} for x in data], progress=False, report_batches=0
    )
    arrays = tvmquant.quantize(model_file, calib_data=iter([x[None] for x in data]), progress=False, report_batches=0)
    for name, params in stacked.table.items():
        np.testing.assert_array_equal(params.scale, listed.table[name].scale)
        np.testing.assert_array_equal(params.scale, arrays.table[name].scale)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "calib, message",
    [
        ({"wrong": calibration_images(2), "other": calibration_images(2)}, "the model expects \\['input'\\]"),
        (
            {"input": calibration_images(2, size=8)},
            "has shape \\(2, 3, 8, 8\\); the model takes samples of shape \\(3, 16, 16\\)",
        ),
        # integers a float32 input holds exactly (a 0/1 mask) are cast; others are refused
        ({"input": np.full((2, 3, 16, 16), 2**25, np.int32)}, "dtype int32, the model expects float32"),
        ([], "calibration data is empty"),
    ],
)
def test_bad_calibration_data_names_the_culprit(model_file, calib, message):
    with pytest.raises(CalibrationDataError, match=message):
        tvmquant.quantize(model_file, calib_data=calib, progress=False)


def test_nan_in_calibration_inputs_is_refused_naming_batch_and_input(model_file):
    data = calibration_images(3)
    data[1, 0, 0, 0] = np.nan
    data[1, 0, 0, 1] = np.inf
    for config in (tvmquant.QuantConfig(), tvmquant.QuantConfig(nan_policy="error")):
        with pytest.raises(CalibrationDataError, match=r"sample 1 input 'input' has 1 NaN and 1 Inf"):
            tvmquant.quantize(model_file, config, data, progress=False, report_batches=0)


def test_nan_inside_the_model_follows_nan_policy():
    from tvmquant.calibration import make_observer

    # NaN/Inf that arise inside the model reach the observers, which apply nan_policy.
    warn = make_observer(tvmquant.QuantConfig().activation, "conv2d_0.in0", "warn")
    with pytest.warns(Warning, match="conv2d_0.in0"):
        warn.collect(np.array([np.nan, 1.0], np.float32))
    error = make_observer(tvmquant.QuantConfig().activation, "conv2d_0.in0", "error")
    with pytest.raises(CalibrationError, match="conv2d_0.in0"):
        error.collect(np.array([np.nan, 1.0], np.float32))


def test_skip_entry_matching_nothing_is_an_error(model_file):
    with pytest.raises(SkipRuleError, match="'conv2d_99' matches no layer"):
        tvmquant.quantize(model_file, tvmquant.QuantConfig(skip=("conv2d_99",)), calibration_images(2), progress=False)
    with pytest.raises(SkipRuleError, match="op type 'softmax' matches no layer"):
        tvmquant.quantize(model_file, tvmquant.QuantConfig(skip=("op:softmax",)), calibration_images(2), progress=False)


def test_bad_model_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="garbage.onnx.*not a valid ONNX file"):
        tvmquant.quantize(str(garbage), calib_data=calibration_images(1))
    with pytest.raises(ModelError, match="does not exist"):
        tvmquant.quantize(str(tmp_path / "missing.onnx"), calib_data=calibration_images(1))
    # an op the importer cannot take
    model = residual_cnn()
    model.graph.node[-1].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match="NoSuchOp"):
        tvmquant.quantize(model, calib_data=calibration_images(1))


def test_qoperator_model_is_refused_with_reexport_hint():
    from onnx import TensorProto, helper

    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"], name="qmm")
    inputs = [
        helper.make_tensor_value_info(
            n,
            TensorProto.UINT8 if n in ("a", "b", "az", "bz", "yz") else TensorProto.FLOAT,
            [2, 2] if n in ("a", "b") else [],
        )
        for n in ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]
    ]
    graph = helper.make_graph([node], "q", inputs, [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelError, match="QLinearMatMul.*'qmm'.*QDQ"):
        tvmquant.quantize(model, calib_data=np.zeros((1, 2, 2), np.uint8))


def test_cli_errors_are_one_line_and_leave_no_file(tmp_path, model_file, calib_file, capsys):
    out = tmp_path / "missing_dir" / "out.tvmq"
    assert cli.main(["quantize", model_file, "--calib", calib_file, "-o", str(out), "-q"]) == cli.EXIT_USER_ERROR
    assert "folder" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "out.tvmq"
    assert cli.main(["quantize", model_file, "--calib", calib_file, "--skip", "nope", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "'nope' matches no layer" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tvmquant-")]
    assert cli.main(["quantize", model_file, "--calib", str(tmp_path / "none.npz"), "-o", str(out), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "none.tvmq")]) == 2


def test_dynamic_pads_of_a_known_shape_are_folded():
    from models import dynamic_pad_conv
    from tvm.relax.frontend.onnx import from_onnx

    model = dynamic_pad_conv()
    with pytest.raises(Exception):  # noqa: B017 - TVM's importer alone refuses it
        from_onnx(model, shape_dict={"x": [1, 3, 8, 8]})
    data = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    qmodel = tvmquant.quantize(model, calib_data=data, progress=False, report_batches=2)
    assert [layer.name for layer in qmodel.layers] == ["conv2d_0"]
    assert qmodel.sqnr["output0"] > 30


def test_compile_deployable_library_loads_with_runtime_only(tmp_path, model_file, calib_file):
    artifact = tmp_path / "m.tvmq"
    assert cli.main(["quantize", model_file, "--calib", calib_file, "-o", str(artifact), "-q"]) == 0
    library = tmp_path / "m.so"
    assert cli.main(["compile", str(artifact), "-o", str(library), "-q"]) == 0
    assert library.exists() and (tmp_path / "m.so.json").exists()
    x = calibration_images(1, seed=9)
    np.save(tmp_path / "x.npy", x)
    expected = tvmquant.load(artifact).compile()(x)
    script = (
        "import os, sys, numpy as np; from tvmquant.deploy import load_library; "
        f"m = load_library({str(library)!r}); y = m(np.load({str(tmp_path / 'x.npy')!r})); "
        f"np.save({str(tmp_path / 'y.npy')!r}, y); import tvm.base; "
        "maps = open('/proc/self/maps').read(); "
        "print(tvm.base._RUNTIME_ONLY, 'libtvm_compiler' in maps)"
    )
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]  # the compiler library was never loaded
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    # `tvmquant run` takes the library too
    np.savez(tmp_path / "x.npz", input=x)
    assert cli.main(["run", str(library), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz"), "-q"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["logits"], expected)


def test_cli_bench_times_int8_fp32_and_onnx_runtime(tmp_path, model_file, calib_file, capsys):
    pytest.importorskip("onnxruntime")
    artifact = tmp_path / "cnn.tvmq"
    assert cli.main(["quantize", model_file, "--calib", calib_file, "-o", str(artifact), "-q"]) == 0
    out = tmp_path / "bench.json"
    # OpenVINO's rows have their own test (tests/test_bench_openvino.py)
    args = ["bench", str(artifact), "--threads", "1", "--seconds", "0.2", "--no-openvino", "-o", str(out), "-q"]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    engines = set(result["latency_ms"])
    assert engines == {"tvmquant_int8", "tvm_fp32", "ort_fp32", "ort_int8_qdq"}, result["skipped"]
    for engine in engines:
        assert result["latency_ms"][engine]["1"] > 0
        assert engine in table
    ratio = result["speedup"]["vs_tvm_fp32"]["1"]
    assert ratio == pytest.approx(result["latency_ms"]["tvm_fp32"]["1"] / result["latency_ms"]["tvmquant_int8"]["1"])
    assert result["machine"]["cores"] >= 1 and "llvm_mcpu" in result["machine"]
    assert result["tuned"] == {"tvmquant_int8": False, "tvm_fp32": False} and "(untuned)" in table
    # which model it measured: what `tvmquant report --bench` checks
    from tvmquant.report import model_fingerprint

    assert result["model"] == json.loads(json.dumps(model_fingerprint(tvmquant.load(artifact))))
    assert result["model"]["name"] == "cnn.tvmq"
    # bad arguments: one line, no output file
    bad = tmp_path / "bad.json"
    assert cli.main(["bench", str(artifact), "--threads", "0", "-o", str(bad), "-q"]) == cli.EXIT_USER_ERROR
    assert "threads" in capsys.readouterr().err and not bad.exists()
    missing = str(tmp_path / "no_such_db")
    assert cli.main(["bench", str(artifact), "--db", missing, "-o", str(bad), "-q"]) == cli.EXIT_USER_ERROR
    assert "no_such_db" in capsys.readouterr().err and not bad.exists()
