"""The ``.tvmq`` artifact (format 2): what it stores, its size against ONNX Runtime's QDQ file, exact round trips,
the ONNX source kept or found again by path and SHA-256, determinism, and format-1 artifacts."""

import json
import os
import shutil
import zipfile

import numpy as np
import onnx
import pytest
import tvm
from models import calibration_images, residual_cnn, residual_cnn_dynamic_batch

import tvmquant
from tvmquant import cli
from tvmquant._compat import const_value, is_const, op_name, structural_equal
from tvmquant.api import _json_default
from tvmquant.artifact import ARTIFACT_FORMAT, ArtifactError, split_constants, unpack_arrays

SKIPPED = "conv2d_1"  # kept in FP32 in the shared model, so that the artifact holds FP32 weights too


@pytest.fixture(scope="module")
def qmodel(model_file):
    config = tvmquant.QuantConfig(skip=(SKIPPED,))
    return tvmquant.quantize(model_file, config, calib_data=calibration_images(8), progress=False)


@pytest.fixture(scope="module")
def saved(qmodel, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "cnn.tvmq"
    qmodel.save(path)
    return path


def _manifest(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("manifest.json"))


def _stored_constants(path, key="simulated") -> dict:
    entry = _manifest(path)["modules"][key]
    with zipfile.ZipFile(path) as archive:
        return unpack_arrays(archive.read(entry["constants"]), entry["index"], str(path))


def _conv_weights(mod) -> list:
    """The weight operand of each conv2d in ``main``, in order, through a dequantize if there is one."""
    values = {}
    weights = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
            if op_name(binding.value) == "relax.nn.conv2d":
                weight = binding.value.args[1]
                weight = values.get(weight, weight)
                if op_name(weight) == "relax.dequantize":
                    weight = weight.args[0]
                weights.append(const_value(weight) if is_const(weight) else None)
    return weights


# ------------------------------------------------------------------------------------------------ contents
def test_artifact_stores_the_simulated_module_once_and_no_source(saved, model_file):
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
        graph = archive.read("simulated.relax.json").decode()
    assert names == sorted(["manifest.json", "simulated.relax.json", "simulated.bin"])
    manifest = _manifest(saved)
    assert manifest["format"] == ARTIFACT_FORMAT == 2
    assert manifest["source"]["kept"] is False and manifest["source"]["kind"] == "onnx"
    record = manifest["source"]["file"]
    assert record["path"] == os.path.abspath(model_file) and record["size"] == os.path.getsize(model_file)
    assert len(record["sha256"]) == 64
    # No tensor data in the graph: every constant was lifted into simulated.bin.
    assert '"ffi.Tensor"' not in graph


def test_quantized_layers_store_int8_weights_and_a_skipped_layer_its_fp32_weights_exactly(qmodel, saved):
    constants = _stored_constants(saved)
    # Conv weights are (out, in, kh, kw); int32 biases (1, out, 1, 1).
    weights = {name: array for name, array in constants.items() if array.ndim == 4 and array.shape[0] > 1}
    assert sorted({str(array.dtype) for array in weights.values()}) == ["float32", "int8"]
    assert sum(array.dtype == np.float32 for array in weights.values()) == 1  # the skipped conv only
    # Nothing else is FP32 at weight size: biases of quantized layers are int32.
    assert max(array.size for array in constants.values() if array.dtype == np.float32) == max(
        array.size for array in weights.values() if array.dtype == np.float32
    )
    loaded = tvmquant.load(saved)
    index = [layer.name for layer in qmodel.layers if layer.op_type == "conv2d"].index(SKIPPED)
    fp32_weight = _conv_weights(qmodel.fp32)[index]
    stored = _conv_weights(loaded.simulated)[index]
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, fp32_weight)
    assert [layer.name for layer in loaded.layers if not layer.quantized] == [SKIPPED]


def test_round_trip_is_bit_exact_for_int8_and_simulated(qmodel, saved):
    loaded = tvmquant.load(saved)
    assert structural_equal(loaded.simulated, qmodel.simulated)
    assert structural_equal(loaded.mod, qmodel.mod)
    x = calibration_images(2, seed=7)[1:]
    np.testing.assert_array_equal(loaded.compile()(x), qmodel.compile()(x))
    np.testing.assert_array_equal(loaded.compile(mode="simulated")(x), qmodel.compile(mode="simulated")(x))
    assert str(loaded.summary()) == str(qmodel.summary())
    assert loaded.output_names == qmodel.output_names == ["logits"]


