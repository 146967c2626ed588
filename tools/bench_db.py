#!/usr/bin/env python
"""Benchmark the schedule database: load time and lookup time at 100,000 records.

The issue's bar: load (open + checksum + validate every record) in at most 2 s, and a
lookup in at most 50 us median once loaded.  Records are synthetic but shaped like real
ones: 16 families (2 dtypes x 4 layouts x 2 thread counts; ``--one-family`` puts them all
in one, the worst case for nearest-neighbour search), three machines, log-uniform sizes,
and traces drawn from the schedule grammar with per-record split factors, so most traces
are distinct (the worst case for validation).

    python tools/bench_db.py                     # 100,000 records in a temporary directory
    python tools/bench_db.py --records 20000 --unique-traces 500 --keep /tmp/db.h5
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from looptune.database import (LookupSettings, MachineKey, MatmulProblem, Record, ScheduleIndex, StoreSettings,
                               load, save)
from looptune.runtime.compiler.trace import Step, Trace

MACHINES = [
    MachineKey("x86_64", "Bench CPU A", "avx512", ("avx", "avx2", "avx512f", "fma"), 16, "gcc 12.2.0", "1"),
    MachineKey("x86_64", "Bench CPU B", "avx2", ("avx", "avx2", "fma"), 8, "clang 17.0.6", "1"),
    MachineKey("aarch64", "Bench CPU C", "neon", ("asimd",), 64, "gcc 13.2.0", "1"),
]


def random_trace(rng: random.Random) -> Trace:
    """A plausible schedule: tile m, n, k (sometimes twice), reorder, then vectorize/unroll/pack/parallel."""
    steps = [Step.make("split", loop=d, factor=rng.choice([2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256]))
             for d in "mnk"]
    inner = []
    for d in "mn":
        if rng.random() < 0.6:
            steps.append(Step.make("split", loop=f"{d}.i", factor=rng.choice([2, 4, 6, 8, 12, 16])))
            inner.append(d)

    def name(d: str, part: str) -> str:
        return f"{d}.i.{part}" if d in inner else f"{d}.i"

    order = ["m.o", "n.o", "k.o"] + [name(d, "o") for d in inner] + ["k.i", name("m", "i"), name("n", "i")]
    steps.append(Step.make("reorder", order=order))
    steps.append(Step.make("vectorize", loop=name("n", "i")))
    if rng.random() < 0.7:
        steps.append(Step.make("unroll", loop=name("m", "i"), factor=rng.choice([1, 2, 4, 8])))
    if rng.random() < 0.5:
        steps.append(Step.make("pack", operand=rng.choice("AB"), at=rng.choice(["m.o", "n.o", "k.o"])))
    if rng.random() < 0.3:
        steps.append(Step.make("parallel", loop="m.o"))
    return Trace(tuple(steps))


def random_problem(rng: random.Random, family: tuple[str, str, int]) -> MatmulProblem:
    dtype, layout, threads = family
    size = lambda: max(1, int(2 ** rng.uniform(0, 13)))   # noqa: E731  (1 .. 8192, log-uniform)
    return MatmulProblem(size(), size(), size(), batch=rng.choice([1, 1, 1, 1, 2, 4, 8, 32]), dtype=dtype,
                         layout=layout, threads=threads)


FAMILIES = [(d, l, t) for d in ("float32", "float64") for l in ("nn", "tn", "nt", "tt") for t in (1, 8)]


def synthetic_records(count: int, seed: int = 0, unique_traces: int | None = None,
                      families: list[tuple[str, str, int]] = FAMILIES) -> list[Record]:
    rng = random.Random(seed)
    pool = [random_trace(rng) for _ in range(unique_traces)] if unique_traces else None
    records: dict[tuple, Record] = {}
    while len(records) < count:
        problem = random_problem(rng, rng.choice(families))
        machine = MACHINES[0] if rng.random() < 0.6 else rng.choice(MACHINES[1:])
        gflops = rng.uniform(1, 2000)
        records[(problem, machine)] = Record(
            problem, machine, rng.choice(pool) if pool else random_trace(rng), gflops, gflops * rng.uniform(0, 0.05),
            gflops * rng.uniform(0.3, 1.2), rng.random() < 0.97, "dqn-v1", "beam", rng.randint(10, 2000),
            1.7e9 + rng.uniform(0, 1e8))
    return list(records.values())


def median_us(fn, queries) -> float:
    samples = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--unique-traces", type=int, default=None, help="draw traces from a pool of this size")
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--one-family", action="store_true", help="all records float32/nn/1 thread (worst case)")
    parser.add_argument("--keep", help="write the database here instead of a temporary directory")
    args = parser.parse_args()
    families = FAMILIES[:1] if args.one_family else FAMILIES

    t0 = time.perf_counter()
    records = synthetic_records(args.records, unique_traces=args.unique_traces, families=families)
    print(f"generated {len(records)} records ({len({r.trace for r in records})} distinct traces) "
          f"in {time.perf_counter() - t0:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or os.path.join(tmp, "bench.h5")
        t0 = time.perf_counter()
        save(path, records, StoreSettings())
        print(f"write: {time.perf_counter() - t0:.2f} s, {os.path.getsize(path) / 1e6:.1f} MB")

        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            db = load(path)
            loaded = time.perf_counter()
            index = ScheduleIndex(db, MACHINES[0], LookupSettings())
            loads.append((loaded - t0, time.perf_counter() - loaded))
        load_s, index_s = min(loads, key=lambda x: sum(x))
        print(f"load (read + checksum + validate {len(db)} records): {load_s:.3f} s; "
              f"index build: {index_s:.3f} s; total {load_s + index_s:.3f} s  [bar: 2 s]")

        rng = random.Random(1)
        misses = [random_problem(rng, rng.choice(families)) for _ in range(args.queries)]
        local = [r.problem for r in db if r.machine == MACHINES[0] and r.verified]
        hits = [rng.choice(local) for _ in range(args.queries)]
        index.nearest(misses[0])   # warm-up
        print(f"lookup, exact hit, index.best(MatmulProblem): median {median_us(index.best, hits):.1f} us")
        print(f"lookup, exact hit, index.best(key string): median "
              f"{median_us(index.best, [p.key() for p in hits]):.1f} us")
        print(f"lookup, nearest (random new problems), index.best: median {median_us(index.best, misses):.1f} us  "
              f"[bar: 50 us]")
        print(f"lookup, 5 nearest, index.nearest(k=5): median "
              f"{median_us(lambda p: index.nearest(p, 5), misses[:5000]):.1f} us")


if __name__ == "__main__":
    main()
