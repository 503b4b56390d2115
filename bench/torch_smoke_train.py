#!/usr/bin/env python3
"""Training tokens/s of PyTorch eager on the smoke recipe's model, for docs/PERFORMANCE.md.

    python3 bench/torch_smoke_train.py [--threads 2] [--steps 30]

Builds the same Qwen3-MoE as recipes/smoke-tiny-moe.yaml (its `model.architecture`) with
transformers, eager attention and eager experts, and runs AdamW training steps on random
token batches of the recipe's micro_batch_size × seq_len (loss + aux loss, clipping), timing
each step after a warm-up. Compare with moeru's `tokens_per_s` in the run's metrics.jsonl.
"""
import argparse
import statistics
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

# Mirrors recipes/smoke-tiny-moe.yaml (kept by hand; the script fails if transformers rejects it).
ARCH = dict(vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[0], rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
            router_aux_loss_coef=0.01)
BATCH, SEQ = 8, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM._from_config(Qwen3MoeConfig(**ARCH), attn_implementation="eager",
                                             experts_implementation="eager").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, ARCH["vocab_size"], (BATCH, SEQ))
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"torch {torch.__version__} eager, {args.threads} threads: median step {med * 1e3:.1f} ms, "
          f"{BATCH * SEQ / med:.0f} tokens/s ({BATCH}x{SEQ} tokens/step, {args.steps} steps)")


if __name__ == "__main__":
    main()
