#!/usr/bin/env bash
# The training stall of a checkpoint, synchronous against `checkpoint.async`, on a model whose
# save takes several steps' time: a 2-layer MoE with a 32k vocabulary (~31 M parameters, a
# ~370 MB checkpoint of weights and AdamW moments) on short batches, so a step is short and a
# save long. Each mode trains STEPS steps: `none` saves only at the end, `sync` and `async`
# every EVERY steps. Per save the loop logs "training paused X s" (a synchronous save; for an
# asynchronous one the snapshot plus any wait for the save before it). Prints the median step
# time (metrics.jsonl), the median pause per save and its share of a step, how many steps a
# background save took, the run's wall time, and the wall time each save added over `none`
# as a share of a step (this includes steps slowed by the writer sharing the CPU).
#
#   bash scripts/bench-async-checkpoint.sh [STEPS=40] [EVERY=10]   # after `cargo build`
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${MOERU:-target/debug/moeru}
steps=${1:-40}
every=${2:-10}
out=$(mktemp -d "${TMPDIR:-/tmp}/moeru-async-bench.XXXXXX")
trap '[ -n "${KEEP:-}" ] || rm -rf "$out"' EXIT; echo "logs in $out" >&2
printf '%-6s %8s %12s %9s %10s %8s %16s\n' mode "step s" "pause ms" "pause %" "bg steps" "wall s" "wall/save %step"
for mode in none sync async; do
  dir="$out/$mode"
  asynchronous=false every_now=$every
  [ "$mode" = async ] && asynchronous=true
  [ "$mode" = none ] && every_now=0
  start=$(date +%s.%N)
  "$bin" train recipes/smoke-tiny-moe.yaml \
    --set model.architecture.vocab_size=32768 --set model.architecture.hidden_size=512 \
    --set model.architecture.intermediate_size=1024 \
    --set model.architecture.moe_intermediate_size=512 \
    --set model.architecture.num_experts=8 --set model.architecture.num_attention_heads=8 \
    --set model.architecture.num_key_value_heads=4 --set model.architecture.head_dim=64 \
    --set data.seq_len=64 --set train.micro_batch_size=1 --set train.steps="$steps" \
    --set data.eval=null --set train.eval_every=0 \
    --set checkpoint.every="$every_now" --set checkpoint.keep_last=1 \
    --set checkpoint.async="$asynchronous" --set checkpoint.dir="$dir/ckpt" \
    --set logging.dir="$dir/logs" --set logging.progress=false \
    --set logging.tensorboard=false >"$dir.log" 2>&1 || { cat "$dir.log"; exit 1; }
  end=$(date +%s.%N)
  python3 - "$mode" "$dir.log" "$dir/logs/metrics.jsonl" "$start" "$end" "$out/none.wall" <<'PY'
import json, os, re, statistics, sys
mode, log, metrics, start, end, none_wall = sys.argv[1:7]
steps = [r["tokens"] / r["tokens_per_s"] for r in map(json.loads, open(metrics)) if "loss" in r]
step = statistics.median(steps[2:])
wall = float(end) - float(start)
text = open(log).read()
# Pauses of the saves during training; the final one (and the end's wait for it) is left out.
pauses = [float(x) for x in re.findall(r"(?:saved|saving) .*\(training paused ([0-9.]+) s\)", text)][:-1]
background = [float(x) for x in re.findall(r"written in the background in ([0-9.]+) s", text)][:-1]
if mode == "none":
    open(none_wall, "w").write(str(wall))
    print(f"{mode:<6} {step:>8.3f} {'-':>12} {'-':>9} {'-':>10} {wall:>8.1f} {'-':>16}")
    sys.exit()
pause = statistics.median(pauses)
bg = f"{statistics.median(background) / step:.1f}" if background else "-"
per_save = (wall - float(open(none_wall).read())) / len(pauses)
print(f"{mode:<6} {step:>8.3f} {1000 * pause:>12.2f} {100 * pause / step:>8.2f}% {bg:>10} "
      f"{wall:>8.1f} {100 * per_save / step:>15.0f}%")
PY
done
