#!/usr/bin/env python3
"""Kernel-by-kernel time of a `moeru bench` step on a GPU, from cubecl's profiling log.

With `[profiling.logger] level = "basic"` in a cubecl.toml of the working directory
(scripts/gpu-runs.sh writes one), cubecl times every kernel it launches and logs one line per
launch, `| <duration> | <kernel name>`, the duration in Rust's Debug form (`812.4µs`, `1.2ms`).
This groups the launches by kernel (generic arguments dropped, so one matmul routine is one
row whatever its tile sizes) and prints each group's share of the profiled time:

    python3 bench/kernel_profile.py LOG [--top 30] [--json OUT]

Profiled kernels run one at a time, so the total exceeds an unprofiled step; the shares say
which kernels bound the step.
"""
import argparse
import json
import re
import sys
from collections import defaultdict

LINE = re.compile(r"^\|\s*([0-9.]+)\s*(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")
UNIT_S = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def short_name(name: str) -> str:
    """The kernel's path without generic arguments or a trailing hash."""
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    return re.sub(r"\s+", " ", "".join(out)).strip() or name


def parse(lines):
    """(seconds, name) for every timed launch; lines that are not launch timings are skipped."""
    for line in lines:
        m = LINE.match(line.strip())
        if m:
            yield float(m.group(1)) * UNIT_S[m.group(2)], m.group(3)


def summarize(launches):
    groups = defaultdict(lambda: [0.0, 0])
    for seconds, name in launches:
        g = groups[short_name(name)]
        g[0] += seconds
        g[1] += 1
    total = sum(g[0] for g in groups.values())
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return total, [
        {"kernel": k, "seconds": s, "launches": n, "share": s / total if total else 0.0}
        for k, (s, n) in rows
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    try:
        with open(a.log, encoding="utf-8", errors="replace") as f:
            total, rows = summarize(parse(f))
    except OSError as e:
        sys.exit(f"{a.log}: {e.strerror} (cubecl wrote no profile: a CPU run, or no cubecl.toml)")
    if not rows:
        sys.exit(f"{a.log}: no kernel timings (lines `| <duration> | <kernel>`) found")
    launches = sum(r["launches"] for r in rows)
    print(f"{a.log}: {launches} timed launches, {total * 1e3:.1f} ms profiled")
    print(f"{'share':>6} {'ms':>9} {'launches':>8}  kernel")
    for r in rows[: a.top]:
        print(f"{100 * r['share']:5.1f}% {r['seconds'] * 1e3:9.2f} {r['launches']:8d}  {r['kernel']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"total_seconds": total, "kernels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
