"""Tuning wall time with 1 vs 2 RPC servers on loopback (one tracker, `python -m tvmquant.rpc_server` each).

Quantizes the bundled Fashion-MNIST CNN, then tunes it from scratch with the same trial budget and seed, its
candidates measured on 1 server and then on 2 (``--rpc-parallel`` = servers), into fresh databases; also the
local runner (no RPC) for reference. All on this machine: with 2 cores the servers, the builders and the search
share them, so 2 servers cannot give 2x here (on a farm each server is its own machine).

    PYTHONPATH=. python bench/rpc_tuning.py [--trials 40]   # writes bench/results/rpc_tuning.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args, log_path, env):
    log = open(log_path, "w")  # noqa: SIM115  (lives as long as the process)
    return subprocess.Popen(
        [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _wait_servers(port, key, count, timeout=120):
    import tvm

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            summary = tvm.rpc.connect_tracker("127.0.0.1", port).summary()
            if sum(1 for s in summary["server_info"] if s["key"] == "server:" + key) >= count:
                return
        except Exception:  # noqa: BLE001  (still starting)
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{count} servers did not register in {timeout} s")


def tune_on_farm(artifact, servers, trials, work):
    """Wall seconds of `tvmquant tune` with ``servers`` loopback servers (tracker and servers started first)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    procs = [
        _start(
            ["-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
            os.path.join(work, f"tracker{servers}.log"),
            env,
        )
    ]
    try:
        for i in range(servers):
            server_port = _free_port()
            args = ["-m", "tvmquant.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", "bench"]
            args += ["--host", "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1)]
            procs.append(_start(args, os.path.join(work, f"server{servers}_{i}.log"), env))
        _wait_servers(port, "bench", servers)
        return _tune(
            artifact,
            trials,
            os.path.join(work, f"db_rpc{servers}"),
            ["--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "bench", "--rpc-parallel", str(servers)],
            env,
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tune(artifact, trials, db, extra, env):
    command = [sys.executable, "-m", "tvmquant.cli", "tune", artifact, "--db", db, "--trials", str(trials), *extra]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    done = [line for line in result.stderr.splitlines() if line.startswith("[tune] done")]
    return {"wall_s": round(wall, 1), "summary": done[-1] if done else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "rpc_tuning.json"))
    args = parser.parse_args(argv)

    import tvmquant
    from tvmquant.benchmark import machine_info
    from tvmquant.examples import fmnist_model_path, load_fmnist_example

    work = tempfile.mkdtemp(prefix="rpc_tuning_")
    artifact = os.path.join(work, "fmnist.tvmq")
    calib, _, _ = load_fmnist_example()
    tvmquant.quantize(fmnist_model_path(), calib_data=calib[:32]).save(artifact)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {
        "local_runner": _tune(artifact, args.trials, os.path.join(work, "db_local"), [], env),
        "rpc_1_server": tune_on_farm(artifact, 1, args.trials, work),
        "rpc_2_servers": tune_on_farm(artifact, 2, args.trials, work),
    }
    for name, run in runs.items():
        print(f"{name}: {run['wall_s']} s  {run['summary']}")
    result = {
        "benchmark": "tvmquant tune of the bundled Fashion-MNIST CNN (INT8): wall time, 1 vs 2 loopback RPC servers",
        "model": "tvmquant.examples.fmnist_model_path()",
        "trials": args.trials,
        "runs": runs,
        "speedup_2_vs_1": round(runs["rpc_1_server"]["wall_s"] / runs["rpc_2_servers"]["wall_s"], 2),
        "machine": machine_info(),
        "note": (
            "one 2-core machine, shared with other jobs while it ran: tracker, servers, builders and the search "
            "share the same 2 cores, so a second loopback server cannot double measuring throughput; the wall "
            "times include process start-up (~10 s of importing TVM). On a farm each server is its own machine."
        ),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
