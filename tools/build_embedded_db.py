#!/usr/bin/env python3
"""Regenerate the embedded default schedule database shipped in the package (runtime/data/default.h5).

It holds tuned records for common problem families on this machine class, for one and two
threads: the quick, transformer, CNN and decode presets, square sizes, and a fixed sample of
the LoopTune paper grid.  dl-public shapes are deliberately left out, so that set stays a
held-out test of nearest-record lookup for the shipped database.

    python tools/build_embedded_db.py [--budget 2.5] [--tuner auto] [--threads 1 2]     # ~11 min on 2 cores

The records of other machines already in the shipped file are kept when they come from the
current code generator (``--drop-other-machines`` drops them): the file carries one set of
records per machine class it was built on, and each machine serves its own first (others'
rank below, as nearest records).  This machine's records are always rebuilt.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runtime" / "data" / "default.h5"
SQUARES = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def shapes() -> list[str]:
    from looptune.tuner.ship.presets import preset_problems

    problems = []
    for name in ("quick", "transformer", "cnn", "decode"):
        problems += preset_problems(name)
    paper = preset_problems("paper")
    problems += random.Random(0).sample(paper, 40)
    lines, seen = [], set()
    for p in problems:
        line = str(p)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    for s in SQUARES:
        for dtype in ("float32", "float64"):
            line = f"{s} {s} {s}" + ("" if dtype == "float32" else " dtype=float64")
            if line not in seen:
                seen.add(line)
                lines.append(line)
    return lines


def keep_other_machines(shipped: str, staging: str) -> int:
    """Copy into ``staging`` the records of ``shipped`` made on other machines by the current code
    generator (records of an older one would be recompiled by rules they were not tuned under)."""
    from looptune.database import commit, load, merge
    from looptune.runtime.compiler.codegen import CODEGEN_VERSION

    built = load(staging).records
    here = {r.machine for r in built}
    # a machine keyed before its cache sizes joined the key is this machine's old record set: superseded
    here_uncached = {m.without_caches() for m in here}
    others = [r for r in load(shipped).records
              if r.machine not in here and r.machine not in here_uncached
              and r.machine.codegen_version == CODEGEN_VERSION]
    commit(staging, merge(built, others))
    return len(others)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--tuner", default="auto")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--drop-other-machines", action="store_true",
                    help="ship this machine's records only (default: keep other machines' current-codegen records)")
    args = ap.parse_args()
    lines = shapes()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        shape_file = f.name
    # build a fresh file and swap it in at the end: records from an older code generator or policy
    # are dropped, and an interrupted run leaves the shipped database untouched
    staging = args.out + ".new"
    for stale in (staging, staging + ".lock"):
        if os.path.exists(stale):
            os.unlink(stale)
    try:
        for t in args.threads:
            cmd = [sys.executable, "-m", "looptune.tuner.cli", "build-db", "--shapes", shape_file, "--db", staging,
                   "--threads", str(t), "--budget", str(args.budget), "--tuner", args.tuner, "--no-bench"]
            print("+", " ".join(cmd), flush=True)
            env = dict(os.environ, OPENBLAS_NUM_THREADS=str(t))
            subprocess.run(cmd, check=True, env=env)
        if not args.drop_other_machines and os.path.exists(args.out):
            kept = keep_other_machines(args.out, staging)
            print(f"kept {kept} records of other machines from {args.out}")
        os.replace(staging, args.out)
    finally:
        os.unlink(shape_file)
        if os.path.exists(staging + ".lock"):
            os.unlink(staging + ".lock")
    print(f"{len(lines)} problems x threads {args.threads} -> {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
