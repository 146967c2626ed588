"""Issue 12: large problems searched on a proxy and confirmed on the real size; parallel candidates
at threads > 1.  Synthetic runners and fake clocks: deterministic, no timing asserts."""
from __future__ import annotations

import math

import pytest
from agent_fakes import SyntheticRunner

from looptune.runtime.compiler.defaults import default_params
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.policy import Policy
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.measure.runner import RunResult, RunStatus
from looptune.tuner.search.budget import Budget
from looptune.tuner.search.loop import run
from looptune.tuner.search.proxy import PROXY_ABOVE_S, Rates, confirm_cost_s, prior_timing_s, proxy_problem
from looptune.tuner.search.tune import NO_POLICY, PolicyTune, tune


def test_a_cheap_problem_is_its_own_proxy():
    p = MatmulProblem(600, 500, 400, threads=2)
    assert prior_timing_s(p) <= PROXY_ABOVE_S and proxy_problem(p) == p


def test_the_proxy_keeps_family_remainders_and_one_block_per_thread():
    for p in (MatmulProblem(2048, 2048, 2048, threads=2), MatmulProblem(1024, 1024, 1024),
              MatmulProblem(1000, 3000, 999, dtype="float64", layout="nt"),
              MatmulProblem(64, 4096, 4096, batch=8, threads=2)):
        q = proxy_problem(p)
        assert q.family == p.family and q.flops < p.flops and prior_timing_s(q) < prior_timing_s(p)
        assert q.batch <= p.batch and q.batch >= min(p.batch, p.threads)
        params = default_params(p)
        blocks = {"m": params.mc, "n": params.nc, "k": params.kc}
        for dim in "mnk":
            real, small = getattr(p, dim), getattr(q, dim)
            assert small <= real and (real - small) % blocks[dim] == 0     # whole blocks taken off
            assert small >= min(real, blocks[dim])                         # at least one block kept
        if params.parallel in ("m.o", "n.o"):
            dim = params.parallel[0]
            assert getattr(q, dim) >= min(getattr(p, dim), p.threads * blocks[dim])
    assert proxy_problem(MatmulProblem(2048, 2048, 2048, threads=2)) == proxy_problem(
        MatmulProblem(2048, 2048, 2048, threads=2))          # a pure function


def test_confirm_cost_counts_the_first_timing_and_numpy_once():
    p = MatmulProblem(2048, 2048, 2048, threads=2)
    r = Rates(150.0, 150.0)
    assert confirm_cost_s(p, r, first=True) > confirm_cost_s(p, r, first=False, numpy_timed=False) \
        > confirm_cost_s(p, r, first=False, numpy_timed=True) > 0


