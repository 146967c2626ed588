#!/usr/bin/env python3
"""The outside harness: what a new user gets, measured the way they would call it.

For each shape: a fresh kernel cache and a fresh user database; ``looptune tune M N K
--budget 2 --db DB --threads T`` (the CLI, as a user runs it); then, in a new process that
imports numpy first like an application, ``C = runtime.matmul(A, B, out=C)`` against
``np.matmul(A, B, out=C)`` (fp32, row-major), each timed as the median of 15 runs of at least
20 ms, the two taking turns run by run (this VM changes speed for minutes at a time; timing
one side after the other measured numpy against itself at 0.67x), threads pinned on both sides (``threads=T``; threadpoolctl limits numpy's BLAS to T).
Timer and pinning are ``looptune.tuner.ship.timing``'s, shared with ``looptune bench``.

Where numpy's OpenBLAS runs kernels below the CPU's ISA (``baselines.blas_info``), numpy with
``OPENBLAS_CORETYPE`` set to the core that fits (``--numpy-core``, default auto) takes turns
too, from a child process (OpenBLAS reads the variable when it loads); the ratio is against the
faster numpy.

    python tools/bench_outside.py --threads 1
    python tools/bench_outside.py --threads 2 --shapes "128 128 128" "600 500 400"
    python tools/bench_outside.py --threads 1 --no-handoff     # the generated code alone
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap

from looptune.tuner.ship.baselines import baseline_core, blas_info

SHAPES_T1 = ["64 64 64", "128 128 128", "256 256 256", "512 512 512", "1024 1024 1024", "131 67 263",
             "1 1024 1024", "64 2048 512", "1568 96 864"]
SHAPES_T2 = ["128 128 128", "256 256 256", "1024 1024 1024", "600 500 400", "1 1024 1024", "64 2048 512",
             "1568 96 864"]

TIMER = textwrap.dedent("""
    import contextlib, json, sys
    import numpy as np
    from looptune import runtime
    from looptune.tuner.ship.baselines import NumpyChild
    from looptune.tuner.ship.timing import pinned_threads, time_interleaved
    m, n, k, threads = (int(x) for x in sys.argv[1:5])
    core = sys.argv[5] if len(sys.argv) > 5 else ""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = np.empty((m, n), np.float32)

    with pinned_threads(threads), contextlib.ExitStack() as stack:
        sides = {"ours": lambda: runtime.matmul(a, b, out=c, threads=threads), "numpy": lambda: np.matmul(a, b, out=c)}
        sides["ours"]()
        assert np.allclose(c, a @ b, rtol=1e-3, atol=1e-3 * k ** 0.5)
        if core:                        # numpy on the fitting OpenBLAS core, in a child process
            child = stack.enter_context(NumpyChild(core, threads))
            child.load(f"{m} {n} {k}", out=True)
            sides["numpy_core"] = child
        # 15 runs of at least 20 ms each, taking turns (who goes first alternates), so every side
        # sees the machine in the same state
        seconds = time_interleaved(sides, min_repeats=15, max_repeats=15, min_time_s=0.0, min_sample_s=0.02,
                                   alternate=True)
    flops = 2.0 * m * n * k
    out = {name: flops / s / 1e9 for name, s in seconds.items()}
    if core:
        out["core"] = child.core
    print(json.dumps({**out, "source": runtime.explain(a, b, threads=threads).source}))
""")


def run_shape(shape: str, threads: int, budget_s: float, handoff: bool, core: str | None = None) -> dict:
    m, n, k = (int(x) for x in shape.split())
    with tempfile.TemporaryDirectory(prefix="looptune-outside-") as tmp:
        env = {**os.environ, "LOOPTUNE_CACHE_DIR": os.path.join(tmp, "cache"), "LOOPTUNE_DB": os.path.join(tmp, "db.h5"),
               "OPENBLAS_NUM_THREADS": str(threads), "LOOPTUNE_NUM_THREADS": str(threads)}
        if not handoff:
            env["LOOPTUNE_NO_NUMPY_HANDOFF"] = "1"
        tune = subprocess.run(["looptune", "tune", str(m), str(n), str(k), "--budget", str(budget_s),
                               "--threads", str(threads), "--db", env["LOOPTUNE_DB"], "--json"],
                              env=env, capture_output=True, text=True, timeout=600)
        if tune.returncode != 0:
            return {"shape": shape, "error": tune.stderr.strip()[-300:]}
        timed = subprocess.run([sys.executable, "-c", TIMER, str(m), str(n), str(k), str(threads), core or ""],
                               env=env, capture_output=True, text=True, timeout=600)
        if timed.returncode != 0:
            return {"shape": shape, "error": timed.stderr.strip()[-300:]}
        stored = json.loads(tune.stdout.strip().splitlines()[-1]).get("gflops")     # what the record says
        return {"shape": shape, "stored": stored, **json.loads(timed.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="*", help='"M N K" strings (default: the issue\'s set for the thread count)')
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--no-handoff", action="store_true", help="serve generated kernels even where numpy was faster")
    ap.add_argument("--numpy-core", default="auto", metavar="auto|off|CORE",
                    help="also numpy with OPENBLAS_CORETYPE=CORE (child process); auto: the fitting core where "
                         "numpy's OpenBLAS runs one below this CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = args.shapes or (SHAPES_T1 if args.threads == 1 else SHAPES_T2)
    blas = blas_info()
    core = baseline_core(blas, args.numpy_core)
    rows = [run_shape(s, args.threads, args.budget, not args.no_handoff, core) for s in shapes]
    for r in rows:
        if "error" not in r:
            r["best"] = max(r["numpy"], r.get("numpy_core", 0.0))
            r["ratio"] = r["ours"] / r["best"]
    if args.json:
        print(json.dumps({"blas": blas.to_dict(), "numpy_core_requested": core, "rows": rows}, indent=1))
        return
    ran = next((r["core"] for r in rows if "core" in r), core)
    extra = f" numpy@{ran} GFLOPS |" if core else ""
    print(f"# {blas.describe()}" + (f"; numpy@{ran}: OPENBLAS_CORETYPE={core}, in a child process" if core else ""))
    print(f"| M N K | source | runtime.matmul GFLOPS | numpy GFLOPS |{extra} ratio (vs {'best' if core else 'numpy'}) |"
          f" stored GFLOPS | served/stored |   ({args.threads} thread(s), out=)")
    print("|" + " --- |" * (8 if core else 7))
    ratios = []
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | error | {r['error']} | |{' |' if core else ''} | | |")
            continue
        ratios.append(r["ratio"])
        theirs = f" {r['numpy_core']:.1f} |" if core else ""
        stored = f" {r['stored']:.1f} | {r['ours'] / r['stored']:.2f} |" if r.get("stored") else " | |"
        print(f"| {r['shape']} | {r['source']} | {r['ours']:.1f} | {r['numpy']:.1f} |{theirs} {r['ratio']:.2f}x |{stored}")
    if ratios:
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        served = [r["ours"] / r["stored"] for r in rows if "error" not in r and r.get("stored")]
        served_geo = f" **{math.exp(sum(map(math.log, served)) / len(served)):.2f}** |" if served else " |"
        print(f"| geomean | | | |{' |' if core else ''} **{geo:.2f}x** (lowest {min(ratios):.2f}x) | |{served_geo}")


if __name__ == "__main__":
    main()
