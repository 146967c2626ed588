"""The one tuning loop: a strategy asks, the loop measures under a wall-clock budget, the strategy is told.

    result = run(strategy, evaluator, budget_s=2.0)          # -> TuneResult
    result.schedule, result.gflops, result.found_by, result.best_at(1.0)

``tune()`` (policy rollout, beam, templates, hill-climb), the search baselines (random walk,
greedy, beam, policy beam) and build-db's random blocking search are strategies on this loop
(cf. TVM meta_schedule's ask/tell task scheduler).  A *strategy* proposes candidates (``ask``:
schedules or agent states, anything with a ``nest``) and hears their measurements (``tell``).
The loop owns the clock, the one ``Evaluator`` and the budget, so every strategy gets the same
accounting:

* the first batch goes out whole (one ``build_many`` call: parallel gcc), cut to what the prior
  cost of a candidate (``prior_cost_s``) says fits half the budget, and then to what the rest
  of the budget pays for (but at least one).  A problem too large to time within the budget
  (``prior_timing_s``: 8192^3 in 0.5 s) is not started at all: the result says so
  (``over_budget``) in milliseconds instead of timing out for a minute;
* later batches are small, and none is started that the remaining budget cannot pay for by a
  cost model fitted to the batches so far (``BatchCost``), with a margin before the end;
* no single measurement call may run longer than max(1 s, twice the budget, 1.5 x the prior
  timing) (``Evaluator.time_limit``; the runner kills the worker of a kernel that overruns, a
  TIMEOUT result);
* after every batch the ``callbacks`` hear ``(problem, candidates, results)``: persistence and
  logging are callbacks, never the search's business; ``history`` keeps (seconds, best GFLOPS
  so far), so one run answers "what would a 1 s, 10 s, 60 s budget have found".

A bad candidate (compile error, crash, hang, wrong answer) is just a failed result; the loop
never raises for one.  Time includes compiles.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from looptune.runtime.compiler.abi import OUTPUT_DTYPE
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.schedule import Schedule, canonical_key, canonical_schedule
from looptune.runtime.compiler.workload import ITEMSIZE, MatmulProblem
from looptune.tuner.measure.evaluator import EvalStats, Evaluator, gflops_of
from looptune.tuner.measure.protocol import RunResult, RunStatus

MIN_CALL_TIMEOUT_S = 1.0     # a measurement call may always take this long (worker start-up, tiny budgets)

Callback = Callable[[MatmulProblem, Sequence[Any], Sequence[RunResult]], None]


@dataclass(frozen=True)
class TuneResult:
    """What every search returns: the best schedule found, its measurement, and how it was found."""

    problem: MatmulProblem
    schedule: Schedule                      # canonical trace of the best nest (the first proposed if none ran)
    result: RunResult                       # its measurement (``result.ok`` False if every candidate failed)
    found_by: str                           # e.g. "policy-rollout", "refine", "default", "random-search"; "none"
    policy: str                             # name of the policy used ("" without one)
    candidates: int                         # schedules measured
    seconds: float                          # wall time of the whole run
    history: tuple[tuple[float, float], ...] = ()   # (seconds, best GFLOPS so far) after each batch
    best_schedules: tuple[tuple[float, Schedule], ...] = ()   # (seconds, best schedule) whenever it changed

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def over_budget(self) -> bool:
        """Nothing verified, because no candidate could be timed within the budget (none fitted,
        or every one timed out): rerunning with the same budget would fail the same way."""
        return self.result.status is RunStatus.TIMEOUT

    @property
    def error(self) -> str:
        return self.result.error

    @property
    def gflops(self) -> float:
        return self.result.gflops or 0.0

    @property
    def gflops_spread(self) -> float:
        """Interquartile range in GFLOPS (absolute, as the database stores it)."""
        return (self.result.rel_spread or 0.0) * self.gflops

    @property
    def numpy_gflops(self) -> Optional[float]:
        return self.result.numpy_gflops

    @property
    def speedup_vs_numpy(self) -> Optional[float]:
        return self.result.speedup_vs_numpy

    def best_at(self, seconds: float) -> float:
        """Best GFLOPS among results that had arrived ``seconds`` after the start (0 if none)."""
        return max((g for t, g in self.history if t <= seconds), default=0.0)

    def schedule_at(self, seconds: float) -> Optional[Schedule]:
        """The best schedule among results that had arrived ``seconds`` after the start."""
        return next((s for t, s in reversed(self.best_schedules) if t <= seconds), None)


SETUP_S_PER_ELEMENT = 2e-8   # random operands, their float64 reference product, guarded copies (~1.3 s at 1x32000x4096)
OVER_BUDGET_FACTOR = 4.0     # a problem whose one measurement takes longer than this many budgets fails fast


def prior_timing_s(problem: MatmulProblem) -> float:
    """A pessimistic guess of the time to time one candidate, before anything is measured: the
    operands' set-up in the worker plus about nine calls (verification, warm-up, samples) at 40
    float32 GFLOPS per thread (20 in float64; bfloat16 as float32, the rate of its portable
    kernels, which widen to float32)."""
    p = problem
    setup_s = SETUP_S_PER_ELEMENT * p.batch * (p.m * p.k + p.k * p.n + p.m * p.n)
    accumulator_bytes = ITEMSIZE[OUTPUT_DTYPE[p.dtype]]
    return setup_s + 9 * p.flops / (40e9 * p.threads * 4 / accumulator_bytes)     # float64: half the rate


def prior_cost_s(problem: MatmulProblem) -> float:
    """A pessimistic guess of one first-batch candidate's cost: its share of a parallel compile
    (~0.2 s of gcc over the cores) plus its timing.  Only large problems are cut by it."""
    cores = max(1, detect_cpu().cores)
    return 0.2 / min(cores, 4) + prior_timing_s(problem)


class BatchCost:
    """What the next batch of n candidates will cost, from what the earlier ones did.

    Compiles run ``cores`` at a time, so a batch costs ``ceil(n / cores)`` compile rounds plus
    n timings; a lone candidate pays a whole compile round.  Every figure is the worse of
    the latest observation and the running average (a single-round batch keeps the worst
    round seen): overrunning the budget is the failure, stopping a little early is not.
    """

    def __init__(self) -> None:
        self.cores = max(1, detect_cpu().cores)
        self.compile_round_s = 0.25    # wall per round of parallel compiles, until measured
        self.run_s = 0.0               # per candidate timing
        self.other_s = 0.0             # per candidate, not explained by the two (IPC, Python)

    def estimate(self, n: int) -> float:
        return -(-n // self.cores) * self.compile_round_s + n * (self.run_s + self.other_s)

    def observe(self, n: int, wall_s: float, before: EvalStats, after: EvalStats) -> None:
        built = after.built - before.built
        build_s = after.build_seconds - before.build_seconds
        run_total_s = after.run_seconds - before.run_seconds
        if built:
            rounds = -(-built // self.cores)
            seen = build_s / rounds
            # a small batch pays gcc's fixed costs for fewer kernels than the first one did
            self.compile_round_s = max(seen, self.compile_round_s if rounds < 2 else 0.5 * (self.compile_round_s + seen))
        run = run_total_s / n
        self.run_s = max(run, 0.5 * (self.run_s + run)) if self.run_s else run
        other = max(0.0, wall_s - build_s - run_total_s) / n
        self.other_s = max(other, 0.5 * (self.other_s + other)) if self.other_s else other


class Budget:
    """The wall clock of one run, as the loop and the strategies see it."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.perf_counter,
                 start: Optional[float] = None) -> None:
        self.budget_s = budget_s
        self.clock = clock
        self.t0 = clock() if start is None else start
        # keep a margin: cost estimates are noisy, and a VM can stall a process for 0.1-0.2 s
        self.deadline_s = budget_s - max(0.25, 0.125 * budget_s)
        self.cost = BatchCost()

    def elapsed_s(self) -> float:
        return self.clock() - self.t0

    def fits(self, n: int, extra_s: float = 0.0) -> bool:
        """Can ``n`` more candidates (after ``extra_s`` of other work) be paid for before the deadline?"""
        return self.elapsed_s() + extra_s + self.cost.estimate(n) <= self.deadline_s


