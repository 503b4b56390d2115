#!/usr/bin/env bash
# Issue #7's GPU checks, on a machine with one NVIDIA GPU (no Rust needed there), most
# important first, inside one deadline so that a lease of 15 device minutes holds them:
#   1. the parity tests on the GPU in f32 (TF32 tolerances) and the bf16 autocast tests, then
#      NCCL's tests, with the collectives on GPU tensors (no host copies, issue #15);
#   2. moeru bench against transformers eager, bf16, seq 4096: a dense and a MoE shape;
#   3. a kernel-by-kernel profile of one moeru step of each (cubecl's profiling log);
#   4. moeru alone on MOERU_ONLY shapes (default qwen3-moe-16l: transformers eager does not fit
#      it at seq 4096; moeru's blocked attention should, docs/PERFORMANCE.md);
#   5. optionally (NCU=1) Nsight Compute's speed-of-light figures for a slice of one step.
# From the repository root, with gpu-bin/ made by scripts/gpu-prepare.sh:
#   bash scripts/gpu-runs.sh gpu-bin OUT_DIR [DEADLINE_S]
# DEVICE=cpu SHAPES=tiny-moe SEQ=64 rehearses it here on the CPU (BIN_DIR from a CPU build).
# Every step's output lands in OUT_DIR/gpu-runs.tgz, repacked after each step (so a run cut
# short still returns what it finished), with the headline figures in OUT_DIR/summary.txt.
set -uo pipefail
BIN_SRC=$1
OUT=${2:-gpu-out}
DEADLINE=${3:-540}
SHAPES=${SHAPES:-"qwen3-1.7b qwen3-moe-12l"}
MOERU_ONLY=${MOERU_ONLY-qwen3-moe-16l}
STEPS=${STEPS:-5}
SEQ=${SEQ:-4096}
DEVICE=${DEVICE:-cuda}
# Autotune benchmarks kernel variants the first time each shape is seen; minimal keeps that
# inside the warm-up steps (CUBECL_AUTOTUNE_LEVEL=balanced is cubecl's default).
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
# NVRTC compiles the kernels at run time; it may sit outside the loader's path, in the CUDA
# toolkit's lib64 or in the nvidia wheels beside torch.
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
libdirs=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib "$site/nvidia" -maxdepth 3 \
  -name 'libnvrtc.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -)
export LD_LIBRARY_PATH=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
W=$(mktemp -d)
BIN=$W/bin
mkdir -p "$BIN"
summary=$W/summary.txt

pack() {
  cp "$summary" "$OUT/summary.txt"
  tar czf "$OUT/gpu-runs.tgz" -C "$W" --exclude bin --exclude '*.raw' .
}
note() { echo "$*" | tee -a "$summary"; }
# step NAME BUDGET_S CMD...: runs CMD for at most BUDGET_S (less if the deadline is nearer),
# logging to NAME.log and its exit status to the summary.
step() {
  local name=$1 budget=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    note "$name: skipped (deadline)"
    return
  fi
  local t0=$SECONDS
  timeout -k 5 "$budget" "$@" >"$W/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - t0)) s (budget $budget s)"
  pack
}

for f in "$BIN_SRC"/*.xz; do
  name=$(basename "$f" .xz)
  xz -dc "$f" >"$BIN/$name" 2>/dev/null ||
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$BIN/$name"
done
chmod +x "$BIN"/*
have() { [ -x "$BIN/$1" ] || { note "$2: skipped (no $1 in $BIN_SRC)"; false; }; }
export MOERU_REFERENCE_DIR=$PWD/tests/reference
if have numerics "parity and bf16 tests"; then
  MOERU_TEST_DEVICE=$DEVICE step numerics 150 "$BIN/numerics" --test-threads 1 --nocapture
  grep -h "test result\|logits vs autocast\|FAILED\|panicked" "$W/numerics.log" |
    sed 's/^/  numerics: /' | tee -a "$summary"
  pack
fi
if have parallel "NCCL and collectives on GPU tensors"; then
  # The device path (issue #15): flat collectives on CUDA tensors without host copies.
  step parallel 60 "$BIN/parallel" nccl:: --test-threads 1 --nocapture
  grep -h "^test \|test result\|panicked" "$W/parallel.log" | sed 's/^/  parallel: /' | tee -a "$summary"
  pack
fi
have moeru "bench and profile" || { note "done in $SECONDS s"; pack; exit 0; }

for shape in $SHAPES; do
  step "moeru-$shape" 120 "$BIN/moeru" bench --device "$DEVICE" --precision bf16 --shape "$shape" \
    --seq-len "$SEQ" --steps "$STEPS" --warmup 2 --json "$W/moeru-$shape.json"
  grep -h "tokens/s\|MFU\|memory\|MoE:" "$W/moeru-$shape.log" | sed "s/^/  moeru $shape: /" | tee -a "$summary"
  step "transformers-$shape" 100 python3 bench/transformers_bench.py --device "$DEVICE" \
    --precision bf16 --shape "$shape" --seq-len "$SEQ" --steps "$STEPS" --warmup 2 \
    --json "$W/transformers-$shape.json"
  grep -h "tokens/s\|MFU\|memory" "$W/transformers-$shape.log" | sed "s/^/  transformers $shape: /" | tee -a "$summary"
  pack
done

# cubecl reads cubecl.toml from the working directory: profiling on for these runs only. They
# follow the timed runs of the same shape, so autotune answers from its cache in target/.
cat >cubecl.toml <<EOF
[profiling.logger]
level = "basic"
file = "$W/kernels.raw"
append = false
EOF
for shape in $SHAPES; do
  step "profile-$shape" 75 "$BIN/moeru" bench --device "$DEVICE" --precision bf16 --shape "$shape" \
    --seq-len "$SEQ" --steps 1 --warmup 1
  python3 bench/kernel_profile.py "$W/kernels.raw" --top 25 --json "$W/kernels-$shape.json" \
    >"$W/kernels-$shape.txt" 2>&1
  head -n 12 "$W/kernels-$shape.txt" | sed "s/^/  kernels $shape: /" | tee -a "$summary"
  rm -f "$W/kernels.raw"
  pack
done
rm -f cubecl.toml

for shape in $MOERU_ONLY; do
  step "moeru-$shape" 120 "$BIN/moeru" bench --device "$DEVICE" --precision bf16 --shape "$shape" \
    --seq-len "$SEQ" --steps "$STEPS" --warmup 2 --json "$W/moeru-$shape.json"
  grep -h "tokens/s\|MFU\|memory\|MoE:\|rror" "$W/moeru-$shape.log" | sed "s/^/  moeru $shape: /" | tee -a "$summary"
  pack
done

if [ "${NCU:-0}" = 1 ]; then
  shape=${SHAPES%% *}
  # One pass per kernel: a slice of the second step (past compilation and autotune).
  step "ncu-$shape" 120 ncu --clock-control none --section SpeedOfLight --launch-skip 3000 \
    --launch-count 150 --csv "$BIN/moeru" bench --device "$DEVICE" --precision bf16 --shape "$shape" \
    --seq-len "$SEQ" --steps 1 --warmup 1
fi
note "done in $SECONDS s"
pack
