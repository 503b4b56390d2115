#!/usr/bin/env bash
# Makes the committed assets of the tiny LoRA SFT recipe (recipes/smoke-lora-sft.yaml); rerun
# only to change them:
#   recipes/smoke/base            the smoke model after its 60 pretraining steps, as a
#                                 Hugging Face folder (the frozen base the LoRA recipe tunes)
#   recipes/smoke/data/chat-*     recipes/smoke/chat-*.jsonl prepared with --chat
#   recipes/smoke/data/pairs-*    recipes/smoke/pairs-*.jsonl prepared with --preference (DPO)
# Usage: bash scripts/make-smoke-base.sh [path/to/moeru]   (default: target/debug/moeru)
set -euo pipefail
cd "$(dirname "$0")/.."
moeru="${1:-target/debug/moeru}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$moeru" train recipes/smoke-tiny-moe.yaml --set "checkpoint.dir=$work/run" \
  --set "logging.dir=$work/logs" --set logging.progress=false
rm -rf recipes/smoke/base
"$moeru" export --checkpoint "$work/run" --out recipes/smoke/base
cp recipes/smoke/tokenizer.json recipes/smoke/base/
for split in train eval; do
  rm -rf "recipes/smoke/data/chat-$split"
  "$moeru" data prepare --quiet --chat --tokenizer recipes/smoke/tokenizer.json \
    --input "recipes/smoke/chat-$split.jsonl" --output "recipes/smoke/data/chat-$split"
done
for split in train eval; do
  rm -rf "recipes/smoke/data/pairs-$split"
  "$moeru" data prepare --quiet --preference --tokenizer recipes/smoke/tokenizer.json \
    --input "recipes/smoke/pairs-$split.jsonl" --output "recipes/smoke/data/pairs-$split"
done
