#!/usr/bin/env python3
"""transformers' sampling warpers on random logits, for moeru's sampling test.

Run from the repository root:  python3 tests/reference/make_sampling_reference.py
Needs torch, transformers (5.x) and safetensors. Writes tests/reference/sampling/warpers.safetensors:
  logits               [8, 64] F32: random logits (some rows with a wide spread, some narrow)
  <case>               [8, 64] F32: the warped logits (-inf where removed) for each case below
and in the file's metadata, <case> = "temperature,top_k,top_p,min_p".
Cases are single warpers and the whole chain in transformers' order, built by transformers'
own `_get_logits_processor`. The script checks that no kept / removed decision sits within
1e-5 of its threshold, so f32 rounding differences cannot flip a token.
"""
import os

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig
from transformers.generation import utils

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS, VOCAB = 8, 64
# name: (temperature, top_k, top_p, min_p); 1.0 / 0 / 1.0 / 0.0 are off.
CASES = {
    "temperature": (0.7, 0, 1.0, 0.0),
    "top_k": (1.0, 5, 1.0, 0.0),
    "top_p": (1.0, 0, 0.8, 0.0),
    "min_p": (1.0, 0, 1.0, 0.1),
    "chain": (0.8, 20, 0.9, 0.05),
    "chain_hot": (1.5, 40, 0.95, 0.02),
}


class Shim(utils.GenerationMixin):
    """Just enough of a model for `_get_logits_processor` (it reads no weights)."""


def processors(temperature, top_k, top_p, min_p):
    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p if min_p > 0 else None)
    return Shim()._get_logits_processor(
        generation_config=cfg, input_ids_seq_length=1, encoder_input_ids=None,
        prefix_allowed_tokens_fn=None, logits_processor=None)


def check_margins(logits, settings):
    """No decision within 1e-5 of its threshold (top-p's cumulative mass, min-p's bar)."""
    temperature, top_k, top_p, min_p = settings
    x = logits / temperature
    if top_k:
        kth = x.topk(top_k).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        cum = x.sort().values.softmax(-1).cumsum(-1)
        assert ((cum - (1 - top_p)).abs() > 1e-5).all(), settings
        x = processors(1.0, 0, top_p, 0.0)(None, x)
    if min_p > 0:
        p = x.softmax(-1)
        bar = min_p * p.amax(-1, keepdim=True)
        assert ((p - bar).abs() > 1e-5 * bar).all(), settings


def main():
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([2.0, 0.5, 1.5, 0.3, 1.0, 3.0, 0.8, 1.2])[:, None]
    logits = torch.randn(ROWS, VOCAB, generator=g) * spread
    out = {"logits": logits.contiguous()}
    meta = {name: ",".join(repr(v) for v in settings) for name, settings in CASES.items()}
    for name, settings in CASES.items():
        check_margins(logits, settings)
        warped = processors(*settings)(None, logits.clone())
        out[name] = warped.contiguous()
        kept = torch.isfinite(warped).sum(-1).tolist()
        print(name, settings, [type(p).__name__ for p in processors(*settings)], "kept", kept)
    os.makedirs(os.path.join(HERE, "sampling"), exist_ok=True)
    save_file(out, os.path.join(HERE, "sampling", "warpers.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
