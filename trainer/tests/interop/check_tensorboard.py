#!/usr/bin/env python3
"""Checks that TensorBoard reads moeru's event files and that they agree with metrics.jsonl.

Usage: check_tensorboard.py DIR [expected_steps]

Loads every events.out.tfevents.* file in DIR with TensorBoard's EventAccumulator (which applies
the SessionLog START purge a resumed run writes) and verifies that:
  * the scalar tag train/loss exists, with each step once;
  * it has `expected_steps` steps (default: as many as DIR/metrics.jsonl has step lines);
  * per step, its value equals float32(loss) of the metrics.jsonl line of that step;
  * eval/loss, when metrics.jsonl has eval lines, likewise equals float32(eval_loss).
Exits 1 on any mismatch; the last line reads "N passed, M failed". Needs `pip install tensorboard`.
"""

import json
import math
import os
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator


def load_jsonl(path):
    """(train, eval): step -> loss for step lines and eval lines; fails on a repeated step."""
    train, evals = {}, {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if "loss" in obj:
                table, key = train, "loss"
            elif "eval_loss" in obj:
                table, key = evals, "eval_loss"
            else:
                continue
            step = obj["step"]
            if step in table:
                raise SystemExit(f"FAIL: {path}:{lineno}: step {step} appears twice ({key})")
            table[step] = obj[key]
    return train, evals


def same_f32(event_value, json_value):
    expected = np.float32(math.nan if json_value is None else json_value)
    got = np.float32(event_value)
    if np.isnan(expected):
        return bool(np.isnan(got))
    return bool(got == expected)


def compare(acc, tag, expected, n_expected, failures):
    """Compares scalar `tag` with `expected` (step -> float); returns the number of checks passed."""
    passed = 0
    tags = acc.Tags().get("scalars", [])
    if tag not in tags:
        failures.append(f"tag {tag} missing (scalar tags: {sorted(tags)})")
        return passed
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    if len(set(steps)) != len(steps):
        dups = sorted({s for s in steps if steps.count(s) > 1})
        failures.append(f"{tag}: steps {dups} appear more than once")
    if n_expected is not None and len(events) != n_expected:
        failures.append(f"{tag}: {len(events)} steps in the event files, expected {n_expected}")
    else:
        passed += 1
    event_steps = set(steps)
    for step in sorted(set(expected) - event_steps):
        failures.append(f"{tag}: step {step} is in metrics.jsonl but not in the event files")
    for e in events:
        if e.step not in expected:
            failures.append(f"{tag}: step {e.step} is in the event files but not in metrics.jsonl")
        elif not same_f32(e.value, expected[e.step]):
            failures.append(
                f"{tag}: step {e.step}: event value {e.value!r} != float32({expected[e.step]!r})"
                f" = {np.float32(expected[e.step])!r}"
            )
        else:
            passed += 1
    return passed


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    run_dir = argv[1]
    jsonl = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(jsonl):
        print(f"FAIL: {jsonl} does not exist\n0 passed, 1 failed")
        return 1
    if not any(n.startswith("events.out.tfevents.") for n in os.listdir(run_dir)):
        print(f"FAIL: no events.out.tfevents.* file in {run_dir}\n0 passed, 1 failed")
        return 1
    train, evals = load_jsonl(jsonl)
    n_steps = int(argv[2]) if len(argv) == 3 else len(train)

    acc = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.SCALARS: 0}  # 0: keep every event
    )
    acc.Reload()

    failures = []
    passed = compare(acc, "train/loss", train, n_steps, failures)
    if evals:
        passed += compare(acc, "eval/loss", evals, len(evals), failures)

    for f in failures:
        print(f"FAIL: {f}")
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
