"""Process set-up before kernels run: how many threads TVM's CPU thread pool runs, and the AMX tile state.

TVM sizes its pool from ``TVM_NUM_THREADS`` or, when that is unset, from half the logical CPUs on x86 (to
skip hyper-threads). On a VM whose vCPUs are whole cores (2 cores, 1 thread each, as here) that gives one
thread: a model then uses half the machine, and meta-schedule measures single-threaded kernels. tvmquant
sets ``TVM_NUM_THREADS`` to the number of physical cores this process may run on, unless the user set it.
The pool reads it when it starts (the first parallel kernel), so this runs before any model does.

AMX kernels need one more step per process: Linux hands out the tile state only on request
(:func:`request_amx_permission`; :func:`require_amx` also says clearly when the CPU has no AMX, instead of the
SIGILL of the first tile instruction). Kept here, TVM-free, so the runtime-only loader can use it.

And one step that saves time: LLVM generates a library's machine code when it is first used in the process
(:func:`generate_machine_code` does it for every LLVM module of a library at once, one per core).
"""

from __future__ import annotations

import os

__all__ = [
    "cpu_has_amx",
    "default_num_threads",
    "generate_machine_code",
    "request_amx_permission",
    "require_amx",
    "use_physical_cores",
]


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


def llvm_modules(library) -> list:
    """Every LLVM module of ``library`` (a runtime module or a Relax executable), its imports walked to any depth:
    the x86 build links the kernels as several modules, some imported by others."""
    modules, stack = [], [getattr(library, "mod", library)]
    while stack:  # the imports form a tree
        module = stack.pop()
        stack.extend(module.imports)
        if module.kind == "llvm":
            modules.append(module)
    return modules


def generate_machine_code(library) -> int:
    """Have LLVM generate the machine code of every LLVM module in ``library`` (a runtime module or a Relax
    executable) now, on up to :func:`default_num_threads` threads; return how many modules there were.

    TVM's LLVM modules compile to machine code lazily, on the first function lookup, so a library built as
    several modules (:func:`tvmquant.schedules.x86.build` splits the kernels over the cores) would otherwise
    compile them one after the other when the VM starts: 56 s for a MobileNetV2 training graph. TVM releases
    the GIL in the lookup, and each module has its own LLVM context. Looking up a name no module has starts
    the compile without running anything.
    """
    from concurrent.futures import ThreadPoolExecutor

    modules = llvm_modules(library)

    def compile_one(module):
        try:
            module.get_function("__tvmquant_generate_machine_code__", False)
        except AttributeError:  # no such function: expected, the code is generated all the same
            pass

    if len(modules) > 1:
        with ThreadPoolExecutor(min(len(modules), default_num_threads())) as pool:
            list(pool.map(compile_one, modules))
    return len(modules)


# ----------------------------------------------------------------------------------------------------------
# AMX: the tile state must be requested from Linux before the first tile instruction (else SIGILL).
#: ``arch_prctl`` syscall number on x86-64, its ``ARCH_REQ_XCOMP_PERM`` request and AMX's tile-data feature.
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18

_AMX_GRANTED = False


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the kernel reports ``amx_int8`` (and ``amx_tile``) for this CPU."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"amx_int8", "amx_tile"} <= flags
    except OSError:
        pass
    return False


def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile state of this process (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``).

    Idempotent and cheap. Every process that runs an AMX kernel must do this first: the library loader
    (:func:`tvmquant.deploy.load_library`), in-process models, meta-schedule's runner workers, benchmarks.

    Returns
    -------
    bool
        True when granted; False on a CPU or kernel without AMX (nothing to request).
    """
    global _AMX_GRANTED
    if _AMX_GRANTED:
        return True
    if not cpu_has_amx():
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    _AMX_GRANTED = libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    return _AMX_GRANTED


def require_amx(what: str) -> None:
    """Request AMX for ``what`` (a library, a model) and raise a one-line error when this CPU cannot run it.

    Raises
    ------
    RuntimeError
        The CPU has no ``amx_int8`` or Linux refused the tile state; the message names ``what`` and what to do.
    """
    if not cpu_has_amx():
        raise RuntimeError(
            f"{what} uses AMX-INT8 tile instructions and this CPU has no amx_int8: rebuild it for this CPU "
            "(tvmquant compile without --target, or a target without AMX such as "
            '\'{"kind": "llvm", "mcpu": "...", "mattr": ["-amx-int8", "-amx-tile"]}\')'
        )
    if not request_amx_permission():
        raise RuntimeError(
            f"{what} uses AMX-INT8 and Linux refused this process the AMX tile state "
            "(arch_prctl ARCH_REQ_XCOMP_PERM failed; needs Linux 5.16 or later)"
        )
