#!/usr/bin/env python3
"""Stacks of small matrices as a numpy user gets them: ``runtime.matmul`` on (B, M, K) @ (B, K, N)
(and on a stack times one matrix) against ``np.matmul`` on the same arrays (one BLAS call per
matrix) and, when torch is installed, ``torch.matmul``; out of the box (no user database, the
trials against numpy on), float32.

One process per thread count, numpy imported first; every library pinned to the same thread count
and timed with the shared timer of ``looptune bench`` (``tuner/ship/timing.py``) after two
warm-up calls, so samples start at the third call (trials included: they are what a user meets);
medians, ratios within one run.  Each result is checked against numpy before it is timed.

    python tools/bench_stacks.py                      # the issue's stacks at 1 and 2 threads
    python tools/bench_stacks.py --threads 1 --stacks "512 8 8 8" "64 32 32 32 bcast"
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np      # first, as in an application

DEFAULT_STACKS = ["4096 4 4 4", "2048 8 8 8", "1024 16 16 16", "256 32 32 32", "4096 4 4 4 bcast"]


def measure(threads: int, stacks: list[str], repeats: int, min_time_s: float) -> dict:
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
        for spec in stacks:
            words = spec.split()
            batch, m, n, k = map(int, words[:4])
            rng = np.random.default_rng(0)
            a = rng.standard_normal((batch, m, k), dtype=np.float32)
            b = rng.standard_normal((k, n) if "bcast" in words else (batch, k, n), dtype=np.float32)
            np.testing.assert_allclose(runtime.matmul(a, b, threads=threads), a @ b, rtol=1e-4, atol=1e-4)
            fns = {"ours": lambda: runtime.matmul(a, b, threads=threads), "numpy": lambda: np.matmul(a, b)}
            if torch is not None:
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                fns["torch"] = lambda: torch.matmul(ta, tb)
            seconds = timer(fns, min_repeats=repeats, min_time_s=min_time_s)
            row = {"stack": spec, "source": runtime.explain(a, b, threads=threads).source}
            row.update({name: 2.0 * batch * m * n * k / s / 1e9 for name, s in seconds.items()})
            rows.append(row)
    return {"cpu": detect_cpu().model_name, "threads": threads, "torch": torch is not None, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stacks", nargs="*", default=DEFAULT_STACKS, help='"B M N K [bcast]" each')
    ap.add_argument("--repeats", type=int, default=21, help="samples per library at least (the median is kept)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of samples per library at least")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.stacks, args.repeats, args.min_time)))
        return
    from looptune.tuner.ship.baselines import per_thread_count, ratio_table     # the driver side only

    with tempfile.TemporaryDirectory() as scratch:      # a new user: cold kernel cache, no database
        env = dict(os.environ, LOOPTUNE_CACHE_DIR=scratch, LOOPTUNE_DB=os.path.join(scratch, "user.h5"))
        results = per_thread_count(__file__, args.threads, ["--repeats", str(args.repeats), "--min-time",
                                                            str(args.min_time), "--stacks", *args.stacks], env)
    if args.json:
        print(json.dumps(results))
        return
    print(f"# {results[0]['cpu']}; float32 stacks, out of the box; medians, ratios within each run")
    print("\n".join(ratio_table(results, ("stack (B M N K)", "ours GFLOPS", "numpy", "torch"), lambda row: row["stack"])))


if __name__ == "__main__":
    main()
