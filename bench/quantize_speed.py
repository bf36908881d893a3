"""How long quantizing takes, and how much memory: tvmquant against NNCF and ONNX Runtime, in one run.

Each engine quantizes the same ONNX file with the same calibration images, in a fresh process of its own, so
its peak resident memory (``ru_maxrss``) is its own:

``tvmquant``
    ``tvmquant quantize MODEL --calib X.npz -o OUT.tvmq`` (the CLI, default config: percentile 99.99
    histograms, per-channel weights), writing the artifact.
``tvmquant_auto_skip``
    the same with ``--auto-skip DB --auto-skip-max 8``: DB is set above what the model reaches, so AutoSkip
    measures every candidate layer and keeps 8 in FP32 (the most work it can do).
``nncf``
    ``openvino.convert_model`` of the ONNX file, ``nncf.quantize`` (default preset, fast bias correction on,
    ``subset_size`` = all images), ``openvino.save_model``.
``ort``
    ``onnxruntime.quantization.quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, MinMax), the
    file written.

Models: the ResNet-50-style network of ``bench/speed_x86.py`` (random weights, its batch axis made dynamic so
tvmquant calibrates in batches, as it would an exported torchvision model) with 300 random images, NNCF's
default subset size; and MobileNetV2 (``bench/models/export_imagenet.py``) with its 84 calibration images
(``bench/models/imagenet_data.py``), when those files exist.

``wall_s`` is the whole process (imports included: what a user waits for), ``work_s`` the part after the
imports. Threads: every engine gets all the machine's cores.

Run: ``python bench/quantize_speed.py [--images 300] [--engines ...] [-o bench/results/quantize_speed.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "models"))

ENGINES = ("tvmquant", "tvmquant_auto_skip", "nncf", "ort")
AUTO_SKIP_DB = "60"


# ---------------------------------------------------------------------------------------------------- workers
# Each runs in its own process (``--worker``) and prints one JSON line: its work time and its peak RSS.


def _work_tvmquant(model: str, calib: str, out: str, extra: list) -> dict:
    from tvmquant.cli import main

    start = time.perf_counter()
    code = main(["quantize", model, "--calib", calib, "-o", out, *extra])
    if code != 0:
        raise SystemExit(f"tvmquant quantize exited with {code}")
    return {"work_s": time.perf_counter() - start}


def _work_nncf(model: str, calib: str, out: str) -> dict:
    import nncf
    import openvino

    images = _only_array(calib)
    start = time.perf_counter()
    converted = openvino.convert_model(model)
    converted_s = time.perf_counter() - start
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    quantized = nncf.quantize(converted, dataset, subset_size=len(images))
    openvino.save_model(quantized, out)
    return {"work_s": time.perf_counter() - start, "convert_s": converted_s}


def _work_ort(model: str, calib: str, out: str) -> dict:
    from tvmquant.testing.ort import ort_quantize

    images = _only_array(calib)
    start = time.perf_counter()
    path = ort_quantize(model, images, "minmax", per_channel=True, out_dir=os.path.dirname(out))
    os.replace(path, out)
    return {"work_s": time.perf_counter() - start}


def _only_array(path: str) -> np.ndarray:
    with np.load(path) as data:
        return np.asarray(data[data.files[0]])


def _peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` starts afresh at exec, unlike ``ru_maxrss``, which Linux
    carries over from the parent that forked it."""
    with open("/proc/self/status") as handle:
        kb = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    return kb / 1024


def worker(engine: str, model: str, calib: str, out: str) -> None:
    if engine == "tvmquant":
        result = _work_tvmquant(model, calib, out, ["-q"])
    elif engine == "tvmquant_auto_skip":
        result = _work_tvmquant(model, calib, out, ["--auto-skip", AUTO_SKIP_DB, "--auto-skip-max", "8"])
    elif engine == "nncf":
        result = _work_nncf(model, calib, out)
    elif engine == "ort":
        result = _work_ort(model, calib, out)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------- driver


def run_engine(engine: str, model: str, calib: str, folder: str) -> dict:
    suffix = {"nncf": ".xml", "ort": ".onnx"}.get(engine, ".tvmq")
    out = os.path.join(folder, engine + suffix)
    command = [sys.executable, os.path.abspath(__file__), "--worker", engine, model, calib, out]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = wall
    written = [out] + ([out[: -len(".xml")] + ".bin"] if engine == "nncf" else [])
    result["output_mb"] = sum(os.path.getsize(path) for path in written if os.path.exists(path)) / 1e6
    log = done.stderr.strip().splitlines()
    if engine.startswith("tvmquant"):
        result["log"] = [line.strip() for line in log if "auto-skip" in line or "candidate" in line][-4:]
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in result.items()}


def resnet50_dynamic(folder: str) -> str:
    import onnx
    from speed_x86 import resnet50_style

    model = resnet50_style()
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    path = os.path.join(folder, "resnet50_style.onnx")
    onnx.save(model, path)
    return path


def models(folder: str, images: int) -> dict:
    found = {}
    path = resnet50_dynamic(folder)
    calib = (np.random.default_rng(1).standard_normal((images, 3, 224, 224)) * 0.5).astype(np.float32)
    found["resnet50_style"] = (path, calib, "random N(0, 0.5) images")
    mobilenet = os.path.join(HERE, "models", "onnx", "mobilenet_v2.onnx")
    data = os.path.join(HERE, "data", "imagenet_eval.npz")
    if os.path.exists(mobilenet) and os.path.exists(data):
        from imagenet_data import load_imagenet_eval, preprocess

        found["mobilenet_v2"] = (
            mobilenet,
            preprocess(load_imagenet_eval()["calib_u8"], "mobilenet_v2"),
            "the 84 calibration images of bench/models/imagenet_data.py",
        )
    return found


def machine() -> dict:
    from tvmquant.target import cpu_flags, host_mcpu

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    return {
        "cpu": model,
        "mcpu": host_mcpu(),
        "cores": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "python": platform.python_version(),
    }


def versions() -> dict:
    found = {}
    for name in ("tvm", "nncf", "openvino", "onnxruntime"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = None
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(*argv[1:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="random calibration images for ResNet-50-style")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--models", nargs="+", default=None, help="resnet50_style, mobilenet_v2")
    parser.add_argument("-o", "--output", default=None, help="JSON to write")
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="tvmq-qspeed-")
    result = {"machine": machine(), "versions": versions(), "auto_skip_db": float(AUTO_SKIP_DB), "models": {}}
    for name, (path, calib, what) in models(folder, args.images).items():
        if args.models and name not in args.models:
            continue
        calib_path = os.path.join(folder, f"{name}_calib.npz")
        np.savez(calib_path, calib)
        entry = {"images": len(calib), "data": what, "onnx_mb": round(os.path.getsize(path) / 1e6, 1)}
        for engine in args.engines:
            print(f"{name}: {engine} ...", flush=True)
            entry[engine] = run_engine(engine, path, calib_path, folder)
            print(f"  {entry[engine]}", flush=True)
        if "wall_s" in entry.get("nncf", {}):
            for engine in ("tvmquant", "tvmquant_auto_skip", "ort"):
                if "wall_s" in entry.get(engine, {}):
                    entry[f"{engine}_speedup_vs_nncf"] = round(entry["nncf"]["wall_s"] / entry[engine]["wall_s"], 2)
        result["models"][name] = entry
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
