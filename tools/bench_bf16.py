#!/usr/bin/env python3
"""bfloat16 matmul as a numpy user gets it: ``runtime.matmul`` on ml_dtypes arrays against torch's
bf16 matmul and ``np.matmul`` on the same arrays, plus our own float32 for the bf16/fp32 ratio.

One process per thread count, numpy imported first like an application; every library pinned to
the same thread count (torch.set_num_threads, threadpoolctl for numpy's BLAS, ``threads=`` for us);
each figure the median of 9 runs of at least 20 ms, the libraries timed in turns (at 2+ threads
a quarter second apart, so no library's idle threads still spin), after one call (which compiles our kernel,
from a cold cache unless --warm-cache).  ``--db`` serves the records of a database built with
``looptune build-db --dtype bfloat16 ...``; without it the analytic default schedule is served.

    python tools/bench_bf16.py --threads 1 --shapes "1024 1024 1024"
    python tools/bench_bf16.py --threads 2 --shapes-file tools/shapes/dl-public.txt --db bf16.h5
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

# How many calls make a timed run of about 20 ms: calibrated on a loop, not on one call (a first
# call can be slow); pasted into both timing scripts (the torch-alone one must not import LoopTune).
CALLS_PER_RUN = textwrap.dedent("""
    def calls_per_run(fn, run_s=0.02):
        fn()
        r = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(r):
                fn()
            spent = time.perf_counter() - t0
            if spent >= run_s / 4 or r >= 1 << 20:
                return max(1, int(r * run_s / max(spent, 1e-9)))
            r *= 4
""")

TIMER = textwrap.dedent("""
    import json, statistics, sys, time
    import numpy as np
    import ml_dtypes
    import torch
    from threadpoolctl import threadpool_limits
    from looptune import runtime
    from looptune.runtime.compiler.machine import detect_cpu
    threads = int(sys.argv[1]); shapes = json.loads(sys.argv[2]); with_fp32 = sys.argv[3] == "1"
    torch.set_num_threads(threads)
    bf16 = ml_dtypes.bfloat16
""") + CALLS_PER_RUN + textwrap.dedent("""

    def timed(fns):
        # median seconds per call of each of fns, timed in turns (runs of >= 20 ms each), so a
        # change of machine speed during the measurement hits all of them alike
        reps = [calls_per_run(fn) for fn in fns]
        runs = [[] for _ in fns]
        for _ in range(9):
            for fn, r, out in zip(fns, reps, runs):
                if threads > 1:
                    # let the previous library's idle threads go to sleep first (libgomp spins for
                    # milliseconds, OpenBLAS yields for longer), or this run measures the two
                    # pools fighting over the cores rather than this library; then one untimed
                    # call wakes this library's own sleeping threads (a loop in an application
                    # pays that once, not per call)
                    time.sleep(0.25)
                    fn()
                t0 = time.perf_counter()
                for _ in range(r):
                    fn()
                out.append((time.perf_counter() - t0) / r)
        return [statistics.median(x) for x in runs]

    out = []
    with threadpool_limits(limits=threads):
        for b, m, n, k, layout in shapes:
            rng = np.random.default_rng(0)
            lead = (b,) if b > 1 else ()
            a32 = rng.standard_normal(lead + (m, k)).astype(np.float32)
            b32 = rng.standard_normal(lead + (k, n)).astype(np.float32)
            if layout[0] == "t":      # A a transposed view of a (k, m) array, as the layout says
                a32 = np.ascontiguousarray(np.swapaxes(a32, -1, -2)); a32 = np.swapaxes(a32, -1, -2)
            if layout[1] == "t":
                b32 = np.ascontiguousarray(np.swapaxes(b32, -1, -2)); b32 = np.swapaxes(b32, -1, -2)
            a, bb = a32.astype(bf16), b32.astype(bf16)
            ta, tb = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16), torch.from_numpy(bb.astype(np.float32)).to(torch.bfloat16)
            c = runtime.matmul(a, bb, threads=threads)
            ref = np.matmul(a.astype(np.float32), bb.astype(np.float32))
            assert c.dtype == np.float32 and np.allclose(c, ref, rtol=1e-4, atol=1e-4 * k ** 0.5)
            flops = 2.0 * b * m * n * k
            fns = [lambda: runtime.matmul(a, bb, threads=threads), lambda: torch.matmul(ta, tb),
                   lambda: np.matmul(a, bb)]
            if with_fp32:
                fns.append(lambda: runtime.matmul(a32, b32, threads=threads))
            seconds = timed(fns)
            row = {"shape": [b, m, n, k, layout], "source": runtime.explain(a, bb, threads=threads).source}
            for name, sec in zip(("ours", "torch", "numpy", "ours_fp32"), seconds):
                row[name] = flops / sec / 1e9
            out.append(row)
    print(json.dumps({"cpu": detect_cpu().model_name, "bf16": detect_cpu().bf16_isa, "rows": out}))
""")


TORCH_ALONE = textwrap.dedent("""
    import json, statistics, sys, time
    import torch
    threads = int(sys.argv[1]); shapes = json.loads(sys.argv[2])
    torch.set_num_threads(threads)
