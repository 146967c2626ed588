"""Random legal schedules for tests: BLIS-shaped points with perturbations, and raw random walks."""
from __future__ import annotations

import random
from dataclasses import replace

from looptune.runtime.compiler.trace import Step
from looptune.runtime.compiler.defaults import BlockingParams
from looptune.runtime.compiler.ir import ScheduleError
from looptune.runtime.compiler.schedule import Schedule

FACTORS = (2, 3, 4, 5, 6, 7, 8, 12, 16, 32)


def random_walk(rng: random.Random, steps: int = 8) -> Schedule:
    """Apply random legal split/swap/tile steps to the initial nest."""
    s = Schedule.initial()
    for _ in range(steps * 4):
        if len(s.trace) >= steps:
            break
        names = s.nest.names
        op = rng.choice(["split", "split", "swap", "swap", "tile", "unroll"])
        try:
            if op == "split":
                s = s.step("split", loop=rng.choice(names[1:]), factor=rng.choice(FACTORS))
            elif op == "swap":
                i = rng.randrange(1, len(names) - 1)
                s = s.step("swap", loop=names[i], other=names[i + 1])
            elif op == "tile":
                a, b = names[-2:]
                m, n = (a, b) if s.nest.loop(a).dim == "m" else (b, a)
                s = s.step("register_tile", m=m, n=n)
            else:
                s = s.step("unroll", loop=rng.choice(names[1:]), factor=rng.choice((2, 4)))
        except ScheduleError:
            continue
    return s


def random_blocking(rng: random.Random) -> Schedule:
    """A BLIS-shaped schedule with random sizes, packing, vector dimension and parallel loop,
    then a few random legal swaps of the outer loops."""
    mr, nr = rng.choice([(2, 4), (2, 8), (3, 8), (4, 16), (5, 12), (6, 16), (4, 32), (7, 3), (12, 32), (8, 8), (20, 4), (3, 40)])
    p = BlockingParams(mr=mr, nr=nr, mc=mr * rng.choice([2, 3, 5]), kc=rng.choice([2, 5, 16, 33, 64]),
                       nc=nr * rng.choice([2, 3, 7]), unroll_k=rng.choice([1, 2, 4]),
                       pack_a=rng.random() < 0.5, pack_b=rng.random() < 0.5,
                       parallel=rng.choice([None, None, "m.o", "n.o"]), vector=rng.choice(["n", "n", "m"]),
                       prefetch=rng.random() < 0.3)
    s = p.schedule()
    for _ in range(rng.randrange(4)):
        names = s.nest.names
        i = rng.randrange(1, s.nest.kernel_start() - 1) if s.nest.kernel_start() > 2 else 1
        step = Step.make("swap", loop=names[i], other=names[i + 1])
        if s.is_legal(step):
            s = s.apply(step)
    return s


def random_schedules(count: int, seed: int = 0) -> list[Schedule]:
    rng = random.Random(seed)
    return [random_blocking(rng) if i % 3 else random_walk(rng, rng.randrange(2, 10)) for i in range(count)]