def test_split_and_join_constants_restore_the_module_and_its_shared_constants(qmodel):
    from tvmquant.artifact import join_constants

    graph, arrays = split_constants(qmodel.simulated)
    assert all(isinstance(array, np.ndarray) for array in arrays.values())
    assert any(array.ndim == 0 for array in arrays.values())  # scalars keep their rank
    assert '"ffi.Tensor"' in tvm.ir.save_json(qmodel.simulated) and '"ffi.Tensor"' not in graph
    assert structural_equal(join_constants(graph, arrays), qmodel.simulated)


def test_saving_twice_gives_the_same_bytes(qmodel, saved, tmp_path):
    qmodel.save(tmp_path / "again.tvmq")
    assert (tmp_path / "again.tvmq").read_bytes() == saved.read_bytes()
    tvmquant.load(saved).save(tmp_path / "resaved.tvmq")  # a loaded model writes the same artifact
    assert (tmp_path / "resaved.tvmq").read_bytes() == saved.read_bytes()
    with zipfile.ZipFile(saved) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_artifact_is_under_1_3x_the_onnx_runtime_qdq_file(model_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from tvmquant.testing.ort import ort_quantize

    calib = calibration_images(8)
    qdq_path = ort_quantize(model_file, calib, "minmax", per_channel=True, out_dir=str(tmp_path))
    # Every layer in INT8 in both, as ORT quantizes them all.
    tvmquant.quantize(model_file, calib_data=calib, progress=False).save(tmp_path / "cnn.tvmq")
    size, ort_size = os.path.getsize(tmp_path / "cnn.tvmq"), os.path.getsize(qdq_path)
    assert size < 1.3 * ort_size, f"artifact {size} B vs ORT QDQ {ort_size} B"
    # A pre-quantized (QDQ) import stores its own module, once.
    imported = tvmquant.quantize(qdq_path, progress=False)
    imported.save(tmp_path / "qdq.tvmq")
    assert os.path.getsize(tmp_path / "qdq.tvmq") < 1.3 * os.path.getsize(qdq_path)
    with zipfile.ZipFile(tmp_path / "qdq.tvmq") as archive:
        assert sorted(archive.namelist()) == ["manifest.json", "qdq.bin", "qdq.relax.json"]
    loaded = tvmquant.load(tmp_path / "qdq.tvmq")
    assert loaded.qdq is not None and structural_equal(loaded.mod, imported.mod)
    assert onnx.load_from_string(loaded.source).graph.node  # the source, found again at its path


# ------------------------------------------------------------------------------------------------ the source
def test_fp32_mode_with_keep_source_after_the_onnx_file_is_gone(qmodel, tmp_path):
    model_path = tmp_path / "moved.onnx"
    onnx.save(residual_cnn_dynamic_batch(), str(model_path))
    own = tvmquant.quantize(
        str(model_path), qmodel.config, calibration_images(8), batch_size=1, progress=False, report_batches=0
    )
    own.save(tmp_path / "kept.tvmq", keep_source=True)
    model_path.unlink()
    loaded = tvmquant.load(tmp_path / "kept.tvmq")
    assert structural_equal(loaded.fp32, own.fp32) and structural_equal(loaded.annotated, own.annotated)
    x = calibration_images(1, seed=3)
    np.testing.assert_array_equal(loaded.compile(mode="fp32")(x), own.compile(mode="fp32")(x))
    assert loaded.rebatch(2).inputs[0].shape[0] == 2


def test_without_the_source_fp32_needs_the_file_at_its_recorded_path(qmodel, tmp_path):
    model_path = tmp_path / "model.onnx"
    onnx.save(residual_cnn_dynamic_batch(), str(model_path))
    own = tvmquant.quantize(
        str(model_path), qmodel.config, calibration_images(8), batch_size=1, progress=False, report_batches=0
    )
    own.save(tmp_path / "lean.tvmq")
    shutil.move(model_path, tmp_path / "elsewhere.onnx")
    loaded = tvmquant.load(tmp_path / "lean.tvmq")
    assert structural_equal(loaded.mod, own.mod)  # INT8 and the summary need no source
    assert "conv2d_0" in str(loaded.summary())
    message = (
        r"lean.tvmq' keeps no FP32 weights and no ONNX source, and no file at '.*model.onnx'.*re-quantize with "
        r"--keep-source.*or put the ONNX model back at '.*model.onnx'"
    )
    with pytest.raises(ArtifactError, match=message):
        loaded.compile(mode="fp32")
    with pytest.raises(ArtifactError, match=message):
        loaded.rebatch(2)
    with pytest.raises(ArtifactError, match=message):
        loaded.export_onnx(tmp_path / "qdq.onnx")
    # Another model at that path is refused by its SHA-256.
    onnx.save(residual_cnn(seed=3), str(model_path))
    with pytest.raises(ArtifactError, match="has changed since quantization"):
        tvmquant.load(tmp_path / "lean.tvmq").compile(mode="fp32")
    # The file put back: everything works again.
    shutil.move(tmp_path / "elsewhere.onnx", model_path)
    loaded = tvmquant.load(tmp_path / "lean.tvmq")
    assert structural_equal(loaded.fp32, own.fp32)
    assert structural_equal(loaded.annotated, own.annotated)
    assert loaded.rebatch(2).inputs[0].shape == (2, 3, 16, 16)
    pytest.importorskip("onnxruntime")
    loaded.export_onnx(tmp_path / "loaded_qdq.onnx")
    own.export_onnx(tmp_path / "own_qdq.onnx")
    assert (tmp_path / "loaded_qdq.onnx").read_bytes() == (tmp_path / "own_qdq.onnx").read_bytes()


def test_relax_source_keeps_its_fp32_module_only_with_keep_source(tmp_path):
    from tvmquant.frontend.onnx import import_onnx

    mod, _ = import_onnx(residual_cnn())
    own = tvmquant.quantize(mod, calib_data=calibration_images(8), progress=False, report_batches=0)
    own.save(tmp_path / "lean.tvmq")
    own.save(tmp_path / "kept.tvmq", keep_source=True)
    with zipfile.ZipFile(tmp_path / "kept.tvmq") as archive:
        assert "fp32.bin" in archive.namelist() and "source.onnx" not in archive.namelist()
    kept = tvmquant.load(tmp_path / "kept.tvmq")
    assert structural_equal(kept.fp32, own.fp32) and structural_equal(kept.annotated, own.annotated)
    assert kept.source is None
    lean = tvmquant.load(tmp_path / "lean.tvmq")
    assert structural_equal(lean.mod, own.mod)
    with pytest.raises(ArtifactError, match="keeps no FP32 weights .*Relax IRModule.*keep_source=True"):
        lean.compile(mode="fp32")


def test_cli_quantize_keep_source(tmp_path, model_file, saved):
    np.savez(tmp_path / "calib.npz", input=calibration_images(8))
    kept = tmp_path / "kept.tvmq"
    args = ["quantize", model_file, "--calib", str(tmp_path / "calib.npz"), "--skip", SKIPPED, "--keep-source"]
    assert cli.main([*args, "-o", str(kept), "-q"]) == 0
    manifest = _manifest(kept)
    assert manifest["source"]["kept"] is True
    assert manifest["source"]["file"] == _manifest(saved)["source"]["file"]  # the path is recorded either way
    with zipfile.ZipFile(kept) as archive:
        assert archive.read("source.onnx") == tvmquant.load(saved).source  # the same as found at the path


# ------------------------------------------------------------------------------------------------ old formats
def _save_format1(qmodel, path) -> None:
    """An artifact as tvmquant wrote it before format 2 (every module, constants as JSON, the source)."""
    manifest = qmodel.manifest()
    manifest["format"] = 1
    files = {
        "manifest.json": json.dumps(manifest, indent=2, default=_json_default),
        "fp32.relax.json": tvm.ir.save_json(qmodel.fp32),
        "annotated.relax.json": tvm.ir.save_json(qmodel.annotated),
        "int8.relax.json": tvm.ir.save_json(qmodel.mod),
        "int8.relax.py": qmodel.mod.script(show_meta=False),
        "source.onnx": qmodel.source,
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def test_format1_artifacts_still_load_and_resave_as_format2(qmodel, tmp_path):
    _save_format1(qmodel, tmp_path / "old.tvmq")
    old = tvmquant.load(tmp_path / "old.tvmq")
    assert structural_equal(old.mod, qmodel.mod) and structural_equal(old.fp32, qmodel.fp32)
    assert [layer.name for layer in old.layers if not layer.quantized] == [SKIPPED]
    old.save(tmp_path / "new.tvmq", keep_source=True)  # format 1 kept the source: keep it on
    assert _manifest(tmp_path / "new.tvmq")["format"] == 2
    assert os.path.getsize(tmp_path / "new.tvmq") < os.path.getsize(tmp_path / "old.tvmq")
    new = tvmquant.load(tmp_path / "new.tvmq")
    assert structural_equal(new.mod, qmodel.mod) and structural_equal(new.fp32, qmodel.fp32)


@pytest.mark.parametrize("artifact_format, hint", [(3, "upgrade tvmquant, or re-quantize"), (0, "re-quantize")])
def test_unknown_formats_name_the_file_and_say_to_requantize(saved, tmp_path, artifact_format, hint):
    path = tmp_path / "odd.tvmq"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "manifest.json":
                data = json.dumps(dict(json.loads(data), format=artifact_format))
            target.writestr(name, data)
    with pytest.raises(ArtifactError, match=f"odd.tvmq' has artifact format {artifact_format}.*{hint}"):
        tvmquant.load(path)
