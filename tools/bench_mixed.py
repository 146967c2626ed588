#!/usr/bin/env python3
"""Mixed-application benchmark: runtime.matmul inside code that also calls numpy's BLAS.

A kernel benchmark times one library at a time.  An application alternates: our matmul, then a
small numpy BLAS call and element-wise numpy, then our matmul again.  Both libraries keep a thread
pool (ours, numpy's OpenBLAS) whose idle threads spin for a while after each call before
they sleep; on a machine with as many cores as threads, one pool's spinning threads take the cores
the other pool's call needs.  This tool measures that, each workload once with ``runtime.matmul``
and once with ``np.matmul`` in its place (everything else identical):

    alone   y = matmul(x, W)                       x 128x768, W 768x1024 float32 (no interference)
    mixed   y = matmul(x, W); np.dot(s, s) (64x64); y += bias          (issue "Served speed", a)
    mlp     h = matmul(x, W1) (768x3072); np.maximum(h, 0); o = matmul(h, W2) (3072x768);
            softmax over o's rows; one numpy BLAS call (o[:, :64] @ o[:, :64].T)      (b)
    small   y = matmul(p, q), 96x128 @ 128x128 float32, back to back: the wake-up cost of a pool
            for a small multi-threaded problem (just above the runtime's small_flops)

Threads are pinned on both sides: threadpoolctl for numpy's BLAS, ``threads=`` for runtime.matmul
(LOOPTUNE_NUM_THREADS is set too; pinning, sampler and turn order are ``tuner/ship/timing.py``'s,
shared with ``looptune bench``).  Each sample is a fresh process that runs every workload
once, after ``--idle`` seconds of quiet and a short warm-up, as ``--iters`` back-to-back
iterations; the two sides take turns ``--repeats`` times, and the table gives the median
milliseconds per iteration and runtime.matmul / np.matmul.  The np.matmul side never loads
LoopTune's runtime, so it is the program as it was (with ``LOOPTUNE_BLAS_POOL=1`` numpy's OpenBLAS runs on
our pool once it is loaded, and np.matmul timed in the same process would be numpy on our pool,
not the program without us).

    python tools/bench_mixed.py [--threads 1 2] [--iters 40] [--repeats 7] [--json]

The header names numpy's BLAS core.  Where numpy's OpenBLAS runs kernels below the CPU's ISA, a
third side takes turns: the np.matmul program in processes started with ``OPENBLAS_CORETYPE`` set
to the core that fits (``--numpy-core``, default auto; OpenBLAS reads it when it loads), and the
ratio is against the faster np.matmul program.

``--policies`` compares thread-pool wait policies, each in a fresh process (libgomp and OpenBLAS
read their environment once, when loaded):

    python tools/bench_mixed.py --threads 2 --policies looptune gomp-default passive spin-1000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from looptune.tuner.ship.baselines import baseline_core, blas_info
from looptune.tuner.ship.timing import LocalSampler, pinned_threads, turn_order


# libgomp's and OpenBLAS's environment for each candidate policy; "looptune" leaves both unset, so
# the runtime's own choice applies (runtime/compiler/environment.py, set_openmp_wait_policy)
POLICIES = {
    "looptune": {},
    "openmp": {"LOOPTUNE_NO_POOL": "1"},                     # our kernels on libgomp, not our pool
    "blas-pool": {"LOOPTUNE_BLAS_POOL": "1"},                # numpy's OpenBLAS on our pool as well
    "gomp-default": {"GOMP_SPINCOUNT": "300000"},           # libgomp's built-in spin count
    "passive": {"OMP_WAIT_POLICY": "passive"},              # sleep at once after a parallel region
    "active": {"OMP_WAIT_POLICY": "active"},                # spin (for minutes)
    "spin-1000": {"GOMP_SPINCOUNT": "1000"},
    "spin-10000": {"GOMP_SPINCOUNT": "10000"},
    "spin-100000": {"GOMP_SPINCOUNT": "100000"},
    "gomp-default+openblas-4": {"GOMP_SPINCOUNT": "300000", "OPENBLAS_THREAD_TIMEOUT": "4"},
    "looptune+openblas-4": {"OPENBLAS_THREAD_TIMEOUT": "4"},  # OpenBLAS workers sleep after 2^4 cycles
}
WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "LOOPTUNE_NO_POOL", "LOOPTUNE_BLAS_POOL")
WORKLOADS = ("alone", "mixed", "mlp", "small")


def make_workloads(mm, rng) -> dict:
    """name -> one iteration, with ``mm(a, b)`` the matmul under test; operands made once."""
    f32 = np.float32
    x = rng.standard_normal((128, 768), dtype=f32)
    w = rng.standard_normal((768, 1024), dtype=f32) / 28
    bias = rng.standard_normal(1024, dtype=f32)
    s = rng.standard_normal((64, 64), dtype=f32)
    w1 = rng.standard_normal((768, 3072), dtype=f32) / 28
    w2 = rng.standard_normal((3072, 768), dtype=f32) / 55
    p = rng.standard_normal((96, 128), dtype=f32)
    q = rng.standard_normal((128, 128), dtype=f32)

    def alone():
        return mm(x, w)

    def mixed():
        y = mm(x, w)
        np.dot(s, s)
        y += bias
        return y

    def mlp():
        h = mm(x, w1)
        np.maximum(h, 0, out=h)
        o = mm(h, w2)
        o -= o.max(axis=1, keepdims=True)
        np.exp(o, out=o)
        o /= o.sum(axis=1, keepdims=True)
        head = o[:, :64]
        return np.dot(head, head.T)

    def small():
        return mm(p, q)

    return {"alone": alone, "mixed": mixed, "mlp": mlp, "small": small}


def per_iteration_s(fn, iters: int, idle_s: float) -> float:
    """Seconds per iteration of ``iters`` back-to-back iterations, after ``idle_s`` of quiet (every
    pool asleep, as after other work) and two warm-up iterations."""
    time.sleep(idle_s)
    sampler = LocalSampler(fn, calls_per_sample=iters)
    sampler.prepare(min_sample_s=0.0)
    return sampler.sample()[0]


def side_seconds(side: str, threads: int, workloads, *, iters: int, idle_s: float) -> dict:
    """In this process: seconds per iteration of each workload with one library's matmul.  The
    numpy side never loads LoopTune (its OpenBLAS keeps its own threads: the program as it was
    without us); the looptune side is the program with ``runtime.matmul`` in place."""
    os.environ["LOOPTUNE_NUM_THREADS"] = str(threads)
    with pinned_threads(threads):
        if side == "looptune":
            from looptune import runtime    # only on this side: the numpy side must not load our pool
            mm = lambda a, b: runtime.matmul(a, b, threads=threads)     # noqa: E731
        else:
            mm = np.matmul
        fns = make_workloads(mm, np.random.default_rng(0))
        out = {name: per_iteration_s(fns[name], iters, idle_s) for name in workloads}
        if side == "looptune":
            out["sources"] = {name: runtime.explain(*_operands(name), threads=threads).source for name in workloads}
        else:
            out["core"] = blas_info().core
        return out


def measure(threads_list, workloads, *, iters: int, repeats: int, idle_s: float, core: str | None = None) -> list[dict]:
    """One row per (workload, threads): median ms per iteration with each library, each sample
    taken in a fresh process, the sides taking turns; ``core``: a third side, the np.matmul
    program with ``OPENBLAS_CORETYPE=core``."""
    rows = []
    sides = ["looptune", "numpy", *(["numpy_core"] if core else [])]
    for threads in threads_list:
        samples = {side: [] for side in sides}
        for r in range(repeats):
            for side in turn_order(sides, r):
                cmd = [sys.executable, os.path.abspath(__file__), "--side", side.replace("_core", ""), "--threads",
                       str(threads), "--iters", str(iters), "--idle", str(idle_s), "--workloads", *workloads]
                env = dict(os.environ, OPENBLAS_CORETYPE=core) if side == "numpy_core" else None
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"{side} side: {done.stderr[-2000:]}")
                samples[side].append(json.loads(done.stdout))
        sources = samples["looptune"][-1]["sources"]
        for name in workloads:
            ms = {side: 1e3 * statistics.median(s[name] for s in samples[side]) for side in samples}
            row = {"workload": name, "threads": threads, "looptune_ms": ms["looptune"], "numpy_ms": ms["numpy"],
                   "ratio": ms["looptune"] / ms["numpy"], "source": sources[name]}
            if core:
                row.update(numpy_core=samples["numpy_core"][-1]["core"], numpy_core_ms=ms["numpy_core"])
            row["ratio_vs_best"] = ms["looptune"] / min(row["numpy_ms"], row.get("numpy_core_ms", math.inf))
            rows.append(row)
    return rows


def _operands(workload: str):
    """Operands of the shape the workload's (first) runtime.matmul call has, for ``explain``."""
    m, k, n = {"small": (96, 128, 128), "mlp": (128, 768, 3072)}.get(workload, (128, 768, 1024))
    return np.empty((m, k), np.float32), np.empty((k, n), np.float32)


def markdown(rows: list[dict], policy: str | None = None) -> str:
    """The table; with a numpy_core side, its column too and the ratio against the faster np.matmul."""
    core = next((r["numpy_core"] for r in rows if "numpy_core" in r), None)
    head = (("| policy " if policy is not None else "") + "| workload | threads | source | runtime.matmul ms | np.matmul ms |"
            + (f" np.matmul@{core} ms | ratio (vs best) |" if core else " ratio |"))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        theirs = f" {r['numpy_core_ms']:.3f} |" if core else ""
        lines.append((f"| {policy} " if policy is not None else "") +
                     f"| {r['workload']} | {r['threads']} | {r['source']} | {r['looptune_ms']:.3f} | "
                     f"{r['numpy_ms']:.3f} |{theirs} {r['ratio_vs_best']:.2f}x |")
    return "\n".join(lines)


def compare_policies(args) -> None:
    """Run this tool once per policy in a fresh process; one markdown table over all of them."""
    tables = []
    results = {}
    for policy in args.policies:
        env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
        env.update(POLICIES[policy])
        cmd = [sys.executable, os.path.abspath(__file__), "--json", "--iters", str(args.iters), "--repeats",
               str(args.repeats), "--idle", str(args.idle), "--threads", *map(str, args.threads),
               "--numpy-core", args.numpy_core, "--workloads", *args.workloads]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"policy {policy}: {done.stderr[-2000:]}")
        rows = json.loads(done.stdout)["rows"]
        results[policy] = rows
        tables.append(markdown(rows, policy).splitlines()[2 if tables else 0:])
        print(f"# {policy}: done", file=sys.stderr)
    if args.json:
        print(json.dumps({"policies": results}))
    else:
        print("\n".join(line for t in tables for line in t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--iters", type=int, default=40, help="back-to-back iterations per sample")
    ap.add_argument("--repeats", type=int, default=7, help="samples per library (the median is kept)")
    ap.add_argument("--idle", type=float, default=0.1, help="seconds of quiet before each sample")
    ap.add_argument("--policies", nargs="+", choices=list(POLICIES), help="compare wait policies (fresh processes)")
    ap.add_argument("--numpy-core", default="auto", metavar="auto|off|CORE",
                    help="a third side: the np.matmul program with OPENBLAS_CORETYPE=CORE; auto: the fitting core "
                         "where numpy's OpenBLAS runs one below this CPU")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--side", choices=("looptune", "numpy"), help=argparse.SUPPRESS)   # one sample, in this process
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side_seconds(args.side, args.threads[0], args.workloads, iters=args.iters, idle_s=args.idle)))
        return
    if args.policies:
        compare_policies(args)
        return
    policy = {name: os.environ[name] for name in WAIT_VARIABLES if name in os.environ}   # the user's, not ours
    blas = blas_info()
    core = baseline_core(blas, args.numpy_core)
    rows = measure(args.threads, args.workloads, iters=args.iters, repeats=args.repeats, idle_s=args.idle, core=core)
    if args.json:
        print(json.dumps({"environment": policy, "blas": blas.to_dict(), "numpy_core_requested": core, "rows": rows}))
    else:
        print(f"# mixed-application benchmark; wait policy environment: {policy or 'as LoopTune sets it'}")
        print(f"# {blas.describe()}" + (f"; third side: np.matmul with OPENBLAS_CORETYPE={core}" if core else ""))
        print(markdown(rows))


if __name__ == "__main__":
    main()
