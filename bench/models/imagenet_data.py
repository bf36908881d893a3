"""Evaluation and calibration images for the ImageNet models (MobileNetV2, EfficientNet-Lite0).

No ImageNet validation set can be downloaded here, so the data comes from images that ship inside
PyPI packages. All images are stored once, as raw 224x224 RGB uint8 crops; ``preprocess`` applies
each model's own normalisation, so both models see exactly the same pixels.

The split, written to ``bench/data/imagenet_eval.npz``:

``labelled_u8``, ``labelled_labels``, ``labelled_names`` (20 images)
    foolbox's 20 ImageNet validation images (``imagenet_<i>_<label>.jpg``, the ImageNet class index
    in the name), resized so the short side is 256 and centre-cropped to 224, as torchvision's
    reference evaluation does. Measures FP32 and INT8 top-1 (MobileNetV2 FP32: 17/20).
``agreement_u8``, ``agreement_sources`` (110 images, unlabelled)
    For FP32-vs-INT8 top-1 agreement and SQNR: foolbox's 20 CIFAR-10 images upscaled from 32x32 to
    224x224, and 18 seeded random crops (some mirrored) of each of five scikit-image photos: astronaut,
    chelsea, coffee, rocket and camera.
``calib_u8``, ``calib_sources`` (84 images, unlabelled)
    For calibration only: foolbox's 20 CIFAR-100 images (upscaled like the CIFAR-10 ones) and seeded random
    crops and flips of *other* scikit-image photos (motorcycle_left, hubble_deep_field, ihc, retina, coins,
    moon, grass, gravel, brick). No image or source photo of the calibration set appears in the evaluation
    sets, and neither set contains foolbox's ImageNet images, so calibration never sees an image it is then
    scored on.

Every ``*_sources`` entry names the file or photo and the crop box, so any image can be traced.
Grey photos are repeated over the three channels. Randomness is seeded (``SEED``): rerunning the
script writes identical arrays.

Usage::

    pip install foolbox scikit-image   # with a torch==2.13.0 constraint, see shared/EVAL.md
    python bench/models/imagenet_data.py [--out bench/data/imagenet_eval.npz]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "data" / "imagenet_eval.npz"
SEED = 20240601

MODEL_NAMES = ("mobilenet_v2", "efficientnet_lite0")
IMAGE_SIZE = 224
RESIZE_SIZE = 256

# torchvision's ImageNet statistics (MobileNetV2's training normalisation), on the [0, 1] scale.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Photos in skimage.data that are on disk (no pooch download). The two lists never share a photo.
AGREEMENT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
CALIBRATION_PHOTOS = {
    # photo name -> number of crops; the natural scenes get more weight than the textures.
    "motorcycle_left": 12,
    "hubble_deep_field": 8,
    "immunohistochemistry": 8,
    "retina": 6,
    "coins": 6,
    "moon": 6,
    "grass": 6,
    "gravel": 6,
    "brick": 6,
}
CROPS_PER_AGREEMENT_PHOTO = 18


def foolbox_data_dir() -> Path:
    """Return foolbox's bundled sample-image folder, found without importing foolbox.

    Importing foolbox pulls in eagerpy and its framework probing; only its data files are needed.

    Returns
    -------
    pathlib.Path
        The ``foolbox/data`` folder.

    Examples
    --------
    >>> sorted(foolbox_data_dir().glob("imagenet_*.jpg"))[0].name
    'imagenet_00_243.jpg'
    """
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "foolbox is not installed; `pip install -c constraints.txt foolbox` (a constraints file "
            "holding torch==2.13.0) brings its sample images"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def resize_center_crop(image: Image.Image, resize: int = RESIZE_SIZE, crop: int = IMAGE_SIZE) -> np.ndarray:
    """Resize the short side to ``resize`` (bilinear, antialiased) and take the centre ``crop`` square.

    Parameters
    ----------
    image : PIL.Image.Image
        Any PIL image; it is converted to RGB.
    resize : int
        Length of the short side after resizing.
    crop : int
        Side of the centre square kept.

    Returns
    -------
    numpy.ndarray
        uint8 ``(crop, crop, 3)``.

    Examples
    --------
    >>> resize_center_crop(Image.new("RGB", (512, 384))).shape
    (224, 224, 3)
    """
    image = image.convert("RGB")
    width, height = image.size
    # The long side is truncated, not rounded, as torchvision's Resize does.
    if width <= height:
        new_size = (resize, int(resize * height / width))
    else:
        new_size = (int(resize * width / height), resize)
    image = image.resize(new_size, Image.BILINEAR)
    left = int(round((new_size[0] - crop) / 2.0))
    top = int(round((new_size[1] - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def preprocess(images_u8: np.ndarray, model_name: str) -> np.ndarray:
    """Normalise raw RGB crops into a model's float32 NCHW input.

    Parameters
    ----------
    images_u8 : numpy.ndarray
        uint8 ``(N, 224, 224, 3)`` RGB images, as stored in ``imagenet_eval.npz``.
    model_name : {"mobilenet_v2", "efficientnet_lite0"}
        ``"mobilenet_v2"``: ``(x / 255 - mean) / std`` with torchvision's ImageNet statistics;
        ``"efficientnet_lite0"``: ``(x - 127.5) / 128``, the TF-Lite reference normalisation.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, 3, 224, 224)``.

    Examples
    --------
    >>> x = preprocess(np.full((1, 224, 224, 3), 128, np.uint8), "efficientnet_lite0")
    >>> x.shape, float(x[0, 0, 0, 0])
    ((1, 3, 224, 224), 0.00390625)
    """
    images_u8 = np.asarray(images_u8)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[-1] != 3:
        raise ValueError(
            f"preprocess expects uint8 RGB images of shape (N, H, W, 3), got {images_u8.dtype} {images_u8.shape}"
        )
    pixels = images_u8.astype(np.float32)
    if model_name == "mobilenet_v2":
        normalized = (pixels / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD
    elif model_name == "efficientnet_lite0":
        normalized = (pixels - np.float32(127.5)) / np.float32(128.0)
    else:
        raise ValueError(f"unknown model {model_name!r}; expected one of {MODEL_NAMES}")
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2), dtype=np.float32)


def load_foolbox_imagenet() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load foolbox's 20 labelled ImageNet images as 224x224 centre crops.

    Returns
    -------
    images_u8 : numpy.ndarray
        uint8 ``(20, 224, 224, 3)``.
    labels : numpy.ndarray
        int64 ``(20,)`` ImageNet class indices, parsed from the file names.
    names : list of str
        The file names, in the same order.
    """
    paths = sorted(foolbox_data_dir().glob("imagenet_*.jpg"))
    if len(paths) != 20:
        raise FileNotFoundError(f"expected 20 foolbox ImageNet images in {foolbox_data_dir()}, found {len(paths)}")
    images, labels = [], []
    for path in paths:
        match = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", path.name)
        if match is None:
            raise ValueError(f"cannot read the label from foolbox image name {path.name!r}")
        labels.append(int(match.group(1)))
        with Image.open(path) as image:
            images.append(resize_center_crop(image))
    return np.stack(images), np.array(labels, dtype=np.int64), [p.name for p in paths]


