#!/usr/bin/env python3
"""Makes the smoke recipe's corpus and tokenizer (committed; rerun only to change them).

    python3 recipes/smoke/make_smoke_data.py      (needs the `tokenizers` package)

corpus-train.jsonl / corpus-eval.jsonl: short documents of arithmetic facts in words and
digits, generated from a fixed seed: structured enough that a tiny model's loss falls fast.
tokenizer.json: a byte-level BPE of 384 tokens trained on the training corpus, with the Qwen
special tokens, so a tiny model does not pay for Qwen3's 151k vocabulary.
Then prepare both with `moeru data prepare` (see scripts/smoke.sh).
"""
import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def document(rng):
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        kind = rng.choice(["plus", "times", "minus"])
        if kind == "plus":
            lines.append(f"{WORDS[a]} plus {WORDS[b]} is {a + b}.")
        elif kind == "times":
            lines.append(f"{a} times {b} equals {a * b}.")
        else:
            hi, lo = max(a, b), min(a, b)
            lines.append(f"{hi} minus {lo} leaves {hi - lo}.")
    return " ".join(lines)


def write(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def main():
    rng = random.Random(20261122)
    train = [document(rng) for _ in range(3000)]
    evals = [document(rng) for _ in range(200)]
    write(os.path.join(HERE, "corpus-train.jsonl"), train)
    write(os.path.join(HERE, "corpus-eval.jsonl"), evals)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(train, trainer)
    tok.save(os.path.join(HERE, "tokenizer.json"))
    print(f"{len(train)} train / {len(evals)} eval documents, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
