"""``_confirm``'s second placement (``tuner/search/loop.py``): the finalists are timed again, and
once more on operands placed elsewhere in memory (``Evaluator.remeasure_elsewhere``), and scored
by the mean time of the two placements; so a candidate fast on one placement only loses to one
fast on both.

A fake runner answers from a table: GFLOPS per candidate, per placement (the operand shift of its
``MeasureConfig``), per call.
"""
from __future__ import annotations


import pytest

from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.schedule import Schedule, canonical_key
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.evaluator import SECOND_PLACEMENT_SHIFT_BYTES, Evaluator
from looptune.tuner.measure.protocol import MeasureConfig, RunResult, RunStatus
from looptune.tuner.measure.runner import Runner
from looptune.tuner.search.budget import Budget
from looptune.tuner.search.loop import Strategy, _confirm, run

PROBLEM = MatmulProblem(64, 64, 64)
SCHEDULES = {
    "lucky": default_schedule(PROBLEM),
    "steady": Schedule.from_trace(Trace((Step.make("split", loop="n", factor=16),))),
    "noisy": Schedule.from_trace(Trace((Step.make("split", loop="m", factor=8),))),
}
NAME_OF = {canonical_key(s.nest): name for name, s in SCHEDULES.items()}
NUMPY_GFLOPS = 30.0


class PlacementRunner(Runner):
    """GFLOPS from ``table[name][placement]``: a list consumed one call at a time (the last
    entry repeats); placement 0 is the first, 1 any shifted one."""

    needs_build = False

    def __init__(self, table: dict[str, tuple[list[float], list[float]]]) -> None:
        self.config = MeasureConfig()
        self.table = table
        self.calls: list[tuple[str, int]] = []          # (name, operand shift)

    def run(self, candidates):
        out = []
        for c in candidates:
            name, shift = NAME_OF[c.tag], self.config.operand_shift_bytes
            self.calls.append((name, shift))
            seq = self.table[name][1 if shift else 0]
            g = seq[min(sum(1 for n, s in self.calls if n == name and bool(s) == bool(shift)) - 1, len(seq) - 1)]
            sec = PROBLEM.flops / g / 1e9
            out.append(RunResult(RunStatus.OK, c.problem.key(), c.tag, seconds=sec, q1_seconds=sec, q3_seconds=sec,
                                 samples=(sec,), number=1, gflops=g, numpy_seconds=PROBLEM.flops / NUMPY_GFLOPS / 1e9,
                                 numpy_gflops=NUMPY_GFLOPS))
        return out


def mean_time_gflops(*gflops: float) -> float:
    return len(gflops) / sum(1 / g for g in gflops)


# fast on the first placement only; as fast on both; slow first timing (disturbed), fast after
TABLE = {
    "lucky": ([100.0], [40.0]),
    "steady": ([90.0], [90.0]),
    "noisy": ([60.0, 85.0], [85.0]),
}


def confirm(table) -> tuple[tuple, dict, PlacementRunner]:
    runner = PlacementRunner(table)
    evaluator = Evaluator(runner)
    nests = [(PROBLEM, s.nest) for s in SCHEDULES.values()]
    first = evaluator.evaluate(nests)
    measured = {canonical_key(n): r for (_, n), r in zip(nests, first)}
    by_key = {canonical_key(s.nest): s for s in SCHEDULES.values()}
    best = max(((r.gflops, by_key[k], r) for k, r in measured.items()), key=lambda t: t[0])
    t = [0.0]
    result = _confirm(PROBLEM, evaluator, measured, by_key, best, Budget(60.0, clock=lambda: t[0]), top=3)
    return result, {NAME_OF[k]: r for k, r in measured.items()}, runner


def test_a_candidate_fast_on_one_placement_loses_to_one_fast_on_both():
    (g, winner, result), measured, runner = confirm(TABLE)
    assert NAME_OF[canonical_key(winner.nest)] == "steady"
    assert g == pytest.approx(90.0) and result.gflops == pytest.approx(90.0)
    assert measured["lucky"].gflops == pytest.approx(mean_time_gflops(100.0, 40.0))     # 57: scored by mean time
    assert measured["lucky"].seconds == pytest.approx((PROBLEM.flops / 100e9 + PROBLEM.flops / 40e9) / 2)
    # every finalist was timed a second time in place and once on the second placement
    shifted = [name for name, shift in runner.calls if shift]
    assert sorted(shifted) == sorted(SCHEDULES)
    assert {shift for _, shift in runner.calls if shift} == {SECOND_PLACEMENT_SHIFT_BYTES}
    assert runner.config.operand_shift_bytes == 0          # the first placement again afterwards


def test_each_placement_keeps_the_faster_of_its_timings_in_place():
    """The noisy candidate's first timing was disturbed (60); its second (85) stands and is then
    averaged with the second placement's (85)."""
    (_, winner, _), measured, _ = confirm(TABLE)
    assert measured["noisy"].gflops == pytest.approx(85.0)
    faster = dict(TABLE, noisy=([60.0, 95.0], [95.0]))        # now the noisy one is best on both
    (g, winner, _), _, _ = confirm(faster)
    assert NAME_OF[canonical_key(winner.nest)] == "noisy" and g == pytest.approx(95.0)


class Fixed(Strategy):
    name = "fixed"

    def __init__(self, problem, schedules):
        super().__init__(problem)
        self.pending = list(schedules)

    def ask(self, budget=None):
        out, self.pending = self.pending, []
        return out


def test_the_tuning_loop_confirms_its_finalists_on_both_placements():
    t = [0.0]
    runner = PlacementRunner(TABLE)
    result = run(Fixed(PROBLEM, SCHEDULES.values()), Evaluator(runner), budget_s=10.0, confirm=3,
                 clock=lambda: t[0])
    assert result.ok and NAME_OF[canonical_key(result.schedule.nest)] == "steady"
    assert result.gflops == pytest.approx(90.0)
    without = run(Fixed(PROBLEM, SCHEDULES.values()), Evaluator(PlacementRunner(TABLE)), budget_s=10.0, confirm=0,
                  clock=lambda: t[0])
    assert NAME_OF[canonical_key(without.schedule.nest)] == "lucky"     # what one placement alone would pick
