#!/usr/bin/env python3
"""Ratios of the `quant` criterion bench: each type's median time over Q4_1's in the same group
(level, m, shape), from criterion's estimates under target/criterion.

Usage: python3 benches/quant_ratios.py [target/criterion]
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
groups = {}
for bench in root.glob("*/*/new/benchmark.json"):
    info = json.loads(bench.read_text())
    group = info["group_id"]
    if group.count("/") != 2 or group.split("/")[1] not in ("m1", "m64", "dequant"):
        continue
    estimates = json.loads((bench.parent / "estimates.json").read_text())
    groups.setdefault(group, {})[info["function_id"]] = estimates["median"]["point_estimate"]

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
