"""What a new user meets in the first hour, through ``tvmquant.cli.main`` as the user runs it.

Dynamic batch axes, empty and misnamed data files, CUDA targets without an arch, the model's own input,
output and node names, and flags that used to swallow arguments.
"""

import json

import numpy as np
import onnx
import pytest
from models import calibration_images, residual_cnn, residual_cnn_dynamic_batch

import tvmquant
from tvmquant import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("first_contact")
    model = folder / "dyn.onnx"
    onnx.save(residual_cnn_dynamic_batch(), str(model))
    calib = folder / "calib.npz"
    np.savez(calib, input=calibration_images(8))
    artifact = folder / "dyn.tvmq"
    assert cli.main(["quantize", str(model), "--calib", str(calib), "-o", str(artifact), "-q"]) == 0
    return {"model": str(model), "calib": str(calib), "artifact": str(artifact), "folder": folder}


def test_dynamic_batch_is_bound_with_a_notice_and_rebatched_at_compile(files, tmp_path, capsys):
    out = tmp_path / "again.tvmq"
    assert cli.main(["quantize", files["model"], "--calib", files["calib"], "-o", str(out), "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dynamic batch axis (N): bound to batch 1" in err[0] and "--batch-size" in err[0]
    qmodel = tvmquant.load(files["artifact"])
    x = calibration_images(8, seed=3)
    one = qmodel.compile()
    with pytest.raises(ValueError, match=r"compiled for batch 1: compile it for batch 8.*batch_size"):
        one(x)
    expected = np.concatenate([one(x[i : i + 1]) for i in range(8)])
    np.testing.assert_array_equal(qmodel.compile(batch_size=8)(x), expected)  # integer kernels: exact
    # The CLI: an artifact quantized at batch 1, compiled for batch 8.
    library = tmp_path / "b8.so"
    assert cli.main(["compile", files["artifact"], "--batch-size", "8", "-o", str(library), "-q"]) == 0
    meta = json.loads((tmp_path / "b8.so.json").read_text())
    assert meta["inputs"][0]["shape"] == [8, 3, 16, 16] and meta["outputs"][0]["shape"] == [8, 10]
    np.savez(tmp_path / "x.npz", input=x)
    assert cli.main(["run", str(library), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz"), "-q"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["logits"], expected)
    # A static-batch model cannot be rebatched: one clear line.
    static = tmp_path / "static.onnx"
    onnx.save(residual_cnn(), str(static))
    static_artifact = tmp_path / "static.tvmq"
    assert cli.main(["quantize", str(static), "--calib", files["calib"], "-o", str(static_artifact), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["compile", str(static_artifact), "--batch-size", "4", "-o", str(tmp_path / "s.so"), "-q"]) == 2
    assert "static batch of 1" in capsys.readouterr().err and not (tmp_path / "s.so").exists()


def test_empty_npz_is_a_one_line_error_naming_the_file(files, tmp_path, capsys):
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    out = tmp_path / "m.tvmq"
    assert cli.main(["quantize", files["model"], "--calib", str(empty), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty.npz" in err[0] and "holds no arrays" in err[0] and not out.exists()
    assert cli.main(["run", files["artifact"], "--input", str(empty), "-o", str(tmp_path / "y.npz"), "-q"]) == 2
    assert "holds no arrays" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no arrays"):
        tvmquant.quantize(files["model"], calib_data={}, progress=False)


@pytest.mark.parametrize("target", ["cuda", '{"kind": "cuda"}'])
def test_cuda_target_without_arch_is_one_line(files, tmp_path, capsys, target):
    out = tmp_path / "m.so"
    assert cli.main(["compile", files["artifact"], "--target", target, "-o", str(out), "-q"]) == 2
    captured = capsys.readouterr()
    lines = (captured.err + captured.out).strip().splitlines()
    assert len(lines) == 1, lines[:5]
    assert "nvidia/nvidia-h100" in lines[0] and '"arch": "sm_90a"' in lines[0] and not out.exists()


def test_the_models_own_names_are_kept(files, tmp_path, capsys):
    # Outputs keep the ONNX name in run's npz, the library metadata, and the loaded library.
    library = tmp_path / "m.so"
    assert cli.main(["compile", files["artifact"], "-o", str(library)]) == 0
    printed = capsys.readouterr().out
    target = json.loads(printed[printed.index("(target ") + len("(target ") : printed.rindex(")")])
    assert target["kind"] == "llvm"  # valid JSON that --target takes back:
    from tvmquant.compile import as_target

    assert as_target(json.dumps(target)).kind.name == "llvm"
    meta = json.loads((tmp_path / "m.so.json").read_text())
    assert [o["name"] for o in meta["outputs"]] == ["logits"] and json.loads(meta["target"])["kind"] == "llvm"
    from tvmquant.deploy import load_library

    loaded = load_library(library)
    assert [o.name for o in loaded.outputs] == ["logits"] and loaded.outputs[0].shape == (1, 10)
    assert tvmquant.load(files["artifact"]).compile().output_names == ["logits"]
    # Layers are found by their ONNX node names too, shown beside tvmquant's.
    assert cli.main(["inspect", files["artifact"]]) == 0
    table = capsys.readouterr().out
    assert "ONNX node" in table and "conv11" in table and "output 'logits' SQNR" in table
    out = tmp_path / "skip.tvmq"
    argv = ["quantize", "--skip", "conv11", "--skip", "conv2d_0,gemm39", files["model"]]
    assert cli.main(argv + ["--calib", files["calib"], "-o", str(out), "-q"]) == 0
    skipped = [(layer.name, layer.source) for layer in tvmquant.load(out).layers if not layer.quantized]
    assert skipped == [("conv2d_0", "conv2"), ("conv2d_1", "conv11"), ("matmul_0", "gemm39")]
    assert cli.main(["quantize", files["model"], "--calib", files["calib"], "--skip", "conv999", "-o", str(out)]) == 2
    assert "ONNX node names, like ['conv2'" in capsys.readouterr().err


def test_run_errors_name_the_input_file_not_calibration(files, tmp_path, capsys):
    bad = tmp_path / "ints.npz"
    np.savez(bad, input=np.full((2, 3, 16, 16), 2**40, np.int64))  # not exactly float32
    assert cli.main(["run", files["artifact"], "--input", str(bad), "-o", str(tmp_path / "y.npz"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "input file" in err and "ints.npz" in err and "'input' has dtype int64" in err
    assert "calibration" not in err and not (tmp_path / "y.npz").exists()


def test_misnamed_array_is_used_with_a_notice(files, tmp_path, capsys):
    misnamed = tmp_path / "images.npz"
    np.savez(misnamed, images=calibration_images(4))
    assert cli.main(["quantize", files["model"], "--calib", str(misnamed), "-o", str(tmp_path / "m.tvmq"), "-q"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "'images'" in line]
    assert len(notices) == 1 and notices[0].startswith("tvmquant: notice:") and "only input is 'input'" in notices[0]


def test_nan_calibration_file_exits_2(files, tmp_path, capsys):
    data = calibration_images(4)
    data[2, 1, 3, 3] = np.nan
    nan_file = tmp_path / "nan.npz"
    np.savez(nan_file, input=data)
    out = tmp_path / "m.tvmq"
    assert cli.main(["quantize", files["model"], "--calib", str(nan_file), "-o", str(out), "-q"]) == 2
    assert "sample 2 input 'input' has 1 NaN" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--percentile", "150"], "percentile must be in (50, 100]"),
        (["--method", "max", "--percentile", "99.9"], "--percentile applies to --method percentile"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_flags_are_refused(files, tmp_path, capsys, flags, message):
    out = tmp_path / "m.tvmq"
    assert cli.main(["quantize", files["model"], "--calib", files["calib"], *flags, "-o", str(out), "-q"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_percentile_flag_alone_sets_the_percentile(files, tmp_path):
    out = tmp_path / "m.tvmq"
    argv = ["quantize", files["model"], "--calib", files["calib"], "--percentile", "99.9", "-o", str(out), "-q"]
    assert cli.main(argv) == 0
    assert tvmquant.load(out).config.activation.method == tvmquant.Percentile(99.9)
