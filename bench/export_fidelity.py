"""QDQ export fidelity: ONNX Runtime running tvmquant's exported QDQ model vs tvmquant's integer model on the same
images (issue 17), with residual adds written as ``Sum`` (the default) and as ``Add`` (``fused_adds=True``, which
ORT fuses into its approximate ``QLinearAdd``). Also the integer module compiled by stock ``tvm.compile``, to tell
export differences from build differences.

Run: ``python bench/export_fidelity.py [--models mobilenet_v2 efficientnet_lite0]``; needs
bench/models/onnx/*.onnx and bench/data/imagenet_eval.npz. Writes ``bench/results/export_fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import tvm

import tvmquant
import tvmquant.target
from tvmquant._io import flatten_outputs
from tvmquant.benchmark import machine_info
from tvmquant.passes.calibrate import compile_vm
from tvmquant.testing.ort import ort_session

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))


def sqnr_db(reference, other) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def main():
    from imagenet_data import preprocess

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    data = np.load(os.path.join(HERE, "data", "imagenet_eval.npz"), allow_pickle=False)
    folder = tempfile.mkdtemp()
    stock_target = tvm.target.Target({"kind": "llvm", "mcpu": tvmquant.target.host_mcpu()})
    result = {"machine": machine_info(), "note": "shared, loaded 2-core machine", "models": {}}
    for name in args.models:
        calib = preprocess(data["calib_u8"][:8], name)
        images = preprocess(data["labelled_u8"][: args.images], name)
        qmodel = tvmquant.quantize(
            os.path.join(HERE, "models", "onnx", f"{name}.onnx"), calib_data=calib, progress=False, report_batches=0
        )
        integer = qmodel.compile()
        stock = compile_vm(qmodel.mod, build=lambda mod, target=None: tvm.compile(mod, target=stock_target))
        row = {}
        for label, fused in (("sum_adds", False), ("fused_adds", True)):
            path = os.path.join(folder, f"{name}_{label}.onnx")
            qmodel.export_onnx(path, fused_adds=fused)
            session = ort_session(path)
            input_name = session.get_inputs()[0].name
            sqnr, agree, max_abs = [], [], []
            for x in images:
                expected = integer(x[None])
                got = session.run(None, {input_name: x[None]})[0]
                sqnr.append(sqnr_db(expected, got))
                agree.append(int(np.argmax(expected) == np.argmax(got)))
                max_abs.append(float(np.max(np.abs(expected - got))))
            row[label] = {"min_sqnr_db": min(sqnr), "top1_agreement": float(np.mean(agree)), "max_abs": max(max_abs)}
        ort_sum = ort_session(os.path.join(folder, f"{name}_sum_adds.onnx"))
        stock_sqnr = []
        for x in images:
            out = flatten_outputs(stock["main"](tvm.runtime.tensor(x[None])))[0]
            stock_sqnr.append(sqnr_db(out, ort_sum.run(None, {ort_sum.get_inputs()[0].name: x[None]})[0]))
        row["stock_tvm_compile_vs_ort_sum_adds_min_sqnr_db"] = min(stock_sqnr)
        result["models"][name] = row
        print(name, json.dumps(row), flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "export_fidelity.json"), "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
