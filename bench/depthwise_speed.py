"""MobileNetV2's INT8 latency with and without per-channel scales at depthwise inputs, side by side.

Quantizes the exported MobileNetV2 twice (``QuantConfig()`` and ``QuantConfig(depthwise_per_channel=True)``) on
the 84 calibration images, compiles both for this CPU (untuned) and times batch 1 alternately: best of 5 rounds
of 50 runs each. Prepare as for ``bench/accuracy_imagenet.py``. Run: ``python bench/depthwise_speed.py [-o
bench/results/depthwise_speed.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))

from imagenet_data import prepared_model  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.target import host_mcpu  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=None, help="JSON to write")
    args = parser.parse_args(argv)
    path, calib, photos = prepared_model("mobilenet_v2")
    models = {}
    for label, flag in (("default", False), ("depthwise_per_channel", True)):
        config = tvmquant.QuantConfig(depthwise_per_channel=flag)
        qmodel = tvmquant.quantize(path, config, calib_data=calib, progress=False, report_batches=0)
        models[label] = qmodel.compile(mode="int8")
    image = photos[:1]
    for model in models.values():
        for _ in range(20):
            model(image)
    rounds: dict = {label: [] for label in models}
    for _ in range(5):
        for label, model in models.items():
            start = time.perf_counter()
            for _ in range(50):
                model(image)
            rounds[label].append((time.perf_counter() - start) / 50 * 1e3)
    best = {label: round(min(times), 3) for label, times in rounds.items()}
    result = {
        "machine": {"mcpu": host_mcpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "model": "mobilenet_v2, INT8, untuned, batch 1",
        "ms_per_image": best,
        "ratio_per_channel_to_default": round(best["depthwise_per_channel"] / best["default"], 3),
        "command": "python bench/depthwise_speed.py -o bench/results/depthwise_speed.json",
    }
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
