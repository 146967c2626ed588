#!/usr/bin/env python3
"""Measure this machine's peak FMA throughput (GFLOPS) for float32, float64 and (AVX512-BF16) bfloat16.

(``--dtype float16`` times float32's chains: float16 kernels compute in float32.)

    python tools/peak_flops.py                 # 1 thread and all cores, both dtypes
    python tools/peak_flops.py --threads 1 2 --json

Prints every variant (vector width x accumulator count) so a surprising peak can be traced,
then the best per (dtype, threads).  ``--json`` adds one machine-readable line at the end.
The numbers are upper bounds for a matmul kernel.  A run disturbed by other processes (a
thread got less than 90 % of its core) can only come out lower; such runs lose to
undisturbed ones and are flagged DISTURBED when nothing better was had.  Details in
``looptune.tuner.measure.peak``.
"""
from __future__ import annotations

import argparse
import json
import sys

from looptune.runtime.compiler.machine import detect_cpu
from looptune.tuner.measure.peak import peak_table


def main(argv: list[str] | None = None) -> int:
    cpu = detect_cpu()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, cpu.cores}))
    ap.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), nargs="+",
                    default=["float32", "float64"] + (["bfloat16"] if cpu.bf16_isa != "convert" else []))
    ap.add_argument("--isa", choices=("avx512", "avx2", "neon", "portable"), default=None,
                    help=f"variant set to build (default: detected, {cpu.vector_isa})")
    ap.add_argument("--seconds", type=float, default=0.05, help="length of one timed run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per variant; the best counts")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args(argv)
    isa = args.isa or cpu.vector_isa

    print(f"# {cpu.model_name}, {cpu.cores} cores, isa={isa}")
    peaks: dict[str, dict[str, float]] = {}
    variants: dict[str, float] = {}
    disturbed: list[str] = []
    for dtype in args.dtype:
        for threads in args.threads:
            table = peak_table(dtype, threads, isa=isa, seconds=args.seconds, repeats=args.repeats)
            if not table:
                print(f"# no {dtype} variant for isa={isa} on this CPU\n")
                continue
            for name, r in table.items():
                flag = f"  DISTURBED (cpu share {r.cpu_share:.2f})" if r.disturbed else ""
                flag += f"  (got {r.threads} threads)" if r.threads != threads else ""
                print(f"{name:32s} threads={threads:<3d} {r.gflops:9.1f} GFLOPS{flag}")
                variants[f"{name}_t{threads}"] = round(r.gflops, 2)
            best = max(table.values(), key=lambda r: r.gflops)
            peaks.setdefault(dtype, {})[str(threads)] = round(best.gflops, 2)
            if best.disturbed:
                disturbed.append(f"{dtype}_t{threads}")
            print(f"peak {dtype} threads={threads}: {best.gflops:.1f} GFLOPS ({best.variant.name})"
                  f"{'  DISTURBED: other processes took cores; rerun on a quiet machine' if best.disturbed else ''}\n")
    if args.json:
        print(json.dumps({"cpu": cpu.model_name, "isa": isa, "cores": cpu.cores, "peak_gflops": peaks,
                          "disturbed": disturbed, "variants": variants}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
