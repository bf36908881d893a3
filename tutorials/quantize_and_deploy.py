"""Tutorial: quantize an ONNX model, inspect it, recover accuracy, tune it and deploy it.

Run from the repository root: ``python tutorials/quantize_and_deploy.py`` (about two minutes on 2 cores).
Every step has a command-line twin, shown in the comments.
"""

import os
import tempfile

import numpy as np

import tvmquant
from tvmquant import AutoSkip, QuantConfig
from tvmquant.examples import fmnist_model_path, load_fmnist_example

work = tempfile.mkdtemp(prefix="tvmquant-tutorial-")

# 1. Calibration data: a few hundred representative inputs, stacked on axis 0 (or an iterable of batches).
calib, test_x, test_y = load_fmnist_example()

# 2. Quantize with the default config (x86 VNNI: uint8 affine activations at the 99.99th percentile,
#    per-channel symmetric int8 weights).      CLI: tvmquant quantize model.onnx --calib calib.npz -o m.tvmq
qmodel = tvmquant.quantize(fmnist_model_path(), calib_data=calib)

# 3. What was quantized, with which scales, and how much signal each tensor keeps.   CLI: tvmquant inspect m.tvmq
print(qmodel.summary())


# 4. Accuracy: the integer model against FP32 on the bundled test images.
def accuracy(run):
    return np.mean([np.argmax(run(x[None])) == y for x, y in zip(test_x[:300], test_y[:300])])


print(f"FP32 {accuracy(qmodel.compile(mode='fp32')):.3f}  INT8 {accuracy(qmodel.compile()):.3f}")

# 5. Not accurate enough? Keep the most sensitive layers in FP32 automatically (or name them in `skip`).
#    CLI: tvmquant quantize ... --auto-skip 40
careful = tvmquant.quantize(fmnist_model_path(), QuantConfig(auto_skip=AutoSkip(target_sqnr_db=40.0)), calib)
print("kept in FP32:", [layer.name for layer in careful.layers if not layer.quantized])

# 6. Tune the INT8 kernels (meta-schedule) into a reusable database, then build a library that TVM's runtime
#    alone can load.   CLI: tvmquant tune m.tvmq --trials 40 --db db && tvmquant compile ...
#    The budget is spread over the model's 10 kernels: 4 measured candidates each here, to keep the tutorial
#    short; give 16 or more per kernel for fast kernels. Meta-schedule's own log goes to db/logs
#    (verbose=True, or `tvmquant tune --verbose`, shows it here too).
from tvmquant.deploy import export_library, load_library  # noqa: E402
from tvmquant.schedules import x86  # noqa: E402

db = os.path.join(work, "db")
x86.tune(qmodel.mod, x86.x86_target(), trials=40, db_dir=db)
export_library(qmodel, os.path.join(work, "model.so"), db=db)
deployed = load_library(os.path.join(work, "model.so"))
print("deployed library agrees with the artifact:", np.array_equal(deployed(test_x[:1]), qmodel.compile()(test_x[:1])))

# 7. Hand the model to ONNX Runtime or TensorRT as standard QDQ ONNX.   CLI: tvmquant export m.tvmq -o q.onnx
qmodel.export_onnx(os.path.join(work, "model_qdq.onnx"))
print("wrote", work)