def load_foolbox_cifar() -> tuple[np.ndarray, list[str]]:
    """Load foolbox's 20 CIFAR-10 and 20 CIFAR-100 images, upscaled to 224x224 (bicubic).

    Returns
    -------
    images_u8 : numpy.ndarray
        uint8 ``(40, 224, 224, 3)``.
    sources : list of str
        The file names.
    """
    paths = sorted(foolbox_data_dir().glob("cifar10_*.png")) + sorted(foolbox_data_dir().glob("cifar100_*.png"))
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)))
    return np.stack(images).astype(np.uint8), [p.name for p in paths]


def load_skimage_photo(name: str) -> np.ndarray:
    """Return a scikit-image sample photo as uint8 RGB ``(H, W, 3)``; grey photos are repeated to RGB."""
    import skimage.data

    if name == "motorcycle_left":
        # skimage.data has no loader of its own for one view of the stereo pair; the right view,
        # nearly the same scene, is used nowhere so that no scene is in two sets.
        photo = skimage.data.stereo_motorcycle()[0]
    else:
        photo = getattr(skimage.data, name)()
    if photo.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} has dtype {photo.dtype}; expected uint8 pixels")
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.ascontiguousarray(photo[:, :, :3])


def random_crops(
    photo: np.ndarray, count: int, rng: np.random.Generator, name: str, min_scale: float = 0.35
) -> tuple[list[np.ndarray], list[str]]:
    """Cut ``count`` random square crops from ``photo``, mirror about half of them, resize to 224.

    Parameters
    ----------
    photo : numpy.ndarray
        uint8 ``(H, W, 3)``.
    count : int
        Number of crops.
    rng : numpy.random.Generator
        Seeded generator, so the crops are reproducible.
    name : str
        Photo name, recorded in each crop's source string.
    min_scale : float
        Smallest crop side as a fraction of the photo's short side; small crops give close-ups
        whose statistics differ from the full view.

    Returns
    -------
    crops : list of numpy.ndarray
        uint8 ``(224, 224, 3)`` images.
    sources : list of str
        ``"skimage:<name> box=(left,top,side) flip=<0|1>"`` for each crop.
    """
    height, width = photo.shape[:2]
    short_side = min(height, width)
    crops, sources = [], []
    for _ in range(count):
        side = int(round(short_side * rng.uniform(min_scale, 1.0)))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        flip = bool(rng.random() < 0.5)
        crop = photo[top : top + side, left : left + side]
        if flip:
            crop = crop[:, ::-1]
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        crops.append(np.asarray(resized, dtype=np.uint8))
        sources.append(f"skimage:{name} box=({left},{top},{side}) flip={int(flip)}")
    return crops, sources


