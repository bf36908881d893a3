"""INT8 vs FP32 on MobileNetV2 and EfficientNet-Lite0 (ImageNet weights) for every calibration method, with
ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) as the baseline row.

Measures top-1/top-5 on foolbox's 20 labelled ImageNet images, and FP32-vs-INT8 top-1 agreement and logit
SQNR on 110 other natural images; calibration uses 64 disjoint images (see ``bench/models/imagenet_data.py``).
Also lists the tensors with the lowest SQNR (the layers that limit accuracy).

Prepare once (needs the ``torch`` extra, see shared/EVAL.md)::

    python bench/models/export_imagenet.py && python bench/models/imagenet_data.py

Run: ``python bench/accuracy_imagenet.py [--models mobilenet_v2 efficientnet_lite0] [--methods ...]``.
Writes ``bench/results/accuracy_imagenet.json``.

``--recovery`` instead compares the post-training recovery options on the default config (every conv in INT8,
no FP32 fallback): default, + bias correction, + cross-layer equalization, + both, + per-channel scales at
depthwise inputs (``depthwise_per_channel``); side by side with OpenVINO
NNCF (``nncf.quantize`` on the same ONNX and the same calibration images, default preset, its fast bias
correction on, run by OpenVINO on this CPU) and ONNX Runtime. Writes
``bench/results/accuracy_imagenet_recovery.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "models"))

from imagenet_data import load_imagenet_eval, preprocess  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.config import MSE, AutoSkip, Entropy, Max, Percentile, QuantConfig, TensorSpec  # noqa: E402
from tvmquant.quant_math import sqnr_db  # noqa: E402
from tvmquant.testing.ort import ort_predict, ort_quantize  # noqa: E402

ONNX_DIR = os.path.join(HERE, "models", "onnx")
METHODS = {
    "percentile99.99+auto_skip20dB": Percentile(99.99),
    "max": Max(),
    "percentile99.99": Percentile(99.99),
    "percentile99.999": Percentile(99.999),
    "entropy": Entropy(),
    "mse": MSE(),
}


def run_all(compiled, images):
    return np.concatenate([np.asarray(compiled(image[None])) for image in images], axis=0)


def scores(logits, labels, reference_logits):
    top5 = np.argsort(-logits, axis=1)[:, :5]
    ref_top1 = np.argmax(reference_logits, axis=1)
    return {
        "top1": int(np.sum(top5[:, 0] == labels)),
        "top5": int(np.sum([label in row for label, row in zip(labels, top5)])),
        "agree_with_fp32": float(np.mean(top5[:, 0] == ref_top1) * 100),
    }


def evaluate(name, model_path, data, methods, report):
    calib = preprocess(data["calib_u8"], name)
    labelled = preprocess(data["labelled_u8"], name)
    labels = data["labelled_labels"]
    agreement = preprocess(data["agreement_u8"], name)
    rows = []
    fp32 = None
    for method_name in methods:
        config = QuantConfig(activation=TensorSpec("uint8", "affine", method=METHODS[method_name]))
        if "auto_skip" in method_name:
            config = config.replace(auto_skip=AutoSkip(target_sqnr_db=20.0, max_layers=8))
        start = time.time()
        qmodel = tvmquant.quantize(model_path, config, calib, progress=False, report_batches=8)
        quantize_s = time.time() - start
        if fp32 is None:
            fp32_model = qmodel.compile(mode="fp32")
            fp32 = {"labelled": run_all(fp32_model, labelled), "agreement": run_all(fp32_model, agreement)}
            rows.append({"name": "fp32", **scores(fp32["labelled"], labels, fp32["labelled"])})
            print(f"[{name}] fp32 top1 {rows[-1]['top1']}/20 top5 {rows[-1]['top5']}/20", flush=True)
        int8 = qmodel.compile(mode="int8")
        labelled_logits = run_all(int8, labelled)
        agreement_logits = run_all(int8, agreement)
        row = {
            "name": f"tvmquant {method_name} (uint8 affine, per-channel)",
            "fp32_layers": [layer.name for layer in qmodel.layers if not layer.quantized],
            **scores(labelled_logits, labels, fp32["labelled"]),
            "agreement_top1_pct": float(
                np.mean(np.argmax(agreement_logits, 1) == np.argmax(fp32["agreement"], 1)) * 100
            ),
            "logit_sqnr_db": sqnr_db(fp32["agreement"], agreement_logits),
            "quantize_seconds": round(quantize_s, 1),
        }
        if report:
            worst = sorted((v, k) for k, v in qmodel.sqnr.items() if not k.startswith("output"))[:5]
            row["lowest_sqnr_tensors"] = [{"tensor": k, "sqnr_db": round(v, 2)} for v, k in worst]
        rows.append(row)
        print(
            f"[{name}] {row['name']}: top1 {row['top1']}/20 agree {row['agreement_top1_pct']:.1f}% "
            f"SQNR {row['logit_sqnr_db']:.1f} dB",
            flush=True,
        )
    for method in ("minmax", "percentile"):
        path = ort_quantize(model_path, calib, method=method)
        labelled_logits = ort_predict(path, labelled)
        agreement_logits = ort_predict(path, agreement)
        row = {
            "name": f"onnxruntime quantize_static QDQ {method} per-channel",
            **scores(labelled_logits, labels, fp32["labelled"]),
            "agreement_top1_pct": float(
                np.mean(np.argmax(agreement_logits, 1) == np.argmax(fp32["agreement"], 1)) * 100
            ),
            "logit_sqnr_db": sqnr_db(fp32["agreement"], agreement_logits),
        }
        rows.append(row)
        print(
            f"[{name}] {row['name']}: top1 {row['top1']}/20 agree {row['agreement_top1_pct']:.1f}% "
            f"SQNR {row['logit_sqnr_db']:.1f} dB",
            flush=True,
        )
    return rows


RECOVERY = {
    "default": {},
    "+bias_correction": {"bias_correction": True},
    "+equalize": {"equalize": True},
    "+equalize+bias_correction": {"equalize": True, "bias_correction": True},
    "+depthwise_per_channel": {"depthwise_per_channel": True},
}


def agreement_row(name, logits, labels, labelled_logits, fp32):
    return {
        "name": name,
        **scores(labelled_logits, labels, fp32["labelled"]),
        "agreement_top1_pct": float(np.mean(np.argmax(logits, 1) == np.argmax(fp32["agreement"], 1)) * 100),
        "logit_sqnr_db": sqnr_db(fp32["agreement"], logits),
    }


def nncf_predict(model_path, calib, images_sets):
    """``nncf.quantize`` (OpenVINO backend, default preset, fast bias correction) and OpenVINO CPU inference."""
    import nncf
    import openvino

    model = openvino.convert_model(model_path)
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    compiled = openvino.Core().compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": 2})
    outputs = []
    for images in images_sets:
        outputs.append(np.concatenate([compiled(image[None])[0] for image in images], axis=0))
    return outputs, {"nncf": nncf.__version__, "openvino": openvino.__version__}


def evaluate_recovery(name, model_path, data, selected=None, save=lambda rows: None):
    calib = preprocess(data["calib_u8"], name)
    labelled = preprocess(data["labelled_u8"], name)
    labels = data["labelled_labels"]
    agreement = preprocess(data["agreement_u8"], name)
    selected = selected or [*RECOVERY, "nncf", "onnxruntime"]
    rows = []
    fp32 = None

    def report(row):
        rows.append(row)
        save(rows)
        print(f"[{name}] {row['name']}: agree {row['agreement_top1_pct']:.1f}% SQNR {row['logit_sqnr_db']:.1f} dB")

    for row_name, options in RECOVERY.items():
        if row_name not in selected and (fp32 is not None or any(r in selected for r in RECOVERY)):
            continue
        start = time.time()
        qmodel = tvmquant.quantize(model_path, QuantConfig(**options), calib, progress=False, report_batches=0)
        quantize_s = time.time() - start
        if fp32 is None:
            fp32_model = qmodel.compile(mode="fp32")
            fp32 = {"labelled": run_all(fp32_model, labelled), "agreement": run_all(fp32_model, agreement)}
            # The FP32 reference is the FP32 mode of the first row run (equalization leaves it unchanged, to 1e-5).
            reference = {"name": "fp32", "reference_of": row_name}
            rows.append({**reference, **scores(fp32["labelled"], labels, fp32["labelled"])})
        if row_name not in selected:
            continue
        int8 = qmodel.compile(mode="int8")
        row = agreement_row(f"tvmquant {row_name}", run_all(int8, agreement), labels, run_all(int8, labelled), fp32)
        row["fp32_layers"] = [layer.name for layer in qmodel.layers if not layer.quantized]
        row["quantize_seconds"] = round(quantize_s, 1)
        report(row)
    if "nncf" in selected:
        (nncf_labelled, nncf_agreement), versions = nncf_predict(model_path, calib, [labelled, agreement])
        name_nncf = "nncf.quantize (OpenVINO, default preset, fast bias correction)"
        row = agreement_row(name_nncf, nncf_agreement, labels, nncf_labelled, fp32)
        row["versions"] = versions
        report(row)
    for method in ("minmax", "percentile") if "onnxruntime" in selected else ():
        path = ort_quantize(model_path, calib, method=method)
        name_ort = f"onnxruntime quantize_static QDQ {method} per-channel"
        report(agreement_row(name_ort, ort_predict(path, agreement), labels, ort_predict(path, labelled), fp32))
    return rows


def machine_info() -> dict:
    from tvmquant.target import host_target

    flags = []
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx", "sse4"))]
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "mcpu": str(host_target().attrs.get("mcpu", "")),
        "cpu_flags": flags,
        "note": "shared, loaded machine: timings are indicative only",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--recovery", action="store_true", help="compare bias correction / equalization with NNCF")
    parser.add_argument(
        "--rows", nargs="+", default=None, choices=[*RECOVERY, "nncf", "onnxruntime"], help="--recovery rows to run"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    default_out = "accuracy_imagenet_recovery.json" if args.recovery else "accuracy_imagenet.json"
    args.out = args.out or os.path.join(HERE, "results", default_out)
    data = load_imagenet_eval()
    result = {
        "command": "python bench/accuracy_imagenet.py " + " ".join(sys.argv[1:]),
        "data": {
            "labelled": 20,
            "agreement": int(len(data["agreement_u8"])),
            "calibration": int(len(data["calib_u8"])),
        },
        "machine": machine_info(),
        "models": {},
    }
    for name in args.models:
        path = os.path.join(ONNX_DIR, f"{name}.onnx")
        if args.recovery:

            def save(rows, name=name):
                result["models"][name] = rows
                with open(args.out, "w") as handle:
                    json.dump(result, handle, indent=2)

            result["models"][name] = evaluate_recovery(name, path, data, args.rows, save)
        else:
            result["models"][name] = evaluate(name, path, data, args.methods, report=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
