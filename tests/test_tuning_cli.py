"""`tvmquant tune` and the tutorial: every kernel gets a tuning record, and TVM's own log stays in the database.

The default-suite test tunes the bundled Fashion-MNIST CNN with one trial per kernel (real building and
measuring, no stubs); the whole tutorial runs under ``-m slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

tvm = pytest.importorskip("tvm")

import tvmquant  # noqa: E402
from tvmquant import cli  # noqa: E402
from tvmquant.examples import fmnist_model_path, load_fmnist_example  # noqa: E402
from tvmquant.schedules import x86  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What TVM printed into the terminal before tuning kept its log in the database directory.
TVM_CHATTER = ("[INFO]", "Logging directory", "Unknown schedule rule", "task_scheduler.cc", "[DEBUG]")


def _assert_quiet(text: str) -> None:
    for chatter in TVM_CHATTER:
        assert chatter not in text, f"{chatter!r} reached the terminal:\n{text[-2000:]}"


def test_cli_tune_gives_every_kernel_a_record_and_keeps_tvm_quiet(tmp_path, capfd):
    calib, _, _ = load_fmnist_example()
    artifact = str(tmp_path / "fmnist.tvmq")
    tvmquant.quantize(fmnist_model_path(), calib_data=calib[:32]).save(artifact)
    capfd.readouterr()
    db = str(tmp_path / "db")
    # One trial per kernel: the smallest run that still measures every kernel.
    assert cli.main(["tune", artifact, "--db", db, "--trials", "1", "--trials-per-task", "1"]) == 0
    out, err = capfd.readouterr()
    _assert_quiet(out + err)
    target = x86.x86_target()
    tasks = x86.extract_tasks(tvmquant.load(artifact).mod, target)
    assert len(tasks) >= 5
    records = x86.records_for_target(db, target)
    untuned = [task.task_name for task in tasks if not x86._is_tuned(records, task, target)]
    assert not untuned, f"no record for {untuned}"
    assert f"1 trials over {len(tasks)} kernels: giving each kernel at least 1; total {len(tasks)}" in err
    assert err.count("[tune] task ") == len(tasks)  # one progress line per kernel: each got its batch
    # Meta-schedule's log is in the database directory instead, one file per kernel plus the scheduler's.
    logs = os.listdir(os.path.join(db, "logs"))
    assert "tvm.s_tir.meta_schedule.logging.task_scheduler.log" in logs
    assert len([name for name in logs if ".logging.task_" in name and "scheduler" not in name]) == len(tasks)


@pytest.mark.slow
def test_tutorial_tunes_every_kernel_quietly():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tutorials", "quantize_and_deploy.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_quiet(result.stdout + result.stderr)
    assert "no tuning record" not in result.stderr
    assert "deployed library agrees with the artifact: True" in result.stdout
    assert "[tune] done" in result.stderr
