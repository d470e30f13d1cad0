#!/usr/bin/env python3
"""Draws the loss curves of several char_lm runs into one PNG.

    plot_loss.py OUT.png RUN.csv [RUN.csv ...]      label = file name without .csv
    plot_loss.py OUT.png label=RUN.csv ...           explicit labels
    plot_loss.py OUT.png --mean label=a.csv,b.csv,c.csv ...   mean over seeds (shaded min..max)

Needs Debian's python3-matplotlib. Held-out loss is drawn solid, training loss
(smoothed over 50 steps) dotted.
"""
import csv
import math
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    steps, train, val_steps, val = [], [], [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            s = int(row["step"])
            steps.append(s)
            train.append(float(row["train_loss"]))
            if row["val_loss"]:
                val_steps.append(s)
                val.append(float(row["val_loss"]))
    return steps, train, val_steps, val


def smooth(xs, k=50):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    out, args = args[0], args[1:]
    mean = False
    if args and args[0] == "--mean":
        mean, args = True, args[1:]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, spec in enumerate(args):
        label, _, paths = spec.rpartition("=")
        paths = paths.split(",")
        label = label or os.path.basename(paths[0]).removesuffix(".csv")
        color = f"C{i}"
        runs = [read(p) for p in paths]
        if mean and len(runs) > 1:
            vs = runs[0][2]
            vals = [[r[3][j] for r in runs] for j in range(len(vs))]
            ax.plot(vs, [sum(v) / len(v) for v in vals], color=color, label=f"{label} (held-out, mean of {len(runs)})")
            ax.fill_between(vs, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.2)
        else:
            steps, train, vs, val = runs[0]
            ax.plot(vs, val, color=color, label=f"{label} (held-out)")
            ax.plot(steps, smooth(train), color=color, linestyle=":", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 3.2))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
