"""Compares two moeru runs: per-step losses and gradient norms (metrics.jsonl) and the final
checkpoint's weights.

    python3 compare_runs.py RUN_A RUN_B STEP [--tol 1e-5]

RUN_x is a folder with logs/metrics.jsonl and ckpt/step-NNNNNN/: model.safetensors (moeru's
names, experts stacked) or, from a tensor/expert-parallel run, model.safetensors.index.json
with per-expert Hugging Face names; both are compared under the latter. Exits 1 when a loss,
a weight, or a gradient norm relative to its size differs by more than the tolerance. The
gradient norms are compared because AdamW's update is blind to a gradient's scale.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def logged(run: Path, key: str):
    """Every value of `key` in the run's per-step metrics, in order."""
    out = []
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec and "loss" in rec:
            out.append(rec[key])
    return out


def weights(step_dir: Path):
    """Every tensor of a checkpoint under Hugging Face names, experts one by one."""
    index = step_dir / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(step_dir / f)))
        return out
    out = {}
    for name, t in load_file(str(step_dir / "model.safetensors")).items():
        if name.endswith(".experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                p = f"{name[:-len('gate_up_proj')]}{e}"
                out[f"{p}.gate_proj.weight"] = t[e, :inter]
                out[f"{p}.up_proj.weight"] = t[e, inter:]
        elif name.endswith(".experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{name[:-len('down_proj')]}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("step", type=int)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    la, lb = logged(args.a, "loss"), logged(args.b, "loss")
    if len(la) != len(lb) or not la:
        sys.exit(f"{args.a}: {len(la)} steps logged, {args.b}: {len(lb)}")
    loss_diff = max(abs(x - y) for x, y in zip(la, lb))
    ga, gb = logged(args.a, "grad_norm"), logged(args.b, "grad_norm")
    if len(ga) != len(la) or len(gb) != len(lb):
        sys.exit("a run logged no gradient norm on some step")
    norm_diff = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(ga, gb))
    ckpt = f"ckpt/step-{args.step:06d}"
    wa, wb = weights(args.a / ckpt), weights(args.b / ckpt)
    if sorted(wa) != sorted(wb):
        sys.exit("the checkpoints hold different tensors")
    weight_diff = max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)
    print(f"{args.a.name} vs {args.b.name}: {len(la)} steps, max loss diff {loss_diff:.2e}, "
          f"max weight diff {weight_diff:.2e}, max grad-norm diff {norm_diff:.2e} (relative)")
    if loss_diff > args.tol or weight_diff > args.tol or norm_diff > args.tol:
        sys.exit(f"differences above {args.tol}")
    if la[-1] > la[0] - 0.1:
        sys.exit(f"the loss did not fall ({la[0]} -> {la[-1]})")


if __name__ == "__main__":
    main()
