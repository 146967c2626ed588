#!/usr/bin/env python3
"""float16 matmul as a numpy user gets it: ``runtime.matmul`` on numpy float16 arrays against
``np.matmul`` on the same arrays (numpy's own loop: float16 never reaches its BLAS) and, when torch
is installed, ``torch.matmul`` on float16 CPU tensors.

One process per thread count, numpy imported first like an application; every library pinned to
the same thread count (``threads=`` for us, threadpoolctl for numpy, ``torch.set_num_threads``:
``looptune.tuner.ship.timing.pinned_threads``) and timed with the shared timer of ``looptune
bench`` (``timing.time_interleaved`` at one thread, the libraries taking turns sample by sample;
``time_phased`` at more, each library in blocks of its own so no other pool's threads still spin):
two warm-up calls (the first compiles our kernel, from a cold cache unless --warm-cache), so
samples start at the third call; each figure is the median sample, and the ratios are of medians
of the same run.  Each result is checked against numpy before it is timed.  ``--db`` serves the
records of a database built with ``looptune build-db`` on ``dtype=float16`` shapes; without it the
analytic default schedule is served.

    python tools/bench_f16.py                                  # 64^3, 256^3, 512^3 at 1 and 2 threads
    python tools/bench_f16.py --threads 1 --shapes "1024 1024 1024" --repeats 3
"""
from __future__ import annotations

import argparse
import json

import numpy as np      # first, as in an application

DEFAULT_SHAPES = ["64 64 64", "256 256 256", "512 512 512"]


def parse_shapes(lines: list[str]) -> list[list[int]]:
    shapes = []
    for line in lines:
        words = line.split("#")[0].split()
        if len(words) >= 3:
            shapes.append([int(w) for w in words[:3]])
    return shapes


def error_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 accumulation of K exact products, then one rounding to float16 (see
    tests/runtime/test_f16_matmul.py): how far a correct result may be from the float64 product."""
    k = a.shape[1]
    gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    g = gamma * np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    return g + 2.0 ** -11 * (np.abs(a.astype(np.float64) @ b.astype(np.float64)) + g) + 2.0 ** -25


def measure(threads: int, shapes: list[list[int]], repeats: int, min_time_s: float) -> dict:
    """In this process: GFLOPS of each library on each shape at ``threads``."""
    from looptune import runtime
    from looptune.runtime.compiler.machine import detect_cpu
    from looptune.tuner.ship.timing import pinned_threads, time_interleaved, time_phased

    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    timer = time_phased if threads > 1 else time_interleaved
    with pinned_threads(threads, torch):
        for m, n, k in shapes:
            rng = np.random.default_rng(0)
            a = rng.standard_normal((m, k)).astype(np.float16)
            b = rng.standard_normal((k, n)).astype(np.float16)
            c = runtime.matmul(a, b, threads=threads)
            exact = a.astype(np.float64) @ b.astype(np.float64)
            assert c.dtype == np.float16 and np.all(np.abs(c.astype(np.float64) - exact) <= error_bound(a, b))
            fns = {"ours": lambda: runtime.matmul(a, b, threads=threads), "numpy": lambda: np.matmul(a, b)}
            if torch is not None:
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                assert torch.matmul(ta, tb).dtype == torch.float16
                fns["torch"] = lambda: torch.matmul(ta, tb)
            seconds = timer(fns, min_repeats=repeats, min_time_s=min_time_s)
            row = {"shape": [m, n, k], "source": runtime.explain(a, b, threads=threads).source}
            row.update({name: 2.0 * m * n * k / s / 1e9 for name, s in seconds.items()})
            rows.append(row)
    return {"cpu": detect_cpu().model_name, "threads": threads, "torch": torch is not None, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shapes", nargs="*", default=[], help='"M N K" each (default: 64^3, 256^3, 512^3)')
    ap.add_argument("--shapes-file")
    ap.add_argument("--repeats", type=int, default=7, help="samples per library at least (the median is kept)")
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds of samples per library at least")
    ap.add_argument("--db", help="a schedule database with float16 records (LOOPTUNE_DB)")
    ap.add_argument("--warm-cache", action="store_true", help="keep the user's kernel cache")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)     # one thread count, in this process
    args = ap.parse_args()
    lines = list(args.shapes)
    if args.shapes_file:
        with open(args.shapes_file) as f:
            lines += f.read().splitlines()
    shapes = parse_shapes(lines or DEFAULT_SHAPES)
    if args.worker is not None:
        print(json.dumps(measure(args.worker, shapes, args.repeats, args.min_time)))
        return
    from looptune.tuner.ship.baselines import per_thread_count_as_user, ratio_table     # the driver side only

    results = per_thread_count_as_user(__file__, args.threads, ["--repeats", str(args.repeats), "--min-time",
                                                                str(args.min_time), "--shapes",
                                                                *(" ".join(map(str, s)) for s in shapes)],
                                       db=args.db, warm_cache=args.warm_cache)
    if args.json:
        print(json.dumps(results))
        return
    print(f"# {results[0]['cpu']}; float16 (numpy's own loop, no BLAS); medians, ratios within each run")
    print("\n".join(ratio_table(results, ("shape", "ours GFLOPS", "np.matmul", "torch f16"),
                                 lambda row: "x".join(map(str, row["shape"])), numpy_format=".2f", ratio_format=".1f")))


if __name__ == "__main__":
    main()
