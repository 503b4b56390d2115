#!/usr/bin/env bash
# Builds what scripts/gpu-runs.sh needs on a GPU machine (which has no Rust): the cuda release
# binary, the `numerics` test binary (parity and bf16 tests) and moeru-parallel's unit tests
# (NCCL, and its collectives on GPU tensors), stripped and xz-compressed into gpu-bin/
# (ignored by git). Checks that they fit the device tool's carry with the working tree, that
# they need no shared library the GPU image may lack, and no newer glibc than it has.
#   bash scripts/gpu-prepare.sh            # ~30 min from clean on 2 cores, then incremental
# Then carry gpu-bin and run `bash scripts/gpu-runs.sh gpu-bin "$OUT"` there.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
CARRY_LIMIT=$((64 * 1024 * 1024))
# The GPU image's glibc (Ubuntu 24.04); a binary needing newer symbols would not start there.
GLIBC_THERE=${GLIBC_THERE:-2.39}

# Once per machine: rewriting the LLVM stand-in would make cargo rebuild the cubecl stack.
if ! ls "${XDG_DATA_HOME:-$HOME/.local/share}"/tracel/tracel-llvm-*/bin/llvm-config >/dev/null 2>&1; then
  sh ../shared/tools/cuda-offline-llvm.sh >/dev/null
fi
cargo build --release --locked -p moeru --features cuda
# Test executables by target name: numerics, and moeru_parallel (packed as `parallel`).
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("numerics", "moeru_parallel"):
        print(m["target"]["name"].replace("moeru_", ""), m["executable"])
'
}
tests=$( (cargo test --release --locked -p moeru-tests --features cuda --test numerics \
  --no-run --message-format json
  cargo test --release --locked -p moeru-parallel --features cuda --lib \
  --no-run --message-format json) | executables)

rm -rf gpu-bin gpu-bin-tests
mkdir -p gpu-bin
pack() { # name path
  strip -o "gpu-bin/$1" "$2"
  local needed
  needed=$(objdump -p "gpu-bin/$1" | awk '/NEEDED/ {print $2}' | tr '\n' ' ')
  for lib in $needed; do
    case $lib in
      libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|libgcc_s.so.*|ld-linux*|libstdc++.so.*|libz.so.*|libzstd.so.*) ;;
      *) echo "error: gpu-bin/$1 needs $lib, which the GPU image may lack" >&2; exit 1 ;;
    esac
  done
  local glibc
  glibc=$(objdump -T "gpu-bin/$1" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
  if [ "$(printf '%s\n%s\n' "$glibc" "$GLIBC_THERE" | sort -V | tail -n 1)" != "$GLIBC_THERE" ]; then
    echo "error: gpu-bin/$1 needs glibc $glibc, the GPU image has $GLIBC_THERE" >&2
    exit 1
  fi
  # The x86 branch filter and preset 9e take ~8 % off plain -6 (~1 min per binary).
  xz -T1 --x86 --lzma2=preset=9e -f "gpu-bin/$1"
  echo "gpu-bin/$1.xz: $(du -b "gpu-bin/$1.xz" | cut -f1) bytes (from $(du -b "$2" | cut -f1)); needs $needed; glibc $glibc"
}
pack moeru "$CARGO_TARGET_DIR/release/moeru"
while read -r name path; do pack "$name" "$path"; done <<<"$tests"

tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s}')
bins=$(du -cb gpu-bin/*.xz | tail -n 1 | cut -f1)
echo "carry: working tree $tree + gpu-bin $bins = $((tree + bins)) of $CARRY_LIMIT bytes"
if [ $((tree + bins)) -gt $CARRY_LIMIT ]; then
  # gpu-runs.sh skips the steps whose binary is absent, so two calls can share the work.
  mkdir -p gpu-bin-tests
  mv gpu-bin/numerics.xz gpu-bin-tests/
  echo "over the carry limit together: run gpu-runs.sh twice, carrying gpu-bin (bench, profile)"
  echo "and then gpu-bin-tests (parity) while the machine is still warm"
fi
