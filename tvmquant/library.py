"""Write deployable libraries (build side): compile a quantized model and write ``model.so`` + ``model.so.json``.

The runtime side, which loads them with TVM's runtime alone, is :mod:`tvmquant.deploy`.
"""

from __future__ import annotations

import json
import os

from ._compat import versions
from ._io import _umask, atomic_write
from .deploy import METADATA_FORMAT, file_sha256, metadata_path
from .target import as_target, target_has_amx, target_json


def export_library(qmodel, path, target=None, db=None, mode: str = "int8") -> dict:
    """Compile ``qmodel`` for ``target`` and write ``path`` (library) and ``path + '.json'`` (metadata).

    ``mode`` picks the integer (``"int8"``), simulated or FP32 module; ``db`` is a tuning database.
    """
    from .compile import build

    _check_folder(path)
    target = as_target(target)
    modules = {"int8": lambda: qmodel.mod, "simulated": lambda: qmodel.simulated, "fp32": lambda: qmodel.fp32}
    mod = modules[mode]()
    table = {name: params.to_dict() for name, params in qmodel.table.items()}
    if target.kind.name == "cuda" and mode == "int8":
        _warn_unsigned_activations(qmodel)
    return write_library(
        build(mod, target=target, db=db), mod, path, qmodel.inputs, target, {"mode": mode, "quant_table": table}
    )


def _warn_unsigned_activations(qmodel) -> None:
    import warnings

    if qmodel.config.activation.dtype != "int8":
        warnings.warn(
            f"the model's activations are {qmodel.config.activation.dtype}: NVIDIA int8 tensor cores take signed "
            "int8 x int8, so its convs and matmuls run on CUDA cores; quantize with the 'cuda_int8' preset "
            "(tvmquant quantize --preset cuda_int8) for tensor cores",
            stacklevel=3,
        )


def write_library(executable, mod, path, inputs, target, extra: dict | None = None) -> dict:
    """Write a compiled ``executable`` of ``mod`` as ``path`` plus its metadata ``path + '.json'``.

    Both files appear only when both were written completely.
    """
    import tempfile

    import tvm

    path = os.fspath(path)
    folder = _check_folder(path)
    metadata = {
        "format": METADATA_FORMAT,
        "target": target_json(target),
        # The loader checks for the CPU's amx_int8 and requests the tile state before the first kernel.
        "amx_int8": target_has_amx(target),
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": _output_infos(mod),
        **(extra or {}),
        "versions": versions(),
        "tvm": tvm.__version__,
    }
    handle, tmp_library = tempfile.mkstemp(prefix=".tvmquant-", suffix=".so", dir=folder)
    os.close(handle)
    try:
        executable.export_library(tmp_library)
        os.chmod(tmp_library, 0o777 & ~_umask())
        # The pair is renamed into place one file after the other: the hash lets the loader tell a library from
        # another build (or a write interrupted between the two renames) instead of running it with wrong metadata.
        metadata["library_sha256"] = file_sha256(tmp_library)
        if target.kind.name == "cuda":
            # The compiler stores CUDA source; compile it now, so that the GPU host needs no nvcc.
            from . import cuda_binaries

            binaries = cuda_binaries.precompile(executable, target)
            cuda_binaries.write_archive(binaries, cuda_binaries.archive_path(path))
            metadata["cuda_binaries"] = os.path.basename(cuda_binaries.archive_path(path))
        atomic_write(metadata_path(path), lambda stream: stream.write(json.dumps(metadata, indent=2).encode()))
        os.replace(tmp_library, path)
    except BaseException:
        if os.path.exists(tmp_library):
            os.unlink(tmp_library)
        raise
    return metadata


def _check_folder(path) -> str:
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {os.fspath(path)!r}: folder {folder!r} does not exist; create it first")
    return folder


def _output_infos(mod) -> list:
    from ._compat import tensor_dtype, tensor_shape
    from ._relax import output_names

    ret = mod["main"].ret_ty if hasattr(mod["main"], "ret_ty") else None
    fields = list(getattr(ret, "fields", [])) or [ret]
    names = output_names(mod, len(fields))
    infos = []
    for name, ty in zip(names, fields):
        holder = type("T", (), {"ty": ty})
        infos.append({"name": name, "shape": list(tensor_shape(holder) or ()), "dtype": tensor_dtype(holder)})
    return infos
