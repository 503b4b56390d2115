#!/usr/bin/env bash
# Tensor and expert parallelism on the CPU: a mid-size MoE (hidden 256, 4 layers, 8 experts
# top-2, 3 of them MoE) on the smoke corpus, the same global batch of 8 × 128 tokens, 12 steps,
# as 1 rank, dp2, tp2 (SP), dp2·ep2 and tp2·ep2 (SP) on thread ranks. Prints tokens/s (steps
# 3–12) and the share of rank 0's step time spent inside collectives (waiting for the peer
# included), from metrics.jsonl. Needs target/debug/moeru (cargo build -p moeru) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${MOERU:-target/debug/moeru}
out=$(mktemp -d)
steps=12

run() { # name, grad_accum, extra --set arguments...
    local name=$1 accum=$2
    shift 2
    "$bin" train recipes/smoke-tiny-moe.yaml \
        --set model.architecture.hidden_size=256 --set model.architecture.intermediate_size=512 \
        --set model.architecture.moe_intermediate_size=256 \
        --set model.architecture.num_hidden_layers=4 --set model.architecture.num_experts=8 \
        --set model.architecture.num_attention_heads=8 --set model.architecture.num_key_value_heads=4 \
        --set model.architecture.head_dim=32 --set model.architecture.tie_word_embeddings=false \
        --set train.steps=$steps --set train.micro_batch_size=2 --set train.grad_accum="$accum" \
        --set data.seq_len=128 --set data.eval=null --set train.eval_every=0 \
        --set checkpoint.every=0 --set checkpoint.dir="$out/$name/ckpt" \
        --set logging.dir="$out/$name/logs" --set logging.progress=false \
        --set logging.tensorboard=false "$@" >/dev/null 2>&1
    python3 - "$name" "$out/$name/logs/metrics.jsonl" <<'PY'
import json, sys
name, path = sys.argv[1:]
steps = [json.loads(l) for l in open(path) if '"loss"' in l][2:]
secs = [s["tokens"] / s["tokens_per_s"] for s in steps]
comm = [sum(op.get("seconds", 0.0) for g in s.get("comm", {}).values() for op in g.values())
        for s in steps]
tok = sum(s["tokens"] for s in steps) / sum(secs)
share = sum(comm) / sum(secs)
print(f"| {name} | {tok:,.0f} | {1000 * sum(secs) / len(secs):.0f} ms | {100 * share:.0f} % | {steps[-1]['loss']:.4f} |")
PY
}

echo "| layout | tokens/s | step | in collectives | loss at step $steps |"
echo "| --- | --- | --- | --- | --- |"
run one 4
run dp2 2 --set parallel.dp=2
run tp2-sp 4 --set parallel.tp=2 --set parallel.sequence_parallel=true
run dp2-ep2 2 --set parallel.dp=2 --set parallel.ep=2
run tp2-ep2-sp 4 --set parallel.tp=2 --set parallel.ep=2 --set parallel.sequence_parallel=true
rm -rf "$out"
