"""Model inputs and outputs on the numpy side, shared by the compiler-side API and the runtime-only loader.

Imports numpy only, so that :mod:`tvmquant.deploy` works with TVM's runtime library alone.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, static shape and dtype."""

    name: str
    shape: tuple
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(data: dict) -> "InputSpec":
        return InputSpec(data["name"], tuple(data["shape"]), data["dtype"])


def feed_from_args(args: tuple, kwargs: dict, inputs) -> dict:
    """``model(x)``, ``model(x, y)``, ``model({"input": x})`` or ``model(input=x)`` as one dict."""
    if len(args) == 1 and hasattr(args[0], "keys"):
        feed = dict(args[0])
    else:
        feed = dict(zip([spec.name for spec in inputs], args))
    feed.update(kwargs)
    return feed


def check_inputs(feed: dict, inputs) -> dict:
    """Validate names, shapes and dtypes of run-time inputs with errors naming the input."""
    names = [spec.name for spec in inputs]
    feed = _one_input_alias(feed, names, "the call")
    missing = [name for name in names if name not in feed]
    if missing:
        raise ValueError(f"missing model inputs {missing}; the model takes {names}")
    out = {}
    for spec in inputs:
        array = np.asarray(feed[spec.name])
        if tuple(array.shape) != tuple(spec.shape):
            hint = ""
            if array.ndim == len(spec.shape) and tuple(array.shape[1:]) == tuple(spec.shape[1:]):
                hint = (
                    f"; the model was compiled for batch {spec.shape[0]}: compile it for batch {array.shape[0]} "
                    "(compile(batch_size=...), `tvmquant compile --batch-size`), or feed batches of that size"
                )
            hint = hint or _length_hint(array, spec.shape)
            raise ValueError(
                f"input {spec.name!r} has shape {tuple(array.shape)}, the model expects {tuple(spec.shape)}{hint}"
            )
        if array.dtype != np.dtype(spec.dtype):
            if _exact_float_cast(array, spec.dtype):
                array = array.astype(spec.dtype)
            else:
                raise ValueError(f"input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        out[spec.name] = np.ascontiguousarray(array)
    return out


def _exact_float_cast(array: np.ndarray, dtype: str) -> bool:
    """Float data for a float input, or integers a float input holds exactly (a float attention mask fed 0/1)."""
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return False
    if np.issubdtype(array.dtype, np.floating):
        return True
    return np.issubdtype(array.dtype, np.integer) and (array.size == 0 or int(np.abs(array).max()) < 2**24)


def _length_hint(array: np.ndarray, shape: tuple) -> str:
    """A hint when a non-batch axis differs (a sequence length other than the exported one)."""
    if array.ndim != len(shape):
        return ""
    axes = [axis for axis in range(1, array.ndim) if array.shape[axis] != shape[axis]]
    if not axes:
        return ""
    axis = axes[0]
    return (
        f"; axis {axis} is {array.shape[axis]} but the model was exported for {shape[axis]}: pad or truncate the "
        f"data to {shape[axis]} (for token inputs, a tokenizer's padding to max_length={shape[axis]}), or export "
        "the model with the length you need"
    )


def _one_input_alias(item: dict, names: list, where: str, notice: bool = True) -> dict:
    """A one-input model takes one array under any name; say so (a warning) when the name is not the input's."""
    keys = list(item.keys())
    if len(names) != 1 or len(keys) != 1 or keys[0] in names:
        return item
    if notice:
        import warnings

        warnings.warn(
            f"{where} names its array {keys[0]!r}; the model's only input is {names[0]!r}: using it as "
            f"{names[0]!r} (name the array {names[0]!r} to silence this)",
            InputNameNotice,
            stacklevel=3,
        )
    return {names[0]: item[keys[0]]}


class InputNameNotice(UserWarning):
    """A one-input model was given its one array under another name (the array was used)."""


def flatten_outputs(result) -> list:
    """Numpy arrays of a VM result (a tensor or nested tuples of tensors), in order."""
    if hasattr(result, "numpy"):
        return [result.numpy()]
    outputs = []
    for item in result:
        outputs.extend(flatten_outputs(item))
    return outputs


class CalibrationDataError(ValueError):
    """Calibration data does not fit the model; the message names the batch, input and what was expected."""


def check_data_form(data, what: str = "calibration data") -> None:
    """Refuse data that is none of the forms :func:`iter_batches` takes, before anything runs."""
    if isinstance(data, np.ndarray) or hasattr(data, "keys") or hasattr(data, "__iter__"):
        return
    raise CalibrationDataError(
        f"{what} is a {type(data).__name__}; give an array (samples on axis 0), a dict {{input name: array}}, "
        "or a list or generator of them"
    )


def iter_batches(calib_data, inputs, what: str = "calibration data"):
    """Yield dicts ``{input name: array}`` of exactly the model's input shapes from any accepted form.

    Accepted: an iterable of dicts ``{input name: array}`` or of arrays (one-input models), a single such dict
    (e.g. an ``np.load``-ed npz), or one array. Samples (axis 0) are regrouped into the model's batch: items of
    any number of samples are split or joined, in order; samples left over after the last full batch are an
    error. ``what`` names the data in errors (``"calibration data"``, ``"input file 'x.npz'"``).
    """
    check_data_form(calib_data, what)
    single = isinstance(calib_data, np.ndarray) or hasattr(calib_data, "keys")
    if single:
        calib_data = [calib_data]
    names = [spec.name for spec in inputs]
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else 1
    # Samples are regrouped when every input has the same batch axis (the usual case); otherwise each item must
    # hold whole batches.
    shared_batch = all(spec.shape and spec.shape[0] == batch for spec in inputs)
    pending: dict = {name: [] for name in names}  # samples not yet yielded, per input
    pending_count = 0

    def where(index: int) -> str:
        return what if single else f"{what}, batch {index},"

    for index, item in enumerate(calib_data):
        if not hasattr(item, "keys"):
            if len(inputs) != 1:
                raise CalibrationDataError(
                    f"{where(index)} is a bare array, but the model has inputs {names}: "
                    "give a dict {input name: array}"
                )
            item = {names[0]: item}
        if not item:
            raise CalibrationDataError(
                f"{what} holds no arrays; give one array per model input {names}, samples stacked on axis 0 "
                f"(e.g. np.savez(path, {names[0]}=x))"
            )
        item = _one_input_alias(item, names, what, notice=index == 0)
        missing = [n for n in names if n not in item]
        extra = [k for k in item.keys() if k not in names]
        if missing or extra:
            raise CalibrationDataError(
                f"{where(index)} has inputs {sorted(item.keys())}, the model expects {names}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unknown {extra})" if extra else "")
            )
        if not shared_batch:
            yield from _chunks(item, inputs, where(index))
            continue
        arrays = {}
        count = None
        for spec in inputs:
            array = np.asarray(item[spec.name])
            if array.dtype == object:
                raise CalibrationDataError(f"{where(index)} input {spec.name!r} holds Python objects, not numbers")
            if array.dtype != np.dtype(spec.dtype):
                if _exact_float_cast(array, spec.dtype):
                    array = array.astype(spec.dtype)
                else:
                    raise CalibrationDataError(
                        f"{where(index)} input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}"
                    )
            if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]):
                raise CalibrationDataError(
                    f"{where(index)} input {spec.name!r} has shape {tuple(array.shape)}; the model takes samples "
                    f"of shape {tuple(spec.shape[1:])}, any number of them stacked on axis 0"
                    + _length_hint(array, spec.shape)
                )
            if count is not None and array.shape[0] != count:
                raise CalibrationDataError(f"{where(index)}: inputs hold different numbers of samples")
            count = array.shape[0]
            arrays[spec.name] = array
        for name, array in arrays.items():
            pending[name].append(array)
        pending_count += count or 0
        while pending_count >= batch:
            joined = {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in pending.items()}
            for start in range(0, pending_count - batch + 1, batch):
                yield {name: array[start : start + batch] for name, array in joined.items()}
            used = (pending_count // batch) * batch
            pending = {name: ([array[used:]] if used < pending_count else []) for name, array in joined.items()}
            pending_count -= used
    if pending_count:
        raise CalibrationDataError(
            f"{what} has {pending_count} sample(s) left over after the last full batch of {batch}: give a multiple "
            f"of {batch} samples" + (" (or a calibration batch that divides their number)" if batch > 1 else "")
        )


def _chunks(item: dict, inputs, where: str):
    """The model-sized batches of one item whose inputs do not share a batch axis (no regrouping)."""
    arrays = {}
    num_chunks = None
    for spec in inputs:
        array = np.asarray(item[spec.name])
        if array.dtype != np.dtype(spec.dtype):
            if np.issubdtype(array.dtype, np.floating) and np.issubdtype(np.dtype(spec.dtype), np.floating):
                array = array.astype(spec.dtype)
            else:
                raise CalibrationDataError(
                    f"{where} input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}"
                )
        batch = spec.shape[0] if spec.shape else 1
        if tuple(array.shape) == tuple(spec.shape):
            chunks = 1
        elif (
            array.ndim == len(spec.shape)
            and tuple(array.shape[1:]) == tuple(spec.shape[1:])
            and array.shape[0] % batch == 0
        ):
            chunks = array.shape[0] // batch
        else:
            raise CalibrationDataError(
                f"{where} input {spec.name!r} has shape {tuple(array.shape)}, the model "
                f"expects {tuple(spec.shape)} (or k x {spec.shape[0]} samples stacked on axis 0)"
            )
        if num_chunks is not None and chunks != num_chunks:
            raise CalibrationDataError(f"{where}: inputs hold different numbers of samples")
        num_chunks = chunks
        arrays[spec.name] = (array, batch)
    for chunk in range(num_chunks or 0):
        yield {name: array[chunk * batch : (chunk + 1) * batch] for name, (array, batch) in arrays.items()}


def atomic_write(path, writer) -> None:
    """Call ``writer(binary file)`` on a temporary file next to ``path`` and rename it into place on success.

    A failure leaves no partial file; a missing folder is a clear error.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist; create it first")
    handle, tmp = tempfile.mkstemp(prefix=".tvmquant-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            writer(stream)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
