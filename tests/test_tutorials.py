"""The tutorials run, start to end, and print what the README says they do.

Each takes one to two minutes on an idle 2-core machine (longer on a loaded one), so they are marked ``slow``:
``python -m pytest -m slow tests/test_tutorials.py`` runs them all (each in a fresh process, as a user would).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"


def _run(name: str, timeout: int = 900, env: dict | None = None) -> str:
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    environment.update(env or {})
    out = subprocess.run(
        [sys.executable, str(TUTORIALS / name)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_every_tutorial_has_a_test():
    tested = {"quantize_and_deploy.py", "recover_accuracy.py", "transformer_partial.py", "tune_gpu_offline.py"}
    assert {path.name for path in TUTORIALS.glob("*.py")} == tested


@pytest.mark.slow
def test_quantize_and_deploy():
    out = _run("quantize_and_deploy.py")
    fp32, int8 = (float(v) for v in re.search(r"FP32 ([0-9.]+)\s+INT8 ([0-9.]+)", out).groups())
    assert fp32 > 0.85 and int8 > fp32 - 0.02
    assert "deployed library agrees with the artifact: True" in out


@pytest.mark.slow
def test_recover_accuracy():
    pytest.importorskip("matplotlib")
    out = _run("recover_accuracy.py")
    poor = float(re.search(r"max calibration, per-tensor weights: output SQNR ([0-9.]+) dB", out).group(1))
    default = float(re.search(r"default \(percentile 99.99, per-channel weights\): ([0-9.]+) dB", out).group(1))
    assert default > poor  # the levers recover signal
    assert "report: " in out and "most sensitive layer" in out
    assert re.search(r"bias correction: [0-9.]+ dB", out)
    tuned = float(re.search(r"finetune, 4 epochs on the 64 calibration images: ([0-9.]+) dB", out).group(1))
    assert tuned > default  # on the images it trained on
    fp32, int8 = (float(v) for v in re.search(r"FP32 ([0-9.]+)\s+INT8 ([0-9.]+)", out).groups())
    assert int8 > fp32 - 0.02


@pytest.mark.slow
def test_transformer_partial():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers: pip install -c <(echo torch==2.13.0) transformers")
    out = _run("transformer_partial.py")
    everything = float(re.search(r"everything quantized: worst output SQNR ([0-9.-]+) dB", out).group(1))
    assert everything > 15
    chosen, after = re.search(r"AutoSkip kept \[(.+)\] in FP32: ([0-9.-]+) dB", out).groups()
    assert chosen and float(after) > everything  # it picks the layers that the worst output suffers from


@pytest.mark.slow
def test_tune_gpu_offline():
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc (CUDA toolkit) to compile the candidate kernels")
    out = _run("tune_gpu_offline.py")
    assert re.search(r"package .*: [1-9][0-9]* candidates for [1-9][0-9]* kernels", out)
    assert "model_cuda.so for" in out
