#!/usr/bin/env bash
# The smoke job: train the tiny Qwen3-MoE of recipes/smoke-tiny-moe.yaml from scratch on the
# CPU (60 steps), into a fresh run folder under runs/, then show its first and last loss.
set -euo pipefail
cd "$(dirname "$0")/.."
run="runs/smoke-$(date +%Y%m%d-%H%M%S)"
cargo run --quiet -p moeru -- train recipes/smoke-tiny-moe.yaml \
  --set "checkpoint.dir=$run" --set "logging.dir=$run/logs" "$@"
python3 - "$run/logs/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(f"smoke: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
PY
