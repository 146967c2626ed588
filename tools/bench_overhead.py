#!/usr/bin/env python3
"""Per-call overhead of runtime.matmul on cached kernels against numpy.matmul, one table row per
call path (fresh output, out=, 1-D operands, stacks, broadcast, transposed and strided views,
mixed dtypes), at one thread on both sides; medians of many calls.

    python tools/bench_overhead.py [--reps 20000] [--sizes 8 64] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# one thread on both sides, set before numpy (OpenBLAS) and looptune read them
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["LOOPTUNE_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

from looptune import runtime  # noqa: E402

try:  # optional: pins every BLAS/OpenMP pool numpy may have loaded, whatever the variables said
    from threadpoolctl import threadpool_limits  # noqa: E402
except ImportError:  # pragma: no cover - threadpoolctl is not a dependency
    threadpool_limits = None

STACK = 8     # batch size of the stacked paths


def median_us(fn, reps: int) -> float:
    for _ in range(min(reps, 500)):
        fn()
    samples = []
    clock = time.perf_counter
    for _ in range(reps):
        t = clock()
        fn()
        samples.append(clock() - t)
    return statistics.median(samples) * 1e6


def call_paths(n: int, dtype: str):
    """(name, args, out) per call path for an n x n x n problem: ``matmul(*args, out=out)``."""
    rng = np.random.default_rng(0)

    def arr(*shape, dt=dtype):
        return rng.standard_normal(shape).astype(dt)

    a, b = arr(n, n), arr(n, n)
    sa, sb = arr(STACK, n, n), arr(STACK, n, n)
    v = arr(n)
    wide = arr(n, 2 * n)
    return [
        ("fresh", (a, b), None),
        ("out=", (a, b), np.empty((n, n), dtype)),
        ("1-D @ 2-D", (v, b), None),
        ("2-D @ 1-D", (a, v), None),
        ("1-D @ 2-D out=", (v, b), np.empty(n, dtype)),
        (f"stack {STACK} @ stack", (sa, sb), None),
        (f"stack {STACK} @ stack out=", (sa, sb), np.empty((STACK, n, n), dtype)),
        (f"stack {STACK} @ 2-D", (sa, b), None),
        (f"stack {STACK} @ 2-D out=", (sa, b), np.empty((STACK, n, n), dtype)),
        ("A transposed", (a.T, b), None),
        ("A column step [:, ::2]", (wide[:, ::2], b), None),
        ("A row step [::2]", (arr(2 * n, n)[::2], b), None),
        ("float32 @ float64", (a.astype("float32"), b.astype("float64")), None),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    runtime.configure(threads=1)
    if threadpool_limits is not None:
        threadpool_limits(1)
    print(f"| size | path | runtime.matmul (us) | numpy.matmul (us) | difference (us) |   ({args.dtype}, 1 thread)")
    print("| --- | --- | --- | --- | --- |")
    for n in args.sizes:
        for name, operands, out in call_paths(n, args.dtype):
            if out is None:
                ours = median_us(lambda: runtime.matmul(*operands), args.reps)
                ref = median_us(lambda: np.matmul(*operands), args.reps)
            else:
                ours = median_us(lambda: runtime.matmul(*operands, out=out), args.reps)
                ref = median_us(lambda: np.matmul(*operands, out=out), args.reps)
            print(f"| {n}^3 | {name} | {ours:.2f} | {ref:.2f} | {ours - ref:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
