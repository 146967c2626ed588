"""The problems the agent trains on: a sample of the paper's grid plus a generated mix.

The paper trained on ``m, n, k`` in 64..256 (step 16), float32, one thread.  A policy that
only ever saw that grid generalizes poorly to what users run (decode GEMVs, odd sizes,
float64, transposed views, tall-skinny im2col layers), so the training set adds a generated
mix of those families, every problem small enough that even the untuned natural nest runs in
a few tens of milliseconds (training measures every state an episode visits):

==============  =====  ============================================================
family          share  sizes
==============  =====  ============================================================
skinny M        20 %   m in {1, 2, 4, 8, 16, 32}; n, k log-uniform in [64, 2048]
odd             25 %   m, n, k uniform in [17, 320], not multiples of 8
float64         15 %   the odd and paper-grid families in double precision
layouts         10 %   ``tn`` / ``nt`` / ``tt`` views, sizes as odd
tall / wide     10 %   one of m, n large (512..8192), the other two in [8, 64]
batched         10 %   batch 2..16 of m, n, k in [32, 128]
two threads     10 %   paper-grid sizes with ``threads=2``
==============  =====  ============================================================

Held-out sets are never trained on: ``exclude`` removes any generated problem equal to one
of them (``dl-public.txt`` and the paper grid's test split).  Deterministic for a seed.
"""
from __future__ import annotations

import math
import random
from typing import Iterable

from looptune.runtime.compiler.workload import MatmulProblem

# the natural nest runs at roughly 1-3 GFLOPS; cap problems so one naive run stays near 30 ms
MAX_TRAIN_FLOPS = 64e6
FAMILIES = (("skinny", 0.20), ("odd", 0.25), ("float64", 0.15), ("layout", 0.10), ("tall", 0.10),
            ("batched", 0.10), ("threads", 0.10))


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _odd(rng: random.Random, lo: int = 17, hi: int = 320) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v % 8:
            return v


def _paper(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(64, 257, 16) for _ in range(3))  # type: ignore[return-value]


def _one(rng: random.Random, family: str) -> MatmulProblem:
    if family == "skinny":
        m = rng.choice((1, 2, 4, 8, 16, 32))
        return MatmulProblem(m, _log_uniform(rng, 64, 2048), _log_uniform(rng, 64, 2048))
    if family == "odd":
        return MatmulProblem(_odd(rng), _odd(rng), _odd(rng))
    if family == "float64":
        m, n, k = (_odd(rng) for _ in range(3)) if rng.random() < 0.5 else _paper(rng)
        return MatmulProblem(m, n, k, dtype="float64")
    if family == "layout":
        return MatmulProblem(_odd(rng, 32), _odd(rng, 32), _odd(rng, 32), layout=rng.choice(("tn", "nt", "tt")))
    if family == "tall":
        big, s1, s2 = _log_uniform(rng, 512, 8192), rng.randint(8, 64), rng.randint(8, 64)
        return MatmulProblem(big, s1, s2) if rng.random() < 0.5 else MatmulProblem(s1, big, s2)
    if family == "batched":
        return MatmulProblem(*(rng.randint(32, 128) for _ in range(3)), batch=rng.randint(2, 16))
    if family == "threads":
        return MatmulProblem(*_paper(rng), threads=2)
    raise ValueError(f"unknown family {family!r}")


def generated_mix(count: int, seed: int = 0, exclude: Iterable[MatmulProblem] = ()) -> list[MatmulProblem]:
    """``count`` distinct generated problems, families in the shares above, none in ``exclude``
    and none above ``MAX_TRAIN_FLOPS``."""
    rng = random.Random(seed)
    banned = {_sizes_key(p) for p in exclude}
    names = [f for f, _ in FAMILIES]
    weights = [w for _, w in FAMILIES]
    out: list[MatmulProblem] = []
    seen: set = set()
    while len(out) < count:
        p = _one(rng, rng.choices(names, weights)[0])
        key = _sizes_key(p)
        if p.flops > MAX_TRAIN_FLOPS or key in banned or key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def _sizes_key(p: MatmulProblem) -> tuple:
    return (p.m, p.n, p.k, p.batch, p.dtype, p.layout)   # threads do not make a shape new
