#!/usr/bin/env python3
"""Makes the tiny reference models and their Hugging Face transformers outputs.

Run from the repository root:  python3 tests/reference/make_reference.py
Needs torch, transformers (5.x) and safetensors. Writes
  tests/reference/models/<name>/   a model folder exactly as save_pretrained writes it
  tests/reference/outputs/<name>.safetensors   inputs, logits, losses, gradients
  tests/reference/training/adamw-20-steps.safetensors   a 20-step AdamW run (losses, norms)
The outputs are committed so `cargo test` needs no Python.

The reference is computed in float64 from the f32 (or bf16-upcast) weights, so it is the
exact answer that moeru's f32 computation is compared against.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import (Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, SEQ = 2, 9
# Packed rows: document lengths per row (each row sums to PACKED_SEQ).
PACKED_DOCS = [[4, 3, 5], [7, 5]]
PACKED_SEQ = 12

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, rms_norm_eps=1e-6,
              max_position_embeddings=128, attn_implementation="eager")

MODELS = {
    # dense, tied embeddings, head_dim (16) != hidden / heads (8), 2 kv heads
    "qwen3-dense-tied": dict(
        arch="qwen3", config=dict(COMMON, intermediate_size=48, num_hidden_layers=2,
                                  num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=True, rope_theta=10000.0)),
    # dense, untied, 1 kv head, q/k/v/o biases, stored in bf16
    "qwen3-dense-kv1-bf16": dict(
        arch="qwen3", dtype=torch.bfloat16,
        config=dict(COMMON, intermediate_size=40, num_hidden_layers=2, num_key_value_heads=1,
                    head_dim=8, tie_word_embeddings=False, attention_bias=True,
                    rope_theta=1000000.0)),
    # MoE with a dense first layer (mlp_only_layers), top-2 of 4, norm_topk_prob false
    "qwen3-moe-mixed": dict(
        arch="qwen3_moe",
        config=dict(COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                    num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                    norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1,
                    tie_word_embeddings=False, router_aux_loss_coef=0.05,
                    rope_theta=10000.0)),
    # MoE on every 2nd layer (decoder_sparse_step), top-3 of 6 renormalised, tied, 1 kv head,
    # sharded weights and the older config spellings (num_experts, rope_theta, torch_dtype)
    "qwen3-moe-norm-sharded": dict(
        arch="qwen3_moe", shard="40KB", legacy_spelling=True,
        config=dict(COMMON, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=4,
                    num_key_value_heads=1, head_dim=8, num_experts=6, num_experts_per_tok=3,
                    norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=2,
                    tie_word_embeddings=True, router_aux_loss_coef=0.1,
                    rope_theta=500000.0)),
}


def randomize(model, gen):
    """Weights far from the default init, so every term matters; norms around 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))  # decisive routing
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def legacy_spelling(folder):
    """Rewrite config.json with the pre-5.x key spellings that still circulate."""
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    json.dump(cfg, open(path, "w"), indent=2)


def routing_margin(router_logits, k):
    """Smallest gap between the k-th and (k+1)-th router probability over all tokens."""
    gaps = []
    for logits in router_logits:
        p = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True).values
        gaps.append((p[:, k - 1] - p[:, k]).min().item())
    return min(gaps)


