"""A synthetic runner for agent tests: deterministic GFLOPS from the schedule, no compiler, no kernels."""
from __future__ import annotations

import hashlib
import json

from looptune.tuner.measure.runner import Runner, RunResult, RunStatus


def synthetic_gflops(problem_key: str, tag: str) -> float:
    """Register-tiled nests are fast, packing B helps a little, everything else is slow; plus a
    deterministic per-(problem, schedule) wobble so rankings are not all ties."""
    steps = json.loads(tag)["steps"] if tag else []
    ops = {s["op"] for s in steps}
    g = 2.0
    if "register_tile" in ops:
        g = 60.0
        tile = next(s for s in steps if s["op"] == "register_tile")
        g *= 1.3 if tile["m"].count(".") == 1 else 1.0
        g *= 1.1 if any(s["op"] == "pack" and s["operand"] == "B" for s in steps) else 1.0
    h = int(hashlib.sha256(f"{problem_key}|{tag}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return g * (0.9 + 0.2 * h)


class SyntheticRunner(Runner):
    needs_build = False

    def __init__(self):
        self.calls = 0

    def run(self, candidates):
        out = []
        for c in candidates:
            self.calls += 1
            g = synthetic_gflops(c.problem.key(), c.tag)
            sec = c.problem.flops / g / 1e9
            out.append(RunResult(RunStatus.OK, c.problem.key(), c.tag, seconds=sec, q1_seconds=sec, q3_seconds=sec,
                                 samples=(sec,), number=1, gflops=g, numpy_seconds=sec * 60 / 80,
                                 numpy_gflops=80.0))
        return out
