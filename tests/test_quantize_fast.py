"""Quantizing is fast: calibration runs compiled code for this CPU, in batches, with the same results."""

import importlib

import numpy as np
import onnx
import pytest
import tvm
from models import calibration_images, residual_cnn, residual_cnn_dynamic_batch

import tvmquant
from tvmquant import cli
from tvmquant.target import HOST_GRAPH_OPT_LEVEL
from tvmquant.testing import library_source

calibrate_module = importlib.import_module("tvmquant.passes.calibrate")


@pytest.mark.parametrize("method", [tvmquant.Max(), tvmquant.Percentile(99.9), tvmquant.MSE()])
def test_batched_calibration_gives_the_same_parameters(method):
    model = residual_cnn_dynamic_batch()
    config = tvmquant.QuantConfig(activation=tvmquant.TensorSpec("uint8", "affine", method=method))
    data = calibration_images(8, seed=4)
    one = tvmquant.quantize(model, config, data, batch_size=1, calib_batch=1, progress=False, report_batches=0)
    four = tvmquant.quantize(model, config, data, batch_size=1, calib_batch=4, progress=False, report_batches=0)
    assert one.table.keys() == four.table.keys()
    for name, params in one.table.items():
        other = four.table[name]
        if params.role == "weight" or name == "conv2d_0.in0":  # the weights and the model input: the same values
            np.testing.assert_array_equal(params.scale, other.scale, err_msg=name)
            np.testing.assert_array_equal(params.zero_point, other.zero_point, err_msg=name)
        elif isinstance(method, tvmquant.Max):
            # Batch-4 kernels sum in another order than batch-1 kernels: FP32 activations may differ in the last
            # bit, so the observed max does too (the observers themselves are exact: tests/test_calibration.py).
            np.testing.assert_allclose(params.scale, other.scale, rtol=1e-6, err_msg=name)
            np.testing.assert_array_equal(params.zero_point, other.zero_point, err_msg=name)
        else:  # histogram methods: within one bin of the 2048 over the range
            width = (float(params.a_max) - float(params.a_min)) / 2048 * 2
            assert abs(float(params.a_max) - float(other.a_max)) <= width, name
            assert abs(float(params.a_min) - float(other.a_min)) <= width, name
    # The batched copy calibrated, the model itself keeps the batch it was quantized for.
    assert four.inputs[0].shape[0] == 1


def test_calibration_compiles_for_this_cpu_with_default_schedules(monkeypatch):
    def stock(mod, target):
        raise AssertionError("calibration compiled with stock tvm.compile (TVM's unscheduled loops)")

    monkeypatch.setattr(calibrate_module, "_stock_build", stock)
    targets = []
    from tvmquant import api

    original_build = api.host_build

    def spy_build(mod, target=None):
        targets.append(target)
        return original_build(mod, target)

    monkeypatch.setattr(api, "host_build", spy_build)
    tvmquant.quantize(residual_cnn(), calib_data=calibration_images(2), progress=False, report_batches=0)
    assert targets and all("mcpu" in dict(target.attrs) and int(target.attrs["num-cores"]) >= 1 for target in targets)
    # LLVM -O2: the code of a ResNet-50 generated in a third of -O3's time, as fast
    assert all(int(target.attrs["opt-level"]) == HOST_GRAPH_OPT_LEVEL == 2 for target in targets)


def test_graphs_tvmquant_runs_itself_compile_without_kernel_argument_checks_and_still_refuse_bad_inputs():
    from tvm import relax

    from tvmquant.api import load_model
    from tvmquant.compile import build, host_build

    mod, inputs, _, _ = load_model(residual_cnn())
    x = calibration_images(1, seed=3)
    own, deployed = host_build(mod), build(mod)
    # TVM's message for a tensor of the wrong type, shape or device handed to a kernel: a deployed library keeps
    # the checks, tvmquant's own graphs (calibration, SQNR, AutoSkip, fine-tuning) do without them.
    assert "Mismatched type on argument" in library_source(deployed, "ll")
    assert "Mismatched type on argument" not in library_source(own, "ll")
    results = [relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy() for ex in (own, deployed)]
    np.testing.assert_array_equal(results[0], results[1])
    # The VM's main still checks what it is given, before any kernel runs.
    with pytest.raises(Exception, match=r"param=input.*shape\[3\] mismatch"):
        relax.VirtualMachine(own, tvm.cpu())["main"](tvm.runtime.tensor(calibration_images(1)[..., :-1].copy()))


