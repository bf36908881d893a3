"""Damaged and hostile files (issue 17): each is refused with one line naming the file and what is wrong, and
nothing from the file is executed (no pickles, no member written outside a folder, no gigabyte allocation)."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import onnx
import pytest
import tvm
from models import calibration_images, residual_cnn

import tvmquant
from tvmquant import cli
from tvmquant.artifact import ArtifactError
from tvmquant.frontend.onnx import load_onnx_model
from tvmquant.frontend.prepare import ModelError


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    qmodel = tvmquant.quantize(
        residual_cnn(channels=4, size=8), calib_data=calibration_images(2, size=8), progress=False, report_batches=0
    )
    path = folder / "m.tvmq"
    qmodel.save(path)
    return qmodel, path


def _refused(path, match: str = "") -> str:
    with pytest.raises(ArtifactError) as info:
        tvmquant.load(path)
    message = str(info.value)
    assert "\n" not in message and repr(str(path)) in message
    assert match in message
    return message


def test_truncated_artifacts_are_refused(artifact, tmp_path):
    _, path = artifact
    data = path.read_bytes()
    cuts = sorted({int(len(data) * f) for f in np.linspace(0, 0.999, 12)} | {len(data) - 1, len(data) - 22})
    for cut in cuts:
        damaged = tmp_path / f"cut_{cut}.tvmq"
        damaged.write_bytes(data[:cut])
        _refused(damaged)


def test_bit_flipped_artifacts_are_refused_or_load_unchanged(artifact, tmp_path):
    qmodel, path = artifact
    data = path.read_bytes()
    rng = np.random.default_rng(17)
    refused = 0
    positions = rng.choice(len(data), 40, replace=False)
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << int(rng.integers(8))
        damaged = tmp_path / "flip.tvmq"
        damaged.write_bytes(bytes(flipped))
        try:
            loaded = tvmquant.load(damaged)
        except ArtifactError as err:
            assert "\n" not in str(err) and repr(str(damaged)) in str(err)
            refused += 1
            continue
        # a flip in bytes the zip does not check (timestamps, attributes, comments): the model is unchanged
        assert tvm.ir.structural_equal(loaded.simulated, qmodel.simulated)
        assert {k: v.to_dict() for k, v in loaded.table.items()} == {k: v.to_dict() for k, v in qmodel.table.items()}
    assert refused >= len(positions) // 2  # CRC-32 and the zip structure catch nearly every flip


def _copy_with(path, target, extra: dict) -> None:
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target, "w") as out:
        for info in source.infolist():
            out.writestr(info, source.read(info))
        for name, data in extra.items():
            out.writestr(name, data)


@pytest.mark.parametrize("member", ["../evil.json", "/etc/evil.json", "sub/../../evil.json", "C:/evil.json"])
def test_member_paths_leaving_the_archive_are_refused(artifact, tmp_path, member):
    _, path = artifact
    hostile = tmp_path / "evil.tvmq"
    _copy_with(path, hostile, {member: b"{}"})
    _refused(hostile, "unsafe path")
    assert not (tmp_path.parent / "evil.json").exists()


def test_members_that_decompress_to_gigabytes_are_refused_before_reading(artifact, tmp_path):
    _, path = artifact
    bomb = tmp_path / "bomb.tvmq"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            data = source.read(info)
            out.writestr(info.filename, data + b" " * (80 << 20) if info.filename == "manifest.json" else data)
    assert os.path.getsize(bomb) < 2 << 20  # 80 MiB of padding deflate to ~80 KiB
    _refused(bomb, "would decompress to")
    # the declared size alone decides: a central directory claiming 4 GB for a tiny member
    data = bytearray(path.read_bytes())
    directory = data.rfind(b"PK\x01\x02" + data[data.rfind(b"PK\x01\x02") + 4 : data.rfind(b"PK\x01\x02") + 6])
    data[directory + 24 : directory + 28] = (0xF0000000).to_bytes(4, "little")  # uncompressed size field
    claimed = tmp_path / "claims.tvmq"
    claimed.write_bytes(bytes(data))
    _refused(claimed)


def test_object_dtype_constants_are_refused(artifact, tmp_path):
    _, path = artifact
    with zipfile.ZipFile(path) as source:
        manifest = json.loads(source.read("manifest.json"))
        members = {info.filename: source.read(info) for info in source.infolist()}
    manifest["modules"]["simulated"]["index"][0][1] = "|O"
    members["manifest.json"] = json.dumps(manifest).encode()
    hostile = tmp_path / "object.tvmq"
    with zipfile.ZipFile(hostile, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)
    _refused(hostile, "only raw numbers")


def test_calibration_npz_with_object_arrays_is_refused(model_file, tmp_path, capsys):
    bad = tmp_path / "calib.npz"
    np.savez(bad, input=np.array([{"x": 1}, None], dtype=object))  # needs pickle to load
    code = cli.main(["quantize", model_file, "--calib", str(bad), "-o", str(tmp_path / "m.tvmq"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and repr(str(bad)) in err
    assert not (tmp_path / "m.tvmq").exists()


def test_onnx_with_missing_or_truncated_external_data_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(residual_cnn(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert load_onnx_model(path).graph.initializer  # loads while the data is there
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match="is truncated"):
        load_onnx_model(path)
    data.unlink()
    with pytest.raises(ModelError, match=r"keeps its data in 'm.data', which is missing") as info:
        load_onnx_model(path)
    assert "\n" not in str(info.value) and repr(str(path)) in str(info.value)


def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path):
    (tmp_path / "inner").mkdir()
    model = residual_cnn()
    onnx.save(model, tmp_path / "inner" / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    hacked = onnx.load(tmp_path / "inner" / "m.onnx", load_external_data=False)
    for init in hacked.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(b"\0" * 100000)
    onnx.save(hacked, tmp_path / "inner" / "h.onnx")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_onnx_model(tmp_path / "inner" / "h.onnx")


def _tiny_database(folder) -> None:
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((8, 8), name="A")
    func = te.create_prim_func([a, te.compute((8, 8), lambda i, j: a[i, j] * 2, name="B")])
    mod = tvm.IRModule({"main": func})
    database = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
    workload = database.commit_workload(mod)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    for seconds in (1.0, 2.0, 3.0):
        database.commit_tuning_record(
            ms.database.TuningRecord(
                tvm.s_tir.Schedule(mod).trace, workload, [seconds], target, ms.arg_info.ArgInfo.from_prim_func(func)
            )
        )


def test_tuning_database_cut_mid_record_loads_its_complete_records(tmp_path, caplog):
    from tvmquant.schedules.common import DatabaseError, open_json_database

    _tiny_database(tmp_path)
    records = tmp_path / "database_tuning_record.json"
    full = records.read_bytes()
    assert len(open_json_database(str(tmp_path)).get_all_tuning_records()) == 3
    last = full.rstrip(b"\n").rfind(b"\n") + 1
    for cut in (last + 5, last + (len(full) - last) // 2, len(full) - 2):
        records.write_bytes(full[:cut])  # tune killed while appending its third record
        assert len(open_json_database(str(tmp_path)).get_all_tuning_records()) == 2
        assert records.read_bytes() == full[:last]  # the torn tail is gone: the next append starts a clean line
    assert "cut off mid-line" in caplog.text
    records.write_bytes(b"#" + full[1:])  # damage inside the first record: not an interruption
    with pytest.raises(DatabaseError, match=r"database_tuning_record.json' line 1 is not a JSON record"):
        open_json_database(str(tmp_path))


def test_tuning_record_that_does_not_replay_is_named_with_its_reason(tmp_path):
    # TVM's loader replays every record in threads and says only "(not rendered)"; the error names the line.
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from tvmquant.schedules.common import DatabaseError, open_json_database

    _tiny_database(tmp_path)
    a = te.placeholder((8, 8), name="A")
    func = te.create_prim_func([a, te.compute((8, 8), lambda i, j: a[i, j] * 2, name="B")])
    mod = tvm.IRModule({"main": func})
    sch = tvm.s_tir.Schedule(mod)
    sch.split(sch.get_loops(sch.get_sblock("B"))[0], [2, 4])
    database = open_json_database(str(tmp_path))
    database.commit_tuning_record(
        ms.database.TuningRecord(
            sch.trace,
            database.commit_workload(mod),
            [0.5],
            tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}),
            ms.arg_info.ArgInfo.from_prim_func(func),
        )
    )
    records = tmp_path / "database_tuning_record.json"
    lines = records.read_text().splitlines()
    assert '"B"' in lines[3]
    records.write_text("\n".join([*lines[:3], lines[3].replace('"B"', '"B_elsewhere"')]) + "\n")
    with pytest.raises(DatabaseError, match=r"line 4: .*Cannot find a block with the name: B_elsewhere"):
        open_json_database(str(tmp_path))


def test_library_metadata_must_match_its_library(artifact, tmp_path):
    from tvmquant.deploy import load_library

    qmodel, _ = artifact
    library = tmp_path / "model.so"
    from tvmquant.library import export_library

    export_library(qmodel, library)
    x = calibration_images(1, size=8)
    expected = load_library(library)(x)
    other = tmp_path / "other.so"
    export_library(qmodel, other, mode="fp32")
    meta = library.read_bytes(), (tmp_path / "model.so.json").read_bytes()
    os.replace(other, library)  # another build under the old metadata
    with pytest.raises(ValueError, match="does not describe library") as info:
        load_library(library)
    assert "\n" not in str(info.value)
    library.write_bytes(meta[0])
    (tmp_path / "model.so.json").write_bytes(meta[1][: len(meta[1]) // 2])  # a torn metadata file
    with pytest.raises(ValueError, match="is damaged"):
        load_library(library)
    (tmp_path / "model.so.json").write_bytes(meta[1])
    np.testing.assert_array_equal(load_library(library)(x), expected)


def test_not_a_zip_and_empty_files_are_refused(tmp_path):
    for name, data in (("empty.tvmq", b""), ("text.tvmq", b"hello\n"), ("onnx.tvmq", b"\x08\x07" * 50)):
        (tmp_path / name).write_bytes(data)
        _refused(tmp_path / name)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        out.writestr("manifest.json", b"[1, 2]")
    (tmp_path / "list.tvmq").write_bytes(buffer.getvalue())
    _refused(tmp_path / "list.tvmq")


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    from onnx import numpy_helper

    model = residual_cnn(channels=4, size=8)
    conv = next(node for node in model.graph.node if node.op_type == "Conv" and node.name)
    weight = next(init for init in model.graph.initializer if init.name == conv.input[1])
    values = numpy_helper.to_array(weight).copy()
    values.flat[3], values.flat[7] = np.nan, np.inf
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    path = tmp_path / "nan_weight.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match=rf"has 1 NaN and 1 Inf values.*node {conv.name!r}|node {conv.name!r}.*1 NaN"):
        tvmquant.quantize(str(path), calib_data=calibration_images(2, size=8), progress=False)
    np.savez(tmp_path / "calib.npz", calibration_images(2, size=8))
    code = cli.main(["quantize", str(path), "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "m.tvmq")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "NaN" in err[-1] and conv.name in err[-1]
    assert not (tmp_path / "m.tvmq").exists()
