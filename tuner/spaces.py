"""Parametric schedule spaces for grid and random search.

The RL agent walks the full step grammar; search baselines and database builds also
sample the BLIS-shaped subspace (``BlockingParams``), where every point is a known-good
structure and only sizes vary.  Candidates are deduplicated by their trace.
"""
from __future__ import annotations

import random
from dataclasses import replace

from looptune.database.machine import CpuInfo, detect_cpu
from looptune.runtime.defaults import BlockingParams, default_params
from looptune.runtime.problem import MatmulProblem


def tile_options(cpu: CpuInfo, dtype: str) -> list[tuple[int, int]]:
    """Register tiles whose accumulators fit the register file with room for operands."""
    lanes = cpu.vector_bytes // (4 if dtype == "float32" else 8)
    regs = cpu.vector_registers
    out = []
    for nvec in (1, 2, 3, 4):
        for mr in range(2, 17):
            if mr * nvec + nvec + 1 <= regs:
                out.append((mr, nvec * lanes))
    return out


def blocking_candidates(problem: MatmulProblem, count: int, seed: int = 0,
                        cpu: CpuInfo | None = None) -> list[BlockingParams]:
    """The default parameters first, then up to ``count`` distinct random points."""
    cpu = cpu or detect_cpu()
    rng = random.Random(seed)
    base = default_params(problem, cpu)
    tiles = tile_options(cpu, problem.dtype)
    out = [base]
    seen = {base.schedule().to_json()}
    attempts = 0
    while len(out) < count + 1 and attempts < count * 20:
        attempts += 1
        mr, nr = rng.choice(tiles) if rng.random() < 0.7 else (base.mr, base.nr)
        kc = rng.choice([64, 96, 128, 192, 256, 320, 384, 512])
        mc = mr * rng.choice([2, 4, 6, 8, 12, 16, 24, 32])
        nc = nr * rng.choice([4, 8, 16, 32, 64, 128])
        cand = replace(base, mr=mr, nr=nr, kc=min(kc, max(16, problem.k)), mc=mc, nc=nc,
                       unroll_k=rng.choice([1, 2, 4, 8]),
                       pack_a=rng.random() < 0.7, pack_b=rng.random() < 0.85)
        key = cand.schedule().to_json()
        if key not in seen:
            seen.add(key)
            out.append(cand)
    return out
