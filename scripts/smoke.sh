#!/usr/bin/env bash
# The smoke job: run a committed tiny Qwen3-MoE on the CPU and print its loss.
# (Until the trainer lands, the smoke job is a forward pass; see README.)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run --quiet -p moeru -- forward \
  --model tests/reference/models/qwen3-moe-mixed \
  --input tests/reference/outputs/qwen3-moe-mixed.safetensors \
  --out "$out/forward.safetensors"
python3 - "$out/forward.safetensors" <<'PY'
import json, struct, sys
# Read the `loss` tensor without third-party packages: safetensors is a JSON header + bytes.
data = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8:8 + n])
start, end = header["loss"]["data_offsets"]
loss = struct.unpack("<f", data[8 + n + start:8 + n + end])[0]
print(f"smoke: tiny Qwen3-MoE forward ok, loss {loss:.6f}")
PY
