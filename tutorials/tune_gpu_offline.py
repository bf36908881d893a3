"""Tutorial: tune INT8 kernels for an NVIDIA GPU from a machine that has none.

Run from the repository root: ``python tutorials/tune_gpu_offline.py`` (a few minutes on 2 cores with this
small budget; needs ``nvcc`` here, and TVM's runtime plus a GPU on the GPU host). meta-schedule measures
candidates on the device it tunes for, so the loop is split in three (see ``tvmquant/schedules/offline.py``):

1. here: draw candidate schedules for every kernel, compile them with ``nvcc`` into a *package*;
2. on the GPU host (TVM's runtime only): ``python -m tvmquant.remote measure PACKAGE`` checks every candidate
   against a CPU reference and times it into ``PACKAGE/measurements.json``;
3. here: import the measurements into a tuning database, and compile the model for the GPU with it.

This script runs step 2 itself when this machine has a CUDA GPU; otherwise it prints the command to run on the
GPU host (or set ``TVMQUANT_MEASURED_PACKAGE`` to a package measured there) and compiles with default schedules.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import tvm

import tvmquant
from tvmquant import PRESETS
from tvmquant.examples import fmnist_model_path, load_fmnist_example
from tvmquant.library import export_library

TARGET = "nvidia/nvidia-h100"  # any tag or JSON dict naming the GPU's arch (a bare "cuda" is refused)
work = tempfile.mkdtemp(prefix="tvmquant-gpu-")
package, db = os.path.join(work, "package"), os.path.join(work, "db")

# Signed int8 activations: NVIDIA's int8 tensor cores take int8 x int8 (the x86 default is uint8 activations).
calib, _, _ = load_fmnist_example()
qmodel = tvmquant.quantize(fmnist_model_path(), PRESETS["cuda_int8"], calib[:32], progress=False)

# 1. The package: trials // 8 candidates per kernel (2 here; 8 or more give fast kernels).
#    CLI: tvmquant tune m.tvmq --target nvidia/nvidia-h100 --trials 16 --package package/ --db db/
result = tvmquant.tune(qmodel, target=TARGET, trials=16, package=package, db=db, progress=False)
print(f"package {package}: {result.details['candidates']} candidates for {result.details['tasks']} kernels")

# 2. Measure on the GPU host. The package folder is all it needs (copy it there and back).
measure = [sys.executable, "-m", "tvmquant.remote", "measure", package]
measured = os.environ.get("TVMQUANT_MEASURED_PACKAGE")
if measured:
    shutil.copy(os.path.join(measured, "measurements.json"), package)
elif tvm.cuda(0).exist:
    subprocess.run(measure, check=True, env=dict(os.environ, TVM_USE_RUNTIME_LIB="1"))
else:
    print("no GPU here; on the GPU host run:\n  TVM_USE_RUNTIME_LIB=1 python " + " ".join(measure[1:]))

# 3. Import what was measured (CLI: tvmquant tune m.tvmq --target ... --import package/ --db db/), then build a
#    library for the GPU (CLI: tvmquant compile m.tvmq --target nvidia/nvidia-h100 --db db/ -o model.so).
#    Building for CUDA needs no GPU: the kernels are compiled ahead with nvcc.
if os.path.exists(os.path.join(package, "measurements.json")):
    counts = tvmquant.tune(qmodel, target=TARGET, import_package=package, db=db, progress=False).details
    print(f"imported {counts['correct']} correct schedules for {counts['tuned_tasks']}/{counts['tasks']} kernels")
    metadata = export_library(qmodel, os.path.join(work, "model_cuda.so"), target=TARGET, db=db)
else:
    metadata = export_library(qmodel, os.path.join(work, "model_cuda.so"), target=TARGET)
print(f"wrote {work}/model_cuda.so for {metadata['target']}")
# On the GPU host: tvmquant.deploy.load_library("model_cuda.so", device="cuda") runs it with TVM's runtime alone.
