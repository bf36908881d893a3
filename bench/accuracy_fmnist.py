"""INT8 accuracy of the bundled Fashion-MNIST CNN on the full 10k test set, for every calibration method,
per-channel vs per-tensor weights and affine vs symmetric activations, against ONNX Runtime's
``quantize_static`` on the same calibration data.

Run: ``python bench/accuracy_fmnist.py`` (needs ``apt-get install dataset-fashion-mnist``).
Writes ``bench/results/accuracy_fmnist.json`` and prints a table.

``python bench/accuracy_fmnist.py --bits`` instead compares bit widths on the default config: W8A8, W4A8 and
W4A4 (4-bit values on the int8 kernels), each as plain PTQ and PTQ + bias correction. Writes
``bench/results/accuracy_fmnist_bits.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import tvmquant  # noqa: E402
from tvmquant.config import MSE, Entropy, Max, Percentile, PerChannel, PerTensor, QuantConfig, TensorSpec  # noqa: E402
from tvmquant.examples import fmnist_model_path, load_fashion_mnist, load_fmnist_example  # noqa: E402
from tvmquant.testing.ort import ort_predict, ort_quantize  # noqa: E402

EVAL_BATCH = 100


def configs():
    methods = {"max": Max(), "percentile99.99": Percentile(99.99), "entropy": Entropy(), "mse": MSE()}
    for method_name, method in methods.items():
        for scheme in ("affine", "symmetric"):
            for granularity in ("per_channel", "per_tensor"):
                activation = TensorSpec("uint8" if scheme == "affine" else "int8", scheme, method=method)
                weight = TensorSpec("int8", "symmetric", PerChannel(0) if granularity == "per_channel" else PerTensor())
                yield f"{method_name} {scheme} {granularity}", QuantConfig(activation=activation, weight=weight)


def evaluate(compiled, images, labels) -> tuple[float, np.ndarray]:
    preds = []
    for start in range(0, len(images), EVAL_BATCH):
        logits = compiled(images[start : start + EVAL_BATCH])
        preds.append(np.argmax(logits, axis=1))
    preds = np.concatenate(preds)
    return float(np.mean(preds == labels) * 100), preds


BIT_WIDTHS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


def bit_width_rows(model, calib, test_x, test_y, fp32_acc, fp32_pred):
    import dataclasses

    rows = []
    for label, (weight_bits, activation_bits) in BIT_WIDTHS.items():
        for bias_correction in (False, True):
            base = QuantConfig(bias_correction=bias_correction)
            config = base.replace(
                weight=dataclasses.replace(base.weight, bits=weight_bits),
                activation=dataclasses.replace(base.activation, bits=activation_bits),
            )
            start = time.time()
            qmodel = tvmquant.quantize(model, config, calib, progress=False, report_batches=0)
            seconds = time.time() - start
            acc, pred = evaluate(qmodel.rebatch(EVAL_BATCH).compile(mode="int8"), test_x, test_y)
            row = {
                "name": f"tvmquant {label} PTQ" + (" + bias correction" if bias_correction else ""),
                "weight_bits": weight_bits,
                "activation_bits": activation_bits,
                "bias_correction": bias_correction,
                "accuracy": acc,
                "delta": acc - fp32_acc,
                "agreement": float(np.mean(pred == fp32_pred) * 100),
                "quantize_seconds": round(seconds, 2),
            }
            rows.append(row)
            print(f"{row['name']:<44} {acc:6.2f}% ({row['delta']:+.2f})  agree {row['agreement']:.2f}%", flush=True)
    return rows


def main():
    bits_mode = "--bits" in sys.argv[1:]
    calib, _, _ = load_fmnist_example()
    test_x, test_y = load_fashion_mnist("test")
    model = fmnist_model_path()
    rows = []
    default = tvmquant.QuantConfig()
    first = tvmquant.quantize(model, default, calib, progress=False, report_batches=0)
    fp32_acc, fp32_pred = evaluate(first.rebatch(EVAL_BATCH).compile(mode="fp32"), test_x, test_y)
    print(f"FP32 accuracy {fp32_acc:.2f}%")
    if bits_mode:
        rows = bit_width_rows(model, calib, test_x, test_y, fp32_acc, fp32_pred)
    for name, config in () if bits_mode else configs():
        start = time.time()
        qmodel = tvmquant.quantize(model, config, calib, progress=False, report_batches=0)
        seconds = time.time() - start
        acc, pred = evaluate(qmodel.rebatch(EVAL_BATCH).compile(mode="int8"), test_x, test_y)
        row = {
            "name": f"tvmquant {name}",
            "accuracy": acc,
            "delta": acc - fp32_acc,
            "agreement": float(np.mean(pred == fp32_pred) * 100),
            "quantize_seconds": round(seconds, 2),
            "default": config == default,
        }
        rows.append(row)
        print(f"{row['name']:<44} {acc:6.2f}% ({row['delta']:+.2f})  agree {row['agreement']:.2f}%")
    for method in () if bits_mode else ("minmax", "percentile"):
        path = ort_quantize(model, calib, method=method)
        logits = ort_predict(path, test_x)
        pred = np.argmax(logits, axis=1)
        acc = float(np.mean(pred == test_y) * 100)
        row = {
            "name": f"onnxruntime quantize_static QDQ {method} per_channel",
            "accuracy": acc,
            "delta": acc - fp32_acc,
            "agreement": float(np.mean(pred == fp32_pred) * 100),
        }
        rows.append(row)
        print(f"{row['name']:<44} {acc:6.2f}% ({row['delta']:+.2f})  agree {row['agreement']:.2f}%")
    result = {
        "model": "tvmquant/examples/fmnist_cnn.onnx",
        "test_images": int(len(test_y)),
        "calibration_images": int(len(calib)),
        "fp32_accuracy": fp32_acc,
        "rows": rows,
        "command": "python bench/accuracy_fmnist.py" + (" --bits" if bits_mode else ""),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    if bits_mode:
        from accuracy_imagenet import machine_info

        result["machine"] = machine_info()
    out = os.path.join(
        os.path.dirname(__file__), "results", "accuracy_fmnist_bits.json" if bits_mode else "accuracy_fmnist.json"
    )
    with open(out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
