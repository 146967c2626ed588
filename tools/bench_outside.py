#!/usr/bin/env python3
"""The outside harness: what a new user gets, measured the way they would call it.

For each shape: a fresh kernel cache and a fresh user database; ``looptune tune M N K
--budget 2 --db DB --threads T`` (the CLI, as a user runs it); then, in a new process that
imports numpy first like an application, ``C = runtime.matmul(A, B, out=C)`` against
``np.matmul(A, B, out=C)`` (fp32, row-major), each timed as the median of 15 runs of at least
20 ms, the two taking turns run by run (this VM changes speed for minutes at a time; timing
one side after the other measured numpy against itself at 0.67x), threads pinned on both sides (``threads=T``; threadpoolctl limits numpy's BLAS to T).

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

SHAPES_T1 = ["64 64 64", "128 128 128", "256 256 256", "512 512 512", "1024 1024 1024", "131 67 263",
             "1 1024 1024", "64 2048 512", "1568 96 864"]
SHAPES_T2 = ["128 128 128", "256 256 256", "1024 1024 1024", "600 500 400", "1 1024 1024", "64 2048 512",
             "1568 96 864"]

TIMER = textwrap.dedent("""
    import json, statistics, sys, time
    import numpy as np
    from threadpoolctl import threadpool_limits
    from looptune import runtime
    m, n, k, threads = (int(x) for x in sys.argv[1:5])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = np.empty((m, n), np.float32)

    def reps_for(fn):
        fn()
        t0 = time.perf_counter(); fn(); once = max(time.perf_counter() - t0, 1e-7)
        return max(1, int(0.02 / once))

    def run(fn, reps):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    with threadpool_limits(limits=threads):
        sides = {"ours": lambda: runtime.matmul(a, b, out=c, threads=threads), "numpy": lambda: np.matmul(a, b, out=c)}
        sides["ours"]()
        assert np.allclose(c, a @ b, rtol=1e-3, atol=1e-3 * k ** 0.5)
        reps = {name: reps_for(fn) for name, fn in sides.items()}
        runs = {name: [] for name in sides}
        for r in range(15):             # the two take turns, so both see the machine in the same state
            for name in (("ours", "numpy") if r % 2 == 0 else ("numpy", "ours")):
                runs[name].append(run(sides[name], reps[name]))
        ours, ref = statistics.median(runs["ours"]), statistics.median(runs["numpy"])
    flops = 2.0 * m * n * k
    print(json.dumps({"ours": flops / ours / 1e9, "numpy": flops / ref / 1e9,
                      "source": runtime.explain(a, b, threads=threads).source}))
""")


def run_shape(shape: str, threads: int, budget_s: float, handoff: bool) -> dict:
    m, n, k = (int(x) for x in shape.split())
    with tempfile.TemporaryDirectory(prefix="looptune-outside-") as tmp:
        env = {**os.environ, "LOOPTUNE_CACHE_DIR": os.path.join(tmp, "cache"), "LOOPTUNE_DB": os.path.join(tmp, "db.h5"),
               "OPENBLAS_NUM_THREADS": str(threads), "LOOPTUNE_NUM_THREADS": str(threads)}
        if not handoff:
            env["LOOPTUNE_NO_NUMPY_HANDOFF"] = "1"
        tune = subprocess.run(["looptune", "tune", str(m), str(n), str(k), "--budget", str(budget_s),
                               "--threads", str(threads), "--db", env["LOOPTUNE_DB"]],
                              env=env, capture_output=True, text=True, timeout=600)
        if tune.returncode != 0:
            return {"shape": shape, "error": tune.stderr.strip()[-300:]}
        timed = subprocess.run([sys.executable, "-c", TIMER, str(m), str(n), str(k), str(threads)],
                               env=env, capture_output=True, text=True, timeout=600)
        if timed.returncode != 0:
            return {"shape": shape, "error": timed.stderr.strip()[-300:]}
        return {"shape": shape, **json.loads(timed.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="*", help='"M N K" strings (default: the issue\'s set for the thread count)')
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--no-handoff", action="store_true", help="serve generated kernels even where numpy was faster")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = args.shapes or (SHAPES_T1 if args.threads == 1 else SHAPES_T2)
    rows = [run_shape(s, args.threads, args.budget, not args.no_handoff) for s in shapes]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"| M N K | source | runtime.matmul GFLOPS | numpy GFLOPS | ratio |   ({args.threads} thread(s), out=)")
    print("| --- | --- | --- | --- | --- |")
    ratios = []
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | error | {r['error']} | | |")
            continue
        ratio = r["ours"] / r["numpy"]
        ratios.append(ratio)
        print(f"| {r['shape']} | {r['source']} | {r['ours']:.1f} | {r['numpy']:.1f} | {ratio:.2f}x |")
    if ratios:
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"| geomean | | | | **{geo:.2f}x** (lowest {min(ratios):.2f}x) |")


if __name__ == "__main__":
    main()
