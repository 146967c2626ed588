#!/usr/bin/env python3
"""Re-declare a policy trained on ``looptune-actions-v1`` for ``looptune-actions-v2``.

v2 only changed the units of the register-tile actions: ``tile_12x32`` (float32 elements) became
``tile_12x2v`` (rows x vector registers, ``tuner/agent/actions.py``).  On AVX-512 float32, where
the shipped policy was trained (a Zen 5), the two lists are the same actions index for index,
so its weights carry over unchanged; elsewhere a v2 action asks for the same share of the
register file instead of the same element count (on AVX2 the v1 tiles spilled).  The metadata
records the retag.  How the shipped policy was made: BENCHMARKS.md, "Training the shipped policy".

    python tools/retag_policy.py tuner/agent/data/policy.npz
"""
from __future__ import annotations

import argparse
import sys

from looptune.tuner.agent.actions import ACTION_NAMES, ACTION_SPACE_VERSION, TILE_SHAPES
from looptune.tuner.agent.weights import read_weights, write_weights

V1 = "looptune-actions-v1"
V1_TILES = tuple(f"tile_{rows}x{vectors * 16}" for rows, vectors in TILE_SHAPES)     # float32 on AVX-512


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="weights file (npz), rewritten in place (atomically)")
    args = ap.parse_args()
    params, meta = read_weights(args.path)
    if meta.get("action_space") == ACTION_SPACE_VERSION:
        print(f"{args.path}: already {ACTION_SPACE_VERSION}")
        return 0
    actions = tuple(meta.get("actions", ()))
    expected = tuple(V1_TILES[TILE_SHAPES.index(_shape(n))] if n.startswith("tile_") else n for n in ACTION_NAMES)
    if meta.get("action_space") != V1 or actions != expected:
        print(f"{args.path}: not a {V1} policy whose actions map onto {ACTION_SPACE_VERSION}", file=sys.stderr)
        return 1
    meta = {**meta, "action_space": ACTION_SPACE_VERSION, "actions": list(ACTION_NAMES), "retagged_from": V1}
    write_weights(args.path, params, meta)
    print(f"{args.path}: {V1} -> {ACTION_SPACE_VERSION}")
    return 0


def _shape(name: str) -> tuple[int, int]:
    rows, vectors = name[len("tile_"):-1].split("x")
    return int(rows), int(vectors)


if __name__ == "__main__":
    sys.exit(main())
