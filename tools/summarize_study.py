#!/usr/bin/env python3
"""Summarizes char_lm runs: reads NAME.csv / NAME.log pairs (NAME = optimizer_lrX_sN)
from the folders given and prints the learning-rate sweep and the per-optimizer
table (mean and spread over seeds) as Markdown.

    tools/summarize_study.py RESULTS_DIR [RESULTS_DIR ...]
"""
import csv
import glob
import math
import os
import re
import sys
from collections import defaultdict

NAME = re.compile(r"^(?P<opt>[a-z0-9]+)_lr(?P<lr>[0-9.e-]+)_s(?P<seed>\d+)$")


def read_run(csv_path):
    rows = list(csv.DictReader(open(csv_path)))
    vals = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    last = rows[-1]
    log = csv_path[:-4] + ".log"
    weights = peak = None
    if os.path.exists(log):
        m = re.search(r"weights (\d+) bytes, peak gradients (\d+) bytes", open(log).read())
        if m:
            weights, peak = int(m.group(1)), int(m.group(2))
    return {"steps": int(last["step"]), "val": vals[-1][1] if vals else math.nan,
            "state": int(last["optimizer_state_bytes"]), "weights": weights, "peak": peak}


def main():
    runs = defaultdict(list)
    for d in sys.argv[1:]:
        for path in sorted(glob.glob(os.path.join(d, "*.csv"))):
            m = NAME.match(os.path.basename(path)[:-4])
            if not m:
                continue
            r = read_run(path)
            r["dir"] = d
            runs[(m["opt"], float(m["lr"]))].append((int(m["seed"]), r))
    order = ["adamw", "galore", "galore8bit", "qgalore"]
    print("| optimizer | lr | seed 1 held-out loss (2000 steps) |")
    print("|---|---|---|")
    for opt in order:
        for (o, lr), rs in sorted(runs.items()):
            if o != opt:
                continue
            s1 = [r for s, r in rs if s == 1 and r["steps"] == 2000]
            if s1:
                print(f"| {opt} | {lr:g} | {s1[0]['val']:.4f} |")
    print()
    base = None
    print("| optimizer | lr | seeds | held-out loss, mean (min..max) | vs AdamW | optimizer state | vs AdamW | state + weights | vs AdamW | peak gradients |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for opt in order:
        best = None
        for (o, lr), rs in runs.items():
            done = [r for s, r in rs if r["steps"] == 2000]
            if o == opt and len(done) >= 3 and (best is None or len(done) > len(best[1])):
                best = (lr, done)
        if not best:
            continue
        lr, done = best
        vals = [r["val"] for r in done]
        mean = sum(vals) / len(vals)
        st = done[0]["state"]
        w = done[0]["weights"] or 0
        row = {"mean": mean, "state": st, "sw": st + w}
        if opt == "adamw":
            base = row
        rel = lambda k: f"{100 * row[k] / base[k]:.1f}%" if base else ""
        dv = f"{100 * (mean - base['mean']) / base['mean']:+.2f}%" if base else ""
        print(f"| {opt} | {lr:g} | {len(done)} | {mean:.4f} ({min(vals):.4f}..{max(vals):.4f}) | {dv} | "
              f"{st:,} | {rel('state')} | {st + w:,} | {rel('sw')} | {done[0]['peak']:,} |")


if __name__ == "__main__":
    main()
