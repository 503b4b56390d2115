#!/usr/bin/env python3
"""Writes a GRPO prompt set (JSONL) from reasoning-gym's offline generators.

  pip install reasoning-gym
  python3 scripts/reasoning_gym_prompts.py --dataset basic_arithmetic --size 2000 --seed 1 --out prompts.jsonl

Each row: `prompt` (one user message: the question and the answer format), `answer`, and
`rg_entry` (the generator's whole entry, metadata included) which
scripts/reasoning_gym_reward.py scores with the dataset's own checker. Several `--dataset`s
mix (rows interleaved in order of generation). Run-time Python is only this script and the
reward command; moeru itself reads the JSONL.
"""
import argparse
import json

import reasoning_gym as rg

FORMAT = "\n\nThink briefly, then give the final answer on the last line as `#### <answer>`."


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", action="append", required=True)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    sets = [rg.create_dataset(name, size=a.size, seed=a.seed) for name in a.dataset]
    with open(a.out, "w") as f:
        for i in range(a.size):
            for name, d in zip(a.dataset, sets):
                e = d[i]
                row = {"prompt": [{"role": "user", "content": e["question"] + FORMAT}],
                       "answer": str(e["answer"]),
                       "rg_entry": {"dataset": name, **json.loads(json.dumps(e, default=str))}}
                f.write(json.dumps(row) + "\n")
    print(f"wrote {a.size * len(sets)} prompts to {a.out}")


if __name__ == "__main__":
    main()
