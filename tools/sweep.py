#!/usr/bin/env python3
"""Sweep the blocking space (register tile, cache blocks, packing, unroll) for given problems.

Maintainer tool: finds the best schedule the space holds for each problem, measured
in-process against numpy in the same run with thread counts pinned on both sides.

    OPENBLAS_NUM_THREADS=1 python tools/sweep.py 1024 1024 1024 --budget 60
    python tools/sweep.py --shapes tools/shapes/looptune-paper.txt --sample 50 --json out.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mnk", nargs="*", type=int, help="M N K of one problem")
    ap.add_argument("--shapes", help="shape file (tools/shapes/README.md format)")
    ap.add_argument("--sample", type=int, default=0, help="fixed random sample of this many problems (seed 0)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=48, help="random grid points per problem (plus the default)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per candidate")
    ap.add_argument("--json", help="append one JSON line per problem to this file")
    ap.add_argument("--markdown", action="store_true", help="end with a markdown table (with %% of measured peak)")
    args = ap.parse_args()

    from looptune.runtime.compiler.build import build_many
    from looptune.runtime.compiler.codegen import render
    from looptune.runtime.compiler.workload import MatmulProblem, read_shapes
    from looptune.tuner.measure.runner import Candidate, LocalRunner, MeasureConfig
    from looptune.tuner.search.spaces import blocking_candidates

    if args.shapes:
        problems = read_shapes(args.shapes, threads=args.threads)
        if args.sample:
            problems = random.Random(0).sample(problems, args.sample)
    else:
        m, n, k = args.mnk
        problems = [MatmulProblem(m, n, k, dtype=args.dtype, threads=args.threads)]
    ratios, rows = [], []
    config = MeasureConfig(min_total_seconds=args.min_time, max_repeats=2000, timeout_seconds=60)
    with LocalRunner(config) as runner:
        for p in problems:
            t0 = time.perf_counter()
            cands = blocking_candidates(p, args.candidates, seed=0)
            schedules = [c.schedule() for c in cands]
            builds = build_many([render(s, p.dtype, op=p.op) for s in schedules])
            results = runner.run([Candidate.from_build(p, b, s.to_json()) for s, b in zip(schedules, builds)])
            ok = [i for i, r in enumerate(results) if r.ok]
            if not ok:
                print(f"{p}: no candidate ran: {results[0].error}")
                continue
            best_i = min(ok, key=lambda i: results[i].seconds)
            best = results[best_i]
            numpy_gflops = max(r.numpy_gflops for r in results if r.ok and r.numpy_gflops)
            ratio = best.gflops / numpy_gflops
            ratios.append(ratio)
            default_ratio = results[0].gflops / numpy_gflops if results[0].ok else 0.0
            line = {"problem": p.key(), "gflops": best.gflops, "numpy_gflops": numpy_gflops, "ratio": ratio,
                    "spread": best.rel_spread, "params": cands[best_i].__dict__, "trace": schedules[best_i].to_json(),
                    "default_ratio": default_ratio, "sweep_seconds": time.perf_counter() - t0}
            rows.append((p, best.gflops, numpy_gflops, ratio, best.rel_spread))
            print(f"{p}: best {best.gflops:.1f} GFLOPS, numpy {numpy_gflops:.1f}, ratio {ratio:.3f} "
                  f"(default {default_ratio:.3f}) {cands[best_i]}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(line) + "\n")
    import math
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
    if len(ratios) > 1:
        print(f"geomean ratio over {len(ratios)} problems: {geomean:.3f}")
    if args.markdown and rows:
        from looptune.tuner.measure.peak import measure_peak_gflops

        peaks = {}
        print("\n| problem | threads | best GFLOPS | numpy GFLOPS | ratio | % of peak | spread |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for p, g, ng, r, spread in rows:
            key = (p.dtype, p.threads)
            if key not in peaks:
                peaks[key] = measure_peak_gflops(p.dtype, p.threads)
            print(f"| {p.m}x{p.n}x{p.k} b{p.batch} {p.dtype} {p.layout} | {p.threads} | {g:.1f} | {ng:.1f} | "
                  f"{r:.3f} | {100 * g / peaks[key]:.0f}% | {100 * (spread or 0):.1f}% |")
        if len(rows) > 1:
            print(f"| **geomean** | | | | **{geomean:.3f}** | | |")


if __name__ == "__main__":
    sys.exit(main())
