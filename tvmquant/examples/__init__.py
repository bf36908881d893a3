"""Bundled example model and data: a small Fashion-MNIST CNN and a slice of its data set.

The files here let tests, tutorials and the README demo quantize a real trained network with no
download, no torch and no apt package:

- ``fmnist_cnn.onnx``: a ResNet-style CNN (BatchNorm folded into Conv, residual adds, a depthwise
  conv, ReLU and ReLU6, pooling and a final Linear) trained by ``bench/models/train_fmnist.py``.
  Input ``"input"`` float32 of shape ``(N, 1, 28, 28)``, output ``"logits"`` of shape ``(N, 10)``.
- ``fmnist_data.npz``: 256 raw training images for calibration, the first 1000 test images and
  their labels, all stored as uint8 pixels to keep the file small; the loaders normalise them.

The model expects pixels normalised as ``(x / 255 - FMNIST_MEAN) / FMNIST_STD``, the same
normalisation that is recorded in the ONNX file's ``metadata_props``.

This module imports neither torch nor tvm, so loading the example stays cheap.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "fmnist_model_path",
    "load_fashion_mnist",
    "load_fmnist_example",
    "normalize_fmnist",
]

_EXAMPLES_DIR = Path(__file__).resolve().parent

#: Mean and standard deviation of the Fashion-MNIST training pixels scaled to [0, 1].
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fmnist_model_path() -> str:
    """Return the path of the bundled Fashion-MNIST ONNX model.

    Returns
    -------
    str
        Absolute path of ``fmnist_cnn.onnx``.

    Examples
    --------
    >>> import onnx
    >>> model = onnx.load(fmnist_model_path())
    >>> model.graph.input[0].name
    'input'
    """
    return str(_EXAMPLES_DIR / "fmnist_cnn.onnx")


def normalize_fmnist(images_u8: np.ndarray) -> np.ndarray:
    """Turn raw Fashion-MNIST pixels into the model's float32 input.

    Parameters
    ----------
    images_u8 : numpy.ndarray
        uint8 pixels of shape ``(N, 28, 28)`` or ``(N, 1, 28, 28)``.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(N, 1, 28, 28)`` holding ``(x / 255 - FMNIST_MEAN) / FMNIST_STD``.

    Examples
    --------
    >>> normalize_fmnist(np.zeros((2, 28, 28), np.uint8)).shape
    (2, 1, 28, 28)
    """
    images_u8 = np.asarray(images_u8)
    if images_u8.dtype != np.uint8:
        raise TypeError(
            f"normalize_fmnist expects raw uint8 pixels, got dtype {images_u8.dtype}; "
            "pass the pixels before any scaling"
        )
    if images_u8.ndim == 3:
        images_u8 = images_u8[:, None]
    if images_u8.shape[1:] != (1, 28, 28):
        raise ValueError(f"Fashion-MNIST images have shape (N, 28, 28) or (N, 1, 28, 28), got {images_u8.shape}")
    scaled = images_u8.astype(np.float32) / np.float32(255.0)
    return (scaled - np.float32(FMNIST_MEAN)) / np.float32(FMNIST_STD)


def load_fmnist_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the bundled calibration and test slice of Fashion-MNIST, normalised for the model.

    Returns
    -------
    calib : numpy.ndarray
        float32 ``(256, 1, 28, 28)``: training images, for calibration.
    test_x : numpy.ndarray
        float32 ``(1000, 1, 28, 28)``: the first 1000 test images.
    test_labels : numpy.ndarray
        int64 ``(1000,)``: their class indices (see ``FASHION_MNIST_CLASSES``).

    Examples
    --------
    >>> calib, test_x, test_labels = load_fmnist_example()
    >>> calib.shape, test_x.shape, test_labels.shape
    ((256, 1, 28, 28), (1000, 1, 28, 28), (1000,))
    """
    with np.load(_EXAMPLES_DIR / "fmnist_data.npz", allow_pickle=False) as data:
        calib = normalize_fmnist(data["calib_u8"])
        test_x = normalize_fmnist(data["test_u8"])
        test_labels = data["test_labels"].astype(np.int64)
    return calib, test_x, test_labels


def _read_idx(path: Path) -> np.ndarray:
    # IDX header: two zero bytes, a dtype code (0x08 = uint8), the number of dimensions, then one
    # big-endian uint32 per dimension.
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (header {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    split: str = "test", normalize: bool = True, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a full Fashion-MNIST split from the IDX files of Debian's ``dataset-fashion-mnist``.

    Parameters
    ----------
    split : {"test", "train"}
        ``"test"`` gives the 10,000 test images, ``"train"`` the 60,000 training images.
    normalize : bool
        If true, return float32 ``(N, 1, 28, 28)`` images normalised for the model (see
        ``normalize_fmnist``); if false, the raw uint8 ``(N, 28, 28)`` pixels.
    data_dir : str or os.PathLike, optional
        Folder holding the ``*-idx?-ubyte.gz`` files; defaults to ``FASHION_MNIST_DIR``.

    Returns
    -------
    images : numpy.ndarray
        The images, normalised or raw as ``normalize`` asks.
    labels : numpy.ndarray
        int64 ``(N,)`` class indices.

    Raises
    ------
    FileNotFoundError
        If the IDX files are missing, saying which package installs them.

    Examples
    --------
    >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
    >>> images.shape, labels.shape  # doctest: +SKIP
    ((10000, 1, 28, 28), (10000,))
    """
    if split not in _IDX_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_IDX_FILES)}, got {split!r}")
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    image_path, label_path = (folder / name for name in _IDX_FILES[split])
    missing = [str(p) for p in (image_path, label_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split!r} files not found: {', '.join(missing)}. Install them with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist`, or use "
            "load_fmnist_example() for the bundled 1000-image test slice."
        )
    images = _read_idx(image_path)
    labels = _read_idx(label_path).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split!r}: {images.shape[0]} images but {labels.shape[0]} labels")
    return (normalize_fmnist(images) if normalize else images), labels
