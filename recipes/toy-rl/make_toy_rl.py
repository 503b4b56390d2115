#!/usr/bin/env python3
"""The toy GRPO task (docs/RECIPES.md, "GRPO"): a + b for a, b in 0..10, asked in the smoke
corpus' words ("what is three plus four?").

Writes:
  SFT_OUT           (the first argument) chat rows for the SFT that makes the starting policy: the answer in one of
                    three formats (`#### 7`, `the answer is 7`, `7`) uniformly, and wrong
                    (a + b + 1) one time in ten, so that GRPO has rewards between 0 and 1 to
                    work with in every group
  prompts.jsonl     next to this script: the 121 questions as chat prompts, with `answer` (the GRPO prompt set and
                    its evaluation set)
Deterministic (fixed seed). scripts/make-toy-rl.sh runs it:  python3 recipes/toy-rl/make_toy_rl.py SFT_OUT
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SFT_ROWS = 6000


def question(a, b):
    return f"what is {WORDS[a]} plus {WORDS[b]}?"


def main():
    rng = random.Random(20261207)
    problems = [(a, b) for a in range(11) for b in range(11)]
    with open(sys.argv[1], "w") as f:
        for _ in range(SFT_ROWS):
            a, b = rng.choice(problems)
            n = a + b + (1 if rng.random() < 0.1 else 0)
            answer = rng.choice([f"#### {n}", f"the answer is {n}", f"{n}"])
            row = {"messages": [{"role": "user", "content": question(a, b)},
                                {"role": "assistant", "content": answer}]}
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(HERE, "prompts.jsonl"), "w") as f:
        for a, b in problems:
            row = {"prompt": [{"role": "user", "content": question(a, b)}], "answer": str(a + b)}
            f.write(json.dumps(row) + "\n")
    print(f"wrote {SFT_ROWS} SFT rows to {sys.argv[1]} and {len(problems)} prompts to {HERE}")


if __name__ == "__main__":
    main()
