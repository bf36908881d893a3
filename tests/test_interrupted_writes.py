"""Interrupted writes (issue 17): ``tvmquant quantize``, ``export`` and ``compile`` killed with SIGKILL at several
points leave their output absent, the old file, or the new complete file, never a partial one.

Kill points are exact, not timed: the command runs in a child process whose ``os.fdopen`` (every
:func:`tvmquant._io.atomic_write` goes through it) or ``os.replace`` (the rename into place) sends the process
SIGKILL after so many bytes or at the n-th rename. Timed kills of the whole command run under ``-m slow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from models import calibration_images, residual_cnn

import tvmquant
from tvmquant.artifact import ArtifactError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import os, signal, sys
mode, count = sys.argv[1], int(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "bytes":
    real_fdopen = os.fdopen

    class Stream:
        def __init__(self, inner):
            self.inner, self.written = inner, 0
        def write(self, data):
            room = count - self.written
            if len(data) >= room:
                self.inner.write(bytes(data[:room])); self.inner.flush(); os.fsync(self.inner.fileno()); die()
            self.written += len(data)
            return self.inner.write(data)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self.inner, name)

    os.fdopen = lambda *a, **k: Stream(real_fdopen(*a, **k))
elif mode == "replace":
    real_replace, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == count:
            die()
        return real_replace(src, dst)

    os.replace = replace
from tvmquant import cli
sys.exit(cli.main(sys.argv[3:]))
"""


def _run(mode: str, count: int, argv: list) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(count), *argv], env=env, capture_output=True)
    return done.returncode


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    model = folder / "cnn.onnx"
    onnx.save(residual_cnn(channels=4, size=8), model)
    np.savez(folder / "calib.npz", input=calibration_images(2, size=8))
    old = folder / "old.tvmq"
    tvmquant.quantize(str(model), calib_data=calibration_images(2, size=8, seed=5), progress=False).save(old)
    tvmquant.quantize(str(model), calib_data=calibration_images(2, size=8, seed=6), progress=False).save(
        folder / "new.tvmq"
    )
    return folder, str(model), str(folder / "calib.npz"), old


def _state(path, old_bytes: bytes | None, check) -> str:
    """'absent', 'old' or 'new' (complete: ``check`` loads it); anything else fails the test."""
    if not os.path.exists(path):
        return "absent"
    data = open(path, "rb").read()
    if old_bytes is not None and data == old_bytes:
        return "old"
    check(path)
    return "new"


def _no_temporaries_visible(folder) -> None:
    # a killed writer cannot remove its temporary file; it is hidden (.tvmquant-*) and never the output's name
    assert all(name.startswith(".tvmquant-") for name in os.listdir(folder) if name.startswith("."))


@pytest.mark.parametrize(
    "mode,count",
    [
        ("bytes", 3000),
        ("replace", 1),
        pytest.param("bytes", 1, marks=pytest.mark.slow),
        pytest.param("replace", 99, marks=pytest.mark.slow),  # never killed: the new complete file
    ],
)
def test_killed_quantize_leaves_old_or_complete_artifact(files, tmp_path, mode, count):
    folder, model, calib, old = files
    out = tmp_path / "m.tvmq"
    old_bytes = old.read_bytes()
    out.write_bytes(old_bytes)
    code = _run(mode, count, ["quantize", model, "--calib", calib, "-o", str(out), "-q"])
    state = _state(out, old_bytes, tvmquant.load)
    assert (code == -signal.SIGKILL and state == "old") or (code == 0 and state == "new")
    _no_temporaries_visible(tmp_path)


@pytest.mark.parametrize("mode,count", [("bytes", 100), pytest.param("replace", 1, marks=pytest.mark.slow)])
def test_killed_export_leaves_old_or_complete_onnx(files, tmp_path, mode, count):
    folder, _, _, old = files
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old contents")
    code = _run(mode, count, ["export", str(old), "--format", "onnx-qdq", "-o", str(out), "-q"])
    state = _state(out, b"old contents", lambda path: onnx.checker.check_model(onnx.load(path)))
    assert (code == -signal.SIGKILL and state == "old") or (code == 0 and state == "new")


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, 2, 3])
def test_killed_compile_leaves_a_matching_pair_or_says_so(files, tmp_path, count):
    from tvmquant.deploy import load_library

    folder, _, _, old = files
    out = tmp_path / "model.so"
    assert _run("none", 0, ["compile", str(old), "-o", str(out)]) == 0
    before = out.read_bytes(), (tmp_path / "model.so.json").read_bytes()
    x = calibration_images(1, size=8)
    expected = {name: tvmquant.load(folder / name).compile()(x) for name in ("old.tvmq", "new.tvmq")}
    code = _run("replace", count, ["compile", str(folder / "new.tvmq"), "-o", str(out)])
    pair = out.read_bytes(), (tmp_path / "model.so.json").read_bytes()
    if pair == before:
        np.testing.assert_array_equal(load_library(out)(x), expected["old.tvmq"])
        return
    try:
        got = load_library(out)(x)
    except ValueError as err:  # killed between the two renames: the loader names the mismatch
        assert code == -signal.SIGKILL and "does not describe library" in str(err)
    else:
        np.testing.assert_array_equal(got, expected["new.tvmq"])  # the new complete pair


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0, 6.0, 8.0, 12.0])
def test_timed_sigkill_of_quantize(files, tmp_path, delay):
    folder, model, calib, old = files
    out = tmp_path / "m.tvmq"
    old_bytes = old.read_bytes()
    out.write_bytes(old_bytes)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-m", "tvmquant.cli", "quantize", model, "--calib", calib, "-o", str(out), "-q"], env=env
    )
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert _state(out, old_bytes, tvmquant.load) in ("old", "new")


def test_state_helper_rejects_a_partial_file(files, tmp_path):
    _, _, _, old = files
    partial = tmp_path / "p.tvmq"
    partial.write_bytes(old.read_bytes()[:-10])
    with pytest.raises(ArtifactError):
        _state(partial, b"other", tvmquant.load)
