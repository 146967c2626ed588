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


COMPILER = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"


def export_and_link(root, db, driver_source: str):
    """``looptune export`` of ``db`` into ``root/lib``, built with its own Makefile, and a C driver
    (``root/driver``) linked against the static library; returns ``root``."""
    import subprocess

    from click.testing import CliRunner

    from looptune.tuner.cli import main

    result = CliRunner().invoke(main, ["export", "--db", str(db), "--out", str(root / "lib")])
    assert result.exit_code == 0, result.output
    assert "compiled cleanly" in result.output
    lib = root / "lib"
    subprocess.run(["make", "-s", f"CC={COMPILER}", "liblooptune.a"], cwd=lib, check=True, capture_output=True)
    (root / "driver.c").write_text(driver_source)
    subprocess.run([COMPILER, "-O1", "-std=gnu11", f"-I{lib}", str(root / "driver.c"), str(lib / "liblooptune.a"),
                    "-fopenmp", "-lm", "-o", str(root / "driver")], check=True, capture_output=True, text=True)
    return root
