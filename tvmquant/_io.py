"""Model inputs and outputs on the numpy side, shared by the compiler-side API and the runtime-only loader.

Imports numpy only, so that :mod:`tvmquant.deploy` works with TVM's runtime library alone.
"""

from __future__ import annotations

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
    if len(inputs) == 1 and len(feed) == 1 and names[0] not in feed:
        feed = {names[0]: next(iter(feed.values()))}
    missing = [name for name in names if name not in feed]
    if missing:
        raise ValueError(f"missing model inputs {missing}; the model takes {names}")
    out = {}
    for spec in inputs:
        array = np.asarray(feed[spec.name])
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(
                f"input {spec.name!r} has shape {tuple(array.shape)}, the model expects {tuple(spec.shape)}"
            )
        if array.dtype != np.dtype(spec.dtype):
            if np.issubdtype(array.dtype, np.floating) and np.issubdtype(np.dtype(spec.dtype), np.floating):
                array = array.astype(spec.dtype)
            else:
                raise ValueError(f"input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        out[spec.name] = np.ascontiguousarray(array)
    return out


def flatten_outputs(result) -> list:
    """Numpy arrays of a VM result (a tensor or nested tuples of tensors), in order."""
    if hasattr(result, "numpy"):
        return [result.numpy()]
    outputs = []
    for item in result:
        outputs.extend(flatten_outputs(item))
    return outputs
