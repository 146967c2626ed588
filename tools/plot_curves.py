#!/usr/bin/env python3
"""Plot learning curves from tools/train.py logs (matplotlib, maintainer-only dependency).

    python tools/plot_curves.py tools/out/dqn-log.jsonl tools/out/ppo-log.jsonl --out docs/learning_curve.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", default="docs/learning_curve.png")
    ap.add_argument("--window", type=int, default=100, help="episodes in the moving average")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.logs:
        recs = [json.loads(l) for l in open(path) if l.strip()]
        cfg = next((r for r in recs if r["kind"] == "config"), {})
        label = f"{cfg.get('algo', '?')} ({os.path.basename(path)})"
        eps = [r for r in recs if r["kind"] == "episode"]
        if eps:
            xs, ys, acc = [], [], []
            for r in eps:
                acc.append(r["return"])
                acc = acc[-args.window:]
                xs.append(r["step"])
                ys.append(sum(acc) / len(acc))
            ax1.plot(xs, ys, label=f"{label}: episode return (moving avg {args.window})")
        ev = [r for r in recs if r["kind"] == "eval"]
        if ev:
            ax2.plot([r["step"] for r in ev], [r["vs_numpy_geomean"] for r in ev], marker="o",
                     label=f"{label}: greedy rollout, x numpy (validation)")
    ax1.set_xlabel("environment steps")
    ax1.set_ylabel("return = log(final / initial GFLOPS)")
    ax2.set_xlabel("environment steps")
    ax2.set_ylabel("GFLOPS / numpy, geomean")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
