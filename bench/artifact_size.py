"""Size and load time of a ``.tvmq`` artifact against the FP32 ONNX file and ONNX Runtime's QDQ export.

Model: the ResNet-50-style network of ``bench/speed_x86.py`` (random He weights, BatchNorm folded). ORT's
baseline is ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) on the same calibration data.

Load time is the median of ``--repeats`` runs of :func:`tvmquant.load`, each in a fresh process (after importing
``tvmquant.api``, timed apart), then the same plus building the integer module (``.mod``), which every compile
needs.

Run: ``python bench/artifact_size.py [--calib 4] [--repeats 3] [-o bench/results/artifact_size.json]``. The JSON
keeps one entry per artifact format (``format_2``...), so runs of an older tvmquant (``PYTHONPATH=old/checkout``)
and of this one fill the same file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Importing tvmquant.api (TVM's compiler, the passes) is timed apart: it is the same for every artifact.
_TIMER = (
    "import sys, time; t = time.perf_counter(); import tvmquant.api; imported = time.perf_counter() - t; "
    "t = time.perf_counter(); q = tvmquant.api.load(sys.argv[1]); loaded = time.perf_counter() - t; q.mod; "
    "print(imported, loaded, time.perf_counter() - t)"
)


def load_times(path: str, repeats: int) -> dict:
    """Median seconds of ``tvmquant.load(path)`` and of load + ``.mod``, each run in a fresh process."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _TIMER, path], capture_output=True, text=True, check=True)
        runs.append([float(value) for value in out.stdout.split()[-3:]])
    imported, load, with_mod = np.median(np.asarray(runs), axis=0)
    return {
        "import_api_s": round(float(imported), 3),
        "load_s": round(float(load), 3),
        "load_and_int8_module_s": round(float(with_mod), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=4, help="calibration images (224x224)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-o", "--output", default=None, help="JSON to write")
    args = parser.parse_args(argv)

    import onnx
    from speed_x86 import resnet50_style

    import tvmquant
    from tvmquant.testing.ort import ort_quantize

    folder = tempfile.mkdtemp(prefix="tvmq-size-")
    onnx_path = os.path.join(folder, "resnet50_style.onnx")
    onnx.save(resnet50_style(), onnx_path)
    calib = (np.random.default_rng(1).standard_normal((args.calib, 3, 224, 224)) * 0.5).astype(np.float32)
    qdq_path = ort_quantize(onnx_path, calib, "minmax", per_channel=True, out_dir=folder)
    qmodel = tvmquant.quantize(onnx_path, calib_data=calib, progress=False, report_batches=0)
    sizes = {"fp32_onnx": os.path.getsize(onnx_path), "ort_qdq_onnx": os.path.getsize(qdq_path)}
    times = {}
    variants = {"tvmq": {}}
    if "keep_source" in inspect.signature(qmodel.save).parameters:
        variants["tvmq_keep_source"] = {"keep_source": True}
    for name, kwargs in variants.items():
        path = os.path.join(folder, f"{name}.tvmq")
        qmodel.save(path, **kwargs)
        sizes[name] = os.path.getsize(path)
        times[name] = load_times(path, args.repeats)
    from tvmquant.api import ARTIFACT_FORMAT

    result = {
        "tvmquant": tvmquant.__file__,
        "cpu": _cpu(),
        "bytes": sizes,
        "mb": {name: round(size / 1e6, 1) for name, size in sizes.items()},
        "tvmq_vs_ort_qdq": round(sizes["tvmq"] / sizes["ort_qdq_onnx"], 3),
        "load": times,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        results = {}
        if os.path.exists(args.output):
            with open(args.output) as handle:
                results = json.load(handle)
        results[f"format_{ARTIFACT_FORMAT}"] = result
        with open(args.output, "w") as handle:
            handle.write(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
