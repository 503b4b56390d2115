#!/usr/bin/env python3
"""Makes the preference pairs of the tiny DPO recipe (committed; rerun only to change them).

    python3 recipes/smoke/make_smoke_pairs.py

pairs-train.jsonl / pairs-eval.jsonl: TRL's conversational preference format. The prompt asks
an arithmetic question of the smoke corpus; the chosen answer states the right result in the
corpus' words; the rejected one is wrong twice: a result off by 1 to 3, told with the verb the
corpus uses for another operation ("three plus four equals 8."). Train and eval ask disjoint
questions. (With the right verb and only the number wrong, the held-out rewards accuracy of
this 124k-parameter model stayed near 0.6: it cannot learn arithmetic it was never shown; the
verb is the part that generalizes.) Prepare both with `moeru data prepare --preference` and the
smoke tokenizer (scripts/make-smoke-base.sh).
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def problems():
    out = []
    for a in range(11):
        for b in range(11):
            out.append(("plus", a, b))
            out.append(("times", a, b))
            if a >= b:
                out.append(("minus", a, b))
    return out


VERB = {"plus": "is", "times": "equals", "minus": "leaves"}


def pair(kind, a, b, rng, avoid=None):
    if kind == "plus":
        q, say, right = f"what is {WORDS[a]} plus {WORDS[b]}?", f"{WORDS[a]} plus {WORDS[b]}", a + b
    elif kind == "times":
        q, say, right = f"what is {a} times {b}?", f"{a} times {b}", a * b
    else:
        q, say, right = f"what is {a} minus {b}?", f"{a} minus {b}", a - b
    # The rejected statement is wrong twice: a result off by 1 to 3, told with the verb the
    # corpus uses for another operation.
    bad_verb = rng.choice([v for k, v in VERB.items() if k != kind])
    offsets = [d for d in (-3, -2, -1, 1, 2, 3) if right + d >= 0 and right + d != avoid]
    wrong = right + rng.choice(offsets)
    return wrong, {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": f"{say} {VERB[kind]} {right}."}],
        "rejected": [{"role": "assistant", "content": f"{say} {bad_verb} {wrong}."}],
    }


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(20261204)
    ps = problems()
    rng.shuffle(ps)
    held_out, train = ps[:64], ps[64:]
    write(os.path.join(HERE, "pairs-train.jsonl"), [pair(*p, rng)[1] for p in train])
    write(os.path.join(HERE, "pairs-eval.jsonl"), [pair(*p, rng)[1] for p in held_out])


if __name__ == "__main__":
    main()
