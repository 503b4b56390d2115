#!/usr/bin/env bash
# LoRA versus full fine-tuning of the same model on the CPU: trainable parameters,
# optimizer-state bytes (as `moeru train` reports them at start) and peak RSS of the process.
# The base is a random 8-layer Qwen3-MoE (hidden 512, 8 experts) made here and exported; both
# runs take 3 steps of micro-batch 4 × 256 tokens of the smoke corpus.
# Usage: bash scripts/bench-lora-memory.sh [path/to/moeru]   (default: target/release/moeru)
set -euo pipefail
cd "$(dirname "$0")/.."
moeru="${1:-target/release/moeru}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
arch=(--set model.architecture.hidden_size=512 --set model.architecture.num_hidden_layers=8
  --set model.architecture.num_attention_heads=8 --set model.architecture.num_key_value_heads=4
  --set model.architecture.head_dim=64 --set model.architecture.intermediate_size=1024
  --set model.architecture.moe_intermediate_size=512 --set model.architecture.num_experts=8)
common=(--set logging.progress=false --set logging.tensorboard=false --set train.eval_every=0
  --set data.seq_len=256 --set train.micro_batch_size=4 --set schedule.warmup_steps=0)
"$moeru" train recipes/smoke-tiny-moe.yaml "${arch[@]}" "${common[@]}" --set train.steps=1 \
  --set "checkpoint.dir=$work/init" --set "logging.dir=$work/init/logs" >/dev/null 2>&1
"$moeru" export --checkpoint "$work/init" --out "$work/base" 2>/dev/null
peak() { # runs "$@", prints its report line and peak RSS
  python3 - "$@" <<'PY'
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if p.returncode != 0:
    sys.exit(p.stderr)
line = next(l for l in p.stderr.splitlines() if l.startswith("trainable parameters"))
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"{line}\n  peak RSS {rss:.0f} MiB")
PY
}
for mode in full lora; do
  extra=(--set "model.path=$work/base" --set model.architecture=null)
  if [ "$mode" = lora ]; then
    extra+=(--set lora.rank=16 --set lora.alpha=32)
  fi
  echo "$mode:"
  peak "$moeru" train recipes/smoke-tiny-moe.yaml "${common[@]}" "${extra[@]}" \
    --set train.steps=3 --set "checkpoint.dir=$work/$mode" --set "logging.dir=$work/$mode/logs"
done
