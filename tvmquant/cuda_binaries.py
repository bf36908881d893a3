"""CUDA binaries compiled ahead of time, for libraries built on a machine without a GPU.

TVM 0.27's compiler, on a host without a CUDA driver, stores CUDA *source* in the libraries it builds; the
runtime compiles it when the library is loaded, by calling the global function ``tvm_callback_cuda_compile``
(``nvcc`` or NVRTC on the GPU host: seconds to minutes per library, at every load).

:func:`precompile` runs ``nvcc`` here, on the build host, and keys each binary (a fatbin for the target's
``sm_XX``) by the SHA-256 of the source it came from; :func:`write_archive` stores them in one zip next to the
library (``model.so.cuda.zip``). On the GPU host :func:`install` registers a ``tvm_callback_cuda_compile``
that returns the stored binary for a known source and compiles any other source as TVM would.

This module imports no TVM compiler code at import time: the GPU host may have TVM's runtime only.

Example (GPU host)::

    from tvmquant import cuda_binaries
    cuda_binaries.install("model.so.cuda.zip")
    lib = tvm.runtime.load_module("model.so")     # no nvcc run
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile

__all__ = [
    "precompile",
    "write_archive",
    "read_archive",
    "install",
    "load_cuda_runtime",
    "cuda_modules",
    "nvcc_arch",
    "source_key",
    "archive_path",
]


def nvcc_arch(target) -> list[str]:
    """``nvcc`` ``-gencode`` flags for the target's ``arch`` (``sm_90a`` -> compute_90a / sm_90a)."""
    import re

    arch = str(target.attrs.get("arch", "sm_90"))
    number = re.fullmatch(r"sm_(\d+[a-z]?)", arch)
    if number is None:
        raise ValueError(f"target {target} has arch {arch!r}; expected sm_XX")
    return ["-gencode", f"arch=compute_{number.group(1)},code=sm_{number.group(1)}"]


def source_key(source) -> str:
    """The SHA-256 of a CUDA source (the archive key)."""
    data = source.encode() if isinstance(source, str) else bytes(source)
    return hashlib.sha256(data).hexdigest()


def archive_path(library_path) -> str:
    """Where the binaries of ``library_path`` live: ``model.so`` -> ``model.so.cuda.zip``."""
    return os.fspath(library_path) + ".cuda.zip"


def cuda_modules(module):
    """The CUDA device modules imported (at any depth) by a runtime module."""
    found, stack = [], [module]
    while stack:
        current = stack.pop()
        for child in current.imports:
            if getattr(child, "kind", None) == "cuda":
                found.append(child)
            stack.append(child)
    return found


def precompile(lib, target) -> dict[str, bytes]:
    """Compile the CUDA source of every device module of ``lib`` with ``nvcc`` for ``target``'s arch.

    Parameters
    ----------
    lib : tvm.runtime.Module or tvm.relax.VMExecutable
        What ``tvm.compile`` / ``relax.build`` returned for a CUDA target.
    target : tvm.target.Target

    Returns
    -------
    dict
        ``{source_key(source): fatbin bytes}``.
    """
    from ._compat import nvcc

    driver = nvcc()
    module = getattr(lib, "mod", lib)
    binaries = {}
    for device_module in cuda_modules(module):
        source = device_module.inspect_source("")
        if not source:
            continue
        with target:
            binaries[source_key(source)] = bytes(
                driver.compile_cuda(source, target_format="fatbin", arch=nvcc_arch(target), compiler="nvcc")
            )
    return binaries


def write_archive(binaries: dict[str, bytes], path) -> None:
    """Write ``binaries`` as a zip (``<key>.fatbin`` entries), atomically: the file appears only when complete."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".tvmquant-", suffix=".zip", dir=folder)
    os.close(handle)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, data in sorted(binaries.items()):
                archive.writestr(f"{key}.fatbin", data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_archive(path) -> dict[str, bytes]:
    """The binaries of an archive written by :func:`write_archive`."""
    with zipfile.ZipFile(os.fspath(path)) as archive:
        return {name[: -len(".fatbin")]: archive.read(name) for name in archive.namelist() if name.endswith(".fatbin")}


def load_cuda_runtime() -> bool:
    """Load TVM's CUDA runtime sidecar (``libtvm_runtime_cuda.so``) if nothing loaded it yet.

    The full TVM loads it when its CUDA backend registers; a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``) does
    not, and then ``load_module`` of a CUDA library fails ("a loader of that name is not registered").
    Returns whether the CUDA module loader is registered afterwards.
    """
    from ._compat import get_global_func, load_runtime_library

    if get_global_func(_CUDA_LOADER) is not None:
        return True
    if not load_runtime_library("tvm_runtime_cuda"):  # no CUDA driver (libcuda.so.1) on this machine
        return False
    return get_global_func(_CUDA_LOADER) is not None


_CUDA_LOADER = "ffi.Module.load_from_bytes.cuda"  # registered by TVM's CUDA runtime


_INSTALLED: dict[str, bytes] = {}
_STATS = {"hits": 0, "compiled": 0}


def install(*archives) -> dict:
    """Make TVM's runtime use the stored binaries of ``archives`` when it loads CUDA libraries.

    Sources without a stored binary are compiled as TVM would (``tvm.support.nvcc``; needs ``nvcc`` or NVRTC
    on the GPU host). Call before ``tvm.runtime.load_module``. Returns counters ``{"hits", "compiled"}``
    that the callback updates.
    """
    from ._compat import nvcc, register_global_func

    load_cuda_runtime()
    for archive in archives:
        if archive is not None and os.path.exists(os.fspath(archive)):
            _INSTALLED.update(read_archive(archive))

    def compile_cuda(code, *_rest):
        key = source_key(str(code))
        if key in _INSTALLED:
            _STATS["hits"] += 1
            return _INSTALLED[key]
        _STATS["compiled"] += 1
        try:
            driver = nvcc()
        except ImportError as err:  # a runtime-only TVM without the support package
            raise RuntimeError(
                f"no precompiled CUDA binary for source {key[:12]} and TVM's nvcc support is not importable "
                f"({err}); rebuild the library with tvmquant (it writes <library>.cuda.zip) and keep that file "
                "next to the library"
            ) from None
        return driver.compile_cuda(str(code), target_format="fatbin", compiler="nvcc")

    register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    return _STATS
