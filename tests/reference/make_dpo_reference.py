#!/usr/bin/env python3
"""DPO losses, metrics and policy gradients from TRL's own `DPOTrainer._compute_loss`.

Run from the repository root:  python3 tests/reference/make_dpo_reference.py
Needs torch, transformers 5.x, safetensors and trl==1.16.0 (pinned: TRL's DPO defaults and
loss set move between versions). Writes
  tests/reference/dpo/policy/              the policy: qwen3-moe-mixed + 0.02·N(0, 1) (a folder)
  tests/reference/dpo/dpo.safetensors      the pairs, and per case: loss, metrics, grad.*
The reference model is tests/reference/models/qwen3-moe-mixed as committed.

Each case calls TRL 1.16's `_compute_loss` on a stub trainer (only the attributes it reads)
with TRL's collator and fused LM head on float64 models; the MoE aux loss is off, as TRL has
it for a Qwen3-MoE config (`output_router_logits: false`). Two variants TRL removed in 0.29
(cDPO's label smoothing on `sigmoid`, and `reference_free`) are computed from their one-line
formulas (TRL 0.28's `dpo_loss`) on the same log-probs, and checked against TRL where they
coincide (smoothing 0 is TRL's sigmoid).
"""
import os
import shutil
from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import trl
from safetensors.torch import save_file
from transformers import Qwen3MoeForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer, add_fused_lm_head

assert trl.__version__ == "1.16.0", f"pinned to trl 1.16.0, found {trl.__version__}"

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "models", "qwen3-moe-mixed")
OUT = os.path.join(HERE, "dpo")
BETA = 0.1
# Prompts of 3 and 2 tokens; chosen of 2 and 1; rejected of 1 and 3 (unequal lengths, so
# the padding and IPO's length normalisation both matter).
PAIRS = [
    {"prompt_ids": [5, 17, 42], "chosen_ids": [8, 61], "rejected_ids": [33]},
    {"prompt_ids": [70, 2], "chosen_ids": [19], "rejected_ids": [44, 90, 3]},
]
CASES = {
    "sigmoid": dict(loss_type=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0),
    "hinge": dict(loss_type=["hinge"], loss_weights=[1.0], label_smoothing=0.0),
    "ipo": dict(loss_type=["ipo"], loss_weights=[1.0], label_smoothing=0.0),
    "robust": dict(loss_type=["robust"], loss_weights=[1.0], label_smoothing=0.1),
    "sigmoid_ipo": dict(loss_type=["sigmoid", "ipo"], loss_weights=[0.7, 0.3], label_smoothing=0.0),
}
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]


def load(folder):
    m = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                            experts_implementation="eager")
    return m.double()


def make_policy():
    folder = os.path.join(OUT, "policy")
    shutil.rmtree(folder, ignore_errors=True)
    model = Qwen3MoeForCausalLM.from_pretrained(REFERENCE, dtype=torch.float32)
    gen = torch.Generator().manual_seed(20261204)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


class Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, t):
        return t

    def gather(self, t):
        return t

    def unwrap_model(self, m):
        return m


def stub(case, policy, reference, precomputed):
    return SimpleNamespace(
        model=policy, ref_model=reference, accelerator=Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=precomputed, ld_alpha=None, f_divergence_type="reverse_kl",
        loss_types=case["loss_type"], loss_weights=case["loss_weights"], beta=BETA,
        label_smoothing=case["label_smoothing"], use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))


def seq_logps(model, inputs):
    """Σ log p over completion tokens per row, as `_compute_loss` sums them."""
    mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                labels=labels, use_cache=False, fused_lm_head=True)
    return out.log_probs[:, -(mask.size(1) - 1):].sum(dim=1)


def grads_of(model, loss, tag, out):
    model.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        out[f"grad.{tag}.{name}"] = p.grad.detach().clone()


def formula_cases(policy, ref_logps, inputs, out):
    """cDPO (sigmoid with label smoothing ε) and reference-free sigmoid, from TRL 0.28."""
    eps = 0.1
    for tag, ref in [("sigmoid_smooth", ref_logps), ("reference_free", torch.zeros_like(ref_logps))]:
        logps = seq_logps(policy, inputs)
        c, r = (logps - ref).chunk(2)
        z = BETA * (c - r)
        smooth = eps if tag == "sigmoid_smooth" else 0.0
        loss = (-(1 - smooth) * F.logsigmoid(z) - smooth * F.logsigmoid(-z)).mean()
        out[f"loss.{tag}"] = loss.detach().reshape(1)
        grads_of(policy, loss, tag, out)


def main():
    policy_dir = make_policy()
    policy, reference = load(policy_dir), load(REFERENCE)
    policy.train()  # dropout is 0 in these configs; `_compute_loss` reads `model.training`
    reference.eval()
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    collate = DataCollatorForPreference(pad_token_id=0)
    inputs = collate([dict(p) for p in PAIRS])
    out = {k: inputs[k].to(torch.int64) for k in ("input_ids", "attention_mask", "completion_mask")}
    for part in ("prompt_ids", "chosen_ids", "rejected_ids"):
        out[part] = torch.tensor(sum((p[part] for p in PAIRS), []), dtype=torch.int64)
        out[part + ".lens"] = torch.tensor([len(p[part]) for p in PAIRS], dtype=torch.int64)
    with torch.no_grad():
        ref_logps = seq_logps(reference, inputs)
    out["ref_chosen_logps"], out["ref_rejected_logps"] = ref_logps.chunk(2)
    for tag, case in CASES.items():
        s = stub(case, policy, reference, precomputed=False)
        loss = DPOTrainer._compute_loss(s, policy, dict(inputs), False)
        out[f"loss.{tag}"] = loss.detach().reshape(1)
        for m in METRICS:
            out[f"metric.{tag}.{m.replace('/', '_')}"] = torch.tensor(s._metrics["train"][m])
        grads_of(policy, loss, tag, out)
        print(f"{tag}: loss {loss.item():.7f}")
    # The precomputed path gives the same loss from the stored log-probs.
    s = stub(CASES["sigmoid"], policy, None, precomputed=True)
    pre = dict(inputs, ref_chosen_logps=out["ref_chosen_logps"], ref_rejected_logps=out["ref_rejected_logps"])
    pre_loss = DPOTrainer._compute_loss(s, policy, pre, False).item()
    assert abs(pre_loss - out["loss.sigmoid"].item()) < 1e-12, (pre_loss, out["loss.sigmoid"])
    formula_cases(policy, ref_logps, inputs, out)
    # Smoothing 0 of the formula is TRL's sigmoid: the reproduction is checked where they meet.
    logps = seq_logps(policy, inputs)
    c, r = (logps - ref_logps).chunk(2)
    again = (-F.logsigmoid(BETA * (c - r))).mean().item()
    assert abs(again - out["loss.sigmoid"].item()) < 1e-12, (again, out["loss.sigmoid"])
    # Stored in f32 (what the Rust side reads): far below the tolerances compared at.
    out = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in out.items()}
    save_file(out, os.path.join(OUT, "dpo.safetensors"),
              metadata={"trl": trl.__version__, "beta": str(BETA)})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
