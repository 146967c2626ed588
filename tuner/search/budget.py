"""The wall clock of one tuning run, and the cost model that plans its batches.

    budget = Budget(2.0)                 # started now; Budget(2.0, clock, start) for a run begun earlier
    budget.fits(4), budget.left_s(), budget.cost.estimate(4)

The loop (``loop.run``, whose docstring gives the accounting) owns one per run and hands it to
its strategy's ``ask``, so a strategy can plan within what is left.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from looptune.runtime.compiler.machine import detect_cpu
from looptune.tuner.measure.evaluator import EvalStats

# Budgets above this are treated as this (about 31 years: "no limit" in practice), so that every
# figure derived from a budget (candidate counts, deadlines, timeouts) stays a finite float and
# fits an int: ``--budget 1e308`` tunes until the strategy has nothing left.
MAX_BUDGET_S = 1e9


class BatchCost:
    """What the next batch of n candidates will cost, from what the earlier ones did.

    Compiles run ``cores`` at a time, so a batch costs ``ceil(n / cores)`` compile rounds plus
    n timings; a lone candidate pays a whole compile round.  Every figure is the worse of
    the latest observation and the running average (a single-round batch keeps the worst
    round seen): overrunning the budget is the failure, stopping a little early is not.
    """

    def __init__(self) -> None:
        self.cores = max(1, detect_cpu().cores)
        self.compile_round_s = 0.25    # wall per round of parallel compiles, until measured
        self.run_s = 0.0               # per candidate timing
        self.other_s = 0.0             # per candidate, not explained by the two (IPC, Python)

    def estimate(self, n: int) -> float:
        return -(-n // self.cores) * self.compile_round_s + n * (self.run_s + self.other_s)

    def observe(self, n: int, wall_s: float, before: EvalStats, after: EvalStats) -> None:
        built = after.built - before.built
        build_s = after.build_seconds - before.build_seconds
        run_total_s = after.run_seconds - before.run_seconds
        if built:
            rounds = -(-built // self.cores)
            seen = build_s / rounds
            # a small batch pays gcc's fixed costs for fewer kernels than the first one did
            self.compile_round_s = max(seen, self.compile_round_s if rounds < 2 else 0.5 * (self.compile_round_s + seen))
        run = run_total_s / n
        self.run_s = max(run, 0.5 * (self.run_s + run)) if self.run_s else run
        other = max(0.0, wall_s - build_s - run_total_s) / n
        self.other_s = max(other, 0.5 * (self.other_s + other)) if self.other_s else other


class Budget:
    """The wall clock of one run, as the loop and the strategies see it."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.perf_counter,
                 start: Optional[float] = None) -> None:
        self.budget_s = budget_s = min(budget_s, MAX_BUDGET_S)
        self.clock = clock
        self.t0 = clock() if start is None else start
        # keep a margin: cost estimates are noisy, and a VM can stall a process for 0.1-0.2 s
        self.deadline_s = budget_s - max(0.25, 0.125 * budget_s)
        self.reserve_s = 0.0        # kept for later work (the real-size confirmation after a proxy search)
        self.cost = BatchCost()

    def elapsed_s(self) -> float:
        return self.clock() - self.t0

    def fits(self, n: int, extra_s: float = 0.0) -> bool:
        """Can ``n`` more candidates (after ``extra_s`` of other work) be paid for before the
        deadline, the reserve left untouched?"""
        return self.elapsed_s() + extra_s + self.cost.estimate(n) <= self.deadline_s - self.reserve_s

    def left_s(self) -> float:
        """Seconds of the budget not spent or reserved."""
        return self.budget_s - self.elapsed_s() - self.reserve_s
