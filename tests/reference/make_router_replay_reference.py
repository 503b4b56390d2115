#!/usr/bin/env python3
"""Forced-route MoE forwards from transformers: the router-replay oracle.

Run from the repository root:  python3 tests/reference/make_router_replay_reference.py
Needs torch, transformers 5.x and safetensors. For qwen3-moe-mixed (norm_topk_prob off) and
qwen3-moe-norm-sharded (norm on), on fixed ids, transformers' `Qwen3MoeTopKRouter.forward` is
patched so that about one token slot in five goes to its (k+1)-th best expert instead of its
k-th (router replay's selection), the weights taken from the live softmax over the chosen
experts, renormalised when `norm_topk_prob` (as moeru's replay does). The routes each layer
used, the logits, the mean next-token loss (labels = ids, no aux loss) and every parameter's
gradient, the router's included, go to tests/reference/router_replay/<model>.safetensors:
  input_ids [2, 9]; routes.<layer> [tokens, k] (i64); forced.<layer> [tokens] (1: moved);
  logits; loss; grad.<name>
"""
import os

import torch
from safetensors.torch import save_file
from transformers import Qwen3MoeForCausalLM
from transformers.models.qwen3_moe import modeling_qwen3_moe as qm

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ["qwen3-moe-mixed", "qwen3-moe-norm-sharded"]


def forced_router(recorded, generator):
    """A `Qwen3MoeTopKRouter.forward` that moves ~20% of token slots to the next-best expert
    and records, per router, the experts used."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        probs = torch.softmax(logits, dtype=torch.float64, dim=-1)
        order = torch.argsort(probs.detach(), dim=-1, descending=True)
        idx = order[:, : self.top_k].clone()
        moved = torch.rand(idx.shape[0], generator=generator) < 0.2
        idx[moved, self.top_k - 1] = order[moved, self.top_k]
        value = probs.gather(1, idx)
        if self.norm_topk_prob:
            value = value / value.sum(dim=-1, keepdim=True)
        recorded.append((idx, moved))
        return logits, value.to(logits.dtype), idx

    return forward


def make(name):
    model = Qwen3MoeForCausalLM.from_pretrained(
        os.path.join(HERE, "models", name), dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager").double()
    model.train()
    g = torch.Generator().manual_seed(20261207)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    recorded = []
    original = qm.Qwen3MoeTopKRouter.forward
    qm.Qwen3MoeTopKRouter.forward = forced_router(recorded, g)
    try:
        out = model(input_ids=ids, labels=ids)
    finally:
        qm.Qwen3MoeTopKRouter.forward = original
    model.zero_grad()
    out.loss.backward()
    layers = [i for i, layer in enumerate(model.model.layers)
              if isinstance(layer.mlp, qm.Qwen3MoeSparseMoeBlock)]
    assert len(layers) == len(recorded), (layers, len(recorded))
    res = {"input_ids": ids, "logits": out.logits.detach(), "loss": out.loss.detach().reshape(1)}
    for layer, (idx, moved) in zip(layers, recorded):
        res[f"routes.{layer}"] = idx
        res[f"forced.{layer}"] = moved.long()
        print(f"{name} layer {layer}: {int(moved.sum())} of {len(moved)} tokens moved")
    for pname, p in model.named_parameters():
        res[f"grad.{pname}"] = p.grad.detach().clone()
    res = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in res.items()}
    path = os.path.join(HERE, "router_replay", f"{name}.safetensors")
    save_file(res, path)
    print(f"wrote {path}: loss {out.loss.item():.9f}")


def main():
    os.makedirs(os.path.join(HERE, "router_replay"), exist_ok=True)
    for name in MODELS:
        make(name)


if __name__ == "__main__":
    main()
