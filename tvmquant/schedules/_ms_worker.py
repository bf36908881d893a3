"""Functions that run inside meta-schedule's builder worker processes.

Kept in a module of its own, importing nothing but TVM, because every builder batch starts fresh worker
processes that import whatever module a pickled function lives in.

Why not meta-schedule's ``default_build``: it imports ``tvm.s_tir.tensor_intrin``, which parses every
TVMScript intrinsic (CUDA alone takes ~17 s) in *every* fresh worker, so each batch pays ~25 s before it
compiles anything on a 2-core machine. Candidates reach the builder already tensorized (the intrinsic's
implementation is inlined by the search process), so the registry is not needed to compile them.
"""

from __future__ import annotations


def build_candidate(mod, target, _params):
    """Compile one measure candidate (``default_build`` minus the intrinsic-registry import).

    Parameters
    ----------
    mod : tvm.IRModule
        The scheduled candidate.
    target : tvm.target.Target
    _params : dict or None
        Unused (meta-schedule passes None for TIR tasks).

    Returns
    -------
    tvm.runtime.Module
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def runner_initializer() -> None:
    """Initializer of meta-schedule's runner workers: request the AMX tile state (a no-op without AMX), so
    that measuring an AMX candidate does not die with SIGILL."""
    from ..threads import request_amx_permission

    request_amx_permission()


# ----------------------------------------------------------------------------------------------------------
# Measuring on RPC servers (tvmquant.schedules.rpc): these run in meta-schedule's runner worker processes, and
# `rpc_prepare` also in the tuning process for the up-front probe.

#: Start of the error of a measurement whose server does not match the target (its results are refused).
REFUSED = "refused the results of RPC server"
#: Start of the error when no server is left under the key (no retry can help).
NO_SERVER = "no RPC server"


def servers_under_key(summary: dict, key: str) -> int:
    """How many servers are registered under ``key`` in a tracker's ``summary()``."""
    return sum(1 for item in summary.get("server_info", []) if item["key"].split(":", 1)[-1] == key)


def target_mismatch(info: dict, expect: dict) -> str | None:
    """Why a server described by ``info`` (:func:`tvmquant.rpc_server.setup`) cannot measure for ``expect``
    (:func:`tvmquant.schedules.rpc.expectation`), or None when it can."""
    host = info.get("host", "?")
    if expect["kind"] == "cuda":
        if not info.get("cuda"):
            return f"{host}: it has no CUDA device, the target is {expect['arch']} (use a key of GPU servers)"
        want = "".join(ch for ch in expect["arch"].removeprefix("sm_") if ch.isdigit())
        have = info["cuda"][0].replace(".", "")
        if want and have != want:
            return (
                f"{host}: its GPU is sm_{have}, the target is {expect['arch']} (use a key of {expect['arch']} servers)"
            )
        return None
    mcpu = expect.get("mcpu") or ""
    if mcpu and not info.get("mcpu"):
        return f"{host}: it cannot tell its CPU (no LLVM there), the target's mcpu is {mcpu!r}"
    if mcpu and info["mcpu"] != mcpu:
        return (
            f"{host}: its CPU is {info['mcpu']!r}, the target's mcpu is {mcpu!r} (tune with --target "
            f'\'{{"kind": "llvm", "mcpu": "{info["mcpu"]}"}}\' or use a key of {mcpu} servers)'
        )
    if expect.get("amx") and not info.get("amx"):
        how = "a stock tvm.exec.rpc_server cannot request it: start python -m tvmquant.rpc_server"
        return f"{host}: the target uses AMX and the server's process has no AMX tile state ({how})"
    return None


def rpc_prepare(session, expect: dict) -> dict:
    """Set up the measuring process of an RPC session and check that its machine matches the target.

    With ``python -m tvmquant.rpc_server`` this runs ``tvmquant.rpc.setup`` there (AMX tile state, thread
    pool, what the machine is); with a stock ``tvm.exec.rpc_server`` it sizes the pool and asks LLVM's CPU name
    through TVM's own remote functions. Raises RuntimeError starting with :data:`REFUSED` on a mismatch.
    """
    import json

    threads = int(expect.get("threads") or 0)
    try:
        setup = session.get_function("tvmquant.rpc.setup")
    except Exception:  # noqa: BLE001  (a stock server)
        setup = None
    if setup is not None:
        info = json.loads(setup(threads))
    else:
        info = {"mcpu": "", "amx": False, "threads": threads or None, "cuda": [], "host": "stock tvm.exec.rpc_server"}
        try:
            info["mcpu"] = str(session.get_function("target.llvm_get_system_cpu")())
        except Exception:  # noqa: BLE001  (runtime-only server)
            pass
        if threads:
            session.get_function("runtime.config_threadpool")(1, threads)
        device = session.cuda(0)
        if device.exist:
            info["cuda"] = [str(device.compute_version)]
    problem = target_mismatch(info, expect)
    if problem:
        raise RuntimeError(f"{REFUSED} {problem}")
    return info


def rpc_create_session(rpc_config, expect: dict, wait_s: float):
    """Meta-schedule ``f_create_session``: a session from the tracker, never waiting forever, set up and checked.

    Fails at once when no server is registered under the key any more, and after ``wait_s`` when none became
    free (TVM's ``tracker.request`` would wait for ever).
    """
    import threading

    tracker = rpc_config.connect_tracker()
    key = rpc_config.tracker_key
    where = f"{rpc_config.tracker_host}:{rpc_config.tracker_port}"
    if servers_under_key(tracker.summary(), key) == 0:
        raise RuntimeError(f"{NO_SERVER} is registered under key {key!r} at the tracker {where} any more")
    result: dict = {}

    def request():
        try:
            result["session"] = tracker.request(
                key, priority=rpc_config.session_priority, session_timeout=rpc_config.session_timeout_sec
            )
        except Exception as err:  # noqa: BLE001  (reported below)
            result["error"] = err

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(wait_s)
    if thread.is_alive():
        raise RuntimeError(f"{NO_SERVER} under key {key!r} at {where} became free within {wait_s:.0f} s")
    if "error" in result:
        raise result["error"]
    session = result["session"]
    session.tvmquant_info = rpc_prepare(session, expect)
    return session


def rpc_measure(f_create_session, retries: int, *args):
    """Meta-schedule's RPC measurement (``rpc_runner._worker_func``: upload, random inputs, time_evaluator),
    retried ``retries`` times on another session when it fails (a server that died mid-measurement), but not
    when the server was refused or none is left."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import _worker_func

    for attempt in range(retries + 1):
        try:
            return _worker_func(f_create_session, None, None, None, None, *args)
        except Exception as err:
            message = str(err)
            if attempt == retries or REFUSED in message or NO_SERVER in message:
                raise
    raise AssertionError("unreachable")
