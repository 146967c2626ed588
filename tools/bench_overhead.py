#!/usr/bin/env python3
"""Per-call overhead of runtime.matmul on cached kernels against numpy.matmul, one table row per
call path (fresh output, out=, 1-D operands, stacks, broadcast, transposed and strided views,
mixed dtypes), at one thread on both sides; medians over blocks of 50 calls, the two taking
turns block by block (the shared timer of ``looptune bench``, ``tuner/ship/timing.py``, with a
fixed block) so that a shared machine's load changes hit both alike.  "kernel alone" is
the kernel call the path makes (on operands prepared beforehand), "call path" what the path
adds to it (the kernel's speed against OpenBLAS is the rest of the difference).

    python tools/bench_overhead.py [--reps 20000] [--sizes 8 64] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os

# one thread on both sides, set before numpy (OpenBLAS) and looptune read them, so no pool starts
# idle threads; pinned_threads (threadpoolctl) in main pins every pool that loaded all the same
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["LOOPTUNE_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

from looptune import runtime  # noqa: E402
from looptune.runtime.api import current_resolver  # noqa: E402
from looptune.runtime.call_plan import NumpyPlan, plan_for  # noqa: E402
from looptune.runtime.execute import prepare  # noqa: E402
from looptune.tuner.ship.timing import LocalSampler, pinned_threads, time_interleaved  # noqa: E402

STACK = 8     # batch size of the stacked paths


def paired_us(ours, ref, reps: int, block: int = 50) -> tuple[float, float]:
    """Median per-call times (us) of ``ours`` and ``ref`` over ``reps`` timed calls each (after
    up to 500 untimed ones), taking turns in blocks of ``block`` calls."""
    blocks = max(1, reps // block)
    samplers = {name: LocalSampler(fn, warmup_calls=min(reps, 500), calls_per_sample=block)
                for name, fn in (("ours", ours), ("ref", ref))}
    seconds = time_interleaved(samplers, min_repeats=blocks, max_repeats=blocks, min_time_s=0.0, alternate=True)
    return seconds["ours"] * 1e6, seconds["ref"] * 1e6


def kernel_call(operands: tuple):
    """A no-argument call of just the kernel ``runtime.matmul(*operands)`` runs, on operands
    prepared as its plan says (cast, copied, viewed): its time is the part no call path can
    remove.  None when the call has no plan that folds into one kernel call."""
    a, b = operands
    settings = runtime.settings()
    plan = plan_for(a, b, 1, settings.small_flops)
    if isinstance(plan, NumpyPlan) or plan.looped_batch is not None:
        return None
    runtime.matmul(a, b)                 # resolves (and compiles) the problem first
    kernel = current_resolver().dispatch[plan.key][0]
    x = prepare(a, plan.prep_a, plan.operands) if plan.prep_a else a
    y = prepare(b, plan.prep_b, plan.operands) if plan.prep_b else b
    x = x.reshape(plan.view_a) if plan.view_a is not None else x
    y = y.reshape(plan.view_b) if plan.view_b is not None else y
    c = np.empty(plan.view_c or plan.shape, plan.dtype)
    return lambda: kernel.invoke(x, y, c, 0, plan.threads)


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
        (f"stack (2, {STACK // 2}) @ 2-D", (sa.reshape(2, STACK // 2, n, n), b), None),
        ("A transposed", (a.T, b), None),
        ("A column step [:, ::2]", (wide[:, ::2], b), None),
        ("A row step [::2]", (arr(2 * n, n)[::2], b), None),
        ("float32 @ float64", (a.astype("float32"), b.astype("float64")), None),
        ("int32 @ float32", (a.astype("int32"), b.astype("float32")), None),
    ]


def print_table(sizes: list[int], dtype: str, reps: int) -> None:
    """The table, one row per size and call path."""
    print(f"| size | path | runtime.matmul (us) | numpy.matmul (us) | difference (us) | kernel alone (us) "
          f"| call path (us) |   ({dtype}, 1 thread)")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        for name, operands, out in call_paths(n, dtype):
            if out is None:
                ours, ref = paired_us(lambda: runtime.matmul(*operands), lambda: np.matmul(*operands), reps)
            else:
                ours, ref = paired_us(lambda: runtime.matmul(*operands, out=out),
                                      lambda: np.matmul(*operands, out=out), reps)
            kernel = kernel_call(operands)
            if kernel is None:
                alone = path = "-"
            else:
                k_us, ours2 = paired_us(kernel, lambda: runtime.matmul(*operands), reps)
                alone, path = f"{k_us:.2f}", f"{ours2 - k_us:.2f}"
            print(f"| {n}^3 | {name} | {ours:.2f} | {ref:.2f} | {ours - ref:+.2f} | {alone} | {path} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    runtime.configure(threads=1)
    with pinned_threads(1):
        print_table(args.sizes, args.dtype, args.reps)


if __name__ == "__main__":
    main()
