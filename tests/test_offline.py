"""Offline GPU tuning (tvmquant.schedules.offline, tvmquant.remote, tvmquant.cuda_binaries) and the CUDA model
pipeline (tvmquant.schedules.cuda.prepare / build), without a GPU.

- The NHWC pipeline is checked for exactness on this CPU (same Relax passes, llvm target).
- ``remote.measure_package`` runs on a package of llvm kernels (``--device cpu``): checking against the
  reference, timing, a wrong kernel and a library that crashes its process.
- A real CUDA package of a quantized CNN is built with nvcc, fake measurements are imported, and the build
  picks the recorded schedules (WMMA in the CUDA source).
- Precompiled binaries are found by the runtime's ``tvm_callback_cuda_compile`` (with a stub libcuda).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")
from models import calibration_images, residual_cnn  # noqa: E402
from tvm import relax  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant import remote  # noqa: E402
from tvmquant.config import PRESETS  # noqa: E402
from tvmquant.schedules import cuda, offline  # noqa: E402
from tvmquant.schedules.layout import SinkLayoutTransform  # noqa: E402

needs_nvcc = pytest.mark.skipif(not cuda.have_nvcc(), reason="nvcc is not on PATH (CUDA toolkit not installed)")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A residual CNN quantized with the cuda_int8 preset (signed int8 activations)."""
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    onnx.save(residual_cnn(), path)
    return tvmquant.quantize(str(path), calib_data=calibration_images(8), config=PRESETS["cuda_int8"], progress=False)


def _run_cpu(mod, data):
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(data)).numpy()


def test_nhwc_layout_is_exact_and_leaves_no_transposes(cnn):
    with tvm.transform.PassContext(opt_level=3):
        nhwc = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(cnn.mod)
        nhwc = relax.transform.DeadCodeElimination()(SinkLayoutTransform()(nhwc))
    script = nhwc.script()
    moving = [line for line in script.splitlines() if "permute_dims" in line and "metadata" not in line]
    # Only the model input (NCHW -> NHWC) and the pooled features before the classifier are transposed.
    assert len(moving) <= 2, moving
    assert 'layout="NHWC"' in script or "NHWC" in script
    data = calibration_images(1, seed=5)
    np.testing.assert_array_equal(_run_cpu(cnn.mod, data), _run_cpu(nhwc, data))


