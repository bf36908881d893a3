"""Tuning on a farm through TVM's RPC tracker, on loopback (127.0.0.1 only).

Each test starts a real ``python -m tvm.exec.rpc_tracker`` and ``python -m tvmquant.rpc_server`` processes (their
own process groups, killed at the end), then tunes a tiny quantized conv model with candidates measured there.
No stubs: candidates build here, upload, run and are timed in the servers' session processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")

from test_schedules_x86 import conv2d_reference, conv_module, run  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant import cli  # noqa: E402
from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.rpc import FleetError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Hard bound of a test's tuning: past it the farm is killed, so tuning fails instead of hanging.
HARD_BOUND_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Farm:
    """A tracker and RPC servers on loopback, each in its own process group; :meth:`close` kills them all."""

    def __init__(self, log_dir):
        self.log_dir = str(log_dir)
        self.env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = _free_port()
        self.tracker = f"127.0.0.1:{self.port}"
        tracker = ["-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port)]
        self._start("tracker", [*tracker, "--port-end", str(self.port + 1)])

    def _start(self, name, args):
        log = open(os.path.join(self.log_dir, name + ".log"), "w")  # noqa: SIM115  (closed with the process)
        self.procs[name] = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def add_server(self, name, key):
        port = _free_port()
        args = ["-m", "tvmquant.rpc_server", "--tracker", self.tracker, "--key", key, "--host", "127.0.0.1"]
        self._start(name, [*args, "--port", str(port), "--port-end", str(port + 1)])

    def wait_for(self, key, count, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()  # TVM would retry for 60 s
                summary = tvm.rpc.connect_tracker("127.0.0.1", self.port).summary()
                if sum(1 for s in summary["server_info"] if s["key"] == "server:" + key) >= count:
                    return
            except Exception:  # noqa: BLE001  (the tracker is still starting)
                pass
            time.sleep(0.5)
        raise AssertionError(f"{count} servers under {key!r} did not register in {timeout} s")

    def measured(self, name) -> int:
        """Candidates the server ``name`` loaded (TVM's server logs one line per uploaded module)."""
        with open(os.path.join(self.log_dir, name + ".log")) as handle:
            return handle.read().count("load_module")

    def kill(self, name):
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its session processes
        proc.wait(timeout=10)

    def close(self):
        for name in list(self.procs):
            try:
                self.kill(name)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


@pytest.fixture
def farm(tmp_path):
    farm = Farm(tmp_path)
    yield farm
    farm.close()


def _tiny_model():
    rng = np.random.default_rng(3)
    mod, weights, biases = conv_module((1, 16, 8, 8), [(16, 1, 1, 0, 1)], rng)
    return mod, weights[0], biases[0]


def test_bad_farms_fail_in_seconds_with_one_line(farm, tmp_path, capsys):
    farm.add_server("server1", "cpu")
    mod, _, _ = _tiny_model()
    target = x86.x86_target(num_cores=2)
    db = str(tmp_path / "db")
    cases = [
        (f"127.0.0.1:{_free_port()}", "cpu", target, "cannot reach the RPC tracker"),
        (farm.tracker, "gpu", target, "no RPC server is registered under key 'gpu'"),
        (farm.tracker, "cpu", x86.x86_target("skylake", num_cores=2), "the target's mcpu is 'skylake'"),
    ]
    farm.wait_for("cpu", 1)
    for tracker, key, case_target, message in cases:
        start = time.time()
        with pytest.raises(FleetError, match=message):
            tvmquant.tune(mod, case_target, trials=4, db=db, rpc_tracker=tracker, rpc_key=key, progress=False)
        assert time.time() - start < 15, f"{message!r} took {time.time() - start:.0f} s"
    # The CLI says the same in one line (no traceback), and wrote no database.
    capsys.readouterr()
    assert cli.main(["tune", "x.tvmq", "--db", db, "--rpc-tracker", "nowhere", "--rpc-key", "cpu"]) != 0
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(db, "database_tuning_record.json"))
    with pytest.raises(ValueError, match="needs both rpc_tracker"):
        tvmquant.tune(mod, target, db=db, rpc_key="cpu")


@pytest.mark.slow
def test_two_servers_measure_and_a_killed_one_is_survived(farm, tmp_path, capsys):
    """Run alone: ``python -m pytest -m slow tests/test_tuning_rpc.py`` (about 2 minutes on 2 shared cores)."""
    farm.add_server("server1", "cpu")
    farm.add_server("server2", "cpu")
    mod, weight, bias = _tiny_model()
    target = x86.x86_target(num_cores=2)
    tasks = x86.extract_tasks(mod, target)
    farm.wait_for("cpu", 2)

    killed = {}

    def kill_server2_once_both_measured():
        while time.time() < start + HARD_BOUND_S and not done.is_set():
            if farm.measured("server1") >= 1 and farm.measured("server2") >= 1:
                farm.kill("server2")
                killed["at"] = time.time() - start
                return
            time.sleep(0.2)

    def watchdog():  # no hang: past the bound the farm goes, and tuning fails fast
        if not done.wait(HARD_BOUND_S):
            farm.close()

    done = threading.Event()
    start = time.time()
    threads = [threading.Thread(target=f, daemon=True) for f in (kill_server2_once_both_measured, watchdog)]
    for thread in threads:
        thread.start()
    db = str(tmp_path / "rpc_db")
    try:
        tvmquant.tune(mod, target, trials=24, db=db, rpc_tracker=farm.tracker, rpc_key="cpu", rpc_parallel=2)
    finally:
        done.set()
    wall = time.time() - start
    err = capsys.readouterr().err
    assert wall < HARD_BOUND_S, f"tuning took {wall:.0f} s"
    assert "killed" not in err or "at" in killed
    assert "at" in killed, "server2 was not killed during tuning (tuning ended first)"
    assert farm.measured("server1") >= 2 and farm.measured("server2") >= 1, err[-2000:]
    assert "measuring on 2 RPC servers under key 'cpu'" in err
    assert f"[tune] seeded {len(tasks)} of {len(tasks)} kernels with their default schedule" in err  # on the farm
    # Every task has a valid record, though server2 died in the middle.
    records = x86.records_for_target(db, target)
    assert all(x86._is_tuned(records, task, target) for task in tasks), err[-3000:]
    assert "[tune] done" in err

    # The library built from the farm's database computes what a locally tuned one does (and the reference).
    local_db = str(tmp_path / "local_db")
    tvmquant.tune(mod, target, trials=len(tasks), db=local_db, trials_per_task=1, progress=False)
    data = np.random.default_rng(4).integers(0, 256, (1, 16, 8, 8)).astype("uint8")
    from_farm = run(x86.build(mod, target, db_dir=db), data)
    from_local = run(x86.build(mod, target, db_dir=local_db), data)
    np.testing.assert_array_equal(from_farm, from_local)
    np.testing.assert_array_equal(from_farm, conv2d_reference(data, weight) + bias)
