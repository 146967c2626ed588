"""Fast stand-in tuners for the ship tests: a real schedule, made-up timings, no compiling.

Importable by name (``ship_fakes:fake_tune``) from worker processes: pytest puts this folder
on ``sys.path``, spawned workers inherit it, and CLI subprocesses get it via PYTHONPATH.
"""
from __future__ import annotations

import os
import time

from looptune.runtime.compiler.defaults import default_schedule
from looptune.tuner.measure.protocol import RunResult, RunStatus
from looptune.tuner.search.loop import TuneResult


def fake_tune(problem, budget_s):
    """The analytic default "measured" at a made-up speed; ``LOOPTUNE_FAKE_SLEEP`` seconds each;
    problems with m == 13 fail, as a kernel that never verifies would."""
    time.sleep(float(os.environ.get("LOOPTUNE_FAKE_SLEEP", "0")))
    if problem.m == 13:
        run = RunResult(RunStatus.WRONG_ANSWER, problem.key(), error="wrong answer (fake)")
        return TuneResult(problem, default_schedule(problem), run, "none", "fake-v0", 3, 0.0)
    gflops = 50.0 + problem.m / 100
    seconds = problem.flops / gflops / 1e9        # quartiles 0.5 GFLOPS apart around the median
    run = RunResult(RunStatus.OK, problem.key(), seconds=seconds, q1_seconds=seconds * (1 - 0.25 / gflops),
                    q3_seconds=seconds * (1 + 0.25 / gflops), gflops=gflops, numpy_gflops=40.0)
    return TuneResult(problem, default_schedule(problem), run, "fake", "fake-v0", 3, 0.0)


class Interrupting:
    """Tunes two problems, then behaves like Ctrl-C arriving mid-tune."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, problem, budget_s):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return fake_tune(problem, budget_s)
