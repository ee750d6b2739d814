#!/usr/bin/env bash
# One prepared call for a GPU machine (a lent H100/H200 with 16 cores): build for that GPU, then the GPU check
# (tests that run there + the fwd+bwd table in float32 and bfloat16), then a short CLI run on CUDA.
# Fits one 10-minute command: build ~65 s, check <= 6 min, CLI ~1 min. Results land in $OUT (default
# /tmp/vpfast-gpu): build.log, check.log, check.json, cli.log.
#   usage: bash scripts/gpu_session.sh [arch]      (arch defaults to 9.0: Hopper)
set -uo pipefail
OUT=${OUT:-/tmp/vpfast-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
arch=${1:-9.0}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) python3 -m pip install --no-build-isolation --no-deps -e . \
        >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "build failed"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
timeout 390 python3 -m vpfast.check --device cuda --test-timeout 270 --out "$OUT/check.json" 2>&1 \
    | tee "$OUT/check.log" | tail -60
run=$(mktemp -d)
timeout 120 python3 -m vpfast train --model convlstm --preset small --device cuda --precision bf16-mixed \
    --epochs 1 --train-size 256 --test-size 16 --out "$run" >"$OUT/cli.log" 2>&1
echo "cli train on cuda (bf16-mixed): exit $?"; tail -5 "$OUT/cli.log"
