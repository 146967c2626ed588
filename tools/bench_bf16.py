#!/usr/bin/env python3
"""bfloat16 matmul as a numpy user gets it: ``runtime.matmul`` on ml_dtypes arrays against torch's
bf16 matmul and ``np.matmul`` on the same arrays, plus our own float32 for the bf16/fp32 ratio.

One process per thread count, numpy imported first like an application; every library pinned to
the same thread count (``threads=`` for us, threadpoolctl for numpy, ``torch.set_num_threads``) and
timed with the shared timer of ``looptune bench`` (``tuner/ship/timing.py``): samples of at least
20 ms, at least 9 per library, the median kept; at one thread the libraries take turns sample by
sample, at 2+ each is timed in blocks of its own a quarter second apart (so no library's idle
threads still spin), the best block kept.  Two warm-up calls first (the first compiles our kernel,
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

SAMPLE_S = 0.02     # seconds per sample at least
SAMPLES = 9         # samples per library at least (the median is kept)
QUIET_S = 0.25      # at 2+ threads, between libraries: libgomp spins for milliseconds, OpenBLAS yields longer


def operands(shape: list, rng):
    """float32 A and B of ``[batch, m, n, k, layout]`` (a transposed view where the layout says t)."""
    import numpy as np

    b, m, n, k, layout = shape
    lead = (b,) if b > 1 else ()
    a32 = rng.standard_normal(lead + (m, k)).astype(np.float32)
    b32 = rng.standard_normal(lead + (k, n)).astype(np.float32)
    if layout[0] == "t":      # A a transposed view of a (k, m) array, as the layout says
        a32 = np.swapaxes(np.ascontiguousarray(np.swapaxes(a32, -1, -2)), -1, -2)
    if layout[1] == "t":
        b32 = np.swapaxes(np.ascontiguousarray(np.swapaxes(b32, -1, -2)), -1, -2)
    return a32, b32


def measure(threads: int, shapes: list[list], with_fp32: bool) -> dict:
    """In this process: GFLOPS of each library on each shape at ``threads``."""
    # imported here, in the worker process (thread variables set first), in an application's order
    import numpy as np
    import ml_dtypes
    import torch

    from looptune import runtime
    from looptune.runtime.compiler.machine import detect_cpu
    from looptune.tuner.ship.timing import pinned_threads, time_interleaved, time_phased

    timing = {"min_repeats": SAMPLES, "min_sample_s": SAMPLE_S}
    out = []
    with pinned_threads(threads, torch):
        for shape in shapes:
            b, m, n, k, layout = shape
            a32, b32 = operands(shape, np.random.default_rng(0))
            a, bb = a32.astype(ml_dtypes.bfloat16), b32.astype(ml_dtypes.bfloat16)
            ta = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
            tb = torch.from_numpy(bb.astype(np.float32)).to(torch.bfloat16)
            c = runtime.matmul(a, bb, threads=threads)
            ref = np.matmul(a.astype(np.float32), bb.astype(np.float32))
            assert c.dtype == np.float32 and np.allclose(c, ref, rtol=1e-4, atol=1e-4 * k ** 0.5)
            fns = {"ours": lambda: runtime.matmul(a, bb, threads=threads), "torch": lambda: torch.matmul(ta, tb),
                   "numpy": lambda: np.matmul(a, bb)}
            if with_fp32:
                fns["ours_fp32"] = lambda: runtime.matmul(a32, b32, threads=threads)
            seconds = (time_phased(fns, idle_s=QUIET_S, **timing) if threads > 1 else time_interleaved(fns, **timing))
            row = {"shape": shape, "source": runtime.explain(a, bb, threads=threads).source}
            row.update({name: 2.0 * b * m * n * k / sec / 1e9 for name, sec in seconds.items()})
            out.append(row)
    cpu = detect_cpu()
    return {"cpu": cpu.model_name, "bf16": cpu.bf16_isa, "rows": out}


def measure_torch_alone(threads: int, shapes: list[list]) -> list[float]:
    """In this process, where only torch computes (LoopTune's runtime never loads, numpy's BLAS is
    never called): torch's bf16 GFLOPS on each shape at ``threads``, its best case."""
    import torch        # here: this process must not load LoopTune's runtime or numpy's BLAS first

    from looptune.tuner.ship.timing import pinned_threads, time_interleaved    # (loads neither)

    rows = []
    with pinned_threads(threads, torch):
        for b, m, n, k, layout in shapes:
            lead = (b,) if b > 1 else ()
            ta = torch.randn(lead + ((k, m) if layout[0] == "t" else (m, k))).to(torch.bfloat16)
            tb = torch.randn(lead + ((n, k) if layout[1] == "t" else (k, n))).to(torch.bfloat16)
            ta = ta.transpose(-1, -2) if layout[0] == "t" else ta
            tb = tb.transpose(-1, -2) if layout[1] == "t" else tb
            sec = time_interleaved({"torch": lambda: torch.matmul(ta, tb)}, min_repeats=SAMPLES, min_sample_s=SAMPLE_S)
            rows.append(2.0 * b * m * n * k / sec["torch"] / 1e9)
    return rows


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
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)             # one thread count, in this process
    ap.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)   # the worker times torch alone
    args = ap.parse_args()
    lines = list(args.shapes)
    if args.shapes_file:
        with open(args.shapes_file) as f:
            lines += f.read().splitlines()
    shapes = parse_shapes(lines) or [[1, 1024, 1024, 1024, "nn"]]
    if args.worker is not None:
        print(json.dumps(measure_torch_alone(args.worker, shapes) if args.torch_only
                         else measure(args.worker, shapes, args.fp32)))
        return
    from looptune.tuner.ship.baselines import per_thread_count, per_thread_count_as_user     # the driver side only

    shape_args = ["--shapes", *(f"{m} {n} {k} batch={b} layout={layout}" for b, m, n, k, layout in shapes)]
    [result] = per_thread_count_as_user(__file__, [args.threads], [*shape_args, *(["--fp32"] if args.fp32 else [])],
                                        db=args.db, warm_cache=args.warm_cache)
    alone = None
    if args.torch_alone:
        [alone] = per_thread_count(__file__, [args.threads], [*shape_args, "--torch-only"], dict(os.environ))
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
