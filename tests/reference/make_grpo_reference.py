#!/usr/bin/env python3
"""GRPO losses, gradients, clip metrics and advantages from TRL's own `GRPOTrainer` code.

Run from the repository root:  python3 tests/reference/make_grpo_reference.py
Needs torch, transformers 5.x, safetensors and trl==1.16.0 (pinned: TRL's GRPO defaults move
between versions, e.g. `use_bias_correction_kl`). Writes tests/reference/grpo/grpo.safetensors:
  logps, old, ref, adv, mask              fixed per-token tensors [6, 5] (ragged mask)
  case.<name>.loss / .grad / .<metric>    per loss case: TRL's `_compute_loss` on a stub
  adv.rewards, adv.<mode>, adv.zero_std   advantages for each `scale_rewards` mode
  model.*                                 a tiny MoE chained through the loss: ids, masks,
                                          advantages and every parameter's gradient

Every case sets every option explicitly and is also computed from the formula (the
reproduction below); the script asserts the two agree, so a TRL that renames a private
attribute fails here and the formula stays a second check.
"""
import os
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import trl
from safetensors.torch import save_file
from transformers import Qwen3MoeForCausalLM
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head, nanstd

assert trl.__version__ == "1.16.0", f"pinned to trl 1.16.0, found {trl.__version__}"

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "grpo")
MODEL = os.path.join(HERE, "models", "qwen3-moe-mixed")
B, T = 6, 5
LENGTHS = [5, 3, 1, 4, 2, 5]
METRICS = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"]
# name: (loss_type, beta, epsilon_low, epsilon_high, bias correction, delta, accumulation)
CASES = {
    "grpo": ("grpo", 0.0, 0.2, 0.28, True, None, 1),
    "bnpo": ("bnpo", 0.0, 0.2, 0.28, True, None, 1),
    "dr_grpo": ("dr_grpo", 0.0, 0.2, 0.28, True, None, 1),
    "dapo": ("dapo", 0.0, 0.2, 0.28, True, None, 1),
    "grpo_kl": ("grpo", 0.04, 0.2, 0.28, True, None, 1),
    "bnpo_kl": ("bnpo", 0.04, 0.2, 0.28, True, None, 1),
    "dr_grpo_kl": ("dr_grpo", 0.04, 0.2, 0.28, True, None, 1),
    "dapo_kl": ("dapo", 0.04, 0.2, 0.28, True, None, 1),
    "dapo_kl_plain": ("dapo", 0.04, 0.2, 0.28, False, None, 1),
    "dapo_symmetric": ("dapo", 0.0, 0.2, 0.2, True, None, 1),
    "dapo_delta": ("dapo", 0.0, 0.2, 0.28, True, 1.1, 1),
    "grpo_accum": ("grpo", 0.04, 0.2, 0.28, True, None, 2),
    "bnpo_accum": ("bnpo", 0.04, 0.2, 0.28, True, None, 2),
    "dr_grpo_accum": ("dr_grpo", 0.04, 0.2, 0.28, True, None, 2),
    "dapo_accum": ("dapo", 0.04, 0.2, 0.28, True, None, 2),
}


class Accelerator:
    num_processes = 1
    is_main_process = True
    device = torch.device("cpu")

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t

    def autocast(self):
        return nullcontext()


def stub(case, logps_fn, accumulation, temperature=1.0):
    loss_type, beta, lo, hi, bias, delta, _ = case
    return SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=lo, epsilon_high=hi,
        args=SimpleNamespace(use_bias_correction_kl=bias, delta=delta,
                             steps_per_generation=accumulation),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        accelerator=Accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        max_completion_length=T, temperature=temperature,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=logps_fn)


def tensors():
    g = torch.Generator().manual_seed(20261207)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in LENGTHS], dtype=torch.float64)
    return logps, old, ref, adv, mask


def formula(case, logps, old, ref, adv, mask, rows, num_items):
    """The reproduction: TRL 1.16's token-level loss for one micro-batch of `rows`."""
    loss_type, beta, lo, hi, bias, delta, accum = case
    lp, o, r, a, m = logps[rows], old[rows], ref[rows], adv[rows].unsqueeze(1), mask[rows]
    ratio = torch.exp(lp - o)
    clipped = torch.clamp(ratio, 1 - lo, 1 + hi)
    first = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.min(first * a, clipped * a)
    if beta != 0.0:
        kl = torch.exp(r - lp) - (r - lp) - 1
        per_token = per_token + beta * (kl * ratio if bias else kl)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean() / accum
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1) / accum
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (lp.size(0) * T) / accum
    # dapo: the generation batch's tokens, rescaled to one accumulation window (S = GA).
    return (per_token * m).sum() / num_items