def test_lift_constants_keeps_the_result(cnn):
    target = tvm.target.Target({"kind": "llvm"})
    with tvm.transform.PassContext(opt_level=3):
        folded = relax.transform.FoldConstant()(cnn.mod)
    lifted, weights = cuda.lift_constants(folded, min_bytes=512)
    assert weights and all(w.nbytes >= 512 for w in weights)
    assert int(lifted["main"].attrs["num_input"]) == 1
    data = calibration_images(1, seed=6)
    vm = relax.VirtualMachine(tvm.compile(lifted, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(data), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    np.testing.assert_array_equal(got, _run_cpu(cnn.mod, data))


def test_space_kind_by_dtype():
    assert cuda.space_kind(cuda.int8_matmul(32, 32, 32)["main"]) == "wmma"
    assert cuda.space_kind(cuda.int8_matmul(32, 32, 32, dtype="float16", accum_dtype="float32")["main"]) == "wmma_fp16"
    assert cuda.space_kind(cuda.int8_matmul(32, 32, 32, dtype="float32", accum_dtype="float32")["main"]) is None


# ----------------------------------------------------------------------------------------------------------
# remote.measure_package on llvm kernels
def _plus_one(func):
    """A wrong kernel: the same matmul, plus one."""
    from tvm import te

    a = te.placeholder((16, 16), "int8", name="A")
    b = te.placeholder((16, 16), "int8", name="B")
    k = te.reduce_axis((0, 16), "k")
    c = te.compute((16, 16), lambda i, j: te.sum(a[i, k].astype("int32") * b[j, k].astype("int32"), axis=k), name="C")
    d = te.compute((16, 16), lambda i, j: c[i, j] + 1, name="D")
    return te.create_prim_func([a, b, d])


def test_measure_package_checks_times_and_survives_a_crash(tmp_path):
    func = cuda.int8_matmul(16, 16, 16)["main"]
    llvm = offline.reference_target()
    tvm.compile(tvm.IRModule({"ref_0": offline._reference(func, "ref_0")}), target=llvm).export_library(
        str(tmp_path / "references.so")
    )
    (tmp_path / "candidates_0.so").write_text("not a library")  # loading it kills the child process
    good = func.with_attr("global_symbol", "t0_c0")
    wrong = _plus_one(func).with_attr("global_symbol", "t0_c1")
    tvm.compile(tvm.IRModule({"t0_c0": good, "t0_c1": wrong}), target=llvm).export_library(
        str(tmp_path / "candidates_1.so")
    )
    manifest = {
        "format": offline.PACKAGE_FORMAT,
        "tasks": [
            {
                "index": 0,
                "name": "mm",
                "kind": "wmma",
                "weights": {"m": 1},
                "args": offline._arg_specs(func),
                "reference": "ref_0",
            }
        ],
        "candidates": [
            {"symbol": "t0_c9", "task": 0, "library": "candidates_0.so"},
            {"symbol": "t0_c0", "task": 0, "library": "candidates_1.so"},
            {"symbol": "t0_c1", "task": 0, "library": "candidates_1.so"},
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert manifest["tasks"][0]["args"][-1].get("output") and not manifest["tasks"][0]["args"][0].get("output")
    result = remote.measure_package(str(tmp_path), budget_s=120, min_repeat_ms=1, repeat=2, device="cpu")
    rows = result["candidates"]
    assert "error" in rows["t0_c9"] and rows["t0_c9"].get("seconds") is None
    assert rows["t0_c0"]["correct"] is True and rows["t0_c0"]["seconds"] > 0
    assert rows["t0_c1"]["correct"] is False and rows["t0_c1"]["check"]["max_abs_diff"] == 1
    assert rows["t0_c1"]["check"]["mismatches"] == 256
    assert os.path.exists(tmp_path / "measurements.json")


def test_compare_tolerates_rare_off_by_one_only():
    expected = np.arange(4000, dtype=np.int8).reshape(40, 100)
    got = expected.copy()
    got[0, 0] += 1
    assert remote.compare(got, expected)["correct"]
    got[1:, 0] += 1  # 40 of 4000 elements off by one: more than 0.1%
    assert not remote.compare(got, expected)["correct"]
    assert not remote.compare(expected.astype(np.float32) * np.nan, expected.astype(np.float32))["correct"]


# ----------------------------------------------------------------------------------------------------------
# A real CUDA package (nvcc), fake measurements, import, build
@pytest.mark.slow  # ~25-45 s; kept out of the default suite's 15-minute budget
@needs_nvcc
def test_package_import_and_build(cnn, tmp_path):
    from tvmquant import cli

    artifact = tmp_path / "cnn.tvmq"
    cnn.save(artifact)
    package, db = tmp_path / "pkg", tmp_path / "db"
    common = [str(artifact), "--target", "nvidia/nvidia-h100", "--db", str(db), "-q"]
    assert cli.main(["tune", *common, "--package", str(package), "--trials-per-task", "2"]) == 0
    manifest = json.loads((package / "manifest.json").read_text())

    tasks = manifest["tasks"]
    assert tasks and all(task["kind"] in ("wmma", "cuda") for task in tasks)
    assert sum(task["kind"] == "wmma" for task in tasks) >= len(tasks) - 1  # the classifier may be float
    libraries = {c["library"] for c in manifest["candidates"]}
    for library in libraries:
        assert (package / library).exists()
    assert (package / "references.so").exists() and (package / "candidates.cuda.zip").exists()
    # Fake the GPU: the last candidate of each task is the fastest; one is wrong and must not be picked.
    measured = {}
    for candidate in manifest["candidates"]:
        number = int(candidate["symbol"].split("_c")[1])
        measured[candidate["symbol"]] = {"task": candidate["task"], "seconds": 1e-3 / (1 + number), "correct": True}
    wrong = manifest["candidates"][0]["symbol"]
    measured[wrong].update(seconds=1e-9, correct=False)
    (package / "measurements.json").write_text(json.dumps({"candidates": measured}))
    assert cli.main(["tune", *common, "--import", str(package)]) == 0
    # importing again is harmless: the fastest correct record per kernel is the same
    counts = offline.import_measurements(package, db)
    assert counts["committed"] == len(manifest["candidates"]) and counts["wrong"] == 1
    assert counts["tuned_tasks"] == len(tasks)
    target = cuda.cuda_target()
    prepared = cuda.prepare(cnn.mod, target)
    assert cuda.untuned_kernels(cuda.apply_database(prepared, target, str(db))) == []
    executable = cuda.build(cnn.mod, target, str(db))
    source = cuda.cuda_source(executable)
    assert "wmma::mma_sync" in source


# ----------------------------------------------------------------------------------------------------------
# Precompiled CUDA binaries are what the runtime loads
STUB = "\n".join(
    [
        f"int {name}(){{return 100;}}"
        for name in (
            "cuDeviceGetName",
            "cuFuncSetAttribute",
            "cuLaunchKernelEx",
            "cuModuleGetFunction",
            "cuModuleLoadData",
            "cuModuleUnload",
            "cuTensorMapEncodeTiled",
        )
    ]
    + [
        'int cuGetErrorName(int e, const char** s){*s="stub";return 0;}',
        'int cuGetErrorString(int e, const char** s){*s="stub";return 0;}',
    ]
)


@pytest.mark.slow  # 30-50 s; realize == simulate and load paths are covered by faster tests
@needs_nvcc
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the stub libcuda")
def test_precompiled_binaries_are_used_at_load(tmp_path):
    from tvmquant import cuda_binaries

    target = cuda.cuda_target()
    sch = cuda._sample(cuda.int8_matmul(64, 64, 64), target, 1, 0, "mm")[0]
    lib = tvm.compile(sch.mod, target=target)
    library = tmp_path / "mm.so"
    lib.export_library(str(library))
    binaries = cuda_binaries.precompile(lib, target)
    assert len(binaries) == 1 and next(iter(binaries.values()))[:4] == b"\x50\xed\x55\xba"  # fatbin magic
    cuda_binaries.write_archive(binaries, cuda_binaries.archive_path(library))
    (tmp_path / "stub.c").write_text(STUB)
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(tmp_path / "libcuda.so.1"),
            str(tmp_path / "stub.c"),
        ],
        check=True,
    )
    # A fresh process as on a GPU host: TVM's runtime only, libcuda (a stub here) on the library path;
    # install() loads TVM's CUDA runtime sidecar, which the runtime-only TVM does not load by itself.
    script = textwrap.dedent(f"""
        import json
        import tvm
        from tvmquant import cuda_binaries
        assert tvm.base._RUNTIME_ONLY
        stats = cuda_binaries.install({cuda_binaries.archive_path(library)!r})
        tvm.runtime.load_module({str(library)!r})
        print(json.dumps(stats))
    """)
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", LD_LIBRARY_PATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"hits": 1, "compiled": 0}


def test_torch_check_agrees_with_numpy_compare():
    torch = pytest.importorskip("torch")
    expected = np.arange(-2000, 2000, dtype=np.int32).reshape(40, 100)
    got = expected.copy()
    got[:5, 0] += 1
    for exp, out in ((expected, got), (expected.astype(np.float32), (got + 0.5).astype(np.float32))):
        via_torch = remote._check(tvm.runtime.tensor(out), exp, torch.from_numpy(exp))
        assert via_torch == remote.compare(out, exp)


@needs_nvcc
def test_cli_compile_for_cuda_writes_library_binaries_and_metadata(cnn, tmp_path):
    from tvmquant import cli, cuda_binaries

    artifact = tmp_path / "cnn.tvmq"
    cnn.save(artifact)
    library = tmp_path / "cnn_h100.so"
    assert cli.main(["compile", str(artifact), "--target", "nvidia/nvidia-h100", "-o", str(library), "-q"]) == 0
    metadata = json.loads((tmp_path / "cnn_h100.so.json").read_text())
    assert '"cuda"' in metadata["target"] and metadata["cuda_binaries"] == "cnn_h100.so.cuda.zip"
    binaries = cuda_binaries.read_archive(cuda_binaries.archive_path(library))
    assert len(binaries) == 1 and all(data[:4] == b"\x50\xed\x55\xba" for data in binaries.values())
    if not cuda.have_gpu():
        from tvmquant.deploy import load_library

        with pytest.raises(RuntimeError, match="built for a CUDA GPU and this machine has none"):
            load_library(library)


def test_pooling_kernels_get_one_thread_per_output(cnn):
    """A max pool with its requantize fused must not get dlight's cross-thread reduction (a whole block per
    output: 6.3 ms instead of 58 us for ResNet-50 at batch 32 on an H200, bench/results/gpu/profile_cuda_h200*)."""
    target = cuda.cuda_target()
    prepared = cuda.prepare(cnn.mod, target)
    pools = [gv for gv, f in prepared.functions.items() if "max_pool" in gv.name_hint]
    assert pools, "the test model has a max pool"
    assert all(0 < cuda._largest_reduction(prepared[gv]) <= cuda.WINDOW_REDUCTION for gv in pools)
    scheduled = cuda.ScheduleUntuned(target)(prepared)
    for gv in pools:
        script = scheduled[gv.name_hint].script()
        assert "threadIdx.x" in script and "allreduce" not in script, script[-2000:]


@pytest.mark.skipif(cuda.have_gpu(), reason="checks the message on machines without a GPU")
def test_compile_for_cuda_without_gpu_says_what_to_do(cnn):
    with pytest.raises(RuntimeError, match="no CUDA GPU to run the model on"):
        cnn.compile(target="nvidia/nvidia-h100")


def test_a_library_that_fails_to_build_is_reported_not_fatal(tmp_path, monkeypatch):
    """When nvcc refuses a library, the worker says so and writes nothing; make_package drops that library."""
    from tvmquant import cuda_binaries

    def refuse(lib, target):
        raise RuntimeError("ptxas fatal: made-up failure")

    monkeypatch.setattr(cuda_binaries, "precompile", refuse)
    func = cuda.int8_matmul(16, 16, 16)["main"].with_attr("global_symbol", "t0_c0")
    path = tmp_path / "candidates_0.so"
    payload = ([("t0_c0", tvm.ir.save_json(func))], json.dumps(offline.target_dict(cuda.cuda_target())), str(path))
    done = offline._compile_library(payload)
    assert "ptxas fatal" in done["error"] and done["binaries"] == {}
    assert not path.exists()


def test_bad_package_paths_get_clear_errors(tmp_path, capsys):
    assert remote.main(["measure", str(tmp_path / "nowhere")]) == 2
    assert "is not a measurement package" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="is not a measurement package"):
        offline.import_measurements(tmp_path, tmp_path / "db")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "tasks": [], "candidates": []}))
    with pytest.raises(FileNotFoundError, match="has no traces.json"):
        offline.import_measurements(tmp_path, tmp_path / "db")
    assert not (tmp_path / "db").exists()
