"""The OpenVINO rows of `tvmquant bench` / bench/speed_x86.py: NNCF INT8 and FP32 of the same ONNX model, skipped
with a note when OpenVINO is missing."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest

from tvmquant import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import calibration_images, residual_cnn  # noqa: E402


class _Model:
    def __init__(self, source):
        self._source = source
        self.inputs = []

    def source_model(self):
        return self._source


def test_openvino_rows_are_skipped_with_a_note_when_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    result = {"latency_ms": {}, "skipped": {}}
    benchmark._time_openvino(_Model(residual_cnn()), str(tmp_path), "x.npz", (1, 2), 0.1, None, result, print)
    assert "pip install openvino nncf" in result["skipped"]["openvino"] and not result["latency_ms"]


@pytest.mark.slow
def test_openvino_int8_and_fp32_time_the_same_onnx_model(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    path = str(tmp_path / "cnn.onnx")
    onnx.save(residual_cnn(), path)
    name = onnx.load(path).graph.input[0].name
    calib = calibration_images(16)
    paths = benchmark.openvino_models(path, {name: calib}, str(tmp_path))
    assert set(paths) == {"ov_fp32", "ov_int8"}
    import openvino as ov

    int8 = ov.Core().read_model(paths["ov_int8"])
    assert any(op.get_type_name() == "FakeQuantize" for op in int8.get_ops())  # NNCF's INT8 form
    np.savez(tmp_path / "x.npz", **{name: calib[:1]})
    for threads in (1, 2):
        assert benchmark.time_openvino(paths["ov_int8"], str(tmp_path / "x.npz"), threads, 0.2) > 0
