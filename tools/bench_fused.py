#!/usr/bin/env python3
"""Fused epilogues as a numpy or torch user meets them: ``runtime.matmul(x, w, bias=, activation=,
residual=)`` (one kernel, the epilogue in its store stage) against numpy's unfused composition,
written as a user writes it (``x @ w + b``, then the activation in numpy:
``0.5*y*(1+np.tanh(0.7978845608*(y+0.044715*y**3)))`` for gelu_tanh, ``np.maximum(y, 0)`` for
relu, ``+ r`` for the residual; ``looptune.tuner.measure.fused.NUMPY_ACTIVATIONS``, what the tuner
times numpy on) and, when torch is installed, torch's (``F.gelu(F.linear(x, w.T, b),
approximate="tanh")``, ``F.relu(F.linear(...))``, ``F.linear(...) + r``).

Cases: (a) single layers, 128x3072x768 bias+gelu_tanh, 512x1024x1024 bias+relu, 128x768x3072
bias+residual; (b) a BERT-base MLP block on (128, 768) activations, ``h = gelu(x @ W1 + b1)`` with
W1 768x3072, ``y = h @ W2 + b2 + x`` with W2 3072x768 (gelu as gelu_tanh, the approximation numpy
users write; two fused calls on our side).  GFLOPS count the products' 2MNK only.

One process per thread count, numpy imported first like an application; every library pinned to
the same thread count (``threads=`` for us, threadpoolctl for numpy, ``torch.set_num_threads``:
``looptune.tuner.ship.timing.pinned_threads``) and timed with the shared timer of ``looptune
bench`` (``time_interleaved`` at one thread, the libraries taking turns sample by sample;
``time_phased`` at more): two warm-up calls (the first compiles our kernel), so samples start at
the third call; each figure is the median sample, and the ratios are of medians of the same run.
Each result is checked against numpy's in float64 before it is timed.  ``--db`` serves a database
built with ``looptune build-db`` on ``epilogue=`` shape lines; without it a fused problem is served
as ``runtime.matmul`` serves it untuned (the plain product's nearest record, or the default).

    python tools/bench_fused.py                        # 1 and 2 threads
    python tools/bench_fused.py --threads 1 --repeats 3 --min-time 0.02
"""
from __future__ import annotations

import argparse
import json

import numpy as np      # first, as in an application

LAYERS = [("bias+gelu_tanh", 128, 3072, 768), ("bias+relu", 512, 1024, 1024), ("bias+residual", 128, 768, 3072)]
BERT = (128, 768, 3072)         # tokens, hidden, intermediate


def _layer(case: str, m: int, n: int, k: int, threads: int, torch):
    """(functions to time, flops, ours and numpy's for the check, the problems runtime.matmul serves)."""
    from looptune import runtime
    from looptune.runtime.compiler.epilogue import Epilogue
    from looptune.tuner.measure.fused import NUMPY_ACTIVATIONS

    epilogue = Epilogue.parse(case)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    w, b = rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32) if epilogue.residual else None
    act = NUMPY_ACTIVATIONS.get(epilogue.activation, lambda y: y)

    def ours():
        return runtime.matmul(x, w, bias=b, activation=epilogue.activation, residual=r, threads=threads)

    def numpy_():
        y = act(x @ w + b)
        return y if r is None else y + r

    fns = {"ours": ours, "numpy": numpy_}
    if torch is not None:
        import torch.nn.functional as F

        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w).T, torch.from_numpy(b)
        tr = None if r is None else torch.from_numpy(r)
        fns["torch"] = {"gelu_tanh": lambda: F.gelu(F.linear(tx, tw, tb), approximate="tanh"),
                        "relu": lambda: F.relu(F.linear(tx, tw, tb)),
                        None: lambda: F.linear(tx, tw, tb) + tr}[epilogue.activation]
    return fns, 2.0 * m * n * k, (ours, numpy_), [(m, n, k, epilogue.op)]


