"""How ``looptune train`` decides (``tuner/agent/finetune.py``): held-out scores measured live in
the session, never answered from the recordings; a gain saved only if it holds up when the start
and the best are measured again side by side; the start's scoring cost counted in the budget; and
``dqn.train`` under a control trains until the control stops it, past ``total_steps``."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from agent_fakes import SyntheticRunner
from click.testing import CliRunner
from conftest import RECORDED

pytest.importorskip("torch")

from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.schedule import canonical_key
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent import dqn, finetune
from looptune.tuner.agent.policy import DEFAULT_WEIGHTS, Policy
from looptune.tuner.agent.weights import machine_policy_path
from looptune.tuner.cli import main
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.measure.recordings import MachineRecordings

BUDGET_S = 3.0


def test_heldout_scores_are_measured_here_not_answered_from_the_recordings(synthetic):
    """Recordings of the held-out problems from another session (here: absurd timings of the
    defaults and of the start's end states) must not score the start, or every new end state,
    measured now, would be compared with another day's numbers."""
    start = Policy.in_use()
    recordings = MachineRecordings.current()
    problems, _ = finetune.choose_problems(recordings.results())
    _, held_out = finetune.split_held_out(problems)
    assert any(p in RECORDED for p in held_out)
    ends = [(p, nest) for p in held_out for nest in (start.rollout(p)[-1].nest, default_schedule(p).nest)]
    fresh = Evaluator(SyntheticRunner()).evaluate(ends)
    recordings.append([replace(r, gflops=r.gflops * (1e-3 if i % 2 else 1e3)) for i, r in enumerate(fresh)])
    expected = finetune.heldout_score(start, held_out, Evaluator(SyntheticRunner()))

    report = finetune.finetune(1.5)
    assert report.start_score == pytest.approx(expected)


def test_a_gain_that_does_not_hold_up_measured_again_is_not_saved(synthetic, scripted):
    scripted(1.0, 2.0, confirmed=(1.0, 1.005))
    out = CliRunner().invoke(main, ["train", "--minutes", "0.05", "--json"])
    assert out.exit_code == 0, (out.output, out.exception)
    report = json.loads(out.stdout)
    assert report["best_score"] == 2.0 and (report["confirmed_start_score"], report["confirmed_score"]) == (1.0, 1.005)
    assert not report["saved"] and not machine_policy_path().exists()
    assert "did not hold up measured again (+0.5%)" in finetune.TrainReport(**report).summary()


def test_a_second_ctrl_c_during_the_confirmation_saves_nothing(synthetic, scripted):
    scripted(1.0, 2.0, confirmed=KeyboardInterrupt)
    out = CliRunner().invoke(main, ["train", "--minutes", "0.05"])
    assert out.exit_code == 130 and "interrupted" in out.stdout and not machine_policy_path().exists()


def test_confirmed_scores_time_both_policies_again_in_one_batch(user_dir):
    """The confirmation ignores the memo (every end state and default timed afresh), and a schedule
    both policies end in is timed once, so where they agree they score alike."""
    problems = [MatmulProblem(64, 48, 32), MatmulProblem(40, 72, 56)]
    start, runner = Policy.load(DEFAULT_WEIGHTS), SyntheticRunner()
    evaluator = Evaluator(runner)
    first = finetune.heldout_score(start, problems, evaluator)
    calls = runner.calls
    again = finetune.confirmed_scores(start, Policy.load(DEFAULT_WEIGHTS), problems, evaluator)
    distinct = {(p.key(), canonical_key(nest)) for p, nest in finetune.heldout_pairs(start, problems)}
    assert runner.calls - calls == len(distinct) == 2 * len(problems)
    assert again == (first, first)


@pytest.mark.parametrize("scoring_s", [2.0, 0.3], ids=["start-scoring-eats-the-budget", "normal"])
def test_the_start_scoring_cost_is_counted_in_the_budget(synthetic, monkeypatch, scoring_s):
    """Scoring the start took ``scoring_s`` (a fake clock runs ahead by that much per scoring): the
    last scoring and the confirmation are reserved for from the first step, so the run ends
    within its budget; a budget the start's scoring ate saves nothing rather than overrun."""
    ahead = [0.0]

    def clock() -> float:
        return time.monotonic() + ahead[0]

    def score(policy, problems, evaluator):
        ahead[0] += scoring_s
        return 1.0 if policy.source else 2.0        # the start (shipped) scores 1, every candidate 2

    def again(start, winner, problems, evaluator):
        ahead[0] += scoring_s
        return 1.0, 2.0
    monkeypatch.setattr(finetune, "heldout_score", score)
    monkeypatch.setattr(finetune, "confirmed_scores", again)
    report = finetune.finetune(BUDGET_S, clock=clock)
    assert report.seconds <= BUDGET_S + 0.25, report
    assert report.steps > 0 if scoring_s < 1.0 else report.steps == report.evaluations == 0
    assert report.saved == (scoring_s < 1.0) == (report.confirmed_score is not None)


class StopAt:
    """A ``dqn.TrainControl`` that stops training at ``last`` steps and never evaluates."""

    def __init__(self, last: int) -> None:
        self.last, self.seen = last, 0

    def keep_going(self, step: int) -> bool:
        self.seen = step
        return step < self.last

    def evaluate_now(self, step: int) -> bool:
        return False

    def evaluate(self, qnet, step: int) -> dict:
        return {}


def test_with_a_control_training_goes_on_past_total_steps():
    """``fine_tune_args``' ``total_steps`` only paces exploration: the budget (the control) ends training."""
    args = dqn.Args(seed=0, total_steps=8, num_envs=2, max_steps=4, hidden=8, layers=1, learning_starts=4,
                    batch_size=4, buffer_size=256, target_update=10)
    control = StopAt(40)
    dqn.train(args, Evaluator(SyntheticRunner()), [MatmulProblem(32, 48, 64)], control=control)
    assert control.seen >= 40
