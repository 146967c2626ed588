#!/usr/bin/env python3
"""Per-call overhead of runtime.matmul on cached kernels against numpy.matmul (medians of many calls).

    OPENBLAS_NUM_THREADS=1 LOOPTUNE_NUM_THREADS=1 python tools/bench_overhead.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("LOOPTUNE_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from looptune import runtime  # noqa: E402


def median_us(fn, reps: int) -> float:
    for _ in range(200):
        fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20000)
    args = ap.parse_args()
    print("| size | dtype | runtime.matmul (us) | numpy.matmul (us) | difference (us) |")
    print("| --- | --- | --- | --- | --- |")
    for n in (8, 16, 32):
        for dtype in ("float32", "float64"):
            a = np.random.rand(n, n).astype(dtype)
            b = np.random.rand(n, n).astype(dtype)
            ours = median_us(lambda: runtime.matmul(a, b), args.reps)
            ref = median_us(lambda: np.matmul(a, b), args.reps)
            print(f"| {n}x{n}x{n} | {dtype} | {ours:.2f} | {ref:.2f} | {ours - ref:+.2f} |")


if __name__ == "__main__":
    main()
