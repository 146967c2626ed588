"""The problems the agent trains on: a sample of the paper's grid plus a generated mix.

The paper trained on ``m, n, k`` in 64..256 (step 16), float32, one thread.  A policy that
only ever saw that grid generalizes poorly to what users run (decode GEMVs, odd sizes,
float64, transposed views, tall-skinny im2col layers), so the training set adds a generated
mix of those families.  Training measures every state an episode visits, the untuned natural
nest included (1-3 GFLOPS), so a problem is measured at its own size only when it is small
(``MAX_TRAIN_FLOPS``); larger ones (decode GEMVs with LLM-sized weights, large square and
rectangular products) are measured on their tuning proxy, ``search.proxy.proxy_problem``, the
smaller problem of the same family that ``tune()`` itself searches them on, and kept only when
that proxy is at most ``MAX_PROXY_FLOPS``.  The agent observes the real problem either way.

Two mixes (``MIXES``).  ``small``, the previous policy's: every problem at most
``MAX_TRAIN_FLOPS``, a tenth of them on two threads:

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

``broad``, the shipped policy's, adds decode and large problems on proxies, and threads across
the families:

==============  =====  ============================================================
family          share  sizes
==============  =====  ============================================================
skinny M        15 %   m in {1, 2, 4, 8, 16, 32}; n, k log-uniform in [64, 2048]
decode          10 %   m in 1..4; n, k from LLM layer widths (768 .. 14336), on proxies
odd             18 %   m, n, k uniform in [17, 320], not multiples of 8
float64         12 %   the odd and paper-grid families in double precision
layouts          8 %   ``tn`` / ``nt`` / ``tt`` views, sizes as odd
tall / wide      8 %   one of m, n large (512..8192), the other two in [8, 64]
batched          8 %   batch 2..16 of m, n, k in [32, 128]
large            9 %   m, n, k log-uniform in [384, 4096], float32 or float64, on proxies
two threads     12 %   paper-grid sizes with ``threads=2``
==============  =====  ============================================================

Besides the two-thread family, a fifth of every other family's problems
run on two threads (``Mix.threads_2_share``), so about 30 % of the broad mix is multi-threaded.

Held-out sets are never trained on: ``exclude`` removes any generated problem equal to one
of them (``dl-public.txt`` and the paper grid's test split).  Deterministic for a seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterable

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.search.proxy import proxy_problem

# the natural nest runs at roughly 1-3 GFLOPS; problems measured at their own size stay near
# 30 ms a naive call, those measured on a proxy near 0.1 s (the protocol cuts slow ones short)
MAX_TRAIN_FLOPS = 64e6
MAX_PROXY_FLOPS = 6e8
LLM_WIDTHS = (768, 1024, 2048, 2560, 3072, 4096, 5120, 8192, 11008, 14336)


@dataclass(frozen=True)
class Mix:
    """A generated mix: families and their shares; the share of other families' problems put
    on two threads; whether problems too large to measure at their size come on proxies."""

    families: tuple[tuple[str, float], ...]
    threads_2_share: float = 0.0
    proxies: bool = False


MIXES = {
    "small": Mix((("skinny", 0.20), ("odd", 0.25), ("float64", 0.15), ("layout", 0.10), ("tall", 0.10),
                  ("batched", 0.10), ("threads", 0.10))),
    "broad": Mix((("skinny", 0.15), ("decode", 0.10), ("odd", 0.18), ("float64", 0.12), ("layout", 0.08),
                  ("tall", 0.08), ("batched", 0.08), ("large", 0.09), ("threads", 0.12)),
                 threads_2_share=0.2, proxies=True),
}
SHIPPED_MIX = "broad"


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _odd(rng: random.Random, lo: int = 17, hi: int = 320) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v % 8:
            return v


PAPER_SIZES = range(64, 257, 16)       # the paper's grid: m, n and k each in 64..256 step 16


def paper_grid() -> list[MatmulProblem]:
    """The paper's 2197 problems (float32, one thread)."""
    return [MatmulProblem(m, n, k) for m in PAPER_SIZES for n in PAPER_SIZES for k in PAPER_SIZES]


def _paper(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(PAPER_SIZES.start, PAPER_SIZES.stop, PAPER_SIZES.step) for _ in range(3))  # type: ignore[return-value]


def _one(rng: random.Random, family: str) -> MatmulProblem:
    if family == "skinny":
        m = rng.choice((1, 2, 4, 8, 16, 32))
        return MatmulProblem(m, _log_uniform(rng, 64, 2048), _log_uniform(rng, 64, 2048))
    if family == "decode":
        return MatmulProblem(rng.randint(1, 4), rng.choice(LLM_WIDTHS), rng.choice(LLM_WIDTHS))
    if family == "large":
        return MatmulProblem(*(_log_uniform(rng, 384, 4096) for _ in range(3)),
                             dtype="float64" if rng.random() < 0.25 else "float32")
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


def generated_mix(count: int, seed: int = 0, exclude: Iterable[MatmulProblem] = (),
                  mix: str = SHIPPED_MIX) -> list[MatmulProblem]:
    """``count`` distinct generated problems of ``MIXES[mix]``, families in its shares, none in
    ``exclude``, each small enough to measure (``trainable``; without proxies, at its own size)."""
    spec = MIXES[mix]
    rng = random.Random(seed)
    banned = {_sizes_key(p) for p in exclude}
    names = [f for f, _ in spec.families]
    weights = [w for _, w in spec.families]
    out: list[MatmulProblem] = []
    seen: set = set()
    while len(out) < count:
        family = rng.choices(names, weights)[0]
        p = _one(rng, family)
        if spec.threads_2_share and family != "threads" and rng.random() < spec.threads_2_share:
            p = replace(p, threads=2)
        key = _sizes_key(p)
        small_enough = trainable(p) if spec.proxies else p.flops <= MAX_TRAIN_FLOPS
        if not small_enough or key in banned or key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def measured_problem(problem: MatmulProblem) -> MatmulProblem:
    """The problem training measures ``problem``'s states on: itself when small, else its proxy."""
    return problem if problem.flops <= MAX_TRAIN_FLOPS else proxy_problem(problem)


def trainable(problem: MatmulProblem) -> bool:
    """Small enough to measure every state of an episode: itself, or its proxy, within the caps."""
    return problem.flops <= MAX_TRAIN_FLOPS or proxy_problem(problem).flops <= MAX_PROXY_FLOPS


def _sizes_key(p: MatmulProblem) -> tuple:
    return (p.m, p.n, p.k, p.batch, p.dtype, p.layout)   # threads do not make a shape new
