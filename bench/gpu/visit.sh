#!/usr/bin/env bash
# One GPU-host visit of bench/cuda_int8.py, with TVM's runtime only (no compiler on the GPU host).
#   bash bench/gpu/visit.sh measure   # needs .gpu/p2 (see ../shared/gpu/pack_tvm.sh) and .gpu/pkg.tar.xz
#   bash bench/gpu/visit.sh models    # needs .gpu/p2 and .gpu/models.tar
#   bash bench/gpu/visit.sh profile   # same files: warm re-timing and per-kernel times in place
# Results go to $OUT (the device tool brings that folder back), else to .gpu/out.
set -euo pipefail
mode=${1:?measure or models}
out=${OUT:-.gpu/out}
mkdir -p "$out" /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/p2/whl/*.whl
tar -xJf .gpu/p2/tvm_site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader || true
if [ "$mode" = measure ]; then
  mkdir -p /tmp/pkg && tar -xJf .gpu/pkg.tar.xz -C /tmp/pkg
  python3 -m tvmquant.remote measure /tmp/pkg --out "$out/measurements.json" --budget-s "${BUDGET:-330}" 2>&1 | tail -40
elif [ "$mode" = models ]; then
  mkdir -p /tmp/models && tar -xf .gpu/models.tar -C /tmp/models
  python3 bench/gpu/cuda_models.py /tmp/models "$out/cuda_models.json"
else  # profile: re-time after a warm-up, and per-kernel times in place
  mkdir -p /tmp/models && tar -xf .gpu/models.tar -C /tmp/models
  python3 bench/gpu/profile_cuda.py /tmp/models "$out/profile_cuda.json"
fi
