#!/usr/bin/env bash
# Runs every fuzz target for ITERS iterations from SEED (docs: fuzz/src/lib.rs) and keeps the
# table "target, iterations, ok, errors, panics, seconds" in runs/fuzz-<seed>.txt.
#
#   scripts/fuzz.sh [ITERS=100000] [SEED=1]
#
# New panics' inputs are kept under fuzz/regressions/<target>/ (MOERU_FUZZ_SAVE=1); every
# input is traced to target/fuzz-current-<target>.bin so an abort (a refused allocation over
# 1 GiB) or a hang can be replayed.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS="${1:-100000}"
SEED="${2:-1}"
mkdir -p runs
OUT="runs/fuzz-${SEED}.txt"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
cargo build -p moeru-fuzz --tests --locked
status=0
MOERU_FUZZ_ITERS="$ITERS" MOERU_FUZZ_SEED="$SEED" MOERU_FUZZ_SAVE=1 MOERU_FUZZ_TRACE=1 \
  cargo test -p moeru-fuzz --locked --test fuzz -- --nocapture --test-threads=2 2>&1 \
  | tee "$LOG" || status=$?
{
  echo "# scripts/fuzz.sh $ITERS $SEED  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  printf '%-20s %10s %10s %10s %7s %9s\n' target iterations ok errors panics seconds
  grep '^FUZZ ' "$LOG" | sed 's/^FUZZ //' | sort
  grep -E '^test result|PANIC|still panics|kept ' "$LOG" || true
} > "$OUT"
cat "$OUT"
exit "$status"
