"""Measuring tuning candidates on a fleet of machines through TVM's RPC tracker.

Candidates build here; meta-schedule's RPC measurement (``tvm.s_tir.meta_schedule.runner.rpc_runner``:
upload, random inputs, ``time_evaluator``) runs them on the servers registered with the tracker under one key,
``parallel`` at a time. What tvmquant adds around TVM's engine (:class:`FleetRunner`):

- each measuring session first runs the set-up of :func:`tvmquant.schedules._ms_worker.rpc_prepare` in the
  server's session process (AMX tile state, thread pool) and the server's results are refused when its machine
  does not match the target (another ``mcpu``, no AMX, another GPU);
- waiting for a free server is bounded (TVM's ``tracker.request`` waits for ever), and a measurement whose server
  died is retried on another session;
- :func:`check_fleet` fails in seconds on an unreachable tracker, a key without servers or a mismatched server.
"""

from __future__ import annotations

import functools
import socket
import threading
from dataclasses import dataclass

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, RPCConfig
from tvm.s_tir.meta_schedule.runner.rpc_runner import RPCRunnerFuture
from tvm.support.popen_pool import PopenPoolExecutor

from ..target import target_has_amx
from ._ms_worker import NO_SERVER, REFUSED, rpc_create_session, rpc_measure, servers_under_key

__all__ = ["Fleet", "FleetError", "FleetRunner", "check_fleet", "expectation", "parse_tracker"]


class FleetError(ValueError):
    """The tracker, key or servers of a :class:`Fleet` cannot measure (one line, saying what to do)."""


@dataclass(frozen=True)
class Fleet:
    """Where to measure: the tracker, the device key of the servers, how many measure at once.

    Attributes
    ----------
    tracker : str
        ``HOST:PORT`` of ``python -m tvm.exec.rpc_tracker``.
    key : str
        Device key the servers registered under (``--key``).
    parallel : int, optional
        Measurements at once; default the number of servers under the key when tuning starts.
    session_timeout_s : float
        Longest measuring session (upload, run, time); the server kills it after that.
    wait_s : float
        Longest wait for a free server before a measurement fails.
    retries : int
        Retries of a measurement whose session failed (e.g. its server died).
    connect_timeout_s : float
        How long to try to reach the tracker.
    """

    tracker: str
    key: str
    parallel: int | None = None
    session_timeout_s: float = 60.0
    wait_s: float = 120.0
    retries: int = 1
    connect_timeout_s: float = 5.0

    @property
    def address(self) -> tuple[str, int]:
        return parse_tracker(self.tracker)

    def rpc_config(self) -> RPCConfig:
        host, port = self.address
        return RPCConfig(
            tracker_host=host,
            tracker_port=port,
            tracker_key=self.key,
            session_priority=1,
            session_timeout_sec=int(self.session_timeout_s),
        )