def build_imagenet_eval(seed: int = SEED) -> dict[str, np.ndarray]:
    """Build the labelled, agreement and calibration sets described in the module docstring.

    Parameters
    ----------
    seed : int
        Seed of the crop positions, sizes and flips.

    Returns
    -------
    dict of str to numpy.ndarray
        The arrays written to ``imagenet_eval.npz``.
    """
    rng = np.random.default_rng(seed)
    labelled_u8, labelled_labels, labelled_names = load_foolbox_imagenet()

    cifar, cifar_sources = load_foolbox_cifar()
    # CIFAR-10 images are evaluated; the CIFAR-100 ones calibrate, so that calibration sees upscaled small
    # photos like those it is scored on, without ever seeing one of them.
    agreement = [image for image, source in zip(cifar, cifar_sources) if not source.startswith("cifar100_")]
    agreement_sources = [source for source in cifar_sources if not source.startswith("cifar100_")]
    cifar100 = [image for image, source in zip(cifar, cifar_sources) if source.startswith("cifar100_")]
    for name in AGREEMENT_PHOTOS:
        crops, sources = random_crops(load_skimage_photo(name), CROPS_PER_AGREEMENT_PHOTO, rng, name)
        agreement += crops
        agreement_sources += sources

    calibration = list(cifar100)
    calibration_sources = [source for source in cifar_sources if source.startswith("cifar100_")]
    for name, count in CALIBRATION_PHOTOS.items():
        crops, sources = random_crops(load_skimage_photo(name), count, rng, name)
        calibration += crops
        calibration_sources += sources

    photo_of = re.compile(r"skimage:(\w+) ")
    shared = {m.group(1) for s in calibration_sources if (m := photo_of.match(s))} & {
        m.group(1) for s in agreement_sources if (m := photo_of.match(s))
    }
    if shared:
        raise AssertionError(f"calibration and agreement sets share source photos {sorted(shared)}")

    return {
        "labelled_u8": labelled_u8,
        "labelled_labels": labelled_labels,
        "labelled_names": np.array(labelled_names),
        "agreement_u8": np.stack(agreement),
        "agreement_sources": np.array(agreement_sources),
        "calib_u8": np.stack(calibration),
        "calib_sources": np.array(calibration_sources),
    }


def require_prepared(*paths) -> None:
    """Exit with the commands that make them if the exported model files ``paths`` or the evaluation data are
    missing (a benchmark would otherwise fail deep inside with a bare "does not exist")."""
    missing = [str(path) for path in (*paths, DEFAULT_OUTPUT) if not Path(path).exists()]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: prepare once with `python bench/models/export_imagenet.py && "
            "python bench/models/imagenet_data.py` (see shared/EVAL.md for the packages they need)"
        )


def prepared_model(name: str) -> tuple[str, np.ndarray, np.ndarray]:
    """``(ONNX path, calibration images, evaluation photos)`` of the exported model ``name``, preprocessed for it;
    exits with the preparation commands if the export or the data are missing."""
    path = str(REPO_ROOT / "bench" / "models" / "onnx" / f"{name}.onnx")
    require_prepared(path)
    data = load_imagenet_eval()
    return path, preprocess(data["calib_u8"], name), preprocess(data["agreement_u8"], name)


def load_imagenet_eval(path: str | Path = DEFAULT_OUTPUT) -> dict[str, np.ndarray]:
    """Load the arrays written by this script.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.npz`` file; defaults to ``bench/data/imagenet_eval.npz``.

    Returns
    -------
    dict of str to numpy.ndarray
        ``labelled_u8``, ``labelled_labels``, ``labelled_names``, ``agreement_u8``,
        ``agreement_sources``, ``calib_u8``, ``calib_sources``; pass the ``*_u8`` arrays to
        ``preprocess``.

    Examples
    --------
    >>> data = load_imagenet_eval()  # doctest: +SKIP
    >>> preprocess(data["calib_u8"], "mobilenet_v2").shape  # doctest: +SKIP
    (64, 3, 224, 224)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build it with `python bench/models/imagenet_data.py`")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    arrays = build_imagenet_eval(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB): "
        f"{len(arrays['labelled_u8'])} labelled, {len(arrays['agreement_u8'])} agreement, "
        f"{len(arrays['calib_u8'])} calibration images"
    )


if __name__ == "__main__":
    main()
