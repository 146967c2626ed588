#!/usr/bin/env python3
"""Train the LoopTune agent (DQN, or the PPO baseline) on the paper's shapes; export numpy weights.

Every measurement goes through a recording evaluator (tools/out/recordings.jsonl by default):
each distinct (problem, schedule) is compiled once and measured once, and a rerun with the same
seed replays from the file.  Weights are written as npz (no pickle); the shipped policy is
``tuner/agent/data/policy.npz``.

    nice -n 10 python tools/train.py --algo dqn --mix 256 --steps 40000 \\
        --recordings tools/out/recordings-zen5-mix2.jsonl --out tuner/agent/data/policy.npz    # the shipped policy
        # (the broad mix): 19.9 min for a 24,000-step run from empty recordings, then 29.7 min for this one on
        # them; at most about 50 min from empty on 2 Zen 5 cores
    nice -n 10 python tools/train.py --algo dqn --mix 192 --mix-kind small --steps 20000 \\
        --recordings tools/out/recordings-zen5.jsonl --out tools/out/policy-small.npz        # the previous one
    nice -n 10 python tools/train.py --algo ppo --out tools/out/ppo.npz --steps 8000
    python tools/train.py --replay-only ...     # fail instead of measuring anything new

The shape file's fixed 10 % test split (seed 0, ``env.split_problems``) is never trained on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time

from looptune.runtime.compiler.workload import read_shapes
from looptune.tuner.agent.env import split_problems
from looptune.tuner.agent.trainset import MIXES, SHIPPED_MIX, generated_mix
from looptune.tuner.measure.evaluator import Evaluator

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", choices=("dqn", "ppo"), default="dqn")
    ap.add_argument("--shapes", default=os.path.join(HERE, "shapes", "looptune-paper.txt"))
    ap.add_argument("--train-problems", type=int, default=256, help="fixed random subset of the training split")
    ap.add_argument("--eval-problems", type=int, default=16, help="validation problems (from the training split)")
    ap.add_argument("--mix", type=int, default=0,
                    help="generated problems added to training (skinny, odd, float64, layouts, batched, 2 threads; "
                         "see tuner/agent/trainset.py); a quarter as many again (at most 16) join validation")
    ap.add_argument("--mix-kind", choices=sorted(MIXES), default=SHIPPED_MIX,
                    help="which generated mix (tuner/agent/trainset.py); default: the shipped policy's")
    ap.add_argument("--exclude", action="append", default=[os.path.join(HERE, "shapes", "dl-public.txt"), os.path.join(HERE, "shapes", "models.txt")],
                    help="shape files never trained on (default: dl-public.txt)")
    ap.add_argument("--recordings", default=os.path.join(HERE, "out", "recordings.jsonl"))
    ap.add_argument("--replay-only", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "policy.npz"))
    ap.add_argument("--log", default=None, help="JSON-lines log (default: next to --out)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="total environment steps")
    ap.add_argument("--arch", default="gnn", choices=("gnn", "mlp"))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override an Args field")
    args = ap.parse_args()

    problems = read_shapes(args.shapes)
    train_split, _test = split_problems(problems)
    rng = random.Random(args.seed)
    chosen = rng.sample(train_split, min(len(train_split), args.train_problems + args.eval_problems))
    train_set, eval_set = chosen[: args.train_problems], chosen[args.train_problems:]
    if args.mix:
        banned = list(_test) + [p for f in args.exclude if os.path.exists(f) for p in read_shapes(f)]
        n_eval = max(1, min(16, args.mix // 4))
        mix = generated_mix(args.mix + n_eval, seed=args.seed, exclude=banned, mix=args.mix_kind)
        train_set = train_set + mix[: args.mix]
        eval_set = eval_set + mix[args.mix:]
        rng.shuffle(train_set)

    os.makedirs(os.path.dirname(os.path.abspath(args.recordings)), exist_ok=True)
    if args.replay_only:
        evaluator = Evaluator.replay(args.recordings)
    else:
        evaluator = Evaluator.local(record_path=args.recordings)
    log_path = args.log or os.path.splitext(args.out)[0] + f"-{args.algo}-log.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    logf = open(log_path, "w")

    def log(rec: dict) -> None:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        if rec["kind"] == "eval":
            print(json.dumps(rec), flush=True)

    if args.algo == "dqn":      # torch: imported for the chosen algorithm only, after the arguments are checked
        from looptune.tuner.agent import dqn as algo
    else:
        from looptune.tuner.agent import ppo as algo
    a = algo.Args(seed=args.seed, arch=args.arch) if args.algo == "dqn" else algo.Args(seed=args.seed)
    if args.steps:
        a = dataclasses.replace(a, total_steps=args.steps)
    for kv in args.set:
        k, v = kv.split("=", 1)
        a = dataclasses.replace(a, **{k: type(getattr(a, k))(v)})
    log({"kind": "config", "algo": args.algo, "args": dataclasses.asdict(a), "train": len(train_set),
         "eval": [p.key() for p in eval_set]})
    t0 = time.perf_counter()
    try:
        algo.train(a, evaluator, train_set, eval_set, log=log, export_path=args.out)
    finally:
        evaluator.close()
    print(f"done in {time.perf_counter() - t0:.0f} s; {evaluator.stats}; weights -> {args.out}; log -> {log_path}")


if __name__ == "__main__":
    sys.exit(main())
