#!/usr/bin/env python3
"""Sweep the blocking space (register tile, cache blocks, packing, unroll) for given problems.

Maintainer tool: finds the best schedule the space holds for each problem, measured
in-process against numpy in the same run with thread counts pinned on both sides.

    OPENBLAS_NUM_THREADS=1 python tools/sweep.py 1024 1024 1024 --budget 60
    python tools/sweep.py --shapes ../shared/shapes/looptune-paper.txt --sample 50 --json out.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mnk", nargs="*", type=int, help="M N K of one problem")
    ap.add_argument("--shapes", help="shape file (../shared/shapes format)")
    ap.add_argument("--sample", type=int, default=0, help="fixed random sample of this many problems (seed 0)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=48, help="random grid points per problem (plus the default)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per candidate")
    ap.add_argument("--json", help="append one JSON line per problem to this file")
    args = ap.parse_args()

    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from looptune.runtime.problem import MatmulProblem, read_shapes
    sys.path.insert(0, os.path.dirname(__file__))
    from _inprocess import measure_schedules, numpy_seconds
    from looptune.tuner.spaces import blocking_candidates

    if args.shapes:
        problems = read_shapes(args.shapes, threads=args.threads)
        if args.sample:
            problems = random.Random(0).sample(problems, args.sample)
    else:
        m, n, k = args.mnk
        problems = [MatmulProblem(m, n, k, dtype=args.dtype, threads=args.threads)]
    ratios = []
    for p in problems:
        t0 = time.perf_counter()
        cands = blocking_candidates(p, args.candidates, seed=0)
        results = measure_schedules(p, [c.schedule() for c in cands], min_time=args.min_time)
        t_np = numpy_seconds(p, min_time=args.min_time)
        best_i = min(range(len(results)), key=lambda i: results[i].seconds)
        best = results[best_i]
        ratio = t_np / best.seconds
        ratios.append(ratio)
        line = {"problem": p.key(), "gflops": p.flops / best.seconds / 1e9, "numpy_gflops": p.flops / t_np / 1e9,
                "ratio": ratio, "params": cands[best_i].__dict__, "trace": best.schedule_json,
                "default_ratio": t_np / results[0].seconds, "sweep_seconds": time.perf_counter() - t0}
        print(f"{p}: best {line['gflops']:.1f} GFLOPS, numpy {line['numpy_gflops']:.1f}, ratio {ratio:.3f} "
              f"(default {line['default_ratio']:.3f}) {cands[best_i]}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(line) + "\n")
    if len(ratios) > 1:
        import math
        print(f"geomean ratio over {len(ratios)} problems: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


if __name__ == "__main__":
    sys.exit(main())
