#!/usr/bin/env bash
# moeru against PyTorch (transformers, eager attention) on this CPU, side by side: ROUNDS
# rounds, each running `moeru bench`, transformers with eager experts and transformers with
# its default experts implementation back to back on the same shape, batch and thread count.
# Prints each round's tokens/s and the median ratio with its spread (min–max over rounds).
#
#   bash scripts/bench-vs-torch.sh [SHAPE=mid-moe] [ROUNDS=3] [STEPS=5]   # after `cargo build`
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${MOERU:-target/debug/moeru}
shape=${1:-mid-moe}
rounds=${2:-3}
steps=${3:-5}
threads=${THREADS:-$(nproc)}
args=(--shape "$shape" --seq-len 128 --micro-batch-size 8 --steps "$steps" --warmup 2 --precision f32)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq 1 "$rounds"); do
  RAYON_NUM_THREADS=$threads "$bin" bench "${args[@]}" --json "$out/moeru-$r.json" >/dev/null
  python3 bench/transformers_bench.py "${args[@]}" --device cpu --threads "$threads" \
    --experts eager --json "$out/eager-$r.json" >/dev/null
  python3 bench/transformers_bench.py "${args[@]}" --device cpu --threads "$threads" \
    --experts default --json "$out/default-$r.json" >/dev/null
done
python3 - "$out" "$rounds" "$shape" <<'PY'
import json, statistics, sys
out, rounds, shape = sys.argv[1], int(sys.argv[2]), sys.argv[3]
load = lambda name, r: json.load(open(f"{out}/{name}-{r}.json"))
rows = []
print(f"{shape}: seq 128 x batch 8, f32; tokens/s per round")
print(f"{'round':>5} {'moeru':>10} {'torch eager':>12} {'torch default':>14} {'rows/routed':>12}")
for r in range(1, rounds + 1):
    m, e, d = load("moeru", r), load("eager", r), load("default", r)
    ratio = m.get("expert_rows_per_routed_row")
    rows.append((m["tokens_per_s"], e["tokens_per_s"], d["tokens_per_s"]))
    print(f"{r:>5} {m['tokens_per_s']:>10.0f} {e['tokens_per_s']:>12.0f} {d['tokens_per_s']:>14.0f} "
          f"{ratio if ratio is None else round(ratio, 3)!s:>12}")
for i, name in [(1, "eager experts"), (2, "default experts")]:
    ratios = [row[0] / row[i] for row in rows]
    print(f"moeru / torch ({name}): median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
PY
