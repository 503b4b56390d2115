#!/usr/bin/env bash
# Issue #7's GPU checks, run on a machine with one NVIDIA GPU (no Rust needed there):
# the parity tests on the GPU in f32 and bf16, then moeru bench against transformers eager.
# Build the binaries first (docs/PERFORMANCE.md, "GPU runs"), then from the repository root:
#   bash scripts/gpu-runs.sh BIN_DIR OUT_DIR [STEPS]
# BIN_DIR holds `moeru` and the test binaries `parity` and `precision` of a --features cuda
# release build.
set -uo pipefail
BIN=$1
OUT=${2:-gpu-out}
STEPS=${3:-10}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
export MOERU_REFERENCE_DIR=$PWD/tests/reference MOERU_TEST_DEVICE=cuda
"$BIN/parity" --test-threads 1 --nocapture 2>&1 | tee "$OUT/parity.log"
"$BIN/precision" --test-threads 1 --nocapture 2>&1 | tee "$OUT/precision.log"
for shape in qwen3-0.6b qwen3-1.7b qwen3-moe-16l; do
  "$BIN/moeru" bench --device cuda --precision bf16 --shape "$shape" --seq-len 4096 \
    --steps "$STEPS" --warmup 3 --json "$OUT/moeru-$shape.json" 2>&1 | tee -a "$OUT/bench.log"
  python3 bench/transformers_bench.py --device cuda --precision bf16 --shape "$shape" \
    --seq-len 4096 --steps "$STEPS" --warmup 3 --json "$OUT/transformers-$shape.json" 2>&1 \
    | tee -a "$OUT/bench.log"
done
