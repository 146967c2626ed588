"""`looptune tune` end to end (real compiles, small problem, small budget) and tune() on a synthetic runner."""
from __future__ import annotations

import json
import shutil

import pytest
from agent_fakes import SyntheticRunner
from click.testing import CliRunner

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.agent.policy import DEFAULT_WEIGHTS, Policy
from looptune.tuner.search.tune import TuneResult, tune


def test_tune_api_on_synthetic_measurements():
    pol = Policy.load()
    res = tune(MatmulProblem(96, 128, 80), budget=5.0, policy=pol, evaluator=Evaluator(SyntheticRunner()))
    assert isinstance(res, TuneResult) and res.ok
    assert res.found_by in ("policy-rollout", "policy-beam", "refine", "default", "template") and res.candidates >= 2
    assert res.schedule.nest.tile is not None and res.gflops > 0 and res.policy


def test_shipped_policy_is_valid():
    pol = Policy.load(DEFAULT_WEIGHTS)
    states = pol.rollout(MatmulProblem(200, 64, 144))
    assert states[-1].nest.tile is not None           # the shipped policy register-tiles


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler")
def test_cli_tune_end_to_end(tmp_path):
    from looptune.tuner.cli import main

    db = tmp_path / "db.h5"
    out = CliRunner().invoke(main, ["tune", "48", "40", "56", "--budget", "1.5", "--db", str(db), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["ok"] and data["gflops"] > 0 and data["numpy_gflops"] > 0 and data["stored"]
    from looptune.database import load
    records = load(str(db)).records
    assert len(records) == 1 and records[0].problem.key() == data["problem"]
    text = CliRunner().invoke(main, ["tune", "33", "17", "9", "--budget", "1"])
    assert text.exit_code == 0, text.output
    assert "GFLOPS" in text.output and "for " in text.output


def test_policy_beam_search_respects_a_call_budget():
    from looptune.tuner.search.strategies import PolicyBeamSearch, run_search

    t = [0.0]

    def clock():                      # each call advances 0.25 s: the budget counts batches, not real time
        t[0] += 0.25
        return t[0]

    res = run_search(PolicyBeamSearch(MatmulProblem(80, 96, 112), Policy.load()), Evaluator(SyntheticRunner()),
                     budget_s=3.0, clock=clock)
    assert res.best_gflops > 0 and res.evaluated >= 1
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(res.history, res.history[1:]))
    assert res.best_at(0.0) == 0.0 and res.best_at(1e9) == res.best_gflops


def test_refine_candidates_are_distinct_legal_neighbours_ranked_by_the_policy():
    from looptune.runtime.compiler.defaults import default_schedule
    from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
    from looptune.tuner.search.tune import refine_candidates

    p = MatmulProblem(96, 128, 80)
    base = canonical_schedule(default_schedule(p).nest)
    got = refine_candidates(Policy.load(), p, base, 6, skip={canonical_key(base.nest)})
    keys = [canonical_key(s.nest) for s in got]
    assert len(got) == 6 and len(set(keys)) == 6 and canonical_key(base.nest) not in keys
    assert refine_candidates(Policy.load(), p, base, 6, skip=set(keys)) != got     # skipped ones are not offered again


def test_tune_hill_climbs_when_budget_remains():
    res = tune(MatmulProblem(112, 64, 144), budget=30.0, policy=Policy.load(), evaluator=Evaluator(SyntheticRunner()))
    assert res.ok and res.candidates > 12            # the first batch is at most rollout + 4 beam + default + templates