def parse_tracker(tracker: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``, or a FleetError saying what is wrong."""
    host, _, port = str(tracker).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FleetError(f"--rpc-tracker {tracker!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def expectation(target: tvm.target.Target) -> dict:
    """What a server must be to measure for ``target`` (checked by ``_ms_worker.target_mismatch``)."""
    if target.kind.name == "cuda":
        return {"kind": "cuda", "arch": str(target.attrs.get("arch", ""))}
    return {
        "kind": "llvm",
        "mcpu": str(target.attrs.get("mcpu", "") or ""),
        "amx": bool(target_has_amx(target)),
        "threads": int(target.attrs.get("num-cores", 0) or 0),
    }


def _connect_tracker(fleet: Fleet):
    """A tracker session within ``fleet.connect_timeout_s``, or a FleetError (TVM retries for a minute)."""
    host, port = fleet.address
    what = f"cannot reach the RPC tracker at {host}:{port}"
    hint = f"start it there with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}`"
    try:
        socket.create_connection((host, port), timeout=fleet.connect_timeout_s).close()
    except OSError as err:
        raise FleetError(f"{what} ({err.strerror or err}); {hint}") from None
    result: dict = {}

    def connect():
        try:
            result["tracker"] = tvm.rpc.connect_tracker(host, port)
        except Exception as err:  # noqa: BLE001  (reported below)
            result["error"] = err

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(fleet.connect_timeout_s)
    if "tracker" not in result:
        raise FleetError(f"{what}: something listens on that port but does not answer as a tracker; {hint}")
    return result["tracker"]


def check_fleet(fleet: Fleet, target: tvm.target.Target) -> dict:
    """Fail in seconds when ``fleet`` cannot measure for ``target``; else describe it.

    Checks that the tracker answers, that servers are registered under the key (the tracker's summary), and
    that one of them matches the target (a probe session runs the set-up and the check every measurement runs).

    Returns
    -------
    dict
        ``servers`` (registered under the key), ``parallel`` (measurements at once), ``probe`` (what the probed
        server said of itself).

    Raises
    ------
    FleetError
    """
    host, port = fleet.address
    tracker = _connect_tracker(fleet)
    summary = tracker.summary()
    count = servers_under_key(summary, fleet.key)
    if count == 0:
        keys = sorted({item["key"].split(":", 1)[-1] for item in summary.get("server_info", [])})
        there = f"keys there: {', '.join(keys)}" if keys else "no server is registered at all"
        raise FleetError(
            f"no RPC server is registered under key {fleet.key!r} at the tracker {host}:{port} ({there}); start "
            f"one per machine: python -m tvmquant.rpc_server --tracker {host}:{port} --key {fleet.key}"
        )
    expect = expectation(target)
    try:
        session = rpc_create_session(fleet.rpc_config(), expect, fleet.wait_s)
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1]
        if REFUSED in message:
            raise FleetError("tvmquant " + message[message.find(REFUSED) :]) from None
        if NO_SERVER in message:
            raise FleetError(message[message.find(NO_SERVER) :]) from None
        raise FleetError(f"the RPC server under key {fleet.key!r} failed its set-up: {message}") from None
    info = session.tvmquant_info
    del session
    parallel = fleet.parallel or count
    if parallel < 1:
        raise FleetError(f"--rpc-parallel must be at least 1, got {parallel}")
    return {"servers": count, "parallel": parallel, "probe": info}


@derived_object
class FleetRunner(PyRunner):
    """Meta-schedule runner that measures on the servers of a :class:`Fleet` (see the module docstring).

    Parameters
    ----------
    fleet : Fleet
    target : tvm.target.Target
        What the servers must match.
    parallel : int
        Measurements at once (runner worker processes, one session each).
    evaluator_config : EvaluatorConfig, optional
    """

    def __init__(self, fleet: Fleet, target, parallel: int, evaluator_config: EvaluatorConfig | None = None):
        super().__init__()
        self.rpc_config = fleet.rpc_config()
        self.evaluator_config = EvaluatorConfig._normalized(evaluator_config)
        self.retries = int(fleet.retries)
        self.f_create_session = functools.partial(
            rpc_create_session, expect=expectation(target), wait_s=float(fleet.wait_s)
        )
        # A hard bound per measurement, retries included: a worker past it is killed and the candidate fails.
        self.timeout_s = (fleet.wait_s + fleet.session_timeout_s) * (self.retries + 1)
        self.pool = PopenPoolExecutor(max_workers=int(parallel), timeout=self.timeout_s)

    def run(self, runner_inputs):
        futures = []
        for runner_input in runner_inputs:
            future = self.pool.submit(
                rpc_measure,
                self.f_create_session,
                self.retries,
                self.rpc_config,
                self.evaluator_config,
                1,  # alloc_repeat
                str(runner_input.artifact_path),
                str(runner_input.device_type),
                tuple(arg_info.as_json() for arg_info in runner_input.args_info),
            )
            futures.append(RPCRunnerFuture(future=future, timeout_sec=self.timeout_s))
        return futures

    def close(self) -> None:
        """Stop the runner's worker processes."""
        self.pool.shutdown()