class Strategy(abc.ABC):
    """Proposes candidates for one problem and learns from their measurements."""

    name = "search"
    policy_name = ""           # the policy a strategy follows, if any (reported in the result)

    def __init__(self, problem: MatmulProblem) -> None:
        self.problem = problem

    @abc.abstractmethod
    def ask(self, budget: Optional[Budget] = None) -> list[Any]:
        """The next candidates (anything with a ``nest``), best first; [] when there is
        nothing left worth trying.  ``budget``: the run's clock (None: unlimited)."""

    def tell(self, candidates: Sequence[Any], results: Sequence[RunResult]) -> None:
        """The measurements of candidates this strategy proposed (in the same order)."""

    def found_by(self, candidate: Any) -> str:
        """How ``candidate`` was found, for the result's ``found_by``."""
        return self.name


def run(strategy: Strategy, evaluator: Evaluator, budget_s: float, *, batch: int = 4, confirm: int = 0,
        callbacks: Sequence[Callback] = (), clock: Callable[[], float] = time.perf_counter,
        start: Optional[float] = None) -> TuneResult:
    """Ask, measure, tell until the budget is spent or the strategy has nothing left.

    ``batch``: candidates per batch after the first.  ``confirm``: re-time this many finalists
    at the end when the budget allows (``_confirm``).  ``callbacks``: called with ``(problem,
    candidates, results)`` after every batch.  ``start``: when the run began on ``clock``, if
    earlier than this call (set-up counts against the budget)."""
    problem = strategy.problem
    budget = Budget(budget_s, clock, start)
    prior_s, timing_s = prior_cost_s(problem), prior_timing_s(problem)
    queue: list[Any] = []
    first: list[Any] = []                  # the first candidate proposed: the result's schedule if nothing ran
    measured: dict[str, RunResult] = {}
    by_key: dict[str, Any] = {}
    best: Optional[tuple[float, Any, RunResult]] = None
    history: list[tuple[float, float]] = []
    best_schedules: list[tuple[float, Schedule]] = []
    # Not even asked when one measurement takes several budgets (8192^3 in 0.5 s): that fails fast.
    # When it takes more than the budget but not that much (2048^3 in 2.5 s), the analytic default
    # is measured alone, once, and the run overruns its budget by that measurement: a database
    # gets a verified record for every problem it can time at all.
    too_large = timing_s > OVER_BUDGET_FACTOR * budget_s
    default_only = not too_large and timing_s > budget_s
    # The per-call limit is a safety net against hangs, not the budget (the batch planning holds
    # that): a first call also builds the operands and their reference, which for a large operand
    # (16x11008x4096: 180 MB of B) is most of a 2.5 s budget on its own.
    call_limit_s = max(MIN_CALL_TIMEOUT_S, 2 * budget_s, 1.5 * timing_s)
    with evaluator.time_limit(call_limit_s):
        if default_only:
            default = default_schedule(problem)
            by_key[canonical_key(default.nest)] = default
            first = [default]
            (r,) = evaluator.evaluate([(problem, default.nest)])
            measured[canonical_key(default.nest)] = r
            if gflops_of(r) is not None:
                best = (gflops_of(r), default, r)
                history.append((budget.elapsed_s(), best[0]))
                best_schedules.append((budget.elapsed_s(), canonical_schedule(default.nest)))
            for callback in callbacks:
                callback(problem, [default], [r])
        elif not too_large:
            evaluator.prefetch(problem)    # worker start and numpy timing overlap the first proposals
        while not too_large and not default_only:
            if not queue:
                proposed = strategy.ask(budget)
                first = first or proposed[:1]
                queue = []
                for c in proposed:
                    k = canonical_key(c.nest)
                    if k not in measured and k not in by_key:
                        by_key[k] = c
                        queue.append(c)
                if not queue:
                    break
            if not history:                # the first batch: one compiler call, cut by the prior
                left_s = budget_s - budget.elapsed_s()
                n = min(len(queue), max(2, int(0.5 * budget_s / prior_s)))
                while n > 1 and n * prior_s > left_s:
                    n -= 1                 # one candidate is timed whatever set-up cost: it fits the budget
            else:
                n = min(batch, len(queue))
                while n and not budget.fits(n):
                    n -= 1
            if not n:
                break
            chunk, queue = queue[:n], queue[n:]
            before = replace(evaluator.stats)
            t1 = clock()
            results = evaluator.evaluate([(problem, c.nest) for c in chunk])
            budget.cost.observe(n, clock() - t1, before, evaluator.stats)
            strategy.tell(chunk, results)
            changed = False
            for c, r in zip(chunk, results):
                measured[canonical_key(c.nest)] = r
                g = gflops_of(r)
                if g is not None and (best is None or g > best[0]):
                    best, changed = (g, c, r), True
            now = budget.elapsed_s()
            history.append((now, best[0] if best else 0.0))
            if changed:
                best_schedules.append((now, canonical_schedule(best[1].nest)))
            for callback in callbacks:
                callback(problem, chunk, results)
        if best is not None and confirm:
            best = _confirm(problem, evaluator, measured, by_key, best, budget, confirm)
    seconds = budget.elapsed_s()
    common = dict(policy=strategy.policy_name, candidates=len(measured), seconds=seconds,
                  history=tuple(history), best_schedules=tuple(best_schedules))
    if best is not None:
        g, c, r = best
        found_by = "default" if default_only else strategy.found_by(c)
        return TuneResult(problem, canonical_schedule(c.nest), r, found_by, **common)
    schedule = canonical_schedule(first[0].nest) if first else canonical_schedule(default_schedule(problem).nest)
    return TuneResult(problem, schedule, _failure(problem, schedule, measured, too_large, timing_s, budget_s),
                      "none", **common)