def loss_cases(out):
    logps0, old, ref, adv, mask = tensors()
    for k, v in zip(["logps", "old", "ref", "adv", "mask"], [logps0, old, ref, adv, mask]):
        out[k] = v
    num_items = mask.sum()
    for name, case in CASES.items():
        accum = case[6]
        logps = logps0.clone().requires_grad_(True)
        parts = [list(range(B))] if accum == 1 else [list(range(0, B // 2)), list(range(B // 2, B))]
        total, again = 0.0, 0.0
        metrics = defaultdict(list)
        for rows in parts:
            s = stub(case, lambda *a, rows=rows, **k: (logps[rows], torch.zeros(len(rows), T), None), accum)
            inputs = dict(prompt_ids=torch.zeros(len(rows), 1, dtype=torch.long),
                          prompt_mask=torch.ones(len(rows), 1, dtype=torch.long),
                          completion_ids=torch.zeros(len(rows), T, dtype=torch.long),
                          completion_mask=mask[rows], advantages=adv[rows],
                          old_per_token_logps=old[rows], ref_per_token_logps=ref[rows],
                          num_items_in_batch=num_items)
            total = total + GRPOTrainer._compute_loss(s, None, inputs)
            again = again + formula(case, logps, old, ref, adv, mask, rows, num_items)
            for key, values in s._metrics["train"].items():
                metrics[key].extend(values)
        grad, = torch.autograd.grad(total, logps, retain_graph=True)
        grad_again, = torch.autograd.grad(again, logps)
        assert abs(total.item() - again.item()) < 1e-12, (name, total.item(), again.item())
        assert (grad - grad_again).abs().max() < 1e-12, name
        out[f"case.{name}.loss"] = total.detach().reshape(1)
        out[f"case.{name}.grad"] = grad
        for metric in METRICS:
            if metric in metrics:
                key = metric.replace("/", "_")
                out[f"case.{name}.{key}"] = torch.tensor(metrics[metric], dtype=torch.float64)
        print(f"{name}: loss {total.item():.9f}")


def advantages(rewards, g, mode):
    """TRL 1.16's `sum_then_normalize` advantages (one reward function, weight 1)."""
    grouped = rewards.view(-1, g)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(g)
    if mode in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(g)
    else:
        std = nanstd(rewards).expand_as(rewards)
    a = rewards - mean
    if mode != "none":
        a = a / (std + 1e-4)
    zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(a, nan=0.0), zero


def advantage_cases(out):
    nan = float("nan")
    # 5 groups of 4: plain, zero std, one unscorable row, all unscorable, binary.
    rewards = torch.tensor([0.5, 1.0, -0.25, 2.0,
                            1.0, 1.0, 1.0, 1.0,
                            0.0, nan, 1.0, 1.0,
                            nan, nan, nan, nan,
                            0.0, 1.0, 0.0, 0.0], dtype=torch.float32)
    out["adv.rewards"] = rewards
    for mode in ("group", "batch", "none"):
        a, zero = advantages(rewards, 4, mode)
        out[f"adv.{mode}"] = a
        out[f"adv.{mode}.zero_std"] = zero.float()


def model_case(out):
    """Tiny MoE, fixed prompts + completions at temperature 0.7, TRL's fused head and loss,
    backward into every parameter."""
    temperature = 0.7
    model = Qwen3MoeForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager").double()
    model.train()
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    prompt = torch.tensor([[5, 17, 42], [5, 17, 42], [70, 2, 9], [70, 2, 9]])
    completion = torch.tensor([[8, 61, 3, 12], [33, 2, 0, 0], [19, 44, 90, 0], [7, 0, 0, 0]])
    cmask = (torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])).long()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    ids = torch.cat([prompt, completion], 1)
    attn = torch.cat([torch.ones_like(prompt), cmask], 1)
    s = stub(CASES["dapo_kl"], None, 1, temperature)
    s._get_per_token_logps_and_entropies = (
        lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(s, *a, **k))
    with torch.no_grad():
        logps, _, _ = s._get_per_token_logps_and_entropies(model, ids, attn, completion.size(1))
    g = torch.Generator().manual_seed(7)
    old = logps + 0.1 * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    ref = logps + 0.2 * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    inputs = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=completion,
                  completion_mask=cmask, advantages=adv, old_per_token_logps=old,
                  ref_per_token_logps=ref, num_items_in_batch=cmask.sum())
    loss = GRPOTrainer._compute_loss(s, model, inputs)
    model.zero_grad()
    loss.backward()
    out["model.prompt"], out["model.completion"], out["model.mask"] = prompt, completion, cmask
    out["model.adv"], out["model.old"], out["model.ref"] = adv, old, ref
    out["model.logps"] = logps
    out["model.loss"] = loss.detach().reshape(1)
    out["model.temperature"] = torch.tensor([temperature])
    for name, p in model.named_parameters():
        out[f"model.grad.{name}"] = p.grad.detach().clone()
    print(f"model: loss {loss.item():.9f}")


def main():
    os.makedirs(OUT, exist_ok=True)
    out = {}
    loss_cases(out)
    advantage_cases(out)
    model_case(out)
    # Stored in f32 (what the Rust side reads): far below the tolerances compared at.
    out = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in out.items()}
    save_file(out, os.path.join(OUT, "grpo.safetensors"), metadata={"trl": trl.__version__})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
