"""Quantization-aware fine-tuning of the bundled Fashion-MNIST CNN: QAT and QAT + LSQ for W8A8, W4A8 and W4A4,
next to the post-training model each starts from, on the full 10k test set.

Each row starts from the PTQ model (max calibration on the 256 bundled calibration images) and fine-tunes it with
``tvmquant.finetune`` on Fashion-MNIST training images: ``QAT`` keeps the calibrated scales and trains the weights
through straight-through fake quantization; ``QAT+LSQ`` also learns the step sizes (per channel for weights) and
the activation zero points. The training runs in TVM (the compiled forward+backward graph), by distillation from
the FP32 model (``--loss``, KL on the softmax by default) or with the labels (``--labels``).

Run: ``python bench/finetune_fmnist.py [--train 60000] [--epochs 1] [--batch 64] [--lr 3e-3]``
(needs ``apt-get install dataset-fashion-mnist``). Writes ``bench/results/finetune_fmnist.json``.
Timings come from a shared, loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import tvmquant  # noqa: E402
from tvmquant.benchmark import machine_info  # noqa: E402
from tvmquant.config import PerChannel, QuantConfig, TensorSpec  # noqa: E402
from tvmquant.examples import fmnist_model_path, load_fashion_mnist, load_fmnist_example  # noqa: E402

EVAL_BATCH = 100


def config(weight_bits: int, activation_bits: int) -> QuantConfig:
    return QuantConfig(
        activation=TensorSpec("uint8", "affine", bits=activation_bits),
        weight=TensorSpec("int8", "symmetric", PerChannel(0), bits=weight_bits),
    )


def evaluate(qmodel, images, labels, mode="int8"):
    compiled = qmodel.rebatch(EVAL_BATCH).compile(mode=mode) if qmodel.batch_size != EVAL_BATCH else None
    compiled = compiled or qmodel.compile(mode=mode)
    preds = np.concatenate(
        [np.argmax(compiled(images[i : i + EVAL_BATCH]), axis=1) for i in range(0, len(images), EVAL_BATCH)]
    )
    return float(np.mean(preds == labels) * 100), preds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60000, help="training images used (of 60,000)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--loss", choices=["kl", "mse"], default="kl")
    parser.add_argument("--labels", action="store_true", help="train with cross-entropy on the labels")
    parser.add_argument("--bits", default="4/4,4/8,8/8", help="W/A bit widths, comma-separated")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "finetune_fmnist.json"))
    args = parser.parse_args(argv)

    calib, _, _ = load_fmnist_example()
    test_x, test_y = load_fashion_mnist("test")
    train_x, train_y = load_fashion_mnist("train")
    order = np.random.default_rng(0).permutation(len(train_x))[: args.train]
    train_x, train_y = train_x[order], train_y[order]
    model = fmnist_model_path()
    first = tvmquant.quantize(model, config(8, 8), calib, progress=False, report_batches=0, batch_size=EVAL_BATCH)
    fp32_acc, fp32_pred = evaluate(first, test_x, test_y, mode="fp32")
    print(f"FP32 accuracy {fp32_acc:.2f}%", flush=True)
    rows = []
    result = {
        "model": "tvmquant/examples/fmnist_cnn.onnx",
        "test_images": int(len(test_y)),
        "train_images": int(len(train_x)),
        "calibration_images": int(len(calib)),
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "loss": "cross_entropy (labels)" if args.labels else f"{args.loss} distillation from FP32",
        "fp32_accuracy": fp32_acc,
        "rows": rows,
        "command": "python bench/finetune_fmnist.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine_info(), "note": "shared, loaded 2-core machine: timings are upper bounds"},
    }

    def write():  # after every row: a long run that stops early keeps what it measured
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)

    def record(name, qmodel, extra):
        acc, pred = evaluate(qmodel, test_x, test_y)
        row = {
            "name": name,
            "accuracy": acc,
            "delta": round(acc - fp32_acc, 2),
            "agreement": float(np.mean(pred == fp32_pred) * 100),
            **extra,
        }
        rows.append(row)
        print(f"{name:<22} {acc:6.2f}% ({row['delta']:+.2f})  agree {row['agreement']:.2f}%  {extra}", flush=True)
        write()

    for bits in args.bits.split(","):
        weight_bits, activation_bits = (int(b) for b in bits.split("/"))
        label = f"W{weight_bits}A{activation_bits}"
        start = time.time()
        ptq = tvmquant.quantize(
            model, config(weight_bits, activation_bits), calib, progress=False, report_batches=0, batch_size=args.batch
        )
        record(f"{label} PTQ", ptq, {"seconds": round(time.time() - start, 1)})
        for learn_scales in (False, True):
            start = time.time()
            tuned = tvmquant.finetune(
                ptq,
                train_x,
                train_y if args.labels else None,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch,
                learn_scales=learn_scales,
                loss=None if args.labels else args.loss,
                progress=False,
                report_batches=0,
            )
            seconds = time.time() - start
            record(
                f"{label} QAT{'+LSQ' if learn_scales else ''}",
                tuned,
                {
                    "finetune_seconds": round(seconds, 1),
                    "steps": tuned.finetune_log["steps"],
                    "loss_per_epoch": [round(v, 5) for v in tuned.finetune_log["loss"]],
                    "seconds_by_part": tuned.finetune_log["seconds"],
                },
            )
    write()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
