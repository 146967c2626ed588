#!/usr/bin/env python3
"""Our parallel kernels right after another library's parallel call: are we slowed by its pool?

For each size, ``runtime.matmul(a, b, out=c, threads=T)`` is timed call by call, each call
right after nothing, after a numpy matmul (OpenBLAS's pool) or after a torch matmul (libgomp's
pool), both at T threads (every library pinned to T, and each call timed on its own, by
``tuner/ship/timing.py``).  The table gives our median GFLOPS and our slowest call.  Run it once
per setting to compare, e.g. our pool against OpenMP:

    python tools/bench_pools.py
    LOOPTUNE_NO_POOL=1 python tools/bench_pools.py        # kernels on OpenMP, as before the pool
    LOOPTUNE_BLAS_POOL=1 python tools/bench_pools.py      # numpy's OpenBLAS on our pool too
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

from looptune import runtime
from looptune.tuner.ship.timing import call_seconds, pinned_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    try:
        import torch        # optional: the libgomp case
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"| n (n x n x n) | before each call | runtime.matmul GFLOPS (median) | slowest call ms |   ({args.threads} threads)")
    print("| --- | --- | --- | --- |")
    with pinned_threads(args.threads, torch):
        for n in args.sizes:
            a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
            c = np.empty((n, n), np.float32)
            runtime.matmul(a, b, out=c, threads=args.threads)
            others = {"nothing": lambda: None, "numpy matmul": lambda: np.matmul(a, b)}
            if torch is not None:
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                others["torch matmul"] = lambda: torch.mm(ta, tb)
            for name, other in others.items():
                seconds = call_seconds(lambda: runtime.matmul(a, b, out=c, threads=args.threads), args.calls, other)
                print(f"| {n} | {name} | {2 * n ** 3 / statistics.median(seconds) / 1e9:.1f} | {max(seconds) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
