"""The untuned build path: ResNet-50-style INT8 built by stock ``tvm.compile`` (what ``tvmquant compile`` without
``--db`` did before the one compile path) against tvmquant's INT8 pipeline without a database, in one process.

Run: ``TVM_NUM_THREADS=2 python bench/untuned_compile.py bench/results/untuned_resnet50_<mcpu>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import onnx
import tvm
from tvm import relax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_x86 import resnet50_style  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant.compile import build  # noqa: E402
from tvmquant.target import host_target  # noqa: E402
from tvmquant.threads import request_amx_permission  # noqa: E402


def main(out_path: str) -> None:
    path = os.path.join(tempfile.mkdtemp(), "r50.onnx")
    onnx.save(resnet50_style(), path)
    images = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype("float32")
    qmodel = tvmquant.quantize(path, calib_data=images, progress=False, report_batches=0)
    target = host_target()
    result = {
        "command": "TVM_NUM_THREADS=" + os.environ.get("TVM_NUM_THREADS", "") + " python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "target": str(target)},
    }
    for name, make in (
        ("stock_tvm_compile", lambda: tvm.compile(qmodel.mod, target=target)),
        ("int8_pipeline_no_db", lambda: build(qmodel.mod, target)),
    ):
        start = time.time()
        executable = make()
        compile_s = time.time() - start
        request_amx_permission()  # AMX kernels on an AMX host need the tile state (a no-op elsewhere)
        vm = relax.VirtualMachine(executable, tvm.cpu())
        data = tvm.runtime.tensor(np.zeros(qmodel.inputs[0].shape, qmodel.inputs[0].dtype))
        vm["main"](data)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            vm["main"](data)
            runs.append((time.perf_counter() - start) * 1e3)
        result[name] = {"compile_s": round(compile_s, 1), "ms_runs": [round(r, 1) for r in runs]}
        result[name]["ms_median"] = sorted(result[name]["ms_runs"])[1]
        print(name, result[name], flush=True)
    result["speedup"] = round(result["stock_tvm_compile"]["ms_median"] / result["int8_pipeline_no_db"]["ms_median"], 1)
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "untuned_resnet50.json")
