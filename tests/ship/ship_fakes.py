"""Fast stand-in tuners for the ship tests: a real schedule, made-up timings, no compiling.

Importable by name (``ship_fakes:fake_tune``) from worker processes: pytest puts this folder
on ``sys.path``, spawned workers inherit it, and CLI subprocesses get it via PYTHONPATH.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

from looptune.runtime.compiler.defaults import default_schedule


def fake_tune(problem, budget_s):
    """The analytic default "measured" at a made-up speed; ``LOOPTUNE_FAKE_SLEEP`` seconds each;
    problems with m == 13 fail, as a kernel that never verifies would."""
    time.sleep(float(os.environ.get("LOOPTUNE_FAKE_SLEEP", "0")))
    if problem.m == 13:
        return SimpleNamespace(schedule=default_schedule(problem), gflops=0.0, numpy_gflops=0.0, ok=False,
                               error="wrong answer (fake)")
    return SimpleNamespace(schedule=default_schedule(problem), gflops=50.0 + problem.m / 100, numpy_gflops=40.0,
                           gflops_spread=0.5, found_by="fake", policy="fake-v0", candidates=3, ok=True)


class Interrupting:
    """Tunes two problems, then behaves like Ctrl-C arriving mid-tune."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, problem, budget_s):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return fake_tune(problem, budget_s)
