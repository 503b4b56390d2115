#!/usr/bin/env python3
"""The same training benchmark as `moeru bench`, run by Hugging Face transformers (eager).

    python3 bench/transformers_bench.py --shape qwen3-0.6b --seq-len 4096 --device cuda \
        --precision bf16 [--steps 10 --warmup 2 --json out.json]

Same shapes (bench/shapes.json), random weights and tokens, AdamW (betas 0.9/0.95, weight
decay 0.1), grad clip 1.0, one micro-batch per step, eager attention and (`--experts`) eager
experts, or another of transformers' experts implementations (`default`: its own choice). bf16
is torch.autocast(bfloat16) over f32 weights, which is what moeru's `precision: bf16` does.
The FLOP count is moeru's (trainer/src/bench.rs), so the figures compare directly; CI checks
that both count the same FLOPs per token.
"""
import argparse
import json
import os
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def active_matmul_params(c):
    h, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    total = c["vocab_size"] * h
    for layer in range(c["num_hidden_layers"]):
        total += 2 * h * q + 2 * h * kv
        moe = c["model_type"] == "qwen3_moe" and layer not in c.get("mlp_only_layers", []) \
            and (layer + 1) % c.get("decoder_sparse_step", 1) == 0
        if moe:
            total += h * c["num_experts"] + c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"]
        else:
            total += 3 * h * c["intermediate_size"]
    return total


def train_flops_per_token(c, seq):
    return 6 * active_matmul_params(c) + 12 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * seq


def peak_tflops(name, precision):
    n = name.upper()
    if "H100" in n and "PCIE" in n:
        bf16 = 756.0
    elif any(k in n for k in ("H100", "H200", "H800", "GH200")):
        bf16 = 989.4
    elif "A100" in n or "A800" in n:
        bf16 = 312.0
    elif "L40S" in n:
        bf16 = 362.0
    else:
        return None
    return bf16 if precision == "bf16" else bf16 / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="bf16")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--experts", default="eager",
                    help="transformers' experts implementation: eager, grouped_mm, batched_mm, or default (leave transformers' own choice)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    with open(os.path.join(HERE, "shapes.json")) as f:
        shapes = json.load(f)
    c = dict(shapes[a.shape])
    moe = c["model_type"] == "qwen3_moe"
    cfg_cls, model_cls = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if moe else (Qwen3Config, Qwen3ForCausalLM)
    kwargs = {k: v for k, v in c.items() if k != "model_type"}
    torch.manual_seed(0)
    config = cfg_cls(**kwargs, attn_implementation="eager")
    if moe:
        if a.experts != "default":
            config.experts_implementation = a.experts
        config.output_router_logits = True
    device = torch.device(a.device)
    model = model_cls(config).to(device=device, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, losses = [], []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, c["vocab_size"], (a.micro_batch_size, a.seq_len), generator=gen).to(device)
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= a.warmup:
            times.append(dt)

    tokens = a.micro_batch_size * a.seq_len
    tokens_per_s = tokens * len(times) / sum(times)
    flops = train_flops_per_token(c, a.seq_len)
    tflops = tokens_per_s * flops / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (torch)"
    peak = a.peak_tflops or peak_tflops(name, a.precision)
    mfu = tflops / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    params = sum(p.numel() for p in model.parameters())
    print(f"transformers {a.shape} on {name}: {params} parameters, seq {a.seq_len} x batch {a.micro_batch_size}, {a.precision}")
    print(f"  {tokens_per_s:.1f} tokens/s ({sum(times) / len(times):.3f} s/step over {len(times)} steps), "
          f"{tflops:.3f} model TFLOP/s ({flops:.3e} FLOPs/token)")
    print(f"  MFU {100 * mfu:.1f}% of {peak} TFLOP/s" if mfu else "  MFU: unknown peak for this device (pass --peak-tflops)")
    if mem is not None:
        print(f"  peak memory {mem / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(impl=f"transformers-{a.experts if moe else 'eager'}", shape=a.shape, device=name, precision=a.precision,
                           seq_len=a.seq_len, micro_batch_size=a.micro_batch_size, steps=len(times),
                           parameters=params, tokens_per_s=tokens_per_s, model_tflops=tflops,
                           flops_per_token=flops, peak_tflops=peak, mfu=mfu, peak_memory_bytes=mem,
                           step_seconds=times, losses=losses), f, indent=2)


if __name__ == "__main__":
    main()
