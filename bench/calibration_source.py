"""Does MobileNetV2's post-training error come from its calibration images (CIFAR-100 upscales and textures)?

Quantizes the model twice with the default config, calibrated on the 84 calibration images and on the first 55
of the 110 evaluation photos, and measures both on the other 55 photos (FP32-vs-INT8 top-1 agreement, logit
SQNR). Prepare as for ``bench/accuracy_imagenet.py``. Run: ``python bench/calibration_source.py``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))

from imagenet_data import load_imagenet_eval, preprocess, require_prepared  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.quant_math import sqnr_db  # noqa: E402


def main() -> int:
    path = os.path.join(HERE, "models", "onnx", "mobilenet_v2.onnx")
    require_prepared(path)
    data = load_imagenet_eval()
    calib = preprocess(data["calib_u8"], "mobilenet_v2")
    photos = preprocess(data["agreement_u8"], "mobilenet_v2")
    half = len(photos) // 2
    for name, images in (("the 84 calibration images", calib), (f"the first {half} evaluation photos", photos[:half])):
        qmodel = tvmquant.quantize(path, calib_data=images, progress=False, report_batches=0)
        fp32, int8 = qmodel.compile(mode="fp32"), qmodel.compile(mode="int8")
        reference = np.concatenate([np.asarray(fp32(image[None])) for image in photos[half:]])
        logits = np.concatenate([np.asarray(int8(image[None])) for image in photos[half:]])
        agreement = float(np.mean(reference.argmax(1) == logits.argmax(1)) * 100)
        print(
            f"calibrated on {name}: on the other {len(photos) - half} photos {agreement:.1f}% agreement, "
            f"{sqnr_db(reference, logits):.1f} dB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
