"""BERT-base encoder latency on this CPU, side by side in one run (issue 16, item 4).

Batch 1, sequence 128, the encoder of ``bench/models/export_bert.py`` (12 x 768, mean pooling; random weights:
speed does not depend on them), exported with ``torch.onnx.export``. Engines, each at 1 and 2 threads:

``tvm_fp32``
    The FP32 model through tvmquant's x86 pipeline (``tvmquant.schedules.x86.build``), same trial budget.
``tvmquant_static`` / ``tvmquant_dynamic``
    ``tvmquant.quantize`` with the default preset (calibrated on ``--calib`` random token sequences) and with
    the ``dynamic`` preset (per-token activation scales at run time), compiled as libraries.
``ort_fp32`` / ``ort_dynamic`` / ``ort_static``
    ONNX Runtime on the FP32 file, on ``quantize_dynamic`` (per-channel int8 weights) and on
    ``quantize_static`` (QDQ, per-channel, MinMax, the same calibration sequences).
``ov_fp32`` / ``ov_int8``
    OpenVINO on the converted model and on ``nncf.quantize(..., model_type=TRANSFORMER)`` of it (same data).

With ``--trials-per-task N`` (N > 0) the three TVM models are tuned with the same budget per kernel before they
are built (meta-schedule + XGBoost); 0 builds the untuned default schedules. Each library and each ONNX
Runtime / OpenVINO model is timed in a fresh process (``tvmquant.benchmark``). The JSON has the machine (CPU,
``mcpu``, INT8 instruction sets), the latencies and tvmquant's ratios against ONNX Runtime's best INT8.

Run: ``python bench/speed_bert.py [--config bert-base] [--trials-per-task 0] [-o bench/results/speed_bert.json]``.
Needs torch and transformers (``pip install -c <(echo torch==2.13.0) transformers``), openvino + nncf for the
OpenVINO rows (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "models"))


def token_batches(names: list, count: int, seq: int, vocab: int = 30522, seed: int = 0) -> dict:
    """``count`` random sequences (ids in the vocabulary, full attention mask, segment 0)."""
    rng = np.random.default_rng(seed)
    data = {"input_ids": rng.integers(1000, vocab, (count, seq)).astype(np.int64)}
    data["attention_mask"] = np.ones((count, seq), np.int64)
    if "token_type_ids" in names:
        data["token_type_ids"] = np.zeros((count, seq), np.int64)
    return {name: data[name] for name in names}


def openvino_transformer(path: str, calib: dict, folder: str) -> dict:
    """OpenVINO FP32 and NNCF INT8 (``model_type=TRANSFORMER``) IR files of ``path``."""
    import nncf
    import openvino as ov

    model = ov.convert_model(path)
    names = [port.get_any_name() for port in model.inputs]
    count = len(next(iter(calib.values())))
    samples = [{name: calib[name][i : i + 1] for name in names} for i in range(count)]
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=count, model_type=nncf.ModelType.TRANSFORMER)
    paths = {"ov_fp32": os.path.join(folder, "ov_fp32.xml"), "ov_int8": os.path.join(folder, "ov_int8.xml")}
    ov.save_model(model, paths["ov_fp32"])
    ov.save_model(quantized, paths["ov_int8"])
    return paths


def build_library(mod, inputs, target, folder: str, label: str, trials_per_task: int, result: dict) -> str:
    """Tune ``mod`` (when asked), build it with tvmquant's x86 pipeline and write ``label.so``."""
    from tvmquant.library import write_library
    from tvmquant.schedules import x86

    start = time.time()
    tasks = x86.extract_tasks(mod, target)
    db_dir = None
    if trials_per_task > 0:
        db_dir = os.path.join(folder, f"{label}_db")
        x86.tune(mod, target, trials=trials_per_task * len(tasks), db_dir=db_dir, trials_per_task=trials_per_task)
    library = os.path.join(folder, f"{label}.so")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_library(x86.build(mod, target, db_dir=db_dir), mod, library, inputs, target)
    result["build"][label] = {"tasks": len(tasks), "seconds": round(time.time() - start, 1)}
    return library


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bert-base", help="an export_bert config (bert-base, minilm, tiny)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calib", type=int, default=16, help="calibration sequences (static INT8 engines)")
    parser.add_argument("--trials-per-task", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("-o", "--output", default=os.path.join(HERE, "results", "speed_bert.json"))
    args = parser.parse_args(argv)

    import export_bert
    from accuracy_bert import ort_dynamic, ort_static

    import tvmquant
    from tvmquant.api import load_model
    from tvmquant.benchmark import machine_info, time_library, time_onnx, time_openvino
    from tvmquant.config import DYNAMIC
    from tvmquant.schedules import x86

    warnings.simplefilter("ignore")
    folder = tempfile.mkdtemp(prefix="tvmq-bert-speed-")
    path = os.path.join(folder, f"{args.config}.onnx")
    start = time.time()
    export_bert.export(export_bert.build(args.config), path, batch=1, seq=args.seq)
    target = x86.x86_target()
    result = {
        "machine": machine_info(),
        "model": f"{args.config} encoder, batch 1, sequence {args.seq}, mean pooling (random weights)",
        "target": str(target),
        "trials_per_task": args.trials_per_task,
        "calibration": f"{args.calib} random token sequences",
        "build": {},
        "latency_ms": {},
        "notes": [],
    }
    fp32, inputs, _, _ = load_model(path)
    names = [spec.name for spec in inputs]
    calib = token_batches(names, args.calib, args.seq)
    sample = os.path.join(folder, "sample.npz")
    np.savez(sample, **{name: values[:1] for name, values in calib.items()})
    print(f"exported and imported in {time.time() - start:.0f} s", flush=True)

    libraries = {"tvm_fp32": build_library(fp32, inputs, target, folder, "tvm_fp32", args.trials_per_task, result)}
    for label, config, data in (("tvmquant_static", None, calib), ("tvmquant_dynamic", DYNAMIC, None)):
        start = time.time()
        qmodel = tvmquant.quantize(path, config, calib_data=data, progress=False, report_batches=0)
        result["build"][f"{label}_quantize_s"] = round(time.time() - start, 1)
        int8 = sum(layer.quantized for layer in qmodel.layers if layer.op_type == "matmul")
        result["build"][f"{label}_int8_matmuls"] = int8
        libraries[label] = build_library(qmodel.mod, inputs, target, folder, label, args.trials_per_task, result)
        print(f"{label}: built", flush=True)

    onnx_models = {
        "ort_fp32": path,
        "ort_dynamic": ort_dynamic(path, folder),
        "ort_static": ort_static(path, calib, folder),
    }
    openvino = {}
    if not args.no_openvino:
        try:
            openvino = openvino_transformer(path, calib, folder)
        except ImportError as err:
            result["notes"].append(f"OpenVINO rows skipped: openvino/nncf are not installed ({err})")
    timings = result["latency_ms"]
    for threads in (1, 2):
        for label, library in libraries.items():
            timings[f"{label}_{threads}t"] = time_library(library, sample, threads, args.seconds)
        for label, model in onnx_models.items():
            timings[f"{label}_{threads}t"] = time_onnx(model, sample, threads, args.seconds)
        for label, model in openvino.items():
            timings[f"{label}_{threads}t"] = time_openvino(model, sample, threads, args.seconds)
        print(json.dumps({k: round(v, 2) for k, v in timings.items() if k.endswith(f"_{threads}t")}), flush=True)

    ratios = {}
    for threads in (1, 2):
        ort_best = min(timings[f"ort_dynamic_{threads}t"], timings[f"ort_static_{threads}t"])
        best = min(timings[f"tvmquant_static_{threads}t"], timings[f"tvmquant_dynamic_{threads}t"])
        ratios[f"tvmquant_best_vs_ort_best_int8_{threads}t"] = round(ort_best / best, 3)
        for label in ("tvmquant_static", "tvmquant_dynamic"):
            ratios[f"{label}_vs_tvm_fp32_{threads}t"] = round(
                timings[f"tvm_fp32_{threads}t"] / timings[f"{label}_{threads}t"], 3
            )
            ratios[f"{label}_vs_ort_fp32_{threads}t"] = round(
                timings[f"ort_fp32_{threads}t"] / timings[f"{label}_{threads}t"], 3
            )
        if f"ov_int8_{threads}t" in timings:
            ratios[f"tvmquant_best_vs_ov_int8_{threads}t"] = round(timings[f"ov_int8_{threads}t"] / best, 3)
    result["ratios"] = ratios
    result["goal"] = "tvmquant's best INT8 >= 1.3x ONNX Runtime's best INT8 (issue 16)"
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