def _failure(problem: MatmulProblem, schedule: Schedule, measured: dict[str, RunResult], too_large: bool,
             timing_s: float, budget_s: float) -> RunResult:
    """Why nothing verified: the first failure that is not a timeout, else a timeout (the problem
    does not fit the budget), else nothing was proposed."""
    failures = list(measured.values())
    if any(r.status is not RunStatus.TIMEOUT for r in failures):
        return next(r for r in failures if r.status is not RunStatus.TIMEOUT)
    if failures:
        return failures[0]
    if too_large:
        return RunResult(RunStatus.TIMEOUT, problem.key(), schedule.to_json(),
                         error=f"too large for a {budget_s:g} s budget: timing one candidate takes about "
                               f"{timing_s:.3g} s")
    return RunResult(RunStatus.RUNNER_ERROR, problem.key(), schedule.to_json(), error="nothing was measured")


def _confirm(problem: MatmulProblem, evaluator: Evaluator, measured: dict[str, RunResult], by_key: dict[str, Any],
             best: tuple[float, Any, RunResult], budget: Budget, top: int) -> tuple[float, Any, RunResult]:
    """Time the best few once more and pick again, when the budget allows.

    One measurement taken while something else had the core (another process, a compile of
    the same batch finishing) can put a 100 GFLOPS kernel at 85 and lose it to an 90 GFLOPS
    one.  Disturbances only ever slow a kernel down, so each finalist keeps the faster of its
    two timings.  The kernels are built and loaded already: this costs timings only.
    """
    ok = sorted(((gflops_of(r), k) for k, r in measured.items() if gflops_of(r)), reverse=True)[:top]
    cost = budget.cost
    if len(ok) < 2 or budget.elapsed_s() + 2 * len(ok) * (cost.run_s + cost.other_s) + 0.2 > budget.budget_s:
        return best
    again = evaluator.remeasure([(problem, by_key[k].nest) for _, k in ok])
    for (g, k), r in zip(ok, again):
        g2 = gflops_of(r)
        if g2 is not None and g2 > g:
            measured[k] = r
    g, k = max((gflops_of(measured[k]), k) for _, k in ok)
    return g, by_key[k], measured[k]
