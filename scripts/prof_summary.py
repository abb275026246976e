#!/usr/bin/env python3
"""Aggregates Nsight Compute CSV logs (scripts/gpu_profile.sh) by kernel name: launches, total,
mean and share of GPU time. Usage: scripts/prof_summary.py prof-roll64.csv [...]"""
import csv, collections, sys

for path in sys.argv[1:]:
    lines = open(path, errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        print(f"{path}: no CSV rows"); continue
    tot = collections.defaultdict(float); cnt = collections.Counter(); grid = {}
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        k = row["Kernel Name"].split("(")[0][:60]
        tot[k] += float(row["Metric Value"].replace(",", "")); cnt[k] += 1
        grid[k] = (row.get("Grid Size"), row.get("Block Size"))
    s = sum(tot.values())
    print(f"== {path}: {sum(cnt.values())} launches, {s/1e6:.2f} ms GPU time")
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{v/s*100:5.1f}% {v/1e6:9.3f} ms {cnt[k]:6d}x {v/cnt[k]/1e3:9.1f} us  {k}  grid {grid[k][0]} block {grid[k][1]}")
