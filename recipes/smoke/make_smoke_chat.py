#!/usr/bin/env python3
"""Makes the chat corpus of the tiny LoRA SFT recipe (committed; rerun only to change it).

    python3 recipes/smoke/make_smoke_chat.py

chat-train.jsonl / chat-eval.jsonl: OpenAI-style conversations asking the arithmetic of the
smoke corpus as questions, answered with the fact in the corpus' words, so a LoRA on the
smoke-pretrained model (recipes/smoke/base) learns the chat format fast. Prepare both with
`moeru data prepare --chat` and the smoke tokenizer (see scripts/make-smoke-base.sh).
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def turn(rng):
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    kind = rng.choice(["plus", "times", "minus"])
    if kind == "plus":
        return f"what is {WORDS[a]} plus {WORDS[b]}?", f"{WORDS[a]} plus {WORDS[b]} is {a + b}."
    if kind == "times":
        return f"what is {a} times {b}?", f"{a} times {b} equals {a * b}."
    hi, lo = max(a, b), min(a, b)
    return f"what is {hi} minus {lo}?", f"{hi} minus {lo} leaves {hi - lo}."


def conversation(rng):
    messages = []
    for _ in range(rng.randint(1, 3)):
        q, a = turn(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(20261123)
    write(os.path.join(HERE, "chat-train.jsonl"), [conversation(rng) for _ in range(2000)])
    write(os.path.join(HERE, "chat-eval.jsonl"), [conversation(rng) for _ in range(100)])


if __name__ == "__main__":
    main()