def make(name, spec, gen):
    folder = os.path.join(HERE, "models", name)
    shutil.rmtree(folder, ignore_errors=True)
    moe = spec["arch"] == "qwen3_moe"
    cfg_cls, model_cls = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if moe else (Qwen3Config, Qwen3ForCausalLM)
    model = model_cls(cfg_cls(**spec["config"]))
    randomize(model, gen)
    model.to(spec.get("dtype", torch.float32))
    model.save_pretrained(folder, max_shard_size=spec.get("shard", "5GB"))
    if spec.get("legacy_spelling"):
        legacy_spelling(folder)

    # The reference is what transformers computes from the folder as saved.
    model = model_cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                      experts_implementation="eager")
    model = model.double().eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)

    out = {"input_ids": ids}
    plain = model(input_ids=ids, labels=ids, output_router_logits=False)
    out["logits"] = plain.logits
    out["loss"] = plain.loss.reshape(1)
    model.zero_grad()
    if moe:
        full = model(input_ids=ids, labels=ids, output_router_logits=True)
        k = model.config.num_experts_per_tok
        margin = routing_margin(full.router_logits, k)
        assert margin > 1e-4, f"{name}: top-{k} routing too close to a tie ({margin})"
        out["aux_loss"] = full.aux_loss.reshape(1)
        out["total_loss"] = full.loss.reshape(1)
        counts = [torch.bincount(torch.topk(l, k, dim=-1).indices.reshape(-1),
                                 minlength=model.config.num_experts) for l in full.router_logits]
        out["expert_counts"] = torch.stack(counts).to(torch.int64)
        full.loss.backward()
    else:
        out["total_loss"] = plain.loss.reshape(1).clone()
        plain.loss.backward()
    for pname, p in model.named_parameters():
        out["grad." + pname] = p.grad

    # Packed rows: positions restart per document, no attention across documents. The
    # reference runs each document on its own and concatenates.
    packed_ids, positions, documents, logits = [], [], [], []
    for row in PACKED_DOCS:
        doc_ids = [torch.randint(0, vocab, (1, n), generator=gen) for n in row]
        packed_ids.append(torch.cat(doc_ids, dim=1))
        positions.append(torch.cat([torch.arange(n) for n in row]).unsqueeze(0))
        documents.append(torch.cat([torch.full((n,), d) for d, n in enumerate(row)]).unsqueeze(0))
        with torch.no_grad():
            logits.append(torch.cat([model(input_ids=d).logits for d in doc_ids], dim=1))
    out["packed_input_ids"] = torch.cat(packed_ids)
    out["packed_position_ids"] = torch.cat(positions)
    out["packed_document_ids"] = torch.cat(documents)
    out["packed_logits"] = torch.cat(logits)

    tensors = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.to(torch.int64)).contiguous().clone()
               for k, v in out.items()}
    os.makedirs(os.path.join(HERE, "outputs"), exist_ok=True)
    save_file(tensors, os.path.join(HERE, "outputs", f"{name}.safetensors"))
    print(f"{name}: loss {out['loss'].item():.6f}, {len(tensors)} tensors")


# The optimizer reference: 20 AdamW steps on one reference model, in float32 like moeru.
TRAIN = dict(model="qwen3-moe-mixed", steps=20, micro=2, batch=2, seq=9, lr=2e-3, min_lr=1e-4,
             warmup=3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=0.5, aux_coef=0.05)


def schedule(t, c):
    """moeru's warmup + cosine (docs/RECIPES.md), 0-based step t."""
    import math
    if t < c["warmup"]:
        return c["lr"] * (t + 1) / c["warmup"]
    p = min(1.0, (t - c["warmup"]) / max(1, c["steps"] - c["warmup"]))
    return c["min_lr"] + (c["lr"] - c["min_lr"]) * 0.5 * (1 + math.cos(math.pi * p))


def make_training_reference(gen):
    c = TRAIN
    folder = os.path.join(HERE, "models", c["model"])
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager").train()
    no_decay = lambda n: n.endswith("norm.weight") or n.endswith(".bias")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": c["weight_decay"]},
        {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=c["lr"], betas=c["betas"], eps=c["eps"], foreach=False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (c["steps"], c["micro"], c["batch"], c["seq"]), generator=gen)
    losses, norms, lrs = [], [], []
    targets = c["micro"] * c["batch"] * (c["seq"] - 1)
    for t in range(c["steps"]):
        lr = schedule(t, c)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        step_loss = 0.0
        for m in range(c["micro"]):
            x = ids[t, m]
            out = model(input_ids=x, output_router_logits=True)
            lm = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].reshape(-1, vocab).float(), x[:, 1:].reshape(-1), reduction="sum") / targets
            (lm + c["aux_coef"] * out.aux_loss / c["micro"]).backward()
            step_loss += lm.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip"])
        opt.step()
        losses.append(step_loss)
        norms.append(norm.item())
        lrs.append(lr)
    out = {
        "input_ids": ids.to(torch.int64).contiguous(),
        "loss": torch.tensor(losses, dtype=torch.float64).float(),
        "grad_norm": torch.tensor(norms, dtype=torch.float64).float(),
        "lr": torch.tensor(lrs, dtype=torch.float64).float(),
    }
    save_file(out, os.path.join(HERE, "training", "adamw-20-steps.safetensors"),
              metadata={k: json.dumps(v) for k, v in c.items()})
    print(f"training reference: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def main():
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    for name, spec in MODELS.items():
        make(name, spec, gen)
    os.makedirs(os.path.join(HERE, "training"), exist_ok=True)
    make_training_reference(torch.Generator().manual_seed(99))


if __name__ == "__main__":
    main()
