#!/usr/bin/env python3
"""Generation speed, prefill and decode separately: transformers' `generate` against
`moeru generate --timing` on the same model, the same prompts and the same thread count.

    python3 bench/transformers_generate_bench.py --model recipes/smoke/base --threads 2 \
        --batch 1 16 --prompt-len 64 --new-tokens 64 --moeru target/debug/moeru

Greedy, no EOS (every row runs to --new-tokens; asserted), f32, random prompt ids (seeded), left-aligned
full rows. Prefill is the time to the first token (the prompt forward and its argmax); decode
is the time from the first token to the last, `new_tokens - 1` forwards of the whole batch, as
tokens/s = batch x (new_tokens - 1) / decode seconds. transformers' times come from a logits
processor, which it calls once per step right after the step's forward; moeru's from its
per-step observer. The median of --repeats runs after three warm-ups is reported.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList


class Clock(LogitsProcessor):
    """Timestamps each step: called after the step's forward, before the token is chosen."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def transformers_run(model, ids, new_tokens):
    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
        )
    end = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens
    # The last step's token is chosen after its clock call; count it in decode like moeru.
    return clock.times[0] - start, end - clock.times[0]


def moeru_run(binary, model_dir, input_path, new_tokens, threads):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.safetensors")
        cmd = [binary, "generate", "--model", model_dir, "--input", input_path, "--out", out,
               "--max-new-tokens", str(new_tokens), "--eos-token-id=-1", "--timing"]
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    t = json.loads(run.stderr.strip().splitlines()[-1])
    assert t["decode_steps"] == new_tokens - 1, t
    return t["prefill_s"], t["decode_s"]


def median_of(fn, repeats, warmups=3):
    # torch's CPU kernels are slow the first time they see a shape (every decode step has a
    # new key length), so one warm-up is not enough.
    for _ in range(warmups):
        fn()
    runs = [fn() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="recipes/smoke/base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--moeru", help="the moeru binary; without it only transformers runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rows = []
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(3, vocab, (b, args.prompt_len), generator=g)
        results = {"transformers": median_of(lambda: transformers_run(model, ids, args.new_tokens), args.repeats)}
        if args.moeru:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "in.safetensors")
                save_file({"input_ids": ids.contiguous(), "attention_mask": torch.ones_like(ids)}, path)
                results["moeru"] = median_of(
                    lambda: moeru_run(args.moeru, args.model, path, args.new_tokens, args.threads), args.repeats)
        for who, (prefill, decode) in results.items():
            row = {
                "who": who, "batch": b, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                "prefill_ms": prefill * 1e3, "prefill_tokens_per_s": b * args.prompt_len / prefill,
                "decode_ms": decode * 1e3,
                "decode_tokens_per_s": b * (args.new_tokens - 1) / decode,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| | batch | prefill ms | prefill tok/s | decode ms | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['who']} | {r['batch']} | {r['prefill_ms']:.1f} | {r['prefill_tokens_per_s']:,.0f} "
              f"| {r['decode_ms']:.1f} | {r['decode_tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
