#!/usr/bin/env python3
"""Greedy generation of transformers on the tiny reference models, for moeru's generation test.

Run from the repository root:  python3 tests/reference/make_generation_reference.py
Needs torch, transformers (5.x), peft and safetensors; reads tests/reference/models/<name>/ (made by
make_reference.py) and writes tests/reference/generation/<name>.safetensors (and lora-<adapter>.safetensors for the
base models with a peft adapter of tests/reference/lora/ applied) with
  input_ids, attention_mask  [3, 7] I64: prompts of 5, 3 and 7 tokens, left-padded with 0 (fixed
                             ones, or seeded random ones where those lack the margin below)
  eos                        [1] I64: the stop id, chosen so that row 0 stops early (after a few
                             tokens where it does not repeat one)
  sequences                  [3, 7 + n] I64: generate(do_sample=False, max_new_tokens=10)
  scores                     [n, 3, vocab] F32: the logits each step chose from
The model runs in float64 (sdpa attention: eager attention returns NaN for fully masked pad
rows in float64), and the script makes sure that every chosen token beats the runner-up by more
than 1e-3, so f32 rounding in moeru cannot flip a token.
"""
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
# Base models with a peft adapter of tests/reference/lora/ (made by make_lora_reference.py),
# written as generation/lora-<adapter>.safetensors.
ADAPTERS = {"dense-tied-rslora": "qwen3-dense-tied", "moe-mixed-experts-router": "qwen3-moe-mixed"}
MODELS = ["qwen3-dense-tied", "qwen3-dense-kv1-bf16", "qwen3-moe-mixed", "qwen3-moe-norm-sharded"]
PROMPTS = [[3, 17, 9, 40, 2], [11, 5, 30], [7, 7, 21, 44, 1, 6, 13]]
SEQ, NEW, PAD = 7, 10, 0


def load(name, adapter=None):
    if adapter is not None:
        from peft import PeftModel
        folder = os.path.join(HERE, "lora", adapter)
        return PeftModel.from_pretrained(load(name), folder).double().eval()
    path = os.path.join(HERE, "models", name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, attn_implementation="sdpa",
            experts_implementation="eager")
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, attn_implementation="sdpa")
    return model.eval()


def generate(model, ids, mask, eos):
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=eos,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def prompts(attempt, vocab):
    """The fixed prompts, or for a later attempt random ones of the same lengths."""
    if attempt == 0:
        return PROMPTS
    g = torch.Generator().manual_seed(attempt)
    return [torch.randint(1, vocab, (len(p),), generator=g).tolist() for p in PROMPTS]


def margin_ok(scores, sequences, eos):
    """Whether every chosen token beats the runner-up by more than 1e-3."""
    for t in range(scores.shape[0]):
        for r in range(scores.shape[1]):
            if t > 0 and eos in sequences[r, SEQ:SEQ + t].tolist():
                continue  # finished: pad, whatever the logits say
            top = scores[t, r].topk(2).values
            if float(top[0] - top[1]) <= 1e-3:
                return False
    return True


def run(model, attempt):
    rows = prompts(attempt, model.config.vocab_size)
    ids = torch.tensor([[PAD] * (SEQ - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (SEQ - len(p)) + [1] * len(p) for p in rows])
    with torch.no_grad():
        free, _ = generate(model, ids, mask, eos=None)
        row0 = free[0, SEQ:].tolist()
        # A token new to row 0 at step 2 or later, else (a model that repeats) its first.
        eos = next((t for i, t in enumerate(row0) if i >= 2 and t not in row0[:i]), row0[0])
        sequences, scores = generate(model, ids, mask, eos=eos)
    return ids, mask, eos, sequences, scores


def main():
    os.makedirs(os.path.join(HERE, "generation"), exist_ok=True)
    jobs = [(name, name, None) for name in MODELS]
    jobs += [(f"lora-{a}", base, a) for a, base in ADAPTERS.items()]
    for name, base, adapter in jobs:
        model = load(base, adapter)
        for attempt in range(20):
            ids, mask, eos, sequences, scores = run(model, attempt)
            if margin_ok(scores, sequences, eos):
                break
        else:
            raise SystemExit(f"{name}: no prompts with a logit margin of 1e-3 at every step")
        save_file({
            "input_ids": ids.contiguous(),
            "attention_mask": mask.contiguous(),
            "eos": torch.tensor([eos]),
            "sequences": sequences.contiguous(),
            "scores": scores.float().contiguous(),
        }, os.path.join(HERE, "generation", f"{name}.safetensors"))
        print(name, "attempt", attempt, "eos", eos, sequences[:, SEQ:].tolist())


if __name__ == "__main__":
    main()
