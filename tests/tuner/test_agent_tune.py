"""`looptune tune` end to end (real compiles, small problem, small budget) and tune() on a synthetic runner."""
from __future__ import annotations

import json
import shutil

import pytest
from agent_fakes import SyntheticRunner
from click.testing import CliRunner

from looptune.database import load
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.policy import DEFAULT_WEIGHTS, Policy
from looptune.tuner.agent.trainset import MAX_TRAIN_FLOPS
from looptune.tuner.cli import main
from looptune.tuner.measure.evaluator import TUNE_MEASURE, Evaluator
from looptune.tuner.search.loop import OVER_BUDGET_FACTOR, prior_timing_s, run
from looptune.tuner.search.strategies import BlockingSearch, PolicyBeamSearch
from looptune.tuner.search.tune import PolicyTune, TuneResult, analytic_default, refine_candidates, tune


def test_tune_api_on_synthetic_measurements():
    pol = Policy.load()
    res = tune(MatmulProblem(96, 128, 80), budget_s=5.0, policy=pol, evaluator=Evaluator(SyntheticRunner()))
    assert isinstance(res, TuneResult) and res.ok
    assert res.found_by in ("policy-rollout", "policy-beam", "refine", "default", "template") and res.candidates >= 2
    assert res.schedule.nest.tile is not None and res.gflops > 0 and res.policy


def test_shipped_policy_is_valid():
    pol = Policy.load(DEFAULT_WEIGHTS)
    states = pol.rollout(MatmulProblem(200, 64, 144))
    assert states[-1].nest.tile is not None           # the shipped policy register-tiles


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler")
def test_cli_tune_end_to_end(tmp_path):
    db = tmp_path / "db.h5"
    out = CliRunner().invoke(main, ["tune", "48", "40", "56", "--budget", "1.5", "--db", str(db), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["ok"] and data["gflops"] > 0 and data["numpy_gflops"] > 0 and data["stored"]
    records = load(str(db)).records
    assert len(records) == 1 and records[0].problem.key() == data["problem"]
    text = CliRunner().invoke(main, ["tune", "33", "17", "9", "--budget", "1"])
    assert text.exit_code == 0, text.output
    assert "GFLOPS" in text.output and "for " in text.output


def test_policy_beam_search_respects_a_call_budget():
    t = [0.0]

    def clock():                      # each call advances 0.25 s: the budget counts batches, not real time
        t[0] += 0.25
        return t[0]

    res = run(PolicyBeamSearch(MatmulProblem(80, 96, 112), Policy.load()), Evaluator(SyntheticRunner()),
              budget_s=3.0, clock=clock)
    assert isinstance(res, TuneResult) and res.gflops > 0 and res.candidates >= 1 and res.policy
    assert res.candidates < 20          # an unbounded run of the same search measures 88 here
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(res.history, res.history[1:]))
    assert res.best_at(0.0) == 0.0 and res.best_at(1e9) == res.gflops
    assert res.schedule_at(0.0) is None and res.schedule_at(1e9) == res.schedule


def test_refine_candidates_are_distinct_legal_neighbours_ranked_by_the_policy():
    p = MatmulProblem(96, 128, 80)
    base = canonical_schedule(default_schedule(p).nest)
    got = refine_candidates(Policy.load(), p, base, 6, skip={canonical_key(base.nest)})
    keys = [canonical_key(s.nest) for s in got]
    assert len(got) == 6 and len(set(keys)) == 6 and canonical_key(base.nest) not in keys
    assert refine_candidates(Policy.load(), p, base, 6, skip=set(keys)) != got     # skipped ones are not offered again


def test_tune_hill_climbs_when_budget_remains():
    res = tune(MatmulProblem(112, 64, 144), budget_s=30.0, policy=Policy.load(), evaluator=Evaluator(SyntheticRunner()))
    assert res.ok and res.candidates > 12            # the first batch is at most rollout + 4 beam + default + templates


def test_a_problem_too_large_for_the_budget_is_not_measured():
    runner = SyntheticRunner()
    res = tune(MatmulProblem(8192, 8192, 8192), budget_s=0.5, policy=Policy.load(), evaluator=Evaluator(runner))
    assert not res.ok and res.over_budget and res.found_by == "none" and res.candidates == 0
    assert runner.calls == 0 and res.seconds < 0.5 and "budget" in res.error


def test_a_problem_one_measurement_over_the_budget_gets_its_default_measured_once():
    """2048^3 at 2.5 s (a shipped-database problem): one measurement takes longer than the budget
    but not several budgets, so the analytic default is measured alone and stored verified."""
    runner = SyntheticRunner()
    problem = MatmulProblem(2048, 2048, 2048)
    assert 2.5 < prior_timing_s(problem) < OVER_BUDGET_FACTOR * 2.5
    res = tune(problem, budget_s=2.5, policy=Policy.load(), evaluator=Evaluator(runner), databases=False)
    assert res.ok and not res.over_budget and res.found_by == "default" and res.candidates == 1
    assert res.schedule.to_json() == canonical_schedule(default_schedule(problem).nest).to_json()


@pytest.mark.parametrize("shape, default_first", [((512, 4096, 1024), True), ((96, 80, 112), False)])
def test_the_default_leads_beyond_the_policys_training_sizes(shape, default_first):
    """On a large problem the loop may measure only the first candidate or two: an extrapolated
    rollout must not be the only one (it was: 512x4096x1024 stored at a third of numpy)."""
    problem = MatmulProblem(*shape)
    assert (problem.flops > MAX_TRAIN_FLOPS) == default_first
    first = PolicyTune(problem, Policy.load()).ask()
    is_default = first[0].to_json() == analytic_default(problem).to_json()
    assert is_default == default_first


def test_every_batch_reaches_the_callbacks():
    seen = []
    res = tune(MatmulProblem(64, 48, 96), budget_s=5.0, policy=Policy.load(), evaluator=Evaluator(SyntheticRunner()),
               callbacks=[lambda problem, cands, results: seen.append((problem, len(cands), len(results)))])
    assert res.ok and len(seen) == len(res.history) and sum(n for _, n, _ in seen) == res.candidates
    assert all(p == res.problem and n == m for p, n, m in seen)


def test_blocking_search_runs_on_the_loop():
    res = run(BlockingSearch(MatmulProblem(40, 24, 56), count=8), Evaluator(SyntheticRunner()), budget_s=5.0)
    assert res.ok and res.found_by in ("default", "random-search") and res.policy == ""
    assert res.candidates == 9                  # the default and eight random points, the budget to spare


def test_evaluator_time_limit_caps_each_call_and_restores():
    ev = Evaluator.local()
    try:
        with ev.time_limit(1.5):
            assert ev.runner.config.timeout_seconds == 1.5
            with ev.time_limit(60.0):                 # a limit never raises the timeout
                assert ev.runner.config.timeout_seconds == 1.5
        assert ev.runner.config == TUNE_MEASURE
    finally:
        ev.close()
