"""Deployable binaries: a shared library the TVM runtime loads, plus a JSON file of metadata beside it.

``model.so`` holds the compiled Relax VM executable; ``model.so.json`` the input/output names, shapes and
dtypes, the quantization table and the versions that built it. Loading needs only TVM's runtime library
(``TVM_USE_RUNTIME_LIB=1``: no compiler): this module imports nothing from the compiler side. Writing
libraries is :mod:`tvmquant.library`'s job (build side).

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
from .threads import require_amx, use_physical_cores

METADATA_FORMAT = 1


def metadata_path(library_path) -> str:
    """Where the metadata of a library lives: ``model.so`` -> ``model.so.json``."""
    return os.fspath(library_path) + ".json"


def file_sha256(path) -> str:
    """The SHA-256 of a file, hex (recorded in a library's metadata and checked on load)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_library(qmodel, path, target=None, db=None, mode: str = "int8") -> dict:
    """Compile and write a library: :func:`tvmquant.library.export_library` (build side, imported on call)."""
    from .library import export_library as export

    return export(qmodel, path, target=target, db=db, mode=mode)


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
        try:
            with open(meta_file, "rb") as handle:
                self.metadata = json.loads(handle.read())
            if not isinstance(self.metadata, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(
                f"metadata {meta_file!r} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                "rebuild the library (tvmquant compile) or copy both files again"
            ) from None
        if self.metadata.get("format") != METADATA_FORMAT:
            raise ValueError(f"{meta_file!r} has metadata format {self.metadata.get('format')!r}; expected 1")
        recorded = self.metadata.get("library_sha256")
        if recorded is not None and recorded != file_sha256(path):
            raise ValueError(
                f"metadata {meta_file!r} does not describe library {path!r} (the library's SHA-256 differs from the "
                "one recorded): they come from different builds, or a write was interrupted; rebuild or copy both "
                "files together"
            )
        try:
            self.inputs = [InputSpec.from_dict(d) for d in self.metadata["inputs"]]
            #: Output names, shapes and dtypes (the source model's names, e.g. ONNX's ``logits``).
            self.outputs = [InputSpec.from_dict(d) for d in self.metadata.get("outputs", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"metadata {meta_file!r} lacks valid inputs/outputs ({err!r}); rebuild the library"
            ) from None
        self.output_names = [spec.name for spec in self.outputs]
        use_physical_cores()  # TVM's default is half the CPUs on x86: one thread on a 2-core VM
        if self.metadata.get("amx_int8"):
            require_amx(f"library {path!r}")  # a clear error here, not SIGILL in the first tile instruction
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
