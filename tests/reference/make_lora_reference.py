#!/usr/bin/env python3
"""Makes the LoRA reference fixtures with Python peft on the tiny reference models.

Run from the repository root, after make_reference.py:  python3 tests/reference/make_lora_reference.py
Needs torch, transformers (5.x), peft (>= 0.18; made with 0.21) and safetensors. Writes, per case,
  tests/reference/lora/<case>/adapter_config.json, adapter_model.safetensors   (save_pretrained)
  tests/reference/lora/<case>/reference.safetensors   inputs, logits, losses, LoRA gradients and
                                                      peft's merged weights of every adapted tensor
and lora/smoke-base-peft/ (an adapter on recipes/smoke/base that the trainer continues).
The adapter is made by get_peft_model, its A and B then overwritten with seeded random values
(B non-zero, so the adapter changes the output), saved, and loaded back with
PeftModel.from_pretrained: the reference is what peft computes from the files, in float64.

peft with transformers 5 targets Qwen3-MoE's fused experts through `target_parameters`
(ParamWrapper): `gate_proj`/`up_proj`/`down_proj`/`gate` in target_modules are rewritten to the
parameters `gate_up_proj` (rank 2r, alpha 2·alpha), `down_proj` and `gate.weight`.
"""
import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, SEQ = 2, 9
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    # every linear of a dense model, rsLoRA scaling, dropout in the config (eval: not applied)
    "dense-tied-rslora": dict(
        model="qwen3-dense-tied",
        config=dict(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.05, target_modules=ALL)),
    # biases on q/k/v/o, bf16 base weights, per-module rank and alpha patterns
    "dense-kv1-patterns": dict(
        model="qwen3-dense-kv1-bf16",
        config=dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                    rank_pattern={"v_proj": 3},
                    alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 5})),
    # attention, fused experts (both wrappers nested) and the router; layer 0 is dense and, as
    # peft does with transformers 5, gets no MLP adapter
    "moe-mixed-experts-router": dict(
        model="qwen3-moe-mixed",
        config=dict(r=2, lora_alpha=4, target_modules=ALL + ["gate"])),
    # only down_proj of the experts (one wrapper: `experts.lora_A`), o_proj
    "moe-sharded-down": dict(
        model="qwen3-moe-norm-sharded",
        config=dict(r=3, lora_alpha=6, target_modules=["o_proj"],
                    target_parameters=["mlp.experts.down_proj"])),
}


def load_base(name, folder=None):
    return AutoModelForCausalLM.from_pretrained(
        folder or f"tests/reference/models/{name}", dtype=torch.float32,
        attn_implementation="eager", experts_implementation="eager")


def randomize_adapters(model, gen, scale):
    """Seeded random A and B (B non-zero, so the adapter changes the output)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def lora_name(peft_name):
    """peft's in-memory name -> the name in adapter_model.safetensors minus `base_model.model.`."""
    return peft_name.removeprefix("base_model.model.").replace(".default", "")


def sort_config_lists(folder):
    """peft writes target sets in hash order; sorted, the committed file is reproducible."""
    path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(path))
    for key in ("target_modules", "target_parameters"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)
    open(path, "a").write("\n")


def routing_margin(router_logits, k):
    gaps = []
    for logits in router_logits:
        p = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True).values
        gaps.append((p[:, k - 1] - p[:, k]).min().item())
    return min(gaps)


def make(case, spec, gen):
    folder = os.path.join(HERE, "lora", case)
    shutil.rmtree(folder, ignore_errors=True)
    model = get_peft_model(load_base(spec["model"]), LoraConfig(**spec["config"]))
    randomize_adapters(model, gen, 0.2)
    model.save_pretrained(folder)
    os.remove(os.path.join(folder, "README.md"))  # a generated model card, not needed
    sort_config_lists(folder)
    model.eval()  # no dropout: the reference is the deterministic forward
    made = model

    # The reference is what peft computes from the saved files.
    model = PeftModel.from_pretrained(load_base(spec["model"]), folder, is_trainable=True).eval()
    moe = model.config.model_type == "qwen3_moe"
    while True:  # inputs whose top-k routing is nowhere near a tie (deterministic: seeded)
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
        if not moe:
            break
        with torch.no_grad():
            logits = model.double()(input_ids=ids, output_router_logits=True).router_logits
        model.float()
        if routing_margin(logits, model.config.num_experts_per_tok) > 1e-4:
            break
    with torch.no_grad():
        assert torch.equal(made(input_ids=ids).logits, model(input_ids=ids).logits), \
            f"{case}: peft does not reload its own adapter"
    model = model.double().eval()
    out = model(input_ids=ids, labels=ids, output_router_logits=moe)
    ref = {"input_ids": ids, "logits": out.logits}
    if moe:
        k = model.config.num_experts_per_tok
        margin = routing_margin(out.router_logits, k)
        assert margin > 1e-4, f"{case}: top-{k} routing too close to a tie ({margin})"
        lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                               ids[:, 1:].reshape(-1))
        ref["loss"] = lm.reshape(1)
        ref["aux_loss"] = out.aux_loss.reshape(1)
    else:
        ref["loss"] = out.loss.reshape(1)
    ref["total_loss"] = out.loss.reshape(1)
    out.loss.backward()
    grads = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name, f"{case}: {name} is trainable"
            ref["grad." + lora_name(name)] = p.grad
            grads += 1
        else:
            assert p.grad is None, f"{case}: frozen {name} got a gradient"

    # peft's own merge of every adapted tensor, under the base model's names.
    base = dict(load_base(spec["model"]).named_parameters())
    merged = model.merge_and_unload()
    for name, p in merged.named_parameters():
        if not torch.equal(p.detach().float(), base[name].detach()):
            ref["merged." + name] = p

    tensors = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.to(torch.int64)).contiguous().clone()
               for k, v in ref.items()}
    save_file(tensors, os.path.join(folder, "reference.safetensors"),
              metadata={"case": json.dumps(spec)})
    print(f"{case}: loss {ref['total_loss'].item():.6f}, {grads} LoRA gradients, "
          f"{sum(k.startswith('merged.') for k in tensors)} merged tensors")


def make_smoke_adapter():
    """A peft adapter on the smoke base (recipes/smoke/base) for moeru to continue training:
    lora/smoke-base-peft/ with reference.safetensors holding input ids and peft's logits."""
    folder = os.path.join(HERE, "lora", "smoke-base-peft")
    shutil.rmtree(folder, ignore_errors=True)
    gen = torch.Generator().manual_seed(2026)
    base = lambda: load_base(None, "recipes/smoke/base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL)
    model = get_peft_model(base(), config)
    randomize_adapters(model, gen, 0.05)
    model.save_pretrained(folder)
    os.remove(os.path.join(folder, "README.md"))
    sort_config_lists(folder)
    model = PeftModel.from_pretrained(base(), folder).double().eval()
    ids = torch.randint(0, 300, (BATCH, SEQ), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"input_ids": ids.to(torch.int64).contiguous(),
               "logits": logits.to(torch.float32).contiguous()},
              os.path.join(folder, "reference.safetensors"))
    print(f"smoke-base-peft: logits {tuple(logits.shape)}")


def main():
    os.chdir(os.path.join(HERE, "..", ".."))
    gen = torch.Generator().manual_seed(4321)
    torch.manual_seed(4321)
    for case, spec in CASES.items():
        make(case, spec, gen)
    make_smoke_adapter()


if __name__ == "__main__":
    main()
