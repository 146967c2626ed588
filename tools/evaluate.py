#!/usr/bin/env python3
"""Reproduce the LoopTune paper's table: the policy and the search baselines on held-out shapes.

For each problem: the environment's initial schedule (natural loop order, no splits) is measured
once; then, each with a fresh measurement cache and (unless ``--warm-cache``) an empty kernel
cache, so every compile is paid, the greedy policy rollout (1 candidate), ``looptune tune`` (policy beam +
analytic default, 2 s budget), ``tune-nopolicy`` (the same tune() without the policy: default,
templates and a random-order hill-climb, the ablation; ``--tune-nopolicy 0`` skips it), and each search run once for its largest budget, reporting the
best found by 1, 2, 10, 30 and 60 s of wall clock (compiles included).  Every method's pick
at every checkpoint is finally re-timed in one session with a longer protocol, in alternating
order, so a method that measured more candidates does not win by having taken the maximum of
more noisy numbers.  One JSON line per problem; Markdown summaries at the end.

    nice -n 10 python tools/evaluate.py --shapes tools/shapes/looptune-paper.txt --test-split \\
        --sample 12 --out tools/out/eval-paper.jsonl
    nice -n 10 python tools/evaluate.py --shapes tools/shapes/dl-public.txt --pick 1,3,5,11,15,19,21,25 \\
        --out tools/out/eval-dl.jsonl
    nice -n 10 python tools/evaluate.py --shapes tools/shapes/dl-public.txt --reuse tools/out/eval-dl.jsonl \\
        --policy-beam 0 --out tools/out/eval-dl-newpolicy.jsonl      # rerun policy and tune only
    python tools/evaluate.py --summarize tools/out/eval-paper.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.schedule import Schedule, canonical_schedule
from looptune.runtime.compiler.workload import read_shapes
from looptune.tuner.agent.env import split_problems
from looptune.tuner.agent.policy import Policy
from looptune.tuner.measure.evaluator import TUNE_MEASURE, Evaluator, gflops_of
from looptune.tuner.measure.protocol import Candidate
from looptune.tuner.measure.runner import LocalRunner
from looptune.tuner.search.loop import run
from looptune.tuner.search.strategies import STRATEGIES, PolicyBeamSearch
from looptune.tuner.search.tune import NO_POLICY, analytic_default, tune
from looptune.tuner.ship.timing import turn_order

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = (1.0, 2.0, 10.0, 30.0, 60.0)


def geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


class _KernelCache:
    """Point the kernel cache at a fresh directory (``cold``) for one method run, then delete it."""

    def __init__(self, cold: bool):
        self.cold = cold

    def __enter__(self):
        if self.cold:
            self.old = os.environ.get("LOOPTUNE_CACHE_DIR")
            self.dir = tempfile.mkdtemp(prefix="lt-eval-kernels-")
            os.environ["LOOPTUNE_CACHE_DIR"] = self.dir
        return self

    def __exit__(self, *exc):
        if self.cold:
            if self.old is None:
                os.environ.pop("LOOPTUNE_CACHE_DIR", None)
            else:
                os.environ["LOOPTUNE_CACHE_DIR"] = self.old
            shutil.rmtree(self.dir, ignore_errors=True)


def remeasure(problem, runner, schedules: dict[str, object], rounds: int = 2) -> dict[str, float]:
    """Time each distinct finalist again, all in one session, in alternating order, keeping each
    one's best median: the same protocol for every method, so no method profits from having
    taken the maximum of more noisy measurements during its search."""
    keys = sorted(schedules)
    builds = dict(zip(keys, build_many([render(schedules[k], problem.dtype, op=problem.op) for k in keys])))
    best: dict[str, float] = {}
    for i in range(rounds):
        order = turn_order(keys, i)
        for k, r in zip(order, runner.run([Candidate.from_build(problem, builds[k], tag=k) for k in order])):
            if r.ok and r.gflops:
                best[k] = max(best.get(k, 0.0), r.gflops)
    return best


POLICY_FREE = ("random", "greedy", "beam")      # searches that do not depend on the policy


TUNES = ("tune", "tune-nopolicy")               # tune() with the policy, and without it (the ablation)


def evaluate_problem(problem, runner, policy, budgets: dict[str, float], seed: int, cold: bool = True,
                     final_runner=None, reuse: dict | None = None, reuse_policy_beam: bool = False,
                     nopolicy_budget_s: float = 2.0) -> dict:
    """One JSON row.  ``reuse``: an earlier row for this problem whose policy-free searches
    (and its policy-beam search with ``reuse_policy_beam``, when it ran with the same policy)
    are taken as they are (their picks are re-timed with everything else at the end).
    ``nopolicy_budget_s``: the budget of tune() without the policy (0: not run)."""
    fresh = lambda: Evaluator(runner)        # a fresh memo: every method measures for itself
    row: dict = {"problem": problem.key()}
    [init] = fresh().evaluate([(problem, LoopNest.initial())])
    row["initial_gflops"] = gflops_of(init)
    row["initial_status"] = init.status.value
    row["numpy_gflops"] = init.numpy_gflops
    [dflt] = fresh().evaluate([(problem, analytic_default(problem).nest)])
    row["default_gflops"] = gflops_of(dflt)

    with _KernelCache(cold):
        t0 = time.perf_counter()
        final = policy.rollout(problem)[-1]
        [r] = fresh().evaluate([(problem, final.nest)])
    row["policy"] = {"gflops": gflops_of(r), "seconds": time.perf_counter() - t0,
                     "trace": canonical_schedule(final.nest).to_json()}
    finalists = {row["policy"]["trace"]: canonical_schedule(final.nest)}

    for name, tune_policy, budget_s in (("tune", policy, 2.0), ("tune-nopolicy", NO_POLICY, nopolicy_budget_s)):
        if budget_s <= 0:
            continue
        with _KernelCache(cold):
            res = tune(problem, budget_s=budget_s, policy=tune_policy, seed=seed, evaluator=fresh())
        row[name] = {"gflops": res.gflops if res.ok else None, "seconds": res.seconds, "candidates": res.candidates,
                     "found_by": res.found_by, "trace": res.schedule.to_json()}
        if res.ok:
            finalists[res.schedule.to_json()] = res.schedule

    for name, budget in budgets.items():
        if reuse is not None and name in reuse and (name in POLICY_FREE or reuse_policy_beam):
            row[name] = reuse[name]
            for sched_json in reuse[name].get("at_trace", {}).values():
                finalists[sched_json] = Schedule.from_json(sched_json)
            continue
        if budget <= 0:
            continue
        strategy = STRATEGIES[name]
        strat = strategy(problem, policy, seed=seed) if strategy is PolicyBeamSearch else strategy(problem, seed=seed)
        with _KernelCache(cold):
            sr = run(strat, fresh(), budget)
        at_trace = {}
        for c in CHECKPOINTS:
            sched = sr.schedule_at(c) if c <= budget + 1e-9 else None
            if sched is not None:
                at_trace[str(int(c))] = sched.to_json()
                finalists[sched.to_json()] = sched
        row[name] = {"at": {str(int(c)): sr.best_at(c) for c in CHECKPOINTS if c <= budget + 1e-9},
                     "at_trace": at_trace,
                     "gflops": sr.gflops, "seconds": sr.seconds, "evaluated": sr.candidates,
                     "trace": sr.schedule.to_json() if sr.ok else None}
    if final_runner is not None:
        dflt_sched = analytic_default(problem)
        finalists[dflt_sched.to_json()] = dflt_sched
        re = remeasure(problem, final_runner, finalists)
        row["default_re"] = re.get(dflt_sched.to_json())
        row["policy"]["re"] = re.get(row["policy"]["trace"])
        for name in TUNES:
            if name in row:
                row[name]["re"] = re.get(row[name]["trace"])
        for name in budgets:
            if name in row:
                row[name]["at_re"] = {c: re.get(t) for c, t in row[name]["at_trace"].items()}
    return row


def summarize(rows: list[dict], remeasured: bool = True) -> str:
    """Markdown tables: geomeans over problems (re-measured finalists when available)."""
    if remeasured and all("at_re" in r.get("beam", {}) for r in rows):
        rows = [_use_remeasured(r) for r in rows]
    out = []
    n = len(rows)
    ref60 = []
    for r in rows:
        cands = [r[s]["gflops"] for s in ("beam", "random") if s in r]
        ref60.append(max([c for c in cands if c] or [float("nan")]))
    methods = [("policy (greedy rollout, 1 candidate)", lambda r: r["policy"]["gflops"], lambda r: r["policy"]["seconds"]),
               ("tune (policy, default, templates, hill-climb), 2 s", lambda r: r["tune"]["gflops"], lambda r: r["tune"]["seconds"]),
               ("analytic default (1 candidate)", lambda r: r["default_gflops"], lambda r: None)]
    if all("tune-nopolicy" in r for r in rows):
        methods.insert(2, ("tune without the policy (default, templates, random-order hill-climb), 2 s",
                           lambda r: r["tune-nopolicy"]["gflops"], lambda r: r["tune-nopolicy"]["seconds"]))
    for s in ("random", "greedy", "beam", "policy-beam"):
        if s not in rows[0]:
            continue
        for c in CHECKPOINTS:
            key = str(int(c))
            if key in rows[0][s]["at"]:
                methods.append((f"{s} search, {key} s", (lambda r, s=s, key=key: r[s]["at"].get(key)),
                                (lambda r, s=s, c=c: min(c, r[s]["seconds"]))))
    out.append("| method | speedup over initial | x numpy | x best of beam/random at full budget | time to tune (mean s) |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    for name, g, t in methods:
        gs = [g(r) for r in rows]
        sp = geomean([(x or 0) / r["initial_gflops"] for x, r in zip(gs, rows) if r["initial_gflops"]])
        vn = geomean([(x or 0) / r["numpy_gflops"] for x, r in zip(gs, rows) if r["numpy_gflops"]])
        vb = geomean([(x or 0) / b for x, b in zip(gs, ref60) if b == b])
        ts = [t(r) for r in rows]
        ts = [x for x in ts if x is not None]
        tm = f"{sum(ts) / len(ts):.2f}" if ts else "-"
        out.append(f"| {name} | {sp:.1f}x | {vn:.3f} | {vb:.3f} | {tm} |")
    # the must-show comparisons, per problem
    tune_vs = [(r["tune"]["gflops"] or 0) / b for r, b in zip(rows, ref60) if b == b]
    out.append("")
    out.append(f"{n} problems. tune (2 s) vs the best of beam/random at full budget: >= 0.95x on "
               f"{sum(x >= 0.95 for x in tune_vs)}/{len(tune_vs)} problems, >= 0.9x on {sum(x >= 0.9 for x in tune_vs)}/"
               f"{len(tune_vs)}, min {min(tune_vs, default=float('nan')):.3f}, geomean {geomean(tune_vs):.3f}.")
    if all("tune-nopolicy" in r for r in rows):
        ratios = [(r["tune"]["gflops"] or 0) / max(r["tune-nopolicy"]["gflops"] or 1e-9, 1e-9) for r in rows]
        out.append(f"tune vs tune without the policy (the ablation): geomean {geomean(ratios):.3f}x; tune ahead on "
                   f"{sum(x > 1 for x in ratios)}/{n}, within 1 % or ahead on {sum(x >= 0.99 for x in ratios)}/{n}.")
    for s in ("random", "greedy", "beam", "policy-beam"):
        if s in rows[0] and "2" in rows[0][s]["at"]:
            ratios = [(r["tune"]["gflops"] or 0) / max(r[s]["at"].get("2") or 1e-9, 1e-9) for r in rows]
            out.append(f"tune vs {s} search at 2 s: geomean {geomean(ratios):.3f}x; tune ahead on "
                       f"{sum(x > 1 for x in ratios)}/{n}, within 1 % or ahead on {sum(x >= 0.99 for x in ratios)}/{n}.")
    return "\n".join(out)


def _label(key: str) -> str:
    """``matmul:float64:tn:t1:b8:128x128x64`` -> ``128x128x64 b8 float64 tn``."""
    _, dtype, layout, t, b, sizes = key.split(":")
    extra = [b if b != "b1" else "", dtype if dtype != "float32" else "", layout if layout != "nn" else "",
             f"{t[1:]} threads" if t != "t1" else ""]
    return " ".join([sizes] + [e for e in extra if e])


def per_problem(rows: list[dict]) -> str:
    """One line per problem (GFLOPS, finalists re-measured): what each method's pick reached."""
    rows = [_use_remeasured(r) for r in rows]
    searches = [s for s in ("random", "greedy", "beam", "policy-beam") if s in rows[0]]
    nopolicy = all("tune-nopolicy" in r for r in rows)
    head = ["problem", "numpy", "initial", "default", "policy (1 cand.)", "tune 2 s (s, cands, from)"]
    head += ["tune without policy 2 s (s, cands, from)"] if nopolicy else []
    head += [f"{s} 2 s" for s in searches] + ["best of beam/random 60 s", "tune / 60 s best"]
    out = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    f = lambda x: f"{x:.1f}" if x else "-"
    for r in rows:
        b60 = max((r[s]["gflops"] or 0) for s in ("beam", "random") if s in r)
        t = r["tune"]
        cells = [_label(r["problem"]), f(r["numpy_gflops"]), f(r["initial_gflops"]), f(r["default_gflops"]),
                 f(r["policy"]["gflops"])]
        cells += [f"{f(x['gflops'])} ({x['seconds']:.2f}, {x['candidates']}, {x['found_by']})"
                  for x in [t] + ([r["tune-nopolicy"]] if nopolicy else [])]
        cells += [f(r[s]["at"].get("2")) for s in searches]
        cells += [f(b60), f"{(t['gflops'] or 0) / b60:.3f}" if b60 else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _use_remeasured(r: dict) -> dict:
    r = json.loads(json.dumps(r))
    r["policy"]["gflops"] = r["policy"].get("re")
    for name in TUNES:
        if name in r:
            r[name]["gflops"] = r[name].get("re")
    r["default_gflops"] = r.get("default_re")
    for s in ("random", "greedy", "beam", "policy-beam"):
        if s in r:
            r[s]["at"] = {c: (r[s]["at_re"].get(c) or 0.0) for c in r[s]["at"]}
            r[s]["gflops"] = max(r[s]["at"].values(), default=0.0)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=os.path.join(HERE, "shapes", "looptune-paper.txt"))
    ap.add_argument("--test-split", action="store_true", help="use the fixed held-out 10 %% of the shape file")
    ap.add_argument("--sample", type=int, default=0, help="fixed random sample of this many problems")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of --sample (another seed: another sample)")
    ap.add_argument("--pick", default="", help="comma-separated line indices (after comments) of the shape file")
    ap.add_argument("--policy", default=None, help="policy weights (default: the shipped ones, "
                    "not this machine's `looptune train` policy)")
    ap.add_argument("--tune-nopolicy", type=float, default=2.0,
                    help="budget (s) of tune() without the policy (the ablation, method tune-nopolicy); 0 skips")
    ap.add_argument("--random", type=float, default=60.0, help="budget (s) for random search; 0 skips")
    ap.add_argument("--greedy", type=float, default=30.0)
    ap.add_argument("--beam", type=float, default=60.0)
    ap.add_argument("--policy-beam", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm-cache", action="store_true",
                    help="share the on-disk kernel cache across methods and problems (default: every method "
                         "starts each problem with an empty kernel cache, so every compile is paid)")
    ap.add_argument("--reuse", default=None, metavar="JSONL",
                    help="take the policy-free searches (random, greedy, beam) of these problems from an earlier "
                         "run's rows and rerun only the policy, tune and policy-beam (all picks are re-timed "
                         "together); for evaluating a new policy or tune() without repeating minutes of search")
    ap.add_argument("--reuse-policy-beam", action="store_true",
                    help="with --reuse, also take the policy-beam search (only when the rows used the same policy)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "eval.jsonl"))
    ap.add_argument("--summarize", nargs="*", help="only print the summary of these JSONL files")
    args = ap.parse_args()

    if args.summarize:
        rows, seen = [], set()
        for r in (json.loads(l) for f in args.summarize for l in open(f) if l.strip()):
            if r["problem"] not in seen:          # a problem in several files counts once (the first)
                seen.add(r["problem"])
                rows.append(r)
        print("Finalists re-measured in one session:\n")
        print(summarize(rows))
        print("\nAs measured during each method's own run (best of its noisy measurements):\n")
        print(summarize(rows, remeasured=False))
        print("\nPer problem (GFLOPS, finalists re-measured):\n")
        print(per_problem(rows))
        return
    problems = read_shapes(args.shapes)
    if args.test_split:
        _, problems = split_problems(problems)
    if args.pick:
        problems = [problems[int(i)] for i in args.pick.split(",")]
    if args.sample:
        problems = random.Random(args.sample_seed).sample(problems, min(args.sample, len(problems)))
    reuse = {}
    if args.reuse:
        reuse = {r["problem"]: r for r in (json.loads(l) for l in open(args.reuse) if l.strip())}
        if not (args.pick or args.sample or args.test_split):
            problems = [p for p in problems if p.key() in reuse]
    policy = Policy.load(args.policy)          # None: the shipped weights, as --policy's help says
    budgets = {"random": args.random, "greedy": args.greedy, "beam": args.beam, "policy-beam": args.policy_beam}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = []
    final_cfg = dataclasses.replace(TUNE_MEASURE, warmup=2, min_repeats=15, min_total_seconds=0.25)
    with LocalRunner(TUNE_MEASURE) as runner, LocalRunner(final_cfg) as final_runner, open(args.out, "a") as f:
        for p in problems:
            row = evaluate_problem(p, runner, policy, budgets, args.seed, cold=not args.warm_cache,
                                   final_runner=final_runner, reuse=reuse.get(p.key()) if args.reuse else None,
                                   reuse_policy_beam=args.reuse_policy_beam, nopolicy_budget_s=args.tune_nopolicy)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            b60 = max(row.get(s, {}).get("gflops") or 0 for s in ("beam", "random"))
            print(f"{p}: init {row['initial_gflops'] or 0:.1f}, numpy {row['numpy_gflops'] or 0:.1f}, "
                  f"policy {row['policy']['gflops'] or 0:.1f}, tune {row['tune']['gflops'] or 0:.1f} "
                  f"({row['tune']['seconds']:.2f} s), tune without policy "
                  f"{row.get('tune-nopolicy', {}).get('gflops') or 0:.1f}, best search {b60:.1f}", flush=True)
    print(summarize(rows))


if __name__ == "__main__":
    sys.exit(main())
