"""MobileNetV2 (ImageNet weights) fine-tuned by distillation on its 84 unlabelled calibration images only:
FP32-vs-INT8 top-1 agreement and logit SQNR on the 110 evaluation images before and after, and the wall time of
``tvmquant.finetune`` split into its parts (teacher outputs, compiling the training graph, TVM forward+backward
steps, host optimizer updates).

Prepare once as for ``bench/accuracy_imagenet.py`` (``python bench/models/export_imagenet.py &&
python bench/models/imagenet_data.py``).

Run: ``python bench/finetune_imagenet.py [--epochs 8] [--batch 12] [--loss mse]``: two runs, all parameters at
``lr=1e-4`` and the weights frozen (``train_weights=False``, biases and quantizers) at ``1e-3``; ``--lr LR
[--no-train-weights]`` makes it one run. Writes ``bench/results/finetune_imagenet.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "models"))

from imagenet_data import DEFAULT_OUTPUT, load_imagenet_eval, preprocess  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.benchmark import machine_info  # noqa: E402
from tvmquant.quant_math import sqnr_db  # noqa: E402


def run_all(compiled, images):
    return np.concatenate([np.asarray(compiled(image[None])) for image in images], axis=0)


def measure(qmodel, images, reference):
    logits = run_all(qmodel.compile(mode="int8"), images)
    return {
        "agreement_top1_pct": float(np.mean(np.argmax(logits, 1) == np.argmax(reference, 1)) * 100),
        "logit_sqnr_db": float(sqnr_db(reference, logits)),
    }


#: The fine-tuning configurations compared by default: all parameters at a low rate, and the weights frozen
#: (biases and quantizers only) at the default rate.
RUNS = (
    {"train_weights": True, "lr": 1e-4},
    {"train_weights": False, "lr": 1e-3},
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--onnx-dir", default=os.path.join(HERE, "models", "onnx"))
    parser.add_argument("--data", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, help="one run at this rate (with --no-train-weights: weights frozen)")
    parser.add_argument("--no-train-weights", action="store_true")
    parser.add_argument("--loss", choices=["kl", "mse"], default="mse")
    parser.add_argument("--no-learn-scales", action="store_true")
    parser.add_argument(
        "--flip", action="store_true", help="train on the calibration images and their mirror images (2x the data)"
    )
    parser.add_argument(
        "--depthwise-per-channel",
        action="store_true",
        help="quantize with QuantConfig(depthwise_per_channel=True): per-channel scales at depthwise inputs",
    )
    parser.add_argument("--output", default=os.path.join(HERE, "results", "finetune_imagenet.json"))
    args = parser.parse_args(argv)
    runs = RUNS if args.lr is None else ({"train_weights": not args.no_train_weights, "lr": args.lr},)

    data = load_imagenet_eval(args.data)
    calib = preprocess(data["calib_u8"], args.model)
    agreement = preprocess(data["agreement_u8"], args.model)
    path = os.path.join(args.onnx_dir, f"{args.model}.onnx")
    start = time.time()
    config = tvmquant.QuantConfig(depthwise_per_channel=args.depthwise_per_channel)
    qmodel = tvmquant.quantize(path, config, calib_data=calib, progress=False, report_batches=0)
    quantize_s = time.time() - start
    reference = run_all(qmodel.compile(mode="fp32"), agreement)
    before = measure(qmodel, agreement, reference)
    print(f"before: {before} (quantize {quantize_s:.0f} s)", flush=True)
    train = np.concatenate([calib, calib[..., ::-1]]) if args.flip else calib  # NCHW: W is the last axis
    results = []
    for run in runs:
        start = time.time()
        tuned = tvmquant.finetune(
            qmodel,
            train,
            epochs=args.epochs,
            batch_size=args.batch,
            loss=args.loss,
            learn_scales=not args.no_learn_scales,
            progress=False,
            report_batches=0,
            **run,
        )
        finetune_s = time.time() - start
        after = measure(tuned, agreement, reference)
        print(f"{run}: {after} (finetune {finetune_s:.0f} s: {tuned.finetune_log['seconds']})", flush=True)
        results.append(
            {
                **run,
                "after": after,
                "finetune_wall_seconds": round(finetune_s, 1),
                "finetune_seconds_by_part": tuned.finetune_log["seconds"],
                "steps": tuned.finetune_log["steps"],
                "loss_per_epoch": [round(v, 5) for v in tuned.finetune_log["loss"]],
            }
        )
    result = {
        "model": args.model,
        "config": "default (QuantConfig(): uint8 affine activations, per-channel int8 weights), every conv in INT8"
        + (", per-channel depthwise inputs (depthwise_per_channel=True)" if args.depthwise_per_channel else ""),
        "train_images": int(len(train)),
        "train_data": "the calibration images and their mirror images" if args.flip else "the calibration images",
        "evaluation_images": int(len(agreement)),
        "epochs": args.epochs,
        "batch": args.batch,
        "loss": f"{args.loss} distillation from FP32 (no labels)",
        "learn_scales": not args.no_learn_scales,
        "before": before,
        "runs": results,
        "note": "each run compiles its own training graph (its parameters differ); wall time includes it",
        "command": "python bench/finetune_imagenet.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
    }
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