class RecordingRunner(SyntheticRunner):
    """The synthetic runner, remembering which problem every candidate ran on."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def run(self, candidates):
        self.seen += [(c.problem.key(), c.tag) for c in candidates]
        return super().run(candidates)


def test_search_runs_on_the_proxy_and_the_result_is_the_real_size_timing():
    problem = MatmulProblem(1024, 1024, 1024)
    proxy = proxy_problem(problem)
    runner = RecordingRunner()
    res = tune(problem, budget_s=30.0, policy=Policy.load(), evaluator=Evaluator(runner), databases=False)
    assert res.ok and proxy != problem and res.searched_on == proxy
    keys = [k for k, _ in runner.seen]
    assert keys.count(proxy.key()) >= 2 and problem.key() in keys
    assert all(k == proxy.key() for k in keys[:keys.index(problem.key())])      # the search, then the confirmation
    assert res.result.problem_key == problem.key()                               # what is stored: the real size
    assert (problem.key(), res.result.tag) in runner.seen


def test_a_threads_2_tune_measures_parallel_candidates():
    for shape in ((600, 500, 400), (2048, 2048, 2048), (96, 80, 112)):
        problem = MatmulProblem(*shape, threads=2)
        for policy in (Policy.load(), NO_POLICY):
            runner = RecordingRunner()
            tune(problem, budget_s=3.0, policy=policy, evaluator=Evaluator(runner), databases=False)
            assert any('"parallel"' in tag for _, tag in runner.seen), (shape, policy)
        first = PolicyTune(problem, Policy.load()).ask()
        assert any(s.nest.parallel for s in first[:2])       # even a first batch cut to two has threads
        loops = {s.nest.parallel for s in first if s.nest.parallel}
        assert {"m.o", "n.o"} <= {name.split(".")[0] + ".o" for name in loops} or len(loops) >= 2


def test_the_real_size_confirmation_respects_a_fake_clock():
    """Each runner call advances the fake clock by 0.3 s: the search stops in time for the
    reserved real-size timing, and no real-size timing starts past the budget."""
    t = [0.0]

    class SlowRunner(RecordingRunner):
        def run(self, candidates):
            t[0] += 0.3 * len(candidates)
            return super().run(candidates)

    problem = MatmulProblem(1024, 1024, 1024)
    runner = SlowRunner()
    res = run(PolicyTune(problem, None), Evaluator(runner), budget_s=2.0, confirm=3, clock=lambda: t[0],
              proxy=proxy_problem(problem), rates=lambda: Rates(100.0, 100.0))
    assert res.ok and res.result.problem_key == problem.key()
    real = [i for i, (k, _) in enumerate(runner.seen) if k == problem.key()]
    assert real and len(real) <= 3
    assert res.seconds <= 2.0 + 0.3      # only the last real-size call may end past the deadline


def test_no_room_for_a_proxy_batch_times_the_first_candidate_once_on_the_real_size():
    problem = MatmulProblem(2048, 2048, 2048, threads=2)
    runner = RecordingRunner()
    res = run(PolicyTune(problem, None), Evaluator(runner), budget_s=2.0, confirm=3,
              proxy=proxy_problem(problem), rates=lambda: Rates(20.0, 20.0))       # slow: 1 s+ per real timing
    assert res.ok and res.candidates == 1 and runner.seen == [(problem.key(), runner.seen[0][1])]
    assert res.schedule.nest.parallel                      # the first candidate at threads 2 is parallel


def test_budget_reserve_holds_back_later_batches():
    t = [0.0]
    b = Budget(2.0, clock=lambda: t[0])
    assert b.fits(1)
    b.reserve_s = 1.7
    assert not b.fits(1) and b.left_s() == 2.0 - 1.7


def test_a_failed_real_size_timing_is_not_reported_as_the_proxy_result():
    class RealSizeFails(RecordingRunner):
        def run(self, candidates):
            out = super().run(candidates)
            return [r if c.problem.key() != problem.key() else RunResult(RunStatus.WRONG_ANSWER, r.problem_key, r.tag,
                                                                          error="bad")
                    for c, r in zip(candidates, out)]

    problem = MatmulProblem(1024, 1024, 1024)
    res = tune(problem, budget_s=30.0, policy=NO_POLICY, evaluator=Evaluator(RealSizeFails()), databases=False)
    assert not res.ok and res.result.status is RunStatus.WRONG_ANSWER


def test_database_seeds_join_the_first_batch_and_a_near_local_one_leads_a_large_problem():
    from looptune.runtime.compiler.defaults import default_schedule
    from looptune.runtime.compiler.schedule import canonical_schedule
    from looptune.tuner.search.seeds import Seed, seed_rates
    from looptune.tuner.search.spaces import BlockingParams

    problem = MatmulProblem(2048, 2048, 2048, threads=2)
    sched = canonical_schedule(BlockingParams(8, 32, 256, 256, 512, parallel="m.o").schedule().nest)
    seed = Seed(sched, MatmulProblem(1536, 1536, 1536, threads=2), 0.7, True, 190.0, 180.0)
    strategy = PolicyTune(problem, None, seeds=lambda: [seed])
    first = strategy.ask()
    assert first[0].to_json() == sched.to_json() and strategy.found_by(first[0]) == "database"
    assert any(s.to_json() == canonical_schedule(default_schedule(problem).nest).to_json() for s in first)
    rates = seed_rates(problem, [seed])
    assert rates is not None and rates.kernel_gflops < 190.0                     # discounted
    assert seed_rates(problem, [Seed(sched, seed.problem, 3.0, True, 190.0, 180.0)]) is None   # too far


def test_nearest_seeds_replay_in_the_problems_family(tmp_path, monkeypatch):
    """Seeds come from a database this test writes (never whatever this machine has): the
    records of the problem's family nearest first, this machine's before another's (which
    carries the foreign penalty), a record whose trace does not replay skipped, other families
    (dtype, threads) never asked."""
    from looptune.database import MachineKey, Record, save
    from looptune.runtime.compiler.schedule import Schedule, canonical_schedule
    from looptune.runtime.compiler.trace import Step, Trace
    from looptune.tuner.search.seeds import nearest_seeds

    foreign = MachineKey("aarch64", "Other CPU", "neon", ("asimd",), 4, "clang 17.0.6", "0")
    near_trace = Trace((Step.make("split", loop="m", factor=8), Step.make("split", loop="n", factor=32)))
    far_trace = Trace((Step.make("split", loop="k", factor=64),))
    broken = Trace((Step.make("split", loop="m.i", factor=4),))     # valid grammar, does not replay

    def record(m, n, k, trace, machine=None, **family):
        return Record(MatmulProblem(m, n, k, **family), machine or MachineKey.current(), trace, 90.0, 1.0, 70.0, True,
                      "test", "test", 1, 1.7e9)

    near, far = record(1024, 1024, 1024, near_trace), record(512, 512, 512, far_trace)
    other = record(1000, 1000, 1000, far_trace, machine=foreign)
    db = tmp_path / "user.h5"
    save(db, [near, far, other, record(2000, 1000, 1000, broken),
              record(1000, 1000, 1000, near_trace, dtype="float64"), record(1000, 1000, 1000, near_trace, threads=2)])
    monkeypatch.setenv("LOOPTUNE_DB", str(db))
    monkeypatch.setenv("LOOPTUNE_NO_EMBEDDED_DB", "1")

    problem = MatmulProblem(1000, 1000, 1000)
    seeds = nearest_seeds(problem, 4)
    assert [(s.problem, s.local) for s in seeds] == [(near.problem, True), (far.problem, True), (other.problem, False)]
    assert [s.schedule.to_json() for s in seeds] == [canonical_schedule(Schedule.from_trace(t).nest).to_json()
                                                     for t in (near_trace, far_trace, far_trace)]
    assert seeds[0].distance == pytest.approx(3 ** 0.5 * math.log2(1024 / 1000))
    assert seeds[1].distance == pytest.approx(3 ** 0.5 * math.log2(1000 / 512))
    assert seeds[2].distance == pytest.approx(2.0)                  # the foreign penalty, at distance 0
    assert (seeds[0].gflops, seeds[0].numpy_gflops) == (90.0, 70.0)
    assert all(s.problem.family == problem.family and s.schedule.trace.steps for s in seeds)
    assert [s.problem for s in nearest_seeds(problem, 1)] == [near.problem]


def test_the_fastest_parallel_candidate_is_always_a_finalist_at_threads_2():
    from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
    from looptune.tuner.search.proxy import finalists
    from looptune.tuner.search.spaces import BlockingParams

    problem = MatmulProblem(600, 500, 400, threads=2)
    scheds = [canonical_schedule(BlockingParams(8, 32, 64 * i, 256, 256, parallel=par).schedule().nest)
              for i, par in ((1, None), (2, None), (3, None), (4, "n.o"), (5, "m.o"))]
    by_key = {canonical_key(s.nest): s for s in scheds}
    gflops = dict(zip(by_key, (200.0, 190.0, 180.0, 150.0, 160.0)))
    measured = {k: RunResult(RunStatus.OK, problem.key(), k, seconds=1.0, gflops=g) for k, g in gflops.items()}
    got = finalists(problem, measured, by_key, 3)
    assert len(got) == 3 and got[:2] == list(by_key)[:2] and by_key[got[2]].nest.parallel == "m.o"
    single = finalists(problem.with_threads(1), measured, by_key, 3)
    assert single == list(by_key)[:3]
