#!/usr/bin/env python3
"""transformers loads folders written by `moeru export` and computes the reference logits.

Usage: python3 tests/interop/check_export.py MOERU_BINARY
For every committed reference model: `moeru export` it into a temporary folder, load that
folder with transformers (eager attention and experts), and compare its logits on the
reference input with the committed transformers outputs (max |diff| <= 1e-4).
"""
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "reference")


def main():
    moeru = sys.argv[1]
    names = sorted(f[:-len(".safetensors")] for f in os.listdir(os.path.join(REFERENCE, "outputs")))
    failures = 0
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "exported")
            subprocess.run([moeru, "export", "--model", os.path.join(REFERENCE, "models", name),
                            "--out", out, "--max-shard-bytes", "60000"], check=True)
            model = AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32, attn_implementation="eager",
                experts_implementation="eager").double().eval()
            refs = load_file(os.path.join(REFERENCE, "outputs", f"{name}.safetensors"))
            with torch.no_grad():
                logits = model(input_ids=refs["input_ids"]).logits.float()
            diff = (logits - refs["logits"]).abs().max().item()
            ok = diff <= 1e-4
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: transformers on moeru's export, max |logits diff| {diff:.2e}")
    print(f"{len(names) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
