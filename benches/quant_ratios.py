#!/usr/bin/env python3
"""Ratios of the `quant` criterion bench: each type's median time over Q4_1's in the same group
(level, m, shape), from criterion's estimates under target/criterion.

With --fastest, each type's fastest sample (its time per iteration) over Q4_1's instead. On a
shared host, whose other tenants slow spells of samples down, a spell that covers part of one
type's measurement moves its median and not its fastest sample (criterion measures one type
after another, so the spell lands on that type and not on Q4_1); a spell covering all of it
moves both.

Usage: python3 benches/quant_ratios.py [--fastest] [target/criterion]
"""
import json
import pathlib
import sys

args = sys.argv[1:]
fastest = "--fastest" in args
args = [a for a in args if a != "--fastest"]
root = pathlib.Path(args[0] if args else "target/criterion")
groups = {}
for bench in root.glob("*/*/new/benchmark.json"):
    info = json.loads(bench.read_text())
    group = info["group_id"]
    if group.count("/") != 2 or group.split("/")[1] not in ("m1", "m64", "dequant"):
        continue
    if fastest:
        sample = json.loads((bench.parent / "sample.json").read_text())
        time = min(t / n for t, n in zip(sample["times"], sample["iters"]))
    else:
        estimates = json.loads((bench.parent / "estimates.json").read_text())
        time = estimates["median"]["point_estimate"]
    groups.setdefault(group, {})[info["function_id"]] = time

order = ["F32", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
print("| group | " + " | ".join(order) + " |")
print("|---|" + "---|" * len(order))
for group in sorted(groups):
    times = groups[group]
    base = times.get("Q4_1")
    cells = []
    for t in order:
        if t not in times or not base:
            cells.append("")
        else:
            cells.append(f"{times[t] / base:.2f} ({times[t] / 1e3:.0f} us)")
    print(f"| {group} | " + " | ".join(cells) + " |")