def test_bad_calib_batch_is_refused(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(residual_cnn(), str(path))  # static batch 1
    np.savez(tmp_path / "c.npz", input=calibration_images(4))
    out = tmp_path / "m.tvmq"
    argv = ["quantize", str(path), "--calib", str(tmp_path / "c.npz"), "-o", str(out), "-q"]
    assert cli.main(argv + ["--calib-batch", "0"]) == 2
    assert "--calib-batch must be at least 1" in capsys.readouterr().err
    assert cli.main(argv + ["--calib-batch", "4"]) == 2
    assert "batch axis is static (1)" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="more than this machine has free"):
        tvmquant.quantize(
            residual_cnn_dynamic_batch(), calib_data=calibration_images(4), calib_batch=10**7, progress=False
        )


def test_samples_are_regrouped_into_the_calibration_batch():
    from tvmquant._io import CalibrationDataError, InputSpec, iter_batches

    spec = [InputSpec("x", (4, 2), "float32")]
    data = [np.full((1, 2), i, np.float32) for i in range(3)] + [np.arange(10, 20, dtype=np.float32).reshape(5, 2)]
    batches = [batch["x"] for batch in iter_batches(data, spec)]
    assert [b.shape for b in batches] == [(4, 2), (4, 2)]
    np.testing.assert_array_equal(np.concatenate(batches)[:, 0], [0, 1, 2, 10, 12, 14, 16, 18])
    with pytest.raises(CalibrationDataError, match="1 sample\\(s\\) left over after the last full batch of 4"):
        list(iter_batches(data + [np.zeros((1, 2), np.float32)], spec))
    bad = [np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32)]
    with pytest.raises(CalibrationDataError, match="batch 1, input 'x' has shape \\(1, 3\\); the model takes samples"):
        list(iter_batches(bad, spec))
    with pytest.raises(CalibrationDataError, match="holds Python objects"):
        list(iter_batches([np.array([[object(), object()]] * 4)], spec))


def test_a_list_of_single_samples_calibrates_in_batches():
    # A dynamic-batch model fed one sample per item: quantize counts the list, picks a batch that divides it and
    # regroups the samples (it used to expect 16-sample items).
    images = calibration_images(4, seed=2)
    items = [images[i : i + 1] for i in range(4)]
    qmodel = tvmquant.quantize(residual_cnn_dynamic_batch(), calib_data=items, progress=False, report_batches=0)
    whole = tvmquant.quantize(residual_cnn_dynamic_batch(), calib_data=images, progress=False, report_batches=0)
    for name, params in whole.table.items():
        np.testing.assert_array_equal(params.zero_point, qmodel.table[name].zero_point, err_msg=name)
        np.testing.assert_allclose(params.scale, qmodel.table[name].scale, rtol=1e-6, err_msg=name)


def test_a_generator_streams_and_the_passes_that_read_again_see_its_samples():
    # A generator is read once: calibration streams it; the summary's SQNR and bias correction read it again, from
    # the samples kept as they went by (they used to find it exhausted: no SQNR at all, silently).
    images = calibration_images(16, size=8, seed=3)
    model = residual_cnn_dynamic_batch(channels=4, size=8)
    config = tvmquant.QuantConfig(bias_correction=True)
    listed = tvmquant.quantize(model, config, calib_data=list(images[:, None]), progress=False, report_batches=2)
    streamed = tvmquant.quantize(model, config, calib_data=(x[None] for x in images), progress=False, report_batches=2)
    assert {n: p.to_dict() for n, p in streamed.table.items()} == {n: p.to_dict() for n, p in listed.table.items()}
    assert streamed.sqnr == listed.sqnr and "output0" in streamed.sqnr
    for name, vector in listed.bias_corrections.items():
        np.testing.assert_array_equal(streamed.bias_corrections[name], vector, err_msg=name)


