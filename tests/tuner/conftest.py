"""Fixtures of the machine-policy and ``looptune train`` tests: a user data directory of the test's
own, training measured through the synthetic runner, and scripted held-out scores."""
from __future__ import annotations

import pytest
from agent_fakes import SyntheticRunner

from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.measure.recordings import MachineRecordings

RECORDED = [MatmulProblem(m, n, k) for m, n, k in [(64, 64, 64), (48, 80, 96), (96, 32, 64), (128, 64, 32),
                                                   (40, 56, 72), (64, 128, 96)]]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user data directory of this test's own (where the database, recordings and policy live)."""
    monkeypatch.setenv("LOOPTUNE_DB", str(tmp_path / "schedules.h5"))
    return tmp_path


@pytest.fixture
def synthetic(monkeypatch, user_dir):
    """Training measures through the synthetic runner; ``RECORDED`` already recorded here."""
    pytest.importorskip("torch")
    # deferred: finetune imports torch, which only these fixtures' users need (skipped above without it)
    from looptune.tuner.agent import finetune

    monkeypatch.setattr(finetune, "live_evaluator", lambda store: Evaluator(SyntheticRunner(), store))
    pairs = [(p, nest) for p in RECORDED for nest in (LoopNest.initial(), default_schedule(p).nest)]
    MachineRecordings.current().append(Evaluator(SyntheticRunner()).evaluate(pairs))
    return user_dir


@pytest.fixture
def scripted(monkeypatch):
    """``scripted(*scores, confirmed=(start, best))``: held-out scores in this order (the starting
    policy's first; an exception class is raised), and what measuring the start and the best again
    gives (default: the first score and the best one, so a gain holds up)."""
    # deferred: (as in ``synthetic``) finetune imports torch
    from looptune.tuner.agent import finetune

    def script(*values, confirmed=None):
        calls = iter(values)
        numbers = [v for v in values if not (isinstance(v, type) and issubclass(v, BaseException))]

        def score(policy, problems, evaluator):
            value = next(calls, values[-1])
            if isinstance(value, type) and issubclass(value, BaseException):
                raise value()
            return value

        def again(start, winner, problems, evaluator):
            if isinstance(confirmed, type) and issubclass(confirmed, BaseException):
                raise confirmed()
            return confirmed or (numbers[0], max(numbers))
        monkeypatch.setattr(finetune, "heldout_score", score)
        monkeypatch.setattr(finetune, "confirmed_scores", again)
    return script
