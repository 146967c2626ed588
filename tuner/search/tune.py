"""Tune one problem in about a second: policy rollout in numpy, a few measurements, keep the best.

    from looptune.tuner.search.tune import tune
    res = tune(MatmulProblem(128, 96, 160), budget=2.0)
    res.schedule, res.result.gflops, res.found_by, res.seconds

How the 2 seconds are spent (compiles included):

1. the policy (numpy, ``policy.Policy``) rolls out greedily and in a small beam over its own
   Q-values from the natural loop nest, *without measuring* intermediate states: ~50 ms;
2. the distinct end states, the analytic default and a few template schedules (structures
   that won sweeps) are compiled in ONE ``build_many`` batch (parallel gcc; kernels are
   size-free, so schedules the policy likes are often kernel-cache hits) and timed by the
   isolated runner.  On large problems the batch is cut, in priority order, to what a prior
   cost estimate says fits half the budget; the rest waits for step 3;
3. while budget remains, the tuner hill-climbs from the best measured schedule: its
   one-edit neighbours (any cursor position, ``actions.neighbors``) ranked by the policy's
   Q-value for that edit, alternating with one-factor mutations of its trace (tile size,
   cache blocks; ``mutate``), the best few measured (``refine``); when a neighbourhood
   holds nothing better, the policy beam widens instead.  Batches are small, and none is started
   that the remaining budget cannot pay for.

The measured hill-climb matters most where the policy is least sure (shapes unlike its
training set): the first batch lands near a good schedule, and the neighbours fix the one
split factor or tile it got wrong, which neither more Q-values nor more templates do.

The start is the paper's natural nest rather than the analytic default: the register tile
cannot be changed once chosen, and the policy's best tiles (7-8 x 16 here) differ from the
default's (12 x 32), so starting from the default would close off the best schedules.  The
default is measured alongside instead, so the result is never worse than it.

A bad candidate (compile error, crash, hang, wrong answer) is just a failed result from the
runner; ``tune`` never raises for one.  Importing this module does not import torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule

from looptune.tuner.agent.actions import AgentState, neighbors

from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
from looptune.tuner.measure.evaluator import TUNE_MEASURE, Evaluator, gflops_of
from looptune.tuner.search.mutate import factor_mutations, interleave
from looptune.tuner.agent.observe import observe
from looptune.tuner.measure.runner import ResultStore, RunResult, RunStatus
from looptune.tuner.search.spaces import blocking_candidates

TEMPLATES = 4          # template schedules measured next to the policy's and the default
REFINE = 4             # neighbours of the best schedule measured per hill-climbing round


@dataclass(frozen=True)
class TuneResult:
    """The best schedule found, its measurement, and how it was found."""

    problem: MatmulProblem
    schedule: Schedule                      # canonical trace of the best nest
    result: RunResult                       # its measurement (``result.ok`` False if every candidate failed)
    found_by: str                           # "policy-rollout", "policy-beam", "refine", "default", "template" or "none"
    policy: str                             # name of the policy used ("" without one)
    candidates: int                         # schedules measured
    seconds: float                          # wall time of the whole tune call
    history: tuple[tuple[float, float], ...] = ()   # (seconds, best GFLOPS so far) after each batch

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def gflops(self) -> float:
        return self.result.gflops or 0.0

    @property
    def numpy_gflops(self) -> Optional[float]:
        return self.result.numpy_gflops

    @property
    def speedup_vs_numpy(self) -> Optional[float]:
        return self.result.speedup_vs_numpy


def _default(problem: MatmulProblem) -> Schedule:
    from looptune.runtime.compiler.defaults import default_schedule
    return canonical_schedule(default_schedule(problem).nest)


def _prior_cost(problem: MatmulProblem) -> float:
    """A pessimistic guess of one first-batch candidate's cost before anything is measured:
    its share of a parallel compile (~0.2 s of gcc over the cores) plus about nine calls
    (verification, warm-up, samples) at 40 GFLOPS per thread.  Only large problems are cut by it."""
    from looptune.runtime.compiler.machine import detect_cpu
    cores = max(1, detect_cpu().cores)
    return 0.2 / min(cores, 4) + 9 * problem.flops / (40e9 * problem.threads)


class _BatchCost:
    """What the next batch of n candidates will cost, from what the earlier ones did.

    Compiles run ``cores`` at a time, so a batch costs ``ceil(n / cores)`` compile rounds plus
    n timings; a lone candidate pays a whole compile round.  Every figure is the worse of
    the latest observation and the running average (a single-round batch keeps the worst
    round seen): overrunning the budget is the failure, stopping a little early is not.
    """

    def __init__(self) -> None:
        from looptune.runtime.compiler.machine import detect_cpu
        self.cores = max(1, detect_cpu().cores)
        self.compile_round = 0.25      # s of wall per round of parallel compiles, until measured
        self.run = 0.0                 # s per candidate timing
        self.other = 0.0               # s per candidate not explained by the two (IPC, Python)

    def estimate(self, n: int) -> float:
        return -(-n // self.cores) * self.compile_round + n * (self.run + self.other)

    def observe(self, n: int, wall: float, before, after) -> None:
        built = after.built - before.built
        if built:
            rounds = -(-built // self.cores)
            seen = (after.build_seconds - before.build_seconds) / rounds
            # a small batch pays gcc's fixed costs for fewer kernels than the first one did
            self.compile_round = max(seen, self.compile_round if rounds < 2 else 0.5 * (self.compile_round + seen))
        run = (after.run_seconds - before.run_seconds) / n
        self.run = max(run, 0.5 * (self.run + run)) if self.run else run
        other = max(0.0, wall - (after.build_seconds - before.build_seconds) - (after.run_seconds - before.run_seconds)) / n
        self.other = max(other, 0.5 * (self.other + other)) if self.other else other


def _confirm(problem, evaluator: Evaluator, order: list[Schedule], measured: dict[str, RunResult], best, cost,
             t0: float, budget: float, top: int = 3):
    """Time the best few once more and pick again, when the budget allows.

    One measurement taken while something else had the core (another process, a compile of
    the same batch finishing) can put a 100 GFLOPS kernel at 85 and lose it to an 90 GFLOPS
    one.  Disturbances only ever slow a kernel down, so each finalist keeps the faster of its
    two timings.  The kernels are built and loaded already: this costs timings only.
    """
    ok = sorted(((gflops_of(r), k) for k, r in measured.items() if gflops_of(r)), reverse=True)[:top]
    if len(ok) < 2 or not hasattr(evaluator, "remeasure"):
        return best
    if time.perf_counter() - t0 + 2 * len(ok) * (cost.run + cost.other) + 0.2 > budget:
        return best
    by_key = {canonical_key(s.nest): s for s in order}
    again = evaluator.remeasure([(problem, by_key[k].nest) for _, k in ok])
    for (g, k), r in zip(ok, again):
        g2 = gflops_of(r)
        if g2 is not None and g2 > g:
            measured[k] = r
    g, k = max((gflops_of(measured[k]), k) for _, k in ok)
    return g, by_key[k], measured[k]


def refine_candidates(policy, problem: MatmulProblem, schedule: Schedule, count: int,
                      skip: frozenset[str] | set[str] = frozenset()) -> list[Schedule]:
    """``count`` schedules next to ``schedule``, none with a canonical key in ``skip``; nothing
    is measured.  Two kinds alternate:

    * one-edit neighbours in the agent's action space, the policy's best-rated first (Q of the
      edit at its cursor): a loop split or swapped, packing, unrolling changed, ...;
    * one-factor mutations of the trace (``mutate.factor_mutations``): the register tile one
      size up or down, a cache block halved or doubled, which no action can do once tiled.

    Before: the best measured nest, e.g. ``m.o(96) n.o(512) k(256) [m.i 8 x n.i 16]``.
    After: e.g. ``k`` split by 128, or the tile 8 x 32, or ``m.o`` 48 instead of 96.
    """
    state = AgentState.initial(schedule)
    nbrs = neighbors(state, problem)
    ranked: list[Schedule] = []
    if nbrs:
        cursors = sorted({c for c, _, _ in nbrs})
        row = {c: i for i, c in enumerate(cursors)}
        q = policy.q_values([observe(AgentState(state.schedule, c), problem, 0.5) for c in cursors])
        ranked = [n for _, _, n in sorted(nbrs, key=lambda x: -float(q[row[x[0]], x[1]]))]
        ranked = [canonical_schedule(n.nest) for n in ranked]
    out, seen = [], set(skip)
    for cand in interleave([ranked, factor_mutations(schedule, problem)]):
        k = canonical_key(cand.nest)
        if k not in seen:
            seen.add(k)
            out.append(cand)
            if len(out) >= count:
                break
    return out


def tune(problem: MatmulProblem, *, budget: float = 2.0, policy=None, evaluator: Optional[Evaluator] = None,
         include_default: bool = True, first_width: int = 4, batch: int = 4, refine: int = REFINE) -> TuneResult:
    """Tune ``problem`` within ``budget`` seconds (wall clock, compiles and measurements included).

    ``policy``: a ``policy.Policy``, or None to load the shipped weights; if none can be loaded
    the tuner measures the analytic default only (``found_by="default"``).  ``evaluator``:
    where measurements go (default: a fresh isolated ``LocalRunner``, closed on return).
    """
    t0 = time.perf_counter()
    own = evaluator is None
    if own:   # a candidate that runs far past the budget is cut off (the runner kills and restarts its worker)
        evaluator = Evaluator.local(config=replace(TUNE_MEASURE, timeout_seconds=max(2.0, 2.0 * budget)))
    try:
        evaluator.prefetch(problem)
        if policy is None:
            from looptune.tuner.agent.policy import Policy, PolicyError
            try:
                policy = Policy.load()
            except PolicyError:
                policy = None
        sources: dict[str, str] = {}
        order: list[Schedule] = []

        def add(sched: Schedule, how: str) -> None:
            k = canonical_key(sched.nest)
            if k not in sources:
                sources[k] = how
                order.append(canonical_schedule(sched.nest))

        # keep a margin: cost estimates are noisy, and a VM can stall a process for 0.1-0.2 s
        deadline = budget - max(0.25, 0.125 * budget)
        # The first batch, in priority order (it is cut short when the problem is so large that
        # all of it would not fit the budget): the policy's rollout, the analytic default, then
        # the policy's beam and the template schedules alternately.  Templates are structures that
        # won sweeps (GEMV-like streaming and register-resident panels for skinny M, in-place A
        # for small problems, wide packed tiles for large ones); kernels are size-free, so they
        # are often kernel-cache hits across a family.
        width = first_width
        tb = time.perf_counter()
        beam = [n.state.schedule for n in policy.beam(problem, width=width)] if policy is not None else []
        beam_seconds = time.perf_counter() - tb
        templates = [c.schedule() for c in blocking_candidates(problem, TEMPLATES)[1:]] \
            if include_default or policy is None else []
        if policy is not None:
            add(policy.rollout(problem)[-1].schedule, "policy-rollout")
        if include_default or policy is None:
            add(_default(problem), "default")
        for i in range(max(len(beam), len(templates))):
            if i < len(beam):
                add(beam[i], "policy-beam")
            if i < len(templates):
                add(templates[i], "template")
        first_cap = max(2, int(0.5 * budget / _prior_cost(problem)))

        best: Optional[tuple[float, Schedule, RunResult]] = None
        history: list[tuple[float, float]] = []
        measured: dict[str, RunResult] = {}
        cost = _BatchCost()
        first = True
        refined: set[str] = set()           # schedules whose neighbourhood has been queued
        while True:
            todo = [s for s in order if canonical_key(s.nest) not in measured]
            if not todo:
                elapsed = time.perf_counter() - t0
                if policy is None or elapsed + cost.estimate(2) > deadline:
                    break
                if refine and best is not None and canonical_key(best[1].nest) not in refined:
                    refined.add(canonical_key(best[1].nest))
                    for s in refine_candidates(policy, problem, best[1], refine, set(sources)):
                        add(s, "refine")
                    continue
                # a beam twice as wide costs about twice the last one (numpy, no measuring)
                if width >= 64 or elapsed + 2.2 * beam_seconds + cost.estimate(2) > deadline:
                    break
                width *= 2
                tb = time.perf_counter()
                for node in policy.beam(problem, width=width):
                    add(node.state.schedule, "policy-beam")
                beam_seconds = time.perf_counter() - tb
                continue
            # the first round goes out as one batch (one compiler call); later ones in small batches
            chunk = todo[:first_cap] if first else todo[:batch]
            elapsed = time.perf_counter() - t0
            if not first:
                while chunk and elapsed + cost.estimate(len(chunk)) > deadline:
                    chunk = chunk[:-1]
                if not chunk:
                    break
            before = replace(evaluator.stats)
            t1 = time.perf_counter()
            results = evaluator.evaluate([(problem, s.nest) for s in chunk])
            cost.observe(len(chunk), time.perf_counter() - t1, before, evaluator.stats)
            first = False
            for s, r in zip(chunk, results):
                measured[canonical_key(s.nest)] = r
                g = gflops_of(r)
                if g is not None and (best is None or g > best[0]):
                    best = (g, s, r)
            history.append((time.perf_counter() - t0, best[0] if best else 0.0))
        name = getattr(policy, "name", "") if policy is not None else ""
        best = _confirm(problem, evaluator, order, measured, best, cost, t0, budget)
        if best is None:
            s = order[0]
            r = measured.get(canonical_key(s.nest)) or RunResult(RunStatus.RUNNER_ERROR, problem.key(), s.to_json(),
                                                                  error="nothing was measured")
            return TuneResult(problem, s, r, "none", name, len(measured), time.perf_counter() - t0, tuple(history))
        g, s, r = best
        return TuneResult(problem, s, r, sources[canonical_key(s.nest)], name, len(measured),
                          time.perf_counter() - t0, tuple(history))
    finally:
        if own:
            evaluator.close()
