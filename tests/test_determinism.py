"""Determinism (issue 17): the same command twice gives byte-identical files."""

from __future__ import annotations

import numpy as np
import onnx
from models import calibration_images, resnet_style

from tvmquant import cli


def test_quantize_and_export_twice_give_identical_bytes(tmp_path):
    model = tmp_path / "resnet.onnx"
    onnx.save(resnet_style(stages=((2, 4),), size=16), model)
    np.savez(tmp_path / "calib.npz", input=calibration_images(4, size=16))
    outputs = []
    for run in ("a", "b"):
        artifact, qdq = tmp_path / f"{run}.tvmq", tmp_path / f"{run}.onnx"
        assert (
            cli.main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "-o", str(artifact), "-q"]) == 0
        )
        assert cli.main(["export", str(artifact), "--format", "onnx-qdq", "-o", str(qdq), "-q"]) == 0
        outputs.append((artifact.read_bytes(), qdq.read_bytes()))
    assert outputs[0][0] == outputs[1][0]  # .tvmq: sorted members, fixed timestamps, sorted tables
    assert outputs[0][1] == outputs[1][1]  # QDQ ONNX
