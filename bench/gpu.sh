#!/usr/bin/env bash
# Every check and table that needs a CUDA GPU, in one call, on a machine with torch and triton
# but no Ray and no moefleet install (as the lent GPU machines are):
#   1. the GPU parity tests (Triton kernel, HF checkpoints through it, gating and the engine on
#      CUDA) with the committed launch configs;
#   2. bench/tune_kernels.py on this GPU (writes its records into launch_configs.json);
#   3. the kernel parity tests again, with the tuned configs;
#   4. bench/swiglu_kernels.py --device cuda: the GPU table for bench/RESULTS.md;
#   5. the whole unit suite with CUDA visible (files that need Ray fail to collect there).
# Logs and the tuned table go to $OUT (default /tmp/moefleet-gpu).
#
# Usage: bench/gpu.sh [--quick]    (--quick: the smaller tuning grid)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moefleet-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}

# Import `moefleet` from this checkout without installing it: the package's folders, linked
# under their import names (pyproject.toml's package-dir).
pkg=$(mktemp -d)
mkdir -p "$pkg/moefleet"
for d in client cluster experts hf protos router sim; do ln -s "$PWD/$d" "$pkg/moefleet/$d"; done
ln -s "$PWD/deploy/serve" "$pkg/moefleet/serve"
export PYTHONPATH="$pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
parity=(tests/unit/test_kernels.py tests/unit/test_checkpoint.py tests/unit/test_gating.py
        tests/unit/test_engine.py)

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
$PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, torch.cuda.get_device_name(), torch.get_num_threads(), 'threads')"

step "1. GPU parity, committed launch configs"
$PY -m pytest -p no:cacheprovider -q -m gpu "${parity[@]}" 2>&1 | tee "$OUT/parity_before.log" | tail -5

step "2. tuning the launch configs on this GPU"
timeout 300 $PY bench/tune_kernels.py "$@" 2>&1 | tee "$OUT/tune.log"
cp experts/kernels/launch_configs.json "$OUT/"

step "3. kernel parity, tuned launch configs"
$PY -m pytest -p no:cacheprovider -q -m gpu tests/unit/test_kernels.py 2>&1 \
    | tee "$OUT/parity_after.log" | tail -3

step "4. the GPU kernel table"
$PY bench/swiglu_kernels.py --device cuda 2>&1 | tee "$OUT/kernels.md"

step "5. the unit suite with CUDA visible"
timeout 300 $PY -m pytest -p no:cacheprovider -q -m unit --continue-on-collection-errors tests/unit \
    > "$OUT/unit.log" 2>&1
tail -15 "$OUT/unit.log"
step "done"
