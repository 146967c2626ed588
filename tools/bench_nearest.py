#!/usr/bin/env python3
"""Leave-one-out: how well does nearest-record lookup serve problems that are not in the database?

For each problem of the shape file, the database minus every record of that problem's sizes
is written to a temporary file; runtime.matmul then serves the problem from the nearest
remaining record (no live tuning), timed against numpy in the same run.

    OPENBLAS_NUM_THREADS=1 python tools/bench_nearest.py --db dl.h5 --shapes tools/shapes/dl-public.txt
"""
from __future__ import annotations

import argparse
import os
import tempfile

from looptune.database import load, save
from looptune.runtime.compiler.workload import read_shapes
from looptune.tuner.ship.bench import geomean, run_bench, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    from looptune import runtime

    records = list(load(args.db))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(read_shapes(args.shapes)):
            sizes = (p.m, p.n, p.k, p.batch, p.dtype, p.layout)
            rest = [r for r in records
                    if (r.problem.m, r.problem.n, r.problem.k, r.problem.batch, r.problem.dtype, r.problem.layout) != sizes]
            path = os.path.join(tmp, f"loo{i}.h5")
            save(path, rest)
            runtime.configure(user_db=path, embedded_db=None, fallback="nearest", max_distance=float("inf"))
            rows += run_bench([p], threads=args.threads, with_torch=False)
            print(f"{p}: {rows[-1].looptune_gflops:.1f} GFLOPS vs numpy {rows[-1].numpy_gflops:.1f} "
                  f"({rows[-1].vs_numpy:.2f}x, {rows[-1].source})", flush=True)
    print(table(rows))
    print(f"geomean vs numpy served by nearest records: {geomean([r.vs_numpy for r in rows]):.3f}")


if __name__ == "__main__":
    main()
