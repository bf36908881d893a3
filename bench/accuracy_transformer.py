"""Output SQNR of a small transformer encoder block (the one in tests/models.py: LayerNorm, multi-head
attention, GELU MLP) with its matmuls in INT8 and softmax / layer norm / GELU left in FP32.

Run: ``python bench/accuracy_transformer.py``. Writes ``bench/results/accuracy_transformer.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from models import transformer_block  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.config import MSE, Entropy, Max, Percentile, QuantConfig, TensorSpec  # noqa: E402
from tvmquant.quant_math import sqnr_db  # noqa: E402
from tvmquant.testing.ort import ort_quantize, ort_session  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 16, 32)).astype(np.float32)
    evaluation = rng.standard_normal((64, 16, 32)).astype(np.float32)
    model = transformer_block()
    rows = []
    fp32 = None
    for name, method in [
        ("max", Max()),
        ("percentile99.99", Percentile(99.99)),
        ("entropy", Entropy()),
        ("mse", MSE()),
    ]:
        for scheme, dtype in [("affine", "uint8"), ("symmetric", "int8")]:
            config = QuantConfig(activation=TensorSpec(dtype, scheme, method=method))
            qmodel = tvmquant.quantize(model, config, calib, progress=False, report_batches=0)
            if fp32 is None:
                run_fp32 = qmodel.compile(mode="fp32")
                fp32 = np.concatenate([run_fp32(x[None]) for x in evaluation])
                kinds = [layer.op_type for layer in qmodel.layers if layer.quantized]
            run = qmodel.compile()
            out = np.concatenate([run(x[None]) for x in evaluation])
            rows.append({"name": f"tvmquant {name} {scheme}", "output_sqnr_db": round(sqnr_db(fp32, out), 2)})
            print(rows[-1], flush=True)
    path = os.path.join(HERE, "results", "transformer_block.onnx")
    import onnx

    onnx.save(model, path)
    try:
        session = ort_session(ort_quantize(path, calib, "minmax"))
        out = np.concatenate([session.run(None, {"input": x[None]})[0] for x in evaluation])
        rows.append({"name": "onnxruntime quantize_static QDQ minmax", "output_sqnr_db": round(sqnr_db(fp32, out), 2)})
        print(rows[-1])
    finally:
        os.remove(path)
    result = {
        "model": "tests/models.py:transformer_block (seq 16, dim 32, 2 heads)",
        "quantized_ops": sorted(set(kinds)),
        "fp32_ops": ["softmax", "layer_norm", "erf (GELU)"],
        "evaluation_inputs": len(evaluation),
        "rows": rows,
        "command": "python bench/accuracy_transformer.py",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    with open(os.path.join(HERE, "results", "accuracy_transformer.json"), "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
