"""Which transformers encoders tvmquant imports: BERT-base, DistilBERT and a MiniLM-sized BERT (random weights,
built from their configs), exported with torch.onnx.export legacy and dynamo, at batch 1 and 8, sequence 128.

For each: the layers AnnotateQuant finds with the default preset and with dynamic activations (matmuls, of
which attention's activation x activation ones, and adds in INT8). Needs torch and transformers.

Run: ``python bench/bert_import.py [config ...]`` (about 40 minutes on 2 loaded cores). Writes
``bench/results/bert_import.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))


def main():
    import export_bert

    from tvmquant.api import load_model
    from tvmquant.config import DYNAMIC, X86_VNNI
    from tvmquant.passes.annotate import AnnotateQuant, layers_of

    warnings.simplefilter("ignore")
    rows = []
    folder = tempfile.mkdtemp(prefix="bert-import-")
    for config in sys.argv[1:] or ["distilbert", "minilm", "bert-base"]:
        for dynamo in (False, True):
            for batch in (1, 8):
                start = time.time()
                path = os.path.join(folder, f"{config}_{dynamo}_{batch}.onnx")
                export_bert.export(export_bert.build(config), path, batch=batch, dynamo=dynamo)
                mod, inputs, _, _ = load_model(path)
                for kind, quant_config in (("x86_vnni (default)", X86_VNNI), ("dynamic", DYNAMIC)):
                    layers = layers_of(AnnotateQuant(quant_config)(mod))
                    matmuls = [layer for layer in layers if layer.op_type == "matmul"]
                    rows.append(
                        {
                            "config": config,
                            "exporter": "dynamo" if dynamo else "legacy",
                            "batch": batch,
                            "config_kind": kind,
                            "inputs": [spec.to_dict() for spec in inputs],
                            "matmul_layers": len(matmuls),
                            "attention_matmuls": sum(layer.weight is None for layer in matmuls),
                            "int8_matmuls": sum(layer.quantized for layer in matmuls),
                            "int8_adds": sum(layer.quantized for layer in layers if layer.op_type == "add"),
                            "seconds": round(time.time() - start),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                os.remove(path)
    result = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "rows": rows,
        "command": "python bench/bert_import.py",
        "machine": {"platform": platform.platform(), "note": "shared 2-core machine, other jobs running"},
    }
    with open(os.path.join(HERE, "results", "bert_import.json"), "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
