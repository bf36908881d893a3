"""How many threads TVM's CPU thread pool runs.

TVM sizes its pool from ``TVM_NUM_THREADS`` or, when that is unset, from half the logical CPUs on x86 (to
skip hyper-threads). On a VM whose vCPUs are whole cores (2 cores, 1 thread each, as here) that gives one
thread: a model then uses half the machine, and meta-schedule measures single-threaded kernels. tvmquant
sets ``TVM_NUM_THREADS`` to the number of physical cores this process may run on, unless the user set it.
The pool reads it when it starts (the first parallel kernel), so this runs before any model does.
"""

from __future__ import annotations

import os

__all__ = ["default_num_threads", "use_physical_cores"]


def default_num_threads() -> int:
    """Physical cores available to this process (at least 1)."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover  (psutil is a dependency)
        physical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover  (not Linux)
        allowed = physical
    return max(1, min(physical, allowed))


def use_physical_cores() -> int:
    """Set ``TVM_NUM_THREADS`` to :func:`default_num_threads` unless it is set; return the value in force."""
    value = os.environ.get("TVM_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    threads = default_num_threads()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads
