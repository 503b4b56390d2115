#!/usr/bin/env python3
"""A `command` reward for prompt sets from scripts/reasoning_gym_prompts.py: reads one JSON
object per completion on stdin (moeru's `completion` plus the prompt row's fields), writes one
score per line: the row's reasoning-gym checker on the text after the last `####` (0 when
there is none). Recipe:

  rewards:
    - {name: rg, kind: command, argv: [python3, scripts/reasoning_gym_reward.py], timeout_s: 60}
"""
import json
import sys

import reasoning_gym as rg


def answer(text):
    at = text.rfind("####")
    return None if at < 0 else text[at + 4:].strip().splitlines()[0].strip() if text[at + 4:].strip() else None


def main():
    checkers = {}
    for line in sys.stdin:
        row = json.loads(line)
        entry = row["rg_entry"]
        name = entry["dataset"]
        if name not in checkers:
            checkers[name] = rg.get_score_answer_fn(name)
        got = answer(row["completion"])
        score = 0.0 if got is None else float(checkers[name](got, entry))
        print(score)


if __name__ == "__main__":
    main()
