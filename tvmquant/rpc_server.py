"""An RPC server for a tuning farm: TVM's ``tvm.exec.rpc_server`` plus the set-up tvmquant's measurements need.

Usage on each measuring machine (one server per CPU or GPU to measure on)::

    python -m tvmquant.rpc_server --tracker HOST:9190 --key KEY

It is TVM's own server (``tvm.rpc.Server``: it registers with the tracker under ``KEY`` and serves every
session in a fresh process), with one more remote function, ``tvmquant.rpc.setup``: the tuner calls it at the
start of every measuring session, in that session's process, to request the AMX tile state
(:func:`tvmquant.threads.request_amx_permission`), size TVM's thread pool, and report what this machine is
(LLVM's ``mcpu``, AMX, CUDA devices), so that the tuner refuses the results of a server whose target does not
match. A stock ``python -m tvm.exec.rpc_server`` also works for targets without AMX (threads and ``mcpu`` are
then set and queried through TVM's own remote functions).

Runtime side: imports :mod:`tvmquant.threads` and TVM's RPC only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

#: Name of the remote set-up function (the tuner looks it up on each server).
SETUP_FUNC = "tvmquant.rpc.setup"


def setup(num_threads: int) -> str:
    """Prepare this process for measuring and describe the machine (run in each RPC session's process).

    Parameters
    ----------
    num_threads : int
        Threads of TVM's CPU pool; 0 means this machine's physical cores.

    Returns
    -------
    str
        JSON: ``mcpu`` (LLVM's name for this CPU, "" without LLVM), ``amx`` (tile state granted), ``threads``,
        ``cuda`` (compute versions of the CUDA devices, e.g. ``["9.0"]``), ``host``.
    """
    import tvm

    from .threads import default_num_threads, request_amx_permission

    amx = request_amx_permission()
    threads = int(num_threads) or default_num_threads()
    # The pool reads TVM_NUM_THREADS when it starts; config_threadpool resizes it if it already has.
    os.environ["TVM_NUM_THREADS"] = str(threads)
    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, threads)  # 1: kBig, the "big" cores (all of them on x86)
    try:  # tvmquant's correction of LLVM's name where a hypervisor misreports the model (target.host_mcpu)
        from .target import host_mcpu

        mcpu = host_mcpu()
    except ImportError:  # a runtime-only TVM: no LLVM to ask
        mcpu = ""
    cuda = []
    for index in range(8):
        device = tvm.cuda(index)
        if not device.exist:
            break
        cuda.append(str(device.compute_version))
    info = {
        "mcpu": mcpu,
        "amx": bool(amx),
        "threads": threads,
        "cuda": cuda,
        "host": socket.gethostname(),
    }
    return json.dumps(info)


def register() -> None:
    """Register :func:`setup` as the remote function ``tvmquant.rpc.setup`` (sessions forked later inherit it)."""
    import tvm

    tvm.register_global_func(SETUP_FUNC, setup, override=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvmquant.rpc_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracker", required=True, help="the tracker, HOST:PORT")
    parser.add_argument("--key", required=True, help="device key to register under (one key per kind of target)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=9090, help="first port to try")
    parser.add_argument("--port-end", type=int, default=9199, help="last port to try")
    parser.add_argument("--custom-addr", default=None, help="address to report to the tracker")
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args(argv)
    url, _, port = args.tracker.rpartition(":")
    if not url or not port.isdigit():
        print(f"error: --tracker {args.tracker!r} is not HOST:PORT", file=sys.stderr)
        return 2
    from tvm import rpc

    logging.basicConfig(level=logging.WARNING if args.silent else logging.INFO)
    server = rpc.Server(
        args.host,
        args.port,
        args.port_end,
        key=args.key,
        tracker_addr=(url, int(port)),
        custom_addr=args.custom_addr,
        silent=args.silent,
        server_init_callback=register,  # runs in the server's process, whose forks serve the sessions
    )
    server.proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
