#!/usr/bin/env python3
"""What the policy adds to ``looptune tune``: the same tune() with the shipped policy and with
``--policy none`` (analytic default, templates, database seeds and a random-order hill-climb),
on shapes the policy never saw, at several budgets.

The shape sets (``--set``): ``sample``, a fixed random sample of new shapes (sizes 1-4096,
square and skinny, a quarter float64); ``paper``, a fixed sample of the LoopTune paper grid's
held-out test split (``env.split_problems``, never trained on); ``dl-public``, the public
performance set (never trained on, and kept out of the embedded database).

Each run is ``tools/bench_tune.py``'s: ``looptune tune ... --json`` in a fresh process, kernel
cache and user database.  The two methods take turns shape by shape (which goes first alternates),
and each is scored by its own tuned/numpy (numpy timed by the same worker in the same run), so a
change of machine speed between the two runs cancels; the contribution is the ratio of the two.

    python tools/bench_policy.py --threads 1 --budgets 0.5 1 2        # 40 shapes, about 8 min
    python tools/bench_policy.py --count 12 --budgets 1 --json
    python tools/bench_policy.py --budgets 1 --policy tools/out/policy.npz      # a freshly trained policy
    python tools/bench_policy.py --budgets 1 --searches random beam             # the paper's search baselines too
    python tools/bench_policy.py --set dl-public --budgets 1 --searches random beam --threads 2

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
from looptune.runtime.compiler.workload import MatmulProblem, read_shapes
from looptune.tuner.agent.policy import DEFAULT_WEIGHTS

SHAPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes")

SEARCH = """
import json, sys
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.search.loop import run
from looptune.tuner.search.strategies import STRATEGIES
name, m, n, k, dtype, batch, layout, threads, budget_s = sys.argv[1:10]
problem = MatmulProblem(int(m), int(n), int(k), dtype=dtype, batch=int(batch), layout=layout, threads=int(threads))
evaluator = Evaluator.local()
try:
    res = run(STRATEGIES[name](problem, seed=0), evaluator, float(budget_s))
finally:
    evaluator.close()
print(json.dumps({"ratio": res.speedup_vs_numpy if res.ok else None, "found_by": name, "candidates": res.candidates}))
"""


def search_once(name: str, p: MatmulProblem, threads: int, budget_s: float) -> dict:
    """One search strategy on one problem in a fresh process and kernel cache."""
    with tempfile.TemporaryDirectory(prefix="lt-bench-search-") as tmp:
        env = dict(os.environ, LOOPTUNE_CACHE_DIR=os.path.join(tmp, "cache"))
        argv = [name, str(p.m), str(p.n), str(p.k), p.dtype, str(p.batch), p.layout, str(threads), str(budget_s)]
        done = subprocess.run([sys.executable, "-c", SEARCH, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def sample_shapes(count: int, seed: int = 0) -> list[MatmulProblem]:
    """``count`` problems: sizes 1-4096 drawn log-uniformly, a third of them skinny (one side
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
        out.append(MatmulProblem(m, n, k, dtype="float64" if rng.random() < 0.25 else "float32"))
    return out


def shape_set(name: str, count: int, seed: int) -> list[MatmulProblem]:
    """The problems of ``--set name``: ``count`` of them (dl-public: all, unless fewer are asked)."""
    if name == "sample":
        return sample_shapes(count, seed)
    if name == "paper":
        from looptune.tuner.agent.env import split_problems
        _train, test = split_problems(read_shapes(os.path.join(SHAPES_DIR, "looptune-paper.txt")))
        return random.Random(seed).sample(test, min(count, len(test)))
    return read_shapes(os.path.join(SHAPES_DIR, "dl-public.txt"))[:count]


def label(p: MatmulProblem) -> str:
    extra = (f" batch={p.batch}" if p.batch > 1 else "") + (f" {p.layout}" if p.layout != "nn" else "")
    return f"{p.m} {p.n} {p.k}{extra}"


def source(found_by: str) -> str:
    """A candidate's source without its decorations: "policy-rollout+parallel" -> "policy-rollout"."""
    return found_by.split("+")[0] if found_by else "none"


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--set", dest="shape_set", choices=("sample", "paper", "dl-public"), default="sample")
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default=None, help="policy weights (npz) to compare against --policy none "
                    "(default: the shipped policy)")
    ap.add_argument("--searches", nargs="*", default=[], choices=("random", "greedy", "beam"),
                    help="also run these searches from the initial nest with the same budget")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = shape_set(args.shape_set, args.count, args.seed)
    # named explicitly: `looptune tune` without --policy follows the policy in use, which on a
    # machine with a `looptune train` policy is not the shipped one
    policy = args.policy or DEFAULT_WEIGHTS
    rows = []
    for budget in args.budgets:
        for i, p in enumerate(shapes):
            runs = {}
            for method in (("policy", "none") if i % 2 == 0 else ("none", "policy")):
                runs[method] = tune_once(f"{p.m} {p.n} {p.k}", args.threads, budget, dtype=p.dtype, batch=p.batch,
                                         layout=p.layout, policy="none" if method == "none" else policy)
            for name in args.searches:
                runs[name] = search_once(name, p, args.threads, budget)
            rows.append({"budget_s": budget, "shape": label(p), "dtype": p.dtype, **runs})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"# --set {args.shape_set} --threads {args.threads}, {len(shapes)} shapes (seed {args.seed}); "
          "tuned/numpy per method, contribution = with policy / --policy none")
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
    print("\n| --budget | method | candidate sources that won (problems) |")
    print("| --- | --- | --- |")
    for budget in args.budgets:
        for method in ("policy", "none"):
            tally: dict[str, int] = {}
            for r in (r for r in rows if r["budget_s"] == budget and r[method].get("found_by")):
                tally[source(r[method]["found_by"])] = tally.get(source(r[method]["found_by"]), 0) + 1
            said = ", ".join(f"{k} {v}" for k, v in sorted(tally.items(), key=lambda kv: -kv[1]))
            print(f"| {budget:g} | {'with policy' if method == 'policy' else '--policy none'} | {said} |")

if __name__ == "__main__":
    main()