def _bert(threads: int, torch):
    from looptune import runtime
    from looptune.tuner.measure.fused import NUMPY_ACTIVATIONS

    t, d, f = BERT
    rng = np.random.default_rng(1)
    x = rng.standard_normal((t, d)).astype(np.float32)
    w1 = (rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((f, d)) / np.sqrt(f)).astype(np.float32)
    b1, b2 = rng.standard_normal(f).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    gelu = NUMPY_ACTIVATIONS["gelu_tanh"]

    def ours():
        h = runtime.matmul(x, w1, bias=b1, activation="gelu_tanh", threads=threads)
        return runtime.matmul(h, w2, bias=b2, residual=x, threads=threads)

    def numpy_():
        h = gelu(x @ w1 + b1)
        return h @ w2 + b2 + x

    fns = {"ours": ours, "numpy": numpy_}
    if torch is not None:
        import torch.nn.functional as F

        tx, t1, t2 = torch.from_numpy(x), torch.from_numpy(w1).T, torch.from_numpy(w2).T
        tb1, tb2 = torch.from_numpy(b1), torch.from_numpy(b2)
        fns["torch"] = lambda: F.linear(F.gelu(F.linear(tx, t1, tb1), approximate="tanh"), t2, tb2) + tx
    return fns, 4.0 * t * d * f, (ours, numpy_), [(t, f, d, "matmul+bias+gelu_tanh"), (t, d, f, "matmul+bias+residual")]


def measure(threads: int, repeats: int, min_time_s: float) -> dict:
    """In this process: GFLOPS of each library on each case at ``threads``."""
    from looptune.runtime.api import current_resolver
    from looptune.runtime.compiler.dispatch import dispatch_key
    from looptune.tuner.ship.baselines import blas_info
    from looptune.tuner.ship.timing import pinned_threads, time_interleaved, time_phased

    try:
        import torch
    except ImportError:
        torch = None
    timer = time_phased if threads > 1 else time_interleaved
    rows = []
    cases = [(f"{case} {m}x{n}x{k}", lambda c=(case, m, n, k): _layer(*c, threads, torch)) for case, m, n, k in LAYERS]
    cases.append((f"BERT-base MLP ({BERT[0]}x{BERT[1]}, {BERT[2]})", lambda: _bert(threads, torch)))
    with pinned_threads(threads, torch):
        for name, make in cases:
            fns, flops, (ours, numpy_), problems = make()
            got, want = ours().astype(np.float64), numpy_().astype(np.float64)
            err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
            assert err < 1e-4, f"{name}: ours differs from numpy by {err:.2e} (relative to the largest value)"
            seconds = timer(fns, min_repeats=repeats, min_time_s=min_time_s)
            dispatch = current_resolver().dispatch
            sources = [dispatch.get(dispatch_key("float32", m, n, k, 1, "nn", threads, op=op)) for m, n, k, op in problems]
            row = {"case": name, "source": "+".join(hit[1].source if hit else "?" for hit in sources), "error": err}
            row.update({lib: flops / s / 1e9 for lib, s in seconds.items()})
            rows.append(row)
    from looptune.runtime.compiler.machine import detect_cpu

    return {"cpu": detect_cpu().model_name, "blas": blas_info().describe(), "threads": threads,
            "torch": None if torch is None else torch.__version__, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7, help="samples per library at least (the median is kept)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of samples per library at least")
    ap.add_argument("--db", help="a schedule database with fused records (LOOPTUNE_DB)")
    ap.add_argument("--warm-cache", action="store_true", help="keep the user's kernel cache")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)     # one thread count, in this process
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.repeats, args.min_time)))
        return
    from looptune.tuner.ship.baselines import per_thread_count_as_user, ratio_table     # the driver side only

    results = per_thread_count_as_user(__file__, args.threads, ["--repeats", str(args.repeats), "--min-time",
                                                                str(args.min_time)], db=args.db,
                                       warm_cache=args.warm_cache)
    if args.json:
        print(json.dumps(results))
        return
    torch = next((r["torch"] for r in results if r["torch"]), None)
    print(f"# {results[0]['cpu']}; float32; {results[0]['blas']}" + (f"; torch {torch}" if torch else ""))
    print("# GFLOPS (2MNK per product), medians from the third call on; ratios within each run")
    print("\n".join(ratio_table(results, ("case", "ours", "numpy unfused", "torch"), lambda row: row["case"])))


if __name__ == "__main__":
    main()
