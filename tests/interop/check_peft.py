#!/usr/bin/env python3
"""Python peft loads LoRA adapters written by moeru and computes moeru's logits.

Usage: python3 tests/interop/check_peft.py [DIR]
DIR holds one folder per case, as `cargo run -p moeru-tests --example write_lora -- DIR` writes
them: adapter_config.json + adapter_model.safetensors (moeru's adapter), moeru.safetensors
(input_ids and moeru's logits) and merged/ (`export_merged_hf`). Without DIR the committed
copies in tests/reference/lora/moeru-written/ are checked (they have no merged/).

Per case: PeftModel.from_pretrained on the base model named in adapter_config.json must load
every tensor of the file (none missing, none left over) and give moeru's logits (max |diff|
<= 1e-4); transformers must load merged/ and give the same logits, and its weights must equal
peft's own merge_and_unload (<= 1e-6).
"""
import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager")


def check(case_dir):
    name = os.path.basename(case_dir)
    cfg = json.load(open(os.path.join(case_dir, "adapter_config.json")))
    base_dir = os.path.join(ROOT, cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(load(base_dir), case_dir).double().eval()
    ok = True

    # Every tensor of the file is in the model under peft's in-memory name, and nothing else.
    file = load_file(os.path.join(case_dir, "adapter_model.safetensors"))
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    if set(file) != set(params):
        print(f"FAIL {name}: peft made {sorted(set(params) - set(file))[:3]}..., "
              f"the file has {sorted(set(file) - set(params))[:3]}...")
        return False
    if any(not torch.equal(file[k].double(), params[k].detach()) for k in file):
        print(f"FAIL {name}: peft loaded other values than the file holds")
        return False

    ours = load_file(os.path.join(case_dir, "moeru.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=ours["input_ids"]).logits.float()
    diff = (logits - ours["logits"]).abs().max().item()
    ok &= diff <= 1e-4
    print(f"{'ok  ' if diff <= 1e-4 else 'FAIL'} {name}: peft on moeru's adapter vs moeru, max |logits diff| {diff:.2e}")

    merged_dir = os.path.join(case_dir, "merged")
    if os.path.isdir(merged_dir):
        merged = load(merged_dir).double().eval()
        with torch.no_grad():
            mlogits = merged(input_ids=ours["input_ids"]).logits.float()
        mdiff = (mlogits - ours["logits"]).abs().max().item()
        theirs = dict(model.merge_and_unload().named_parameters())
        wdiff = max((p.detach() - theirs[n].detach()).abs().max().item() for n, p in merged.named_parameters())
        good = mdiff <= 1e-4 and wdiff <= 1e-6
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name}: transformers on moeru's merged export, max |logits diff| "
              f"{mdiff:.2e}, max |weight - peft merge| {wdiff:.2e}")
    return ok


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "reference", "lora", "moeru-written")
    cases = sorted(os.path.join(root, d) for d in os.listdir(root)
                   if os.path.exists(os.path.join(root, d, "adapter_config.json")))
    if not cases:
        sys.exit(f"{root}: no adapters found")
    failures = sum(not check(c) for c in cases)
    print(f"{len(cases) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
