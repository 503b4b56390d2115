#!/usr/bin/env python3
"""transformers loads folders written by `moeru export` and computes the reference logits.

Usage: python3 tests/interop/check_export.py MOERU_BINARY [RUN_DIR [--checkpoint-only]]
For every committed reference model: `moeru export` it into a temporary folder, load that
folder with transformers (eager attention and experts), and compare its logits on the
reference input with the committed transformers outputs (max |diff| <= 1e-4).
With RUN_DIR (a training run): `moeru export --checkpoint RUN_DIR`, and compare transformers'
logits on the export with `moeru forward` on the checkpoint itself; `--checkpoint-only` skips
the reference models (a tensor/expert-parallel run's checkpoint is checked this way).
"""
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "reference")


def main():
    moeru = sys.argv[1]
    names = sorted(f[:-len(".safetensors")] for f in os.listdir(os.path.join(REFERENCE, "outputs")))
    if "--checkpoint-only" in sys.argv[3:]:
        names = []
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
    if len(sys.argv) > 2:
        failures += not check_checkpoint(moeru, sys.argv[2])
        names.append("checkpoint")
    print(f"{len(names) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


def check_checkpoint(moeru, run):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "exported")
        subprocess.run([moeru, "export", "--checkpoint", run, "--out", out], check=True)
        latest = open(os.path.join(run, "latest")).read().strip()
        model = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager",
            experts_implementation="eager").double().eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, os.path.join(tmp, "in.safetensors"))
        subprocess.run([moeru, "forward", "--model", os.path.join(run, latest), "--input",
                        os.path.join(tmp, "in.safetensors"), "--out", os.path.join(tmp, "out.safetensors")],
                       check=True)
        ours = load_file(os.path.join(tmp, "out.safetensors"))["logits"]
        with torch.no_grad():
            theirs = model(input_ids=ids).logits.float()
        diff = (theirs - ours).abs().max().item()
        ok = diff <= 1e-4
        print(f"{'ok  ' if ok else 'FAIL'} trained checkpoint {run}/{latest}: transformers on the export vs moeru forward, max |logits diff| {diff:.2e}")
        return ok


if __name__ == "__main__":
    main()
