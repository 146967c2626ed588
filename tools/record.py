#!/usr/bin/env python3
"""Build (or extend) the recorded-measurement store the agent trains on.

Measures, for a fixed sample of training problems, the initial nest, the analytic default and
the end states of random walks in the agent's environment, through the recording evaluator:
each distinct (problem, canonical schedule) is compiled once and measured once, appended to a
JSONL file of ``RunResult`` records (no pickle) that ``tools/train.py`` then replays and extends.
Training records on its own as it goes, so this is optional: it front-loads measurements (e.g.
overnight) and makes them reusable across training runs and seeds.

    nice -n 10 python tools/record.py --problems 256 --walks 16 --out tools/out/recordings.jsonl
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.workload import read_shapes
from looptune.tuner.agent.env import split_problems
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.search.strategies import RandomWalkSearch
from looptune.tuner.search.tune import analytic_default

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=os.path.join(HERE, "shapes", "looptune-paper.txt"))
    ap.add_argument("--problems", type=int, default=64, help="fixed random sample of the training split")
    ap.add_argument("--walks", type=int, default=16, help="random-walk end states per problem")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "out", "recordings.jsonl"))
    args = ap.parse_args()

    train, _ = split_problems(read_shapes(args.shapes))
    problems = random.Random(args.seed).sample(train, min(args.problems, len(train)))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ev = Evaluator.local(record_path=args.out)
    t0 = time.perf_counter()
    try:
        for i, p in enumerate(problems):
            walk = RandomWalkSearch(p, seed=args.seed + i, batch=args.walks)
            states = [s.nest for s in walk.ask()]
            ev.evaluate([(p, n) for n in [LoopNest.initial(), analytic_default(p).nest] + states])
            print(f"[{i + 1}/{len(problems)}] {p}: {len(ev.store)} records, {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        ev.close()
    print(f"{ev.stats}; store {args.out}")


if __name__ == "__main__":
    sys.exit(main())
