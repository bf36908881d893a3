"""Deployable binaries: a shared library the TVM runtime loads, plus a JSON file of metadata beside it.

``model.so`` holds the compiled Relax VM executable; ``model.so.json`` the input/output names, shapes and
dtypes, the quantization table and the versions that built it. Loading needs only TVM's runtime library
(``TVM_USE_RUNTIME_LIB=1``: no compiler): this module imports nothing from the compiler side.

Example (on the deployment machine)::

    import os
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"          # runtime only, no libtvm_compiler.so
    import numpy as np
    from tvmquant.deploy import load_library

    model = load_library("model.so")                 # reads model.so.json too
    logits = model(np.zeros(model.inputs[0].shape, np.float32))
"""

from __future__ import annotations

import json
import os

from ._io import InputSpec, check_inputs, feed_from_args, flatten_outputs
from .threads import use_physical_cores

METADATA_FORMAT = 1


def metadata_path(library_path) -> str:
    return os.fspath(library_path) + ".json"


def export_library(qmodel, path, target=None, db=None, mode: str = "int8") -> dict:
    """Compile ``qmodel`` for ``target`` and write ``path`` (library) and ``path + '.json'`` (metadata).

    ``mode`` picks the integer (``"int8"``), simulated or FP32 module; ``db`` is a tuning database.
    """
    from .compile import as_target, build

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

    from .api import _umask, _versions, atomic_write
    from .compile import target_json

    path = os.fspath(path)
    folder = _check_folder(path)
    metadata = {
        "format": METADATA_FORMAT,
        "target": target_json(target),
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": _output_infos(mod),
        **(extra or {}),
        "versions": _versions(),
        "tvm": tvm.__version__,
    }
    handle, tmp_library = tempfile.mkstemp(prefix=".tvmquant-", suffix=".so", dir=folder)
    os.close(handle)
    try:
        executable.export_library(tmp_library)
        os.chmod(tmp_library, 0o777 & ~_umask())
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


class LoadedModel:
    """A library written by :func:`export_library`, callable on numpy arrays."""

    def __init__(self, path: str, device=None):
        import tvm

        from ._compat import VirtualMachine

        meta_file = metadata_path(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"library {path!r} does not exist")
        if not os.path.exists(meta_file):
            raise FileNotFoundError(f"metadata {meta_file!r} is missing: keep it next to the library")
        with open(meta_file) as handle:
            self.metadata = json.load(handle)
        if self.metadata.get("format") != METADATA_FORMAT:
            raise ValueError(f"{meta_file!r} has metadata format {self.metadata.get('format')!r}; expected 1")
        self.inputs = [InputSpec.from_dict(d) for d in self.metadata["inputs"]]
        #: Output names, shapes and dtypes (the source model's names, e.g. ONNX's ``logits``).
        self.outputs = [InputSpec.from_dict(d) for d in self.metadata.get("outputs", [])]
        self.output_names = [spec.name for spec in self.outputs]
        use_physical_cores()  # TVM's default is half the CPUs on x86: one thread on a 2-core VM
        if self.metadata.get("cuda_binaries"):
            from . import cuda_binaries

            cuda_binaries.install(os.path.join(os.path.dirname(os.path.abspath(path)), self.metadata["cuda_binaries"]))
            if device is None and not tvm.cuda(0).exist:
                raise RuntimeError(f"library {path!r} was built for a CUDA GPU and this machine has none")
            device = device or tvm.cuda(0)
        self.device = device or tvm.cpu()
        self.vm = VirtualMachine(tvm.runtime.load_module(path), self.device)

    def __call__(self, *args, **kwargs):
        from ._compat import to_tensor

        checked = check_inputs(feed_from_args(args, kwargs, self.inputs), self.inputs)
        result = self.vm["main"](*[to_tensor(checked[spec.name], self.device) for spec in self.inputs])
        outputs = flatten_outputs(result)
        return outputs[0] if len(outputs) == 1 else outputs


def load_library(path, device=None) -> LoadedModel:
    """Load a library written by :func:`export_library` (or ``tvmquant compile``); needs only TVM's runtime."""
    return LoadedModel(os.fspath(path), device)
