"""A losing policy does not eat the budget (``search.contests``): within one tune(), once the
policy's candidates keep losing to the others, the rest of the run goes on without it.  Replayed
from recorded timings in which the policy's candidates are slow, so every run is the same."""
from __future__ import annotations

import dataclasses

import pytest
from agent_fakes import SyntheticRunner

from looptune.runtime.compiler.schedule import canonical_key
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.policy import Policy
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.measure.replay import RecordingRunner, ResultStore
from looptune.tuner.search.contests import LOSSES_TO_YIELD, POLICY, SEARCH, PolicyContest
from looptune.tuner.search.loop import run
from looptune.tuner.search.tune import CONFIRM, PolicyTune

PROBLEM = MatmulProblem(112, 96, 144)


class JudgedRunner(SyntheticRunner):
    """Synthetic GFLOPS, times ``policy_factor`` for candidates the strategy's policy proposed."""

    def __init__(self, strategy: PolicyTune, policy_factor: float):
        super().__init__()
        self.strategy, self.policy_factor = strategy, policy_factor

    def run(self, candidates):
        out = []
        for c, r in zip(candidates, super().run(candidates)):
            f = self.policy_factor if self.strategy.proposed_by.get(c.tag) == POLICY else 1.0
            out.append(dataclasses.replace(r, gflops=r.gflops * f, seconds=r.seconds / f,
                                           q1_seconds=r.q1_seconds / f, q3_seconds=r.q3_seconds / f))
        return out


def ticking_clock(step_s: float = 0.004):
    """Each call advances ``step_s``: the budget counts clock reads, not real time, so a run is
    the same on every machine and under any load."""
    now = [0.0]

    def clock():
        now[0] += step_s
        return now[0]
    return clock


def tune_run(strategy: PolicyTune, evaluator: Evaluator):
    batches = []
    res = run(strategy, evaluator, 2.0, confirm=CONFIRM, clock=ticking_clock(),
              callbacks=[lambda problem, cands, results: batches.append([canonical_key(c.nest) for c in cands])])
    return res, batches


def record(policy_factor: float, contest: PolicyContest | None = None):
    strategy = PolicyTune(PROBLEM, Policy.load())
    if contest is not None:
        strategy.contest = contest
    store = ResultStore()
    res, batches = tune_run(strategy, Evaluator(RecordingRunner(JudgedRunner(strategy, policy_factor), store)))
    return strategy, res, batches, store


def test_a_losing_policy_is_set_aside_and_later_batches_are_the_searchs():
    strategy, res, batches, store = record(policy_factor=0.3)
    assert res.ok and res.policy_set_aside and strategy.contest.set_aside
    cut = strategy.contest.set_aside_at
    assert strategy.contest.losses >= LOSSES_TO_YIELD and strategy.contest.wins * 3 < strategy.contest.contests
    later = [k for batch in batches[cut:] for k in batch]
    assert later, "the budget left after the policy yielded was not spent"
    assert all(strategy.proposed_by[k] == SEARCH for k in later)
    assert any(strategy.proposed_by[k] == POLICY for batch in batches[:cut] for k in batch)
    assert res.found_by not in ("policy-rollout", "policy-beam")


def test_the_guard_is_deterministic_under_the_replay_runner():
    recorded, res, batches, store = record(policy_factor=0.3)
    replayed = PolicyTune(PROBLEM, Policy.load())
    again, again_batches = tune_run(replayed, Evaluator.replay(store))    # a miss would raise ReplayMissError
    assert again_batches == batches
    assert replayed.contest.set_aside_at == recorded.contest.set_aside_at
    assert canonical_key(again.schedule.nest) == canonical_key(res.schedule.nest) and again.gflops == res.gflops


def test_without_the_guard_the_losing_policy_keeps_its_share_of_the_budget():
    guarded, _, guarded_batches, _ = record(policy_factor=0.3)
    unguarded, res, batches, _ = record(policy_factor=0.3, contest=PolicyContest(losses_to_yield=10 ** 9))
    assert not res.policy_set_aside
    cut = guarded.contest.set_aside_at
    policy_later = sum(unguarded.proposed_by[k] == POLICY for batch in batches[cut:] for k in batch)
    assert policy_later > 0
    assert sum(guarded.proposed_by[k] == POLICY for batch in guarded_batches[cut:] for k in batch) == 0


def test_a_winning_policy_is_followed_to_the_end():
    strategy, res, batches, _ = record(policy_factor=2.0)
    assert res.ok and not res.policy_set_aside and strategy.contest.wins > strategy.contest.losses
    assert any(strategy.proposed_by[k] == POLICY for k in batches[-1] + batches[-2])


@pytest.mark.parametrize("results, set_aside", [
    ([(10, 20)] * 3, True),                           # three straight losses
    ([(30, 20)] + [(10, 20)] * 2, False),             # one win: two losses are not enough
    ([(30, 20)] + [(10, 20)] * 3, True),              # 1 of 4 won: under a third
    ([(30, 20)] * 2 + [(10, 20)] * 4, False),         # 2 of 6 won: a third is enough
    ([(None, None)] * 5, False),                      # failures on both sides: no contest
    ([(None, 5)] * 3, True),                          # the policy's candidates failed, the others ran
    ([(20, 20)] * 5, False),                          # ties are no contest
])
def test_the_rule(results, set_aside):
    contest = PolicyContest()
    for policy_g, search_g in results:
        contest.score([POLICY, SEARCH, SEARCH], [policy_g, search_g, None])
    assert contest.set_aside is set_aside


def test_a_batch_of_one_kind_is_no_contest():
    contest = PolicyContest()
    for _ in range(5):
        contest.score([SEARCH, SEARCH], [10.0, 20.0])
        contest.score([POLICY], [1.0])
    assert contest.contests == 0 and not contest.set_aside and contest.batches == 10
