"""Tutorial: a transformer (a small BERT encoder) with partial quantization.

Run from the repository root: ``python tutorials/transformer_partial.py`` (a few minutes on 2 cores; needs
``pip install -c <(echo torch==2.13.0) transformers``). Random weights: the point is where INT8 goes, not accuracy.

In a transformer, tvmquant quantizes the matmuls (the projections, the attention products ``Q K^T`` and
``P V``, the MLP) and the residual adds; LayerNorm, Softmax and GELU stay in FP32, between a dequantize and a
quantize. The steps: export to ONNX, quantize, read the summary, keep sensitive layers in FP32 by name, by op
type or automatically, and compare the output SQNR of each choice.
"""

import os
import tempfile

import numpy as np
import torch
from transformers import BertConfig, BertModel

import tvmquant
from tvmquant import AutoSkip, QuantConfig
from tvmquant.quant_math import sqnr_db

SEQ, VOCAB = 16, 512
work = tempfile.mkdtemp(prefix="tvmquant-transformer-")
onnx_path = os.path.join(work, "bert_tiny.onnx")

# 1. A 2-layer, 64-wide BERT, exported with the attention written out (eager) so that it reaches ONNX as MatMul,
#    Softmax and LayerNormalization.
torch.manual_seed(0)
config = BertConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=SEQ,
)
config._attn_implementation = "eager"
bert = BertModel(config).eval()
rng = np.random.default_rng(0)


def tokens(count: int) -> dict:
    ids = rng.integers(1, VOCAB, (count, SEQ), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


example = {name: torch.from_numpy(value) for name, value in tokens(1).items()}
torch.onnx.export(
    bert,
    (example["input_ids"], example["attention_mask"], example["token_type_ids"]),
    onnx_path,
    input_names=["input_ids", "attention_mask", "token_type_ids"],
    output_names=["last_hidden_state", "pooler_output"],
    dynamo=True,
    opset_version=18,
)

# 2. Calibration data: one {input name: array} dict per sample.     CLI: tvmquant quantize bert.onnx --calib ...
calib = [{name: value[i : i + 1] for name, value in tokens(32).items()} for i in range(32)]
evaluation = [{name: value[i : i + 1] for name, value in tokens(8).items()} for i in range(8)]
qmodel = tvmquant.quantize(onnx_path, calib_data=calib, progress=False)
print(qmodel.summary())  # matmul_*, add_*: INT8; LayerNorm, Softmax, GELU are not layers: they stay FP32


def output_sqnr(model) -> float:
    """The worse of the two outputs' SQNR vs FP32, measured by quantize on calibration data (no compile needed).

    With random weights the final LayerNorm's output ``last_hidden_state`` is mostly the embeddings carried by
    the residual stream, so quantization barely shows there; ``pooler_output`` (a dense + tanh of the first
    token) shows it."""
    return min(model.summary().outputs.values())


print(f"everything quantized: worst output SQNR {output_sqnr(qmodel):.1f} dB")

# 3. Keep layers in FP32 by name (tvmquant's, or the ONNX node's as Netron shows it), or by op type.
#    CLI: --skip matmul_0 --skip op:add
by_name = tvmquant.quantize(onnx_path, QuantConfig(skip=("matmul_0",)), calib, progress=False)
by_type = tvmquant.quantize(onnx_path, QuantConfig(skip=("op:add",)), calib, progress=False)
print(f"skip matmul_0: {output_sqnr(by_name):.1f} dB;  skip every add (residuals): {output_sqnr(by_type):.1f} dB")

# 4. Or let AutoSkip keep the most sensitive layers in FP32 until the output SQNR reaches a target.
#    CLI: --auto-skip 45
auto = tvmquant.quantize(
    onnx_path, QuantConfig(auto_skip=AutoSkip(target_sqnr_db=45.0, max_layers=4)), calib, progress=False
)
chosen = [layer.name for layer in auto.layers if layer.reason.startswith("auto")]
kept = [layer.name for layer in auto.layers if not layer.quantized]
print(f"AutoSkip kept {chosen} in FP32: {output_sqnr(auto):.1f} dB")
print(f"  layers in FP32 as a result (adds feeding only FP32 ops stay FP32 too): {kept}")

# 5. Run the chosen model against FP32 on held-out inputs.
int8, fp32 = auto.compile(), auto.compile(mode="fp32")
held_out = np.mean([min(map(sqnr_db, fp32(sample), int8(sample))) for sample in evaluation])
print(f"held-out inputs: INT8 vs FP32, worst output SQNR {held_out:.1f} dB")
auto.save(os.path.join(work, "bert_tiny.tvmq"))
print("wrote", work)
