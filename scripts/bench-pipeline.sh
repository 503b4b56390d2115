#!/usr/bin/env bash
# The pipeline bubble on this CPU, measured: two pipeline ranks as two processes (one core
# each: RAYON_NUM_THREADS=1) train a dense 8-layer model (4 layers a stage, a small vocabulary
# so the head costs little). For each schedule the share of rank 0's step spent blocked in the
# pipeline group's exchanges and sums (`comm.pp` seconds in metrics.jsonl, steps 3..) is printed
# beside 1F1B's ideal (p − 1)/(m + p − 1) and interleaved 1F1B's (p − 1)/(v·m + p − 1).
#
#   bash scripts/bench-pipeline.sh            # after `cargo build`
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${MOERU:-target/debug/moeru}
out=$(mktemp -d)
printf '%-12s %8s %8s %10s\n' "schedule" "m" "ideal" "measured"
for case in "1 1" "1 2" "1 4" "1 8" "2 2" "2 4" "2 8"; do
  read -r v m <<<"$case"
  dir="$out/v$v-m$m"
  RAYON_NUM_THREADS=1 "$bin" launch recipes/smoke-tiny-moe.yaml --nproc-per-node 2 \
    --spawn processes \
    --set parallel.pp=2 --set parallel.pp_virtual="$v" --set train.grad_accum="$m" \
    --set model.architecture.decoder_sparse_step=9 --set model.architecture.num_hidden_layers=8 \
    --set model.architecture.hidden_size=256 --set model.architecture.intermediate_size=768 \
    --set model.architecture.num_attention_heads=8 --set model.architecture.head_dim=32 \
    --set model.architecture.tie_word_embeddings=false \
    --set train.micro_batch_size=8 --set train.steps=10 --set data.eval=null \
    --set train.eval_every=0 --set checkpoint.every=0 --set checkpoint.dir="$dir/ckpt" \
    --set logging.dir="$dir/logs" --set logging.progress=false \
    --set logging.tensorboard=false >"$dir.log" 2>&1 || { cat "$dir.log"; exit 1; }
  python3 - "$dir/logs/metrics.jsonl" "$v" "$m" <<'PY'
import json, sys
path, v, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
steps = [r for r in map(json.loads, open(path)) if "loss" in r][2:]
shares = []
for r in steps:
    step = r["tokens"] / r["tokens_per_s"]
    wait = sum(op["seconds"] for op in r.get("comm", {}).get("pp", {}).values())
    shares.append(wait / step)
ideal = 1 / (v * m + 1)
name = "1F1B" if v == 1 else f"interleaved v{v}"
print(f"{name:<12} {m:>8} {ideal:>8.3f} {sum(shares) / len(shares):>10.3f}")
PY
done
