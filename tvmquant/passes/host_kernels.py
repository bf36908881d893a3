"""The small compiled kernels calibration and the summary call from Python (histogram binning and extremes,
:mod:`tvmquant.passes.binning`; error sums, :mod:`tvmquant.passes.error_kernels`): compiled for this CPU once
per process, on first use or ahead of it (:func:`compile_ahead`).

Compiling one takes 0.05-0.1 s, most of it LLVM, which releases the GIL. :func:`compile_ahead` parses the
kernels' TVMScript on the calling thread and compiles them as one module on a background thread, so that they
are ready by the time the first calibration batch needs them: ``quantize`` starts them just before the
calibration graph compiles, whose Python passes leave the second core idle, and only those the graph's tensors
are large enough to call (MobileNetV2: 0.3 s of kernels compiled there instead of in the first batch and the
summary). A kernel asked for while it is being compiled
ahead is waited for; if that compile failed, it is compiled again on the caller's thread, where its error
surfaces.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

__all__ = ["compile_ahead", "function"]

_FUNCS: dict = {}  # name -> compiled function
_PENDING: dict = {}  # name -> Future of the compiled function, while a background thread compiles it
_LOCK = threading.Lock()


def function(name: str, make):
    """The compiled kernel ``name``; ``make()`` returns its PrimFunc (compiled here, unless it already is or
    is being compiled ahead)."""
    with _LOCK:
        func = _FUNCS.get(name)
        pending = _PENDING.get(name)
    if func is not None:
        return func
    if pending is not None:
        try:
            return pending.result()
        except Exception:  # noqa: BLE001  (compiled again below, where the error is raised to the caller)
            pass
    func = _compile({name: make()})[name]
    with _LOCK:
        _FUNCS[name] = func
    return func


def compile_ahead(kernels: dict) -> threading.Thread | None:
    """Start compiling ``{name: make}`` (those not compiled or being compiled yet) on a background thread;
    return the thread (None when there was nothing to do). Not a daemon: the interpreter waits for it at exit
    rather than kill it inside LLVM."""
    with _LOCK:
        todo = {name: make for name, make in kernels.items() if name not in _FUNCS and name not in _PENDING}
        futures = {name: Future() for name in todo}
        _PENDING.update(futures)
    if not todo:
        return None
    try:
        prims = {name: make() for name, make in todo.items()}  # TVMScript is parsed on this thread
    except BaseException:
        with _LOCK:
            for name in futures:
                _PENDING.pop(name, None)
        raise

    def run():
        try:
            funcs = _compile(prims)
        except BaseException as err:  # noqa: BLE001  (handed to whoever waits; they compile it themselves)
            with _LOCK:
                for name in futures:
                    _PENDING.pop(name, None)
            for future in futures.values():
                future.set_exception(err)
            return
        with _LOCK:
            _FUNCS.update(funcs)
            for name in futures:
                _PENDING.pop(name, None)
        for name, future in futures.items():
            future.set_result(funcs[name])

    thread = threading.Thread(target=run, name="tvmquant-host-kernels")
    thread.start()
    return thread


def _compile(prims: dict) -> dict:
    """``{name: compiled function}`` of ``{name: PrimFunc}``, one module for this CPU, machine code generated."""
    import tvm

    from ..target import host_target

    module = tvm.IRModule({name: prim.with_attr("global_symbol", name) for name, prim in prims.items()})
    library = tvm.compile(module, target=host_target())
    return {name: library[name] for name in prims}  # the first lookup generates the machine code
