"""tune() without the policy (the ablation baseline) and parallel candidates for threads > 1, on synthetic
measurements (deterministic, no compiler); the CLI's ``--policy none``."""
from __future__ import annotations

import dataclasses
import json

import pytest
from agent_fakes import SyntheticRunner
from click.testing import CliRunner

from looptune.runtime.compiler.schedule import canonical_key
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.policy import Policy
from looptune.tuner.cli import main
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.search import tune as tune_module
from looptune.tuner.search.tune import NO_POLICY, analytic_default, refine_candidates, tune

SOURCES = {"policy-rollout", "policy-rollout+parallel", "policy-beam", "default", "template", "refine"}


class ThreadAwareRunner(SyntheticRunner):
    """Synthetic GFLOPS times ``parallel_factor`` for schedules with a ``parallel`` step."""

    def __init__(self, parallel_factor: float):
        super().__init__()
        self.parallel_factor = parallel_factor

    def run(self, candidates):
        out = []
        for c, r in zip(candidates, super().run(candidates)):
            parallel = any(s["op"] == "parallel" for s in json.loads(c.tag)["steps"])
            f = self.parallel_factor if parallel else 1.0
            out.append(dataclasses.replace(r, gflops=r.gflops * f, seconds=r.seconds / f,
                                           q1_seconds=r.q1_seconds / f, q3_seconds=r.q3_seconds / f))
        return out


def first_batch_recorder():
    batches = []
    return batches, (lambda problem, cands, results: batches.append(list(cands)))


@pytest.fixture
def policy_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("policy='none' must not use the policy")

    for name in ("load", "rollout", "beam", "q_values"):
        monkeypatch.setattr(Policy, name, forbidden)


def test_policy_none_never_calls_the_policy_and_improves_by_hill_climbing(policy_forbidden):
    batches, record = first_batch_recorder()
    res = tune(MatmulProblem(112, 64, 144), budget_s=5.0, policy=NO_POLICY, evaluator=Evaluator(SyntheticRunner()),
               callbacks=[record])
    assert res.ok and res.policy == ""
    first = {canonical_key(s.nest) for s in batches[0]}
    assert canonical_key(analytic_default(res.problem).nest) in first          # default and templates first
    assert res.found_by == "refine" and canonical_key(res.schedule.nest) not in first
    assert res.history[0][1] < res.gflops and res.candidates > len(batches[0]) + 8


def test_policy_none_orders_neighbours_by_seed_not_by_q_values(policy_forbidden):
    p = MatmulProblem(96, 128, 80)
    base = analytic_default(p)
    keys = lambda seed: [canonical_key(s.nest) for s in refine_candidates(None, p, base, 8, seed=seed)]
    assert keys(0) == keys(0) and keys(0) != keys(1) and len(set(keys(0))) == 8
    assert canonical_key(base.nest) not in keys(0)
    first = keys(0)
    later = [canonical_key(s.nest) for s in refine_candidates(None, p, base, 8, skip=set(first[:4]), seed=0)]
    assert later[:4] == first[4:]           # the same order on every call: the climb goes on where it stopped


@pytest.mark.parametrize("policy", [NO_POLICY, None], ids=["no-policy", "shipped-policy"])
def test_threads_put_parallel_candidates_in_the_first_batch(policy):
    p = MatmulProblem(256, 256, 128, threads=2)
    batches, record = first_batch_recorder()
    res = tune(p, budget_s=5.0, policy=policy, evaluator=Evaluator(SyntheticRunner()), callbacks=[record])
    assert res.ok and res.found_by in SOURCES
    first = batches[0]
    assert analytic_default(p).nest.parallel is not None
    assert canonical_key(analytic_default(p).nest) in {canonical_key(s.nest) for s in first}
    assert {"n.o", "m.o"} <= {s.nest.parallel for s in first}        # templates over the n and the m blocks
    sizes = {"b": p.batch, "m": p.m, "n": p.n, "k": p.k}
    for s in first:
        if s.nest.parallel is not None:
            i = s.nest.index(s.nest.parallel)
            assert s.nest.trip_counts(sizes)[i][0] >= 2          # each thread gets work


def test_a_sequential_record_for_threads_only_when_it_measured_faster():
    p = MatmulProblem(256, 256, 128, threads=2)
    fast = tune(p, budget_s=5.0, policy=NO_POLICY, evaluator=Evaluator(ThreadAwareRunner(2.0)))
    assert fast.ok and fast.schedule.nest.parallel is not None
    slow = tune(p, budget_s=5.0, policy=NO_POLICY, evaluator=Evaluator(ThreadAwareRunner(0.5)))
    assert slow.ok and slow.schedule.nest.parallel is None and slow.found_by == "refine"   # parallel dropped


def test_policy_argument_forms(tmp_path):
    assert tune_module.resolve_policy(NO_POLICY) is None
    assert tune_module.resolve_policy(None).name
    pol = Policy.load()
    assert tune_module.resolve_policy(pol) is pol
    with pytest.raises(Exception, match="no policy weights"):
        tune_module.resolve_policy(str(tmp_path / "missing.npz"))


def test_cli_accepts_policy_none(monkeypatch, tmp_path):
    seen = []
    real_tune = tune_module.tune

    def synthetic_tune(problem, *, budget_s, policy):
        seen.append(policy)
        return real_tune(problem, budget_s=budget_s, policy=policy, evaluator=Evaluator(SyntheticRunner()))

    monkeypatch.setattr(tune_module, "tune", synthetic_tune)
    out = CliRunner().invoke(main, ["tune", "64", "48", "40", "--budget", "3", "--policy", "none", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert seen == [NO_POLICY] and data["ok"] and data["policy"] == ""
    assert data["found_by"] in {"default", "template", "refine"}
    text = CliRunner().invoke(main, ["tune", "64", "48", "40", "--budget", "3", "--policy", "none"])
    assert text.exit_code == 0 and "found by" in text.output
    missing = CliRunner().invoke(main, ["tune", "64", "48", "40", "--policy", str(tmp_path / "missing.npz")])
    assert missing.exit_code != 0 and "no policy weights" in missing.output