""") + CALLS_PER_RUN + textwrap.dedent("""
    rows = []
    for b, m, n, k, layout in shapes:
        lead = (b,) if b > 1 else ()
        ta = torch.randn(lead + ((k, m) if layout[0] == "t" else (m, k))).to(torch.bfloat16)
        tb = torch.randn(lead + ((n, k) if layout[1] == "t" else (k, n))).to(torch.bfloat16)
        ta = ta.transpose(-1, -2) if layout[0] == "t" else ta
        tb = tb.transpose(-1, -2) if layout[1] == "t" else tb
        fn = lambda: torch.matmul(ta, tb)
        r = calls_per_run(fn)
        runs = []
        for _ in range(9):
            t0 = time.perf_counter()
            for _ in range(r):
                fn()
            runs.append((time.perf_counter() - t0) / r)
        rows.append(2.0 * b * m * n * k / statistics.median(runs) / 1e9)
    print(json.dumps(rows))
""")


def parse_shapes(lines: list[str]) -> list[list[int]]:
    shapes = []
    for line in lines:
        words = line.split("#")[0].split()
        if len(words) < 3:
            continue
        m, n, k = (int(w) for w in words[:3])
        batch = next((int(w.split("=")[1]) for w in words[3:] if w.startswith("batch=")), 1)
        layout = next((w.split("=")[1] for w in words[3:] if w.startswith("layout=")), "nn")
        shapes.append([batch, m, n, k, layout])
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="*", default=[])
    ap.add_argument("--shapes-file")
    ap.add_argument("--db", help="a schedule database with bfloat16 records (LOOPTUNE_DB)")
    ap.add_argument("--fp32", action="store_true", help="also time our float32 on the same shapes")
    ap.add_argument("--warm-cache", action="store_true", help="keep the user's kernel cache")
    ap.add_argument("--torch-alone", action="store_true",
                    help="also time torch in a process of its own (no numpy BLAS, no LoopTune: its best case); "
                         "at 2+ threads torch's figures inside the shared process can collapse")
    args = ap.parse_args()
    lines = list(args.shapes)
    if args.shapes_file:
        with open(args.shapes_file) as f:
            lines += f.read().splitlines()
    shapes = parse_shapes(lines) or [[1, 1024, 1024, 1024, "nn"]]
    env = dict(os.environ, LOOPTUNE_FALLBACK="nearest")
    if args.db:
        env["LOOPTUNE_DB"] = os.path.abspath(args.db)
    with tempfile.TemporaryDirectory() as cache:
        if not args.warm_cache:
            env["LOOPTUNE_CACHE_DIR"] = cache
        done = subprocess.run([sys.executable, "-c", TIMER, str(args.threads), json.dumps(shapes),
                               "1" if args.fp32 else "0"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    alone = None
    if args.torch_alone:
        solo = subprocess.run([sys.executable, "-c", TORCH_ALONE, str(args.threads), json.dumps(shapes)],
                              capture_output=True, text=True, check=True)
        alone = json.loads(solo.stdout.strip().splitlines()[-1])
    print(f"# {result['cpu']}, bf16 via {result['bf16']}, {args.threads} thread(s)")
    head = "| shape | ours GFLOPS | torch bf16 | np.matmul (ml_dtypes) | ours/torch | ours/numpy |"
    head += " torch alone | ours/torch alone |" if alone else ""
    print(head + (" ours fp32 | bf16/fp32 |" if args.fp32 else "") + " source |")
    print("|" + "---|" * (head.count("|") - 1 + (2 if args.fp32 else 0) + 1))
    r_torch, r_np, r_alone = [], [], []
    for i, row in enumerate(result["rows"]):
        b, m, n, k, layout = row["shape"]
        shape = f"{m}x{n}x{k}" + (f" b{b}" if b > 1 else "") + (f" {layout}" if layout != "nn" else "")
        rt, rn = row["ours"] / row["torch"], row["ours"] / row["numpy"]
        r_torch.append(rt)
        r_np.append(rn)
        extra = ""
        if alone:
            r_alone.append(row["ours"] / alone[i])
            extra += f" {alone[i]:.0f} | {r_alone[-1]:.2f}x |"
        extra += f" {row['ours_fp32']:.0f} | {row['ours'] / row['ours_fp32']:.2f}x |" if args.fp32 else ""
        print(f"| {shape} | {row['ours']:.0f} | {row['torch']:.0f} | {row['numpy']:.0f} | {rt:.2f}x | {rn:.2f}x |"
              f"{extra} {row['source']} |")
    geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))      # noqa: E731
    print(f"\ngeomean ours/torch {geo(r_torch):.2f}x (lowest {min(r_torch):.2f}x), "
          f"ours/numpy {geo(r_np):.2f}x (lowest {min(r_np):.2f}x) over {len(r_torch)} shapes"
          + (f"; ours/torch alone {geo(r_alone):.2f}x (lowest {min(r_alone):.2f}x)" if r_alone else ""))


if __name__ == "__main__":
    main()
