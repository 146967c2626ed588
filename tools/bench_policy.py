#!/usr/bin/env python3
"""What the policy adds to ``looptune tune``: the same tune() with the shipped policy and with
``--policy none`` (analytic default, templates, database seeds and a random-order hill-climb),
on a fixed sample of shapes the policy never saw, at several budgets.

Each run is ``tools/bench_tune.py``'s: ``looptune tune ... --json`` in a fresh process, kernel
cache and user database.  The two methods take turns shape by shape (which goes first alternates),
and each is scored by its own tuned/numpy (numpy timed by the same worker in the same run), so a
change of machine speed between the two runs cancels; the contribution is the ratio of the two.

    python tools/bench_policy.py --threads 1 --budgets 0.5 1 2        # 40 shapes, about 8 min
    python tools/bench_policy.py --count 12 --budgets 1 --json
    python tools/bench_policy.py --budgets 1 --policy tools/out/policy.npz      # a freshly trained policy
    python tools/bench_policy.py --budgets 1 --searches random beam             # the paper's search baselines too

``--searches`` also runs those searches of the agent's action space (``tuner.search.strategies``)
from the initial loop nest through the same budgeted ask/tell loop, each in a fresh process and
kernel cache, scored the same way (its best against numpy, timed by the same worker).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile

from bench_tune import tune_once

SEARCH = """
import json, sys
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.search.loop import run
from looptune.tuner.search.strategies import STRATEGIES
name, m, n, k, dtype, threads, budget_s = sys.argv[1:8]
problem = MatmulProblem(int(m), int(n), int(k), dtype=dtype, threads=int(threads))
evaluator = Evaluator.local()
try:
    res = run(STRATEGIES[name](problem, seed=0), evaluator, float(budget_s))
finally:
    evaluator.close()
print(json.dumps({"ratio": res.speedup_vs_numpy if res.ok else None, "found_by": name, "candidates": res.candidates}))
"""


def search_once(name: str, shape: str, threads: int, budget_s: float, dtype: str) -> dict:
    """One search strategy on one problem in a fresh process and kernel cache."""
    with tempfile.TemporaryDirectory(prefix="lt-bench-search-") as tmp:
        env = dict(os.environ, LOOPTUNE_CACHE_DIR=os.path.join(tmp, "cache"))
        done = subprocess.run([sys.executable, "-c", SEARCH, name, *shape.split(), dtype, str(threads), str(budget_s)],
                              env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def sample_shapes(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (shape, dtype): sizes 1-4096 drawn log-uniformly, a third of them skinny (one side
    of 1-16), a quarter float64; products capped at 2^33 flops so a 0.5 s budget can still compile
    and time the real size."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        m, n, k = (max(1, round(2 ** rng.uniform(0, 12))) for _ in range(3))
        if rng.random() < 1 / 3:
            side = rng.randrange(3)
            m, n, k = [rng.randint(1, 16) if i == side else v for i, v in enumerate((m, n, k))]
        if 2 * m * n * k > 2 ** 33 or m * n * k < 4096:
            continue
        out.append((f"{m} {n} {k}", "float64" if rng.random() < 0.25 else "float32"))
    return out


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default=None, help="policy weights (npz) to compare against --policy none "
                    "(default: the shipped policy)")
    ap.add_argument("--searches", nargs="*", default=[], choices=("random", "greedy", "beam"),
                    help="also run these searches from the initial nest with the same budget")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = sample_shapes(args.count, args.seed)
    rows = []
    for budget in args.budgets:
        for i, (shape, dtype) in enumerate(shapes):
            runs = {}
            for method in (("policy", "none") if i % 2 == 0 else ("none", "policy")):
                runs[method] = tune_once(shape, args.threads, budget, dtype=dtype,
                                         policy="none" if method == "none" else args.policy)
            for name in args.searches:
                runs[name] = search_once(name, shape, args.threads, budget, dtype)
            rows.append({"budget_s": budget, "shape": shape, "dtype": dtype, **runs})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"# --threads {args.threads}, {len(shapes)} shapes (seed {args.seed}); tuned/numpy per method, "
          "contribution = with policy / --policy none")
    for budget in args.budgets:
        extra = "".join(f" {name} |" for name in args.searches)
        print(f"\n| M N K | dtype | with policy | --policy none |{extra} contribution | found by (policy / none) |"
              f"   (--budget {budget:g}; tuned/numpy)")
        print("| --- | --- | --- | --- |" + " --- |" * len(args.searches) + " --- | --- |")
        ratios, wins = [], {"policy": 0, "none": 0}
        by_search: dict[str, list[float]] = {name: [] for name in args.searches}
        for r in (r for r in rows if r["budget_s"] == budget):
            p, q = r["policy"], r["none"]
            searched = ""
            for name in args.searches:
                x = r[name].get("ratio")
                searched += f" {x:.2f}x |" if x else " no result |"
                if x and q.get("ratio"):
                    by_search[name].append(x / q["ratio"])
            if not p.get("ratio") or not q.get("ratio"):     # a failed run, or no candidate timed in the budget
                said = [x.get("error", "")[:60] or f"no result ({x.get('found_by')})" for x in (p, q)]
                print(f"| {r['shape']} | {r['dtype']} | {said[0]} | {said[1]} |{searched} | |")
                continue
            ratios.append(p["ratio"] / q["ratio"])
            print(f"| {r['shape']} | {r['dtype']} | {p['ratio']:.2f}x | {q['ratio']:.2f}x |{searched} {ratios[-1]:.2f}x | "
                  f"{p['found_by']} / {q['found_by']} |")
            wins["policy" if p["found_by"].startswith("policy") else "none"] += 1
        print(f"| **geomean** | | | |" + "".join(f" {geomean(v):.3f} of none |" for v in by_search.values())
              + f" **{geomean(ratios):.3f}** (lowest {min(ratios, default=float('nan')):.2f}, "
              f"highest {max(ratios, default=float('nan')):.2f}) | the policy's candidate won {wins['policy']} "
              f"of {sum(wins.values())} |")

if __name__ == "__main__":
    main()
