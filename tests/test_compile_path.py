"""One compile path: every way of building a quantized model goes through the target's INT8 pipeline.

``QuantizedModel.compile``, ``export_library``, ``tvmquant compile`` and ``tvmquant bench`` all call
:func:`tvmquant.compile.build`; without a tuning database it must still give VNNI-tensorized blocked kernels
on x86 and WMMA/dp4a kernels on CUDA (before, it fell back to stock ``tvm.compile``: 6 ``vpdpbusd`` instead of
120 on a two-conv model, 2.6 s instead of 59 ms on ResNet-50), and a database only swaps in better schedules.
"""

import os

import numpy as np
import onnx
import pytest
from models import calibration_images, residual_cnn

import tvmquant
from tvmquant.compile import build
from tvmquant.config import PRESETS
from tvmquant.schedules import cuda, x86
from tvmquant.testing import library_source

SAPPHIRE_RAPIDS = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}


def assembly(executable) -> str:
    return library_source(executable, "asm")


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "cnn.onnx"
    onnx.save(residual_cnn(), str(path))
    return tvmquant.quantize(str(path), calib_data=calibration_images(8), progress=False, report_batches=0)


def test_build_without_database_is_vnni_tensorized(qmodel):
    convs = sum(layer.op_type == "conv2d" and layer.quantized for layer in qmodel.layers)
    asm = assembly(build(qmodel.mod, SAPPHIRE_RAPIDS))  # codegen only: runs on any host
    assert asm.count("vpdpbusd") >= convs, "untuned convs are not tensorized with VNNI"


@pytest.mark.slow  # ~25-45 s; kept out of the default suite's 15-minute budget
def test_with_and_without_database_give_the_same_outputs(qmodel, tmp_path):
    target = x86.x86_target(num_cores=2)
    tasks = x86.extract_tasks(qmodel.mod, target)
    db = str(tmp_path / "db")
    x86.tune(qmodel.mod, target, trials=len(tasks), db_dir=db, strategy="replay-trace", progress=False)
    assert os.path.isfile(os.path.join(db, "database_tuning_record.json"))
    images = calibration_images(3, seed=21)
    untuned = qmodel.compile(target)
    tuned = qmodel.compile(target, db=db)
    for image in images:
        np.testing.assert_array_equal(tuned(image[None]), untuned(image[None]))  # integer kernels: exact
    if x86.int8_isa(target) == "vnni":
        assert "vpdpbusd" in assembly(untuned.executable)


@pytest.mark.slow  # ~25-45 s; kept out of the default suite's 15-minute budget
@pytest.mark.skipif(not cuda.have_nvcc(), reason="nvcc is not on PATH")
def test_cuda_build_without_database_uses_tensor_cores_or_dp4a(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(residual_cnn(), str(path))
    signed = tvmquant.quantize(str(path), PRESETS["cuda_int8"], calibration_images(4), progress=False, report_batches=0)
    source = cuda.cuda_source(build(signed.mod, "nvidia/nvidia-h100"))
    assert "wmma::mma_sync" in source or "__dp4a" in source


def test_tune_is_the_python_twin_of_the_command(qmodel, tmp_path, monkeypatch):
    """``tvmquant.tune`` dispatches like ``tvmquant tune``: x86 tunes here, CUDA writes a package or imports one."""
    from tvmquant.schedules import offline

    calls = {}
    monkeypatch.setattr(x86, "tune", lambda mod, target, **kw: calls.setdefault("x86", (target.kind.name, kw)))
    monkeypatch.setattr(
        offline,
        "make_package",
        lambda models, package, target, **kw: (
            calls.setdefault("package", package) and {"candidates": [1], "tasks": [1]}
        ),
    )
    monkeypatch.setattr(offline, "import_measurements", lambda package, db: {"imported_from": package})
    db = str(tmp_path / "db")
    assert tvmquant.tune(qmodel, trials=32, db=db).action == "tuned"
    assert calls["x86"][0] == "llvm" and calls["x86"][1]["trials"] == 32 and calls["x86"][1]["db_dir"] == db
    result = tvmquant.tune(qmodel, target="nvidia/nvidia-h100", db=db, package=str(tmp_path / "pkg"))
    assert result.action == "packaged" and calls["package"] == str(tmp_path / "pkg")
    assert tvmquant.tune(qmodel, db=db, import_package="pkg").details == {"imported_from": "pkg"}
    with pytest.raises(ValueError, match="package=DIR"):
        tvmquant.tune(qmodel, target="nvidia/nvidia-h100", db=db)
    with pytest.raises(ValueError, match="trials must be at least 1"):
        tvmquant.tune(qmodel, trials=0, db=db)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tvmquant.tune(qmodel, db=str(tmp_path / "missing" / "db"))
