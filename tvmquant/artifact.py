"""The ``.tvmq`` artifact: a zip of a manifest, Relax graphs without their constants, and the constants as raw bytes.

Format 2 stores each module once, and only what nothing else derives:

- ``manifest.json``: format, versions, inputs, config, quantization table, layers, SQNR, the modules below
  (``modules``: member names and the index of their constants) and the source (``source``: kept or not, and the
  file's path, size and SHA-256 when the model was quantized from a file);
- ``simulated.relax.json``: the simulated (fake-quant) graph, its tensor constants lifted to parameters, so that
  :func:`tvm.ir.save_json` does not write them as base64 text (``qdq.relax.json`` for a QDQ import);
- ``simulated.bin``: those constants, raw little-endian bytes: int8 weights of quantized layers, int32 biases,
  FP32 weights and biases of layers kept in FP32, scales and zero points (``qdq.bin``);
- ``source.onnx``, only with ``keep_source=True``: the ONNX model as imported (BatchNorm folded);
- ``fp32.relax.json`` and ``fp32.bin``, only with ``keep_source=True`` for a model quantized from a Relax module.

The integer model is ``RealizeQuant`` of the simulated one, as in :class:`tvmquant.QuantizedModel`, so a loaded
artifact gives the same integer model bit for bit. The FP32 modules (``fp32``, ``annotated``) are rebuilt from
the source when a request needs them: from ``source.onnx``, else from the file at the recorded path if its
SHA-256 still matches. Members are sorted, with fixed timestamps: saving a model twice gives the same bytes.

Format 1 (earlier builds of tvmquant 0.1.0) stored the FP32, annotated and integer modules with their constants
as base64 JSON text, a TVMScript copy and the source; :func:`read_format1` still reads it.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ._compat import PyExprMutator, TensorType, Var, is_const, mutator

#: The format :meth:`QuantizedModel.save` writes; :func:`tvmquant.load` also reads format 1.
ARTIFACT_FORMAT = 2
READABLE_FORMATS = (1, 2)

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: fixed, so that saves are byte-identical
_ALIGN = 16  # constants start at multiples of this in the .bin member
_RAW_DTYPES = {
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
}


class ArtifactError(ValueError):
    """A tvmquant artifact is missing, corrupt or of an unknown format, or lacks what a request needs."""


# ----------------------------------------------------------------------------------------------------------
# Relax modules without their constants
def split_constants(mod: tvm.IRModule, func_name: str = "main") -> tuple[str, dict]:
    """``(graph JSON, {name: array})``: ``mod`` with the tensor constants of ``func_name`` lifted to
    extra parameters (so that :func:`tvm.ir.save_json` does not embed them as base64 text), and their values.

    A constant is named after its first use: ``conv2d_3_weight_dq.0`` is argument 0 of the binding
    ``conv2d_3_weight_dq``. A constant used several times is lifted once, so :func:`join_constants` restores the
    sharing too.
    """
    func = mod[func_name]
    names = _constant_names(func)
    lifter = _LiftConstants(names, {param.name for param in func.params})
    body = lifter.visit_expr(func.body)
    lifted = relax.Function(
        list(func.params) + [var for var, _ in lifter.lifted.values()], body, func.ret_ty, func.is_pure, func.attrs
    )
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[func_name] = lifted
    arrays = {var.name: value for var, value in lifter.lifted.values()}
    return tvm.ir.save_json(out), arrays


def join_constants(graph: str, arrays: dict, func_name: str = "main") -> tvm.IRModule:
    """The module :func:`split_constants` took apart: its graph with the constants bound back in."""
    mod = tvm.ir.load_json(graph)
    if not arrays:
        return mod
    # np.asarray(order="C"), not np.ascontiguousarray, which makes 0-d arrays 1-d.
    params = {name: tvm.runtime.tensor(np.asarray(array, order="C")) for name, array in arrays.items()}
    return relax.transform.BindParams(func_name, params)(mod)


def _constant_names(func) -> dict:
    """``{constant: name}`` after each constant's first use as a call argument in ``func``'s bindings."""
    names: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            args = getattr(binding.value, "args", None) or []
            for position, arg in enumerate(args):
                if is_const(arg) and arg not in names:
                    names[arg] = f"{binding.var.name}.{position}"
    return names


@mutator
class _LiftConstants(PyExprMutator):
    def __init__(self, names: dict, taken: set):
        super().__init__()
        self.names = names
        self.taken = set(taken)
        self.lifted: dict = {}  # constant -> (parameter, numpy value)

    def visit_generic_const_(self, op):
        if op in self.lifted:
            return self.lifted[op][0]
        if not is_const(op) or str(op.value.dtype) not in _RAW_DTYPES:
            return op  # dtypes numpy cannot hold stay in the graph
        name = self.names.get(op, "const")
        unique, count = name, 1
        while unique in self.taken:
            unique, count = f"{name}_{count}", count + 1
        self.taken.add(unique)
        value = op.value.numpy()
        # A fresh type, not the constant's own object: whatever else shared that object, the saved graph is the
        # same for a module and for the module loaded back, so re-saving a loaded artifact gives the same bytes.
        var = Var(unique, TensorType(list(value.shape), str(value.dtype)))
        self.lifted[op] = (var, value)
        return var


# ----------------------------------------------------------------------------------------------------------
# Constants as one raw blob
def pack_arrays(arrays: dict) -> tuple[bytes, list]:
    """``(blob, index)``: the arrays' little-endian bytes, each at a multiple of 16, and
    ``[[name, numpy dtype, shape, offset], ...]``."""
    chunks, index, offset = [], [], 0
    for name, array in arrays.items():
        array = np.asarray(array, order="C")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = array.tobytes()
        pad = -offset % _ALIGN
        chunks.append(b"\0" * pad + data)
        offset += pad
        index.append([name, array.dtype.str, list(array.shape), offset])
        offset += len(data)
    return b"".join(chunks), index


def unpack_arrays(blob: bytes, index: list, where: str) -> dict:
    """The arrays :func:`pack_arrays` packed (views into ``blob``)."""
    arrays = {}
    for name, dtype, shape, offset in index:
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf" or dtype.hasobject:
            raise ArtifactError(f"{where}: constant {name!r} has dtype {dtype.str!r}; only raw numbers are read")
        if any(int(d) < 0 for d in shape) or int(offset) < 0:
            raise ArtifactError(f"{where}: constant {name!r} has a negative shape or offset; the file is damaged")
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dtype.itemsize > len(blob):
            raise ArtifactError(f"{where}: constant {name!r} runs past the end of its data; the file is truncated")
        arrays[name] = np.frombuffer(blob, dtype, count, offset).reshape(shape)
    return arrays


def module_members(key: str, mod: tvm.IRModule) -> tuple[dict, dict]:
    """``(zip members, manifest entry)`` of one module stored as ``KEY.relax.json`` + ``KEY.bin``."""
    graph, arrays = split_constants(mod)
    blob, index = pack_arrays(arrays)
    members = {f"{key}.relax.json": graph, f"{key}.bin": blob}
    return members, {"graph": f"{key}.relax.json", "constants": f"{key}.bin", "index": index}


def read_module(archive: zipfile.ZipFile, entry: dict, where: str) -> tvm.IRModule:
    """A module stored by :func:`module_members`."""
    arrays = unpack_arrays(archive.read(entry["constants"]), entry["index"], where)
    return join_constants(archive.read(entry["graph"]).decode(), arrays)


# ----------------------------------------------------------------------------------------------------------
# The zip
def write_zip(handle, members: dict) -> None:
    """Write ``members`` (name -> str or bytes) as a zip, sorted by name, with fixed timestamps and modes.

    JSON is deflated; binaries (raw constants, ONNX) are stored, since they hardly compress and load faster so.
    """
    with zipfile.ZipFile(handle, "w") as archive:
        for name in sorted(members):
            data = members[name]
            data = data.encode() if isinstance(data, str) else data
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)


#: A member larger than this (uncompressed) is refused, and so is one that expands more than ``_MAX_RATIO`` times
#: beyond ``_RATIO_FLOOR``: tvmquant stores constants uncompressed and deflates only JSON, so an artifact's members
#: expand a few times at most; a zip bomb expands thousands of times.
_MAX_MEMBER = 16 << 30
_MAX_RATIO = 200
_RATIO_FLOOR = 64 << 20


def check_archive(archive: zipfile.ZipFile, where: str) -> None:
    """Refuse a zip whose member names leave the archive (``../``, absolute) or whose sizes are implausible, from
    the central directory alone (before reading any member)."""
    for info in archive.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise ArtifactError(f"{where} has a member with an unsafe path {name!r}; it is not a tvmquant artifact")
        expands = info.file_size > _RATIO_FLOOR and info.file_size > _MAX_RATIO * max(info.compress_size, 1)
        if info.file_size > _MAX_MEMBER or expands:
            raise ArtifactError(
                f"{where}: member {name!r} would decompress to {info.file_size} bytes from {info.compress_size}; "
                "refusing it (a damaged or hostile file, not a tvmquant artifact)"
            )


def read_format1(archive: zipfile.ZipFile) -> dict:
    """The modules of a format-1 artifact: ``fp32``, ``annotated``, ``source`` and ``qdq`` (or None)."""
    names = archive.namelist()
    return {
        "fp32": tvm.ir.load_json(archive.read("fp32.relax.json").decode()),
        "annotated": tvm.ir.load_json(archive.read("annotated.relax.json").decode()),
        "source": archive.read("source.onnx") if "source.onnx" in names else None,
        "qdq": tvm.ir.load_json(archive.read("qdq.relax.json").decode()) if "qdq.relax.json" in names else None,
    }


# ----------------------------------------------------------------------------------------------------------
# The ONNX source, by reference
@dataclass(frozen=True)
class SourceFile:
    """Where a model's ONNX file was when it was quantized, and its SHA-256 (recorded in the manifest)."""

    path: str
    sha256: str
    size: int

    @staticmethod
    def of(path) -> "SourceFile":
        path = os.path.abspath(os.fspath(path))
        return SourceFile(path, _sha256(path), os.path.getsize(path))

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @staticmethod
    def from_dict(data: dict) -> "SourceFile":
        return SourceFile(data["path"], data["sha256"], int(data["size"]))

    def problem(self) -> str | None:
        """Why the file at :attr:`path` is not the source any more (None: it is)."""
        if not os.path.isfile(self.path):
            return f"no file at {self.path!r}"
        if os.path.getsize(self.path) != self.size or _sha256(self.path) != self.sha256:
            return f"{self.path!r} has changed since quantization (its SHA-256 differs)"
        return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "ARTIFACT_FORMAT",
    "ArtifactError",
    "SourceFile",
    "split_constants",
    "join_constants",
    "pack_arrays",
    "unpack_arrays",
    "write_zip",
    "read_format1",
    "check_archive",
    "module_members",
    "read_module",
]
