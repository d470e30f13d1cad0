#!/usr/bin/env python3
"""Reads galore_bench's JSON output and prints the ratios the benchmark targets
are stated in (docs/benchmarks.md), all from the one run:

    OMP_NUM_THREADS=2 ./build/bench/galore_bench --benchmark_format=json > bench.json
    tools/bench_ratios.py bench.json
"""
import json
import sys


def main():
    data = json.load(open(sys.argv[1]))
    b = {x["name"]: x for x in data["benchmarks"]}
    ms = lambda n: b[n]["real_time"] * {"ms": 1, "us": 1e-3, "ns": 1e-6}[b[n]["time_unit"]]
    print(f"# {data['context'].get('host_name', '')}, {data['context'].get('num_cpus')} CPUs, "
          f"{data['context'].get('mhz_per_cpu')} MHz, {data['context'].get('date')}")
    print("\n| benchmark | ms | ratio to BM_Gemm | target |")
    print("|---|---|---|---|")
    for model, rank in [("llama60m", 128), ("llama130m", 256)]:
        gemm = f"BM_Gemm/{model}/r{rank}"
        if gemm not in b:
            continue
        print(f"| {gemm} | {ms(gemm):.1f} | 1.00 | |")
        for opt, target in [("adamw", ""), ("galore", "<= 1.3"), ("galore8bit", ""), ("qgalore", "<= 1.6")]:
            n = f"BM_Step/{opt}/{model}/r{rank}"
            if n in b:
                print(f"| {n} | {ms(n):.1f} | {ms(n) / ms(gemm):.2f} | {target if model == 'llama60m' else ''} |")
    print("\n| refresh | ms | speed-up over exact | energy | target |")
    print("|---|---|---|---|---|")
    for shape in ["768x768/r256", "2048x768/r256", "768x2048/r256", "512x512/r128", "1376x512/r128", "512x1376/r128"]:
        exact = f"BM_Refresh/exact/{shape}"
        if exact not in b:
            continue
        for pol, target in [("exact", ""), ("randomized", ">= 10x, energy >= 0.99"), ("warm", ">= 20x, energy >= 0.99")]:
            n = f"BM_Refresh/{pol}/{shape}"
            t = target if "r256" in shape else ""
            print(f"| {n} | {ms(n):.1f} | {ms(exact) / ms(n):.1f}x | {b[n].get('energy', float('nan')):.4f} | {t} |")
    print("\n| kernel | GB/s | share of BM_Memcpy | target |")
    print("|---|---|---|---|")
    for n_el in ["262144", "16777216"]:
        mem = f"BM_Memcpy/{n_el}"
        if mem not in b:
            continue
        gb = lambda n: b[n]["bytes_per_second"] / 1e9
        print(f"| {mem} | {gb(mem):.1f} | 100% | |")
        for k in ["quantize", "dequantize", "stochastic_rounding"]:
            n = f"BM_Quant/{k}/{n_el}"
            print(f"| {n} | {gb(n):.1f} | {100 * gb(n) / gb(mem):.0f}% | >= 50% |")


if __name__ == "__main__":
    main()
