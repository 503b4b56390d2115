#!/usr/bin/env python3
"""The bf16 mixed-precision reference: transformers under torch.autocast(bfloat16).

Run from the repository root after make_reference.py:
    python3 tests/reference/make_bf16_reference.py
Writes tests/reference/outputs-bf16/<name>.safetensors (logits, loss, total_loss, gradients)
for every reference model, from the f32 weights and the input ids of outputs/<name>.safetensors.

moeru's `precision: bf16` is autocast's recipe: f32 parameters, bf16 matmuls, f32 norms,
softmax, loss and residual stream. The one change made to transformers here is the router,
which runs in f32 (moeru keeps routing in f32 so expert choice does not depend on bf16
rounding); transformers' own router would take autocast's bf16 logits. And a linear layer's
bias is added after the bf16 matmul has been rounded (burn has no fused bias epilogue), where
torch's addmm rounds once.
"""
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe import modeling_qwen3_moe

HERE = os.path.dirname(os.path.abspath(__file__))

_router_forward = modeling_qwen3_moe.Qwen3MoeTopKRouter.forward


def f32_router(self, hidden_states):
    with torch.autocast("cpu", enabled=False):
        return _router_forward(self, hidden_states.float())


modeling_qwen3_moe.Qwen3MoeTopKRouter.forward = f32_router


def bias_after_matmul(self, x):
    y = F.linear(x, self.weight)
    return y if self.bias is None else y + self.bias.to(y.dtype)


torch.nn.Linear.forward = bias_after_matmul


def make(name):
    folder = os.path.join(HERE, "models", name)
    with safe_open(os.path.join(HERE, "outputs", f"{name}.safetensors"), "pt") as f:
        ids = f.get_tensor("input_ids")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager",
                                                 experts_implementation="eager")
    model.train(False)
    moe = hasattr(model.config, "num_experts")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, output_router_logits=moe)
    result = {"logits": out.logits.float(), "total_loss": out.loss.reshape(1)}
    result["loss"] = out.loss.reshape(1)
    if moe:
        result["aux_loss"] = out.aux_loss.reshape(1)
        result["loss"] = (out.loss - model.config.router_aux_loss_coef * out.aux_loss).reshape(1)
    out.loss.backward()
    for pname, p in model.named_parameters():
        result["grad." + pname] = p.grad
    tensors = {k: v.detach().float().contiguous().clone() for k, v in result.items()}
    os.makedirs(os.path.join(HERE, "outputs-bf16"), exist_ok=True)
    save_file(tensors, os.path.join(HERE, "outputs-bf16", f"{name}.safetensors"))
    print(f"{name}: bf16 loss {result['loss'].item():.6f}, {len(tensors)} tensors")


def main():
    for name in sorted(os.listdir(os.path.join(HERE, "models"))):
        make(name)


if __name__ == "__main__":
    main()
