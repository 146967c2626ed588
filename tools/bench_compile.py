#!/usr/bin/env python3
"""Compile-time benchmark: one kernel at a time, and batches of 16 candidates, with a cold cache.

    python tools/bench_compile.py [--repeats 9]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from looptune.runtime.compiler.build import BuildSettings, build, build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.search.spaces import blocking_candidates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    problem = MatmulProblem(512, 512, 512)
    cands = blocking_candidates(problem, 16 * (args.repeats + 1), seed=1)
    singles, batches = [], []
    with tempfile.TemporaryDirectory() as tmp:
        settings = BuildSettings(cache_dir=tmp)
        build(render(cands[-1].schedule(), "float32"), settings)       # warm the compiler's own caches
        for i in range(args.repeats):
            src = render(cands[i].schedule(), "float32")
            t = time.perf_counter()
            r = build(src, settings)
            singles.append(time.perf_counter() - t)
            assert r.ok and not r.cached, r.error
        for i in range(args.repeats):
            chunk = cands[args.repeats + 16 * i: args.repeats + 16 * (i + 1)]
            t = time.perf_counter()
            srcs = [render(c.schedule(), "float32") for c in chunk]
            rs = build_many(srcs, settings)
            batches.append(time.perf_counter() - t)
            assert all(r.ok for r in rs)
    print(f"single kernel: median {statistics.median(singles):.3f} s (min {min(singles):.3f}, max {max(singles):.3f}) "
          f"over {len(singles)}")
    print(f"batch of 16 (render + build): median {statistics.median(batches):.3f} s "
          f"(min {min(batches):.3f}, max {max(batches):.3f}) over {len(batches)}")


if __name__ == "__main__":
    main()
