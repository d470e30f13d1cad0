"""Sums an ncu --csv kernel list (gpu__time_duration.sum, base units: ns) by kind."""
import csv
import sys
from collections import defaultdict


def kind(name):
    n = name.lower()
    if "adam" in n:
        return "adam"
    if "stage_rows" in n:
        return "padded copies"
    if any(k in n for k in ("gemm", "nvjet", "sm90", "xmma", "cutlass", "cublas")):
        return "gemm"
    return "other"


def main(path):
    rows = [line for line in open(path) if line.startswith('"')]
    total = defaultdict(float)
    count = defaultdict(int)
    names = defaultdict(float)
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", ""))
        k = kind(r["Kernel Name"])
        total[k] += ns
        count[k] += 1
        names[r["Kernel Name"][:90]] += ns
    all_ns = sum(total.values())
    print(f"kernels: {sum(count.values())}, sum of kernel times {all_ns / 1e6:.3f} ms")
    for k in sorted(total, key=total.get, reverse=True):
        print(f"  {k:14s} {count[k]:4d} kernels {total[k] / 1e6:8.3f} ms  {100 * total[k] / all_ns:5.1f}%")
    print("  largest kernels:")
    for n, ns in sorted(names.items(), key=lambda x: -x[1])[:8]:
        print(f"    {ns / 1e6:8.3f} ms  {n}")


if __name__ == "__main__":
    main(sys.argv[1])