def test_calibration_data_of_no_accepted_form_is_one_clear_error():
    from tvmquant._io import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="calibration data is a float; give an array"):
        tvmquant.quantize(residual_cnn(channels=4, size=8), calib_data=3.0, progress=False)


def test_calibration_reads_the_marked_tensors_without_copying_them(monkeypatch):
    # The x86 build's markers hand a read-only observer the tensor itself (tvmquant._relax.alias_markers): no
    # copy per marked tensor (a fifth of a ResNet-50 calibration batch), and the same parameters, exactly, as
    # the destination-passing markers that copy into planned memory. The residual adds and the concat reuse
    # marked tensors after the marker: memory the VM planner would hand on if the alias were not safe.
    build_module = importlib.import_module("tvmquant.schedules.x86.build")
    copies, running = [], [False]
    original_copyfrom, original_run_vm = tvm.runtime.Tensor.copyfrom, calibrate_module.run_vm

    def counting_copyfrom(self, source):
        if running[0] and isinstance(source, tvm.runtime.Tensor):  # tensor to tensor: a marker's copy
            copies.append(tuple(self.shape))
        return original_copyfrom(self, source)

    def counting_run_vm(*args):
        running[0] = True
        try:
            return original_run_vm(*args)
        finally:
            running[0] = False

    monkeypatch.setattr(tvm.runtime.Tensor, "copyfrom", counting_copyfrom)
    monkeypatch.setattr(calibrate_module, "run_vm", counting_run_vm)
    data = calibration_images(8, seed=5)
    config = tvmquant.QuantConfig(activation=tvmquant.TensorSpec("uint8", "affine", method=tvmquant.Max()))

    def calibrate():
        calibrate_module._VM_CACHE.clear()
        copies.clear()
        qmodel = tvmquant.quantize(
            residual_cnn_dynamic_batch(), config, data, calib_batch=4, progress=False, report_batches=0
        )
        return qmodel.table, len(copies)

    aliased, aliased_copies = calibrate()
    monkeypatch.setattr(build_module, "alias_markers", lambda mod: mod)
    copied, copied_copies = calibrate()
    assert aliased_copies == 0 and copied_copies >= 2 * 10, (aliased_copies, copied_copies)
    assert aliased.keys() == copied.keys()
    for name, params in aliased.items():
        np.testing.assert_array_equal(params.scale, copied[name].scale, err_msg=name)
        np.testing.assert_array_equal(params.zero_point, copied[name].zero_point, err_msg=name)


def test_an_onnx_file_is_read_once_and_its_source_serialized_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(residual_cnn_dynamic_batch(), str(path))
    reads = []
    original = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *args, **kwargs: reads.append(args[0]) or original(*args, **kwargs))
    qmodel = tvmquant.quantize(str(path), calib_data=calibration_images(8), calib_batch=4, progress=False)
    assert reads == [str(path)]  # not again for the batch-4 calibration copy, nor to look at its batch axis
    assert not isinstance(qmodel._source, bytes)  # the ModelProto read, kept as it is until someone asks
    source = qmodel.source
    assert isinstance(source, bytes) and qmodel.source is source
    assert onnx.load_from_string(source).graph.node[0].op_type == residual_cnn_dynamic_batch().graph.node[0].op_type
    qmodel.save(tmp_path / "m.tvmq", keep_source=True)
    np.testing.assert_array_equal(
        tvmquant.load(tmp_path / "m.tvmq").compile()(calibration_images(1)), qmodel.compile()(calibration_images(1))
    )
