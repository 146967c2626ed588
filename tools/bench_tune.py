#!/usr/bin/env python3
"""`looptune tune` on shapes it never saw, as a user runs it: wall time and tuned/numpy.

Each shape runs ``looptune tune M N K --budget B --threads T --json`` in a fresh process with a
fresh kernel cache and a fresh user database (every compile paid, nothing tuned before), and the
wall time includes the CLI's start.  The GFLOPS are the stored, real-size measurement; numpy is
timed by the same worker in the same run at the same thread count.  The header names numpy's
BLAS core (``looptune.tuner.ship.baselines``); where numpy's OpenBLAS runs kernels below the
CPU's ISA, numpy with ``OPENBLAS_CORETYPE`` set to the fitting core (``--numpy-core``, default
auto) is timed as well, in a child process after the tuning runs, and the ratio is against the
faster numpy.

    python tools/bench_tune.py --threads 1
    python tools/bench_tune.py --threads 2 --shapes "2048 2048 2048" "600 500 400"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.ship.baselines import baseline_core, blas_info, numpy_core_gflops

# sizes absent from the paper grid, the training mix and the shipped database (as squares,
# skinny, odd and large shapes), plus the two 2-thread cases
SHAPES = ["96 200 333", "257 257 257", "999 1001 997", "77 1500 640", "1500 96 512", "384 1152 96",
          "24 4096 1024", "700 700 70", "1 2048 2048", "3000 64 256"]
SHAPES_2_THREADS = SHAPES + ["2048 2048 2048", "600 500 400"]


def tune_once(shape: str, threads: int, budget_s: float, *, dtype: str = "float32", policy: str | None = None,
              batch: int = 1, layout: str = "nn") -> dict:
    """One ``looptune tune`` in a fresh process, cache and user database; ``policy``: the CLI's
    ``--policy`` (None: the shipped policy)."""
    m, n, k = shape.split()
    with tempfile.TemporaryDirectory(prefix="lt-bench-tune-") as tmp:
        env = dict(os.environ, LOOPTUNE_CACHE_DIR=os.path.join(tmp, "cache"), LOOPTUNE_DB=os.path.join(tmp, "db.h5"))
        cmd = [sys.executable, "-m", "looptune.tuner.cli", "tune", m, n, k, "--budget", str(budget_s),
               "--threads", str(threads), "--dtype", dtype, "--batch", str(batch), "--layout", layout, "--json"] \
            + (["--policy", policy] if policy else [])
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall_s = time.perf_counter() - t0
    if done.returncode != 0:
        return {"shape": shape, "wall_s": wall_s, "error": done.stderr.strip()[-300:]}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"shape": shape, "wall_s": wall_s, "gflops": out["gflops"], "numpy_gflops": out["numpy_gflops"],
            "ratio": out["speedup_vs_numpy"], "found_by": out["found_by"], "candidates": out["candidates"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--shapes", nargs="+", help='"M N K" strings (default: the built-in unseen set)')
    ap.add_argument("--numpy-core", default="auto", metavar="auto|off|CORE",
                    help="also numpy with OPENBLAS_CORETYPE=CORE (child process); auto: the fitting core where "
                         "numpy's OpenBLAS runs one below this CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = args.shapes or (SHAPES_2_THREADS if args.threads > 1 else SHAPES)
    blas = blas_info()
    core = baseline_core(blas, args.numpy_core)
    rows = [tune_once(s, args.threads, args.budget) for s in shapes]
    ran = None
    if core:
        ok_rows = [r for r in rows if "error" not in r]
        ran, figures = numpy_core_gflops([MatmulProblem(*map(int, r["shape"].split())) for r in ok_rows], core,
                                         args.threads)
        for r, gf in zip(ok_rows, figures):
            r["numpy_core"], r["numpy_core_gflops"] = ran, gf
            r["ratio"] = r["gflops"] / max(r["numpy_gflops"], gf or 0.0)     # against the faster numpy
    if args.json:
        print(json.dumps({"blas": blas.to_dict(), "numpy_core_requested": core, "rows": rows}))
        return
    print(f"# {blas.describe()}" + (f"; numpy@{ran}: OPENBLAS_CORETYPE={core}, in a child process" if core else ""))
    extra = f" numpy@{ran} GFLOPS |" if core else ""
    print(f"| M N K | wall s | tuned GFLOPS | numpy GFLOPS |{extra} ratio{' (vs best)' if core else ''} | found by | "
          f"candidates |   ({args.threads} thread(s), --budget {args.budget:g})")
    print("|" + " --- |" * (8 if core else 7))
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['wall_s']:.2f} | failed: {r['error']} | |{' |' if core else ''} | | |")
            continue
        theirs = f" {r['numpy_core_gflops']:.1f} |" if core else ""
        print(f"| {r['shape']} | {r['wall_s']:.2f} | {r['gflops']:.1f} | {r['numpy_gflops']:.1f} |{theirs} "
              f"{r['ratio']:.2f}x | {r['found_by']} | {r['candidates']} |")
    ok = [r for r in rows if "error" not in r and r["ratio"]]
    if ok:
        geo = math.exp(sum(math.log(r["ratio"]) for r in ok) / len(ok))
        print(f"| geomean | max wall {max(r['wall_s'] for r in rows):.2f} s | | |{' |' if core else ''} **{geo:.2f}x** "
              f"(lowest {min(r['ratio'] for r in ok):.2f}x) | | |")


if __name__ == "__main__":
    main()
