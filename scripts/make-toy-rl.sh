#!/usr/bin/env bash
# Remakes recipes/toy-rl/sft (committed): the toy GRPO demo's starting policy. Writes the SFT
# rows, prepares them, SFTs recipes/smoke/base with recipes/toy-rl-sft.yaml and exports the
# result; the prompt set recipes/toy-rl/prompts.jsonl is rewritten too (it is deterministic).
#   bash scripts/make-toy-rl.sh [path/to/moeru]
set -euo pipefail
cd "$(dirname "$0")/.."
moeru=${1:-target/release/moeru}
work=runs/toy-rl-sft
rm -rf "$work" recipes/toy-rl/sft
mkdir -p "$work"
python3 recipes/toy-rl/make_toy_rl.py "$work/sft-train.jsonl"
"$moeru" data prepare --tokenizer recipes/smoke/base/tokenizer.json --chat --quiet \
  --input "$work/sft-train.jsonl" --output "$work/data"
"$moeru" train recipes/toy-rl-sft.yaml
"$moeru" export --checkpoint "$work" --out recipes/toy-rl/sft
# The export holds weights and config; the tokenizer is the base model's.
cp recipes/smoke/base/tokenizer.json recipes/toy-rl/sft/
ls -l recipes/toy-rl/sft
