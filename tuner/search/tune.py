"""Tune one problem in about a second: policy rollout in numpy, a few measurements, keep the best.

    from looptune.tuner.search.tune import tune
    res = tune(MatmulProblem(128, 96, 160), budget_s=2.0)
    res.schedule, res.result.gflops, res.found_by, res.seconds
    base = tune(MatmulProblem(128, 96, 160), budget_s=2.0, policy="none")   # the ablation: no policy

How the 2 seconds are spent (compiles included):

1. the policy (numpy, ``policy.Policy``) rolls out greedily and in a small beam over its own
   Q-values from the natural loop nest, *without measuring* intermediate states: ~50 ms;
2. the distinct end states, the analytic default and a few template schedules (structures
   that won sweeps) are compiled in ONE ``build_many`` batch (parallel gcc; each as the
   problem's exact-size kernel, the kernel its record will be served by) and timed by the
   isolated runner.  On large problems the batch is cut, in priority order, to what a prior
   cost estimate says fits half the budget; the rest waits for step 3 (the budget accounting
   is the loop's: ``looptune.tuner.search.loop``, where this is one strategy of several);
3. while budget remains, the tuner hill-climbs from the best measured schedule: its
   one-edit neighbours (any cursor position, ``actions.neighbors``) ranked by the policy's
   Q-value for that edit, alternating with one-factor mutations of its trace (tile size,
   cache blocks; ``mutate``), the best few measured (``refine``); when a neighbourhood
   holds nothing better, the policy beam widens instead.  Batches are small, and none is started
   that the remaining budget cannot pay for.

Before step 1, the nearest records of the user's and the embedded database are looked up in a
background thread (``seeds``); their schedules join the first batch (the nearest one first on
a large problem, when it is this machine's and within one doubling of each size).

Large problems: when one timing is expensive, steps 2 and 3 measure on a smaller *proxy* of the
problem's family (``proxy.proxy_problem``: whole cache blocks taken off the large sizes, 1024^3
is searched on 520x1024x512), and the best few (``CONFIRM``, with the fastest parallel one when
threads > 1) are then timed on the real size with a light protocol; the result, and what a
database stores, is that real-size timing.  The loop reserves the confirmation's cost
(``proxy.confirm_cost_s``) from the start; when nothing is left for a proxy batch (2048^3 at
2 threads in 2 s), the first candidate (the nearest record, else the default) is timed alone.

A losing policy does not eat the budget: each measured batch holding both the policy's
candidates (rollout, beam, Q-ranked neighbours) and the others (default, templates, seeds,
mutations) is a contest won by the kind with the faster best candidate; once the policy has lost
three and won under a third of them, the rest of the run goes on as ``policy="none"`` does
(``contests``; ``TuneResult.policy_set_aside``).

``policy="none"`` (``NO_POLICY``) is the ablation baseline: the same tune() with the policy
taken out.  Step 1 proposes nothing, step 2 measures the default and the templates, and the
hill-climb of step 3 tries the one-edit neighbours in a random order (seeded by ``seed`` and
the schedule) instead of by Q-value; where the policy would widen its beam, it goes on through
the rest of the best schedule's neighbourhood instead.  Budget, batches, mutations and the
re-timing of finalists are the same.  ``TuneResult.found_by`` names the winner's source in both
modes: "policy-rollout", "policy-rollout+parallel", "policy-beam", "default", "template", "database",
"refine" (a source + "+parallel": that candidate with ``parallel`` added or moved to the other loop).

Threads: for a problem with threads > 1 the default is parallel, the templates come in parallel
variants (over the n blocks, over the m blocks: ``spaces.parallel_variants``), a sequential
policy rollout is measured with ``parallel`` added too, and the hill-climb's mutations move
``parallel`` to another loop or drop it (``mutate.parallel_mutations``).  The first batch has a
parallel candidate among its first two and, right after it, the same over the other loop (m
blocks / n blocks), so even a batch cut short measures both.  A schedule without ``parallel``
wins such a problem only when it measured faster than the parallel ones (on the real size too:
the fastest parallel candidate is among the finalists confirmed there).

The measured hill-climb matters most where the policy is least sure (shapes unlike its
training set): the first batch lands near a good schedule, and the neighbours fix the one
split factor or tile it got wrong, which neither more Q-values nor more templates do.

The start is the paper's natural nest rather than the analytic default: the register tile
cannot be changed once chosen, and the policy's best tiles (7-8 x 16 here) differ from the
default's (12 x 32), so starting from the default would close off the best schedules.  The
default is measured alongside instead, so the result is never worse than it.

A bad candidate (compile error, crash, hang, wrong answer) is just a failed result from the
runner; ``tune`` never raises for one.  A problem too large to time within the budget is
not measured at all (``TuneResult.over_budget``).  Importing this module does not import torch.
"""
from __future__ import annotations

import os
import random
import time
from typing import Callable, Optional, Sequence, Union

from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.schedule import Schedule, canonical_key, canonical_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.actions import AgentState, neighbors
from looptune.tuner.agent.observe import observe
from looptune.tuner.agent.policy import Policy, PolicyError
from looptune.tuner.agent.trainset import MAX_TRAIN_FLOPS
from looptune.tuner.measure.evaluator import Evaluator, gflops_of
from looptune.tuner.measure.protocol import RunResult
from looptune.tuner.search.budget import Budget
from looptune.tuner.search.contests import POLICY, SEARCH, PolicyContest
from looptune.tuner.search.loop import Callback, Strategy, TuneResult, run
from looptune.tuner.search.mutate import factor_mutations, interleave, parallel_mutations, prefetch_mutations
from looptune.tuner.search.proxy import proxy_problem
from looptune.tuner.search.seeds import DatabaseSeeds, Seed, seed_rates
from looptune.tuner.search.spaces import blocking_candidates

__all__ = ["NO_POLICY", "TuneResult", "PolicyTune", "analytic_default", "refine_candidates", "refine_proposals",
           "resolve_policy", "tune"]

NO_POLICY = "none"     # tune(policy=NO_POLICY): the ablation baseline, tune() without the policy

TEMPLATES = 4          # template schedules measured next to the policy's and the default
REFINE = 4             # neighbours of the best schedule measured per hill-climbing round
CONFIRM = 3            # finalists timed a second time when the budget allows
MAX_BEAM_WIDTH = 64
NEAR_SEED = 1.0       # a record this near (log2 units) leads a large problem's first batch
MAX_NEIGHBOURS = 1 << 20   # no cap: without a policy, a best schedule's whole neighbourhood is ordered at once


def analytic_default(problem: MatmulProblem) -> Schedule:
    """The analytic default schedule, in canonical form."""
    return canonical_schedule(default_schedule(problem).nest)


def refine_candidates(policy: Optional[Policy], problem: MatmulProblem, schedule: Schedule, count: int,
                      skip: frozenset[str] | set[str] = frozenset(), seed: int = 0) -> list[Schedule]:
    """``refine_proposals``' schedules, without who chose them."""
    return [cand for cand, _ in refine_proposals(policy, problem, schedule, count, skip, seed)]


def refine_proposals(policy: Optional[Policy], problem: MatmulProblem, schedule: Schedule, count: int,
                     skip: frozenset[str] | set[str] = frozenset(), seed: int = 0) -> list[tuple[Schedule, str]]:
    """``count`` schedules next to ``schedule``, none with a canonical key in ``skip``; nothing
    is measured.  Two kinds alternate (three with threads > 1):

    * one-edit neighbours in the agent's action space, the policy's best-rated first (Q of the
      edit at its cursor), or without a policy (None) in a random order seeded by ``seed`` and
      ``schedule`` (the same order on every call): a loop split or swapped, packing, unrolling
      changed, ...;
    * one-factor mutations of the trace (``mutate.factor_mutations``): the register tile one
      size up or down, a cache block halved or doubled, which no action can do once tiled;
    * with threads > 1, ``parallel`` moved, dropped or added (``mutate.parallel_mutations``);
    * the ``prefetch`` step added or dropped (``mutate.prefetch_mutations``).

    Each comes with who chose it (``contests``): ``POLICY`` for a neighbour taken in the
    policy's Q-value order, ``SEARCH`` for a mutation or a neighbour in random order.

    Before: the best measured nest, e.g. ``m.o(96) n.o(512) k(256) [m.i 8 x n.i 16]``.
    After: e.g. ``k`` split by 128, or the tile 8 x 32, or ``m.o`` 48 instead of 96.
    """
    state = AgentState.initial(schedule)
    nbrs = neighbors(state, problem)
    ranked: list[Schedule] = []
    if nbrs and policy is None:
        random.Random(f"{seed}:{canonical_key(schedule.nest)}").shuffle(nbrs)
        ranked = [canonical_schedule(n.nest) for _, _, n in nbrs]
    elif nbrs:
        cursors = sorted({c for c, _, _ in nbrs})
        row = {c: i for i, c in enumerate(cursors)}
        q = policy.q_values([observe(AgentState(state.schedule, c), problem, 0.5) for c in cursors])
        ranked = [n for _, _, n in sorted(nbrs, key=lambda x: -float(q[row[x[0]], x[1]]))]
        ranked = [canonical_schedule(n.nest) for n in ranked]
    origin = POLICY if policy is not None else SEARCH
    out, seen = [], set(skip)
    for cand, who in interleave([[(s, origin) for s in ranked],
                                 [(s, SEARCH) for s in factor_mutations(schedule, problem)],
                                 [(s, SEARCH) for s in parallel_mutations(schedule, problem)],
                                 [(s, SEARCH) for s in prefetch_mutations(schedule)]]):
        k = canonical_key(cand.nest)
        if k not in seen:
            seen.add(k)
            out.append((cand, who))
            if len(out) >= count:
                break
    return out


class PolicyTune(Strategy):
    """``tune()``'s strategy: the policy's rollout and beam, the default and templates first, then
    a hill-climb from the best measured schedule and, when that finds nothing new, a wider beam.

    Without a policy (None) it proposes the analytic default and the templates, then hill-climbs
    in a seeded random order through the whole neighbourhood of each best schedule.  A policy
    whose candidates keep losing to the others is set aside for the rest of the run, which then
    goes on as without one (``contests.PolicyContest``: the rule, and ``proposed_by``: who
    proposed each candidate).
    """

    name = "tune"

    def __init__(self, problem: MatmulProblem, policy: Optional[Policy], *, include_default: bool = True,
                 first_width: int = 4, refine: int = REFINE, seed: int = 0,
                 seeds: Callable[[], Sequence[Seed]] = lambda: ()) -> None:
        super().__init__(problem)
        self.seeds = seeds
        self.policy = policy
        self.policy_name = getattr(policy, "name", "") if policy is not None else ""
        self.include_default = include_default or policy is None
        self.width = first_width
        self.refine = refine
        self.seed = seed
        self.sources: dict[str, str] = {}        # canonical key -> how it was found
        self.refined: set[str] = set()           # schedules whose neighbourhood has been proposed
        self.best: Optional[tuple[float, Schedule]] = None
        self.beam_s = 0.0
        self.started = False
        self.climb: tuple[str, list[Schedule]] = ("", [])    # without a policy: best's key, its untried neighbours
        self.proposed_by: dict[str, str] = {}    # canonical key -> contests.POLICY or contests.SEARCH
        self.contest = PolicyContest()

    @property
    def guide(self) -> Optional[Policy]:
        """The policy while it is followed: None without one, or once it has been set aside."""
        return None if self.contest.set_aside else self.policy

    @property
    def policy_set_aside(self) -> bool:
        return self.contest.set_aside

    def _add(self, sched: Schedule, how: str, out: list[Schedule], who: Optional[str] = None) -> None:
        k = canonical_key(sched.nest)
        if k not in self.sources:
            self.sources[k] = how
            self.proposed_by[k] = who or (POLICY if how.startswith("policy") else SEARCH)
            out.append(canonical_schedule(sched.nest))

    def _beam(self) -> list[Schedule]:
        t = time.perf_counter()
        beam = [n.state.schedule for n in self.policy.beam(self.problem, width=self.width)]
        self.beam_s = time.perf_counter() - t
        return beam

    def _first(self) -> list[Schedule]:
        """In priority order (the loop cuts the first batch short on large problems): the policy's
        rollout (and, with threads > 1, the rollout made parallel if it is not), the analytic
        default (first instead, beyond the policy's training sizes), then the policy's beam and the template schedules alternately.  Templates are
        structures that won sweeps (GEMV-like streaming and register-resident panels for skinny M,
        in-place A for small problems, wide packed tiles for large ones), in parallel variants
        with threads > 1."""
        out: list[Schedule] = []
        beam = self._beam() if self.policy is not None else []
        count = TEMPLATES * (2 if self.problem.threads > 1 else 1)     # over the n blocks and over the m blocks
        templates = [c.schedule() for c in blocking_candidates(self.problem, count)[1:]] \
            if self.include_default else []
        # Beyond the sizes the policy was trained on, the analytic default leads: on a large
        # problem the loop may measure only one or two candidates, and an extrapolated rollout
        # (512x4096x1024: an unpacked nest at a third of numpy's speed) must not be the only one.
        default_first = self.include_default and self.problem.flops > MAX_TRAIN_FLOPS
        seeds = [s.schedule for s in self.seeds()]
        near = [s.schedule for s in self.seeds() if s.local and s.distance <= NEAR_SEED]
        if default_first:
            for sched in near[:1]:
                self._add(sched, "database", out)
            self._add(analytic_default(self.problem), "default", out)
        if self.policy is not None:
            rollout = canonical_schedule(self.policy.rollout(self.problem)[-1].nest)
            self._add(rollout, "policy-rollout", out)
            if self.problem.threads > 1 and rollout.nest.parallel is None:
                for sched in parallel_mutations(rollout, self.problem)[:1]:
                    self._add(sched, "policy-rollout+parallel", out)
        if self.include_default and not default_first:
            self._add(analytic_default(self.problem), "default", out)
        for i in range(max(len(beam), len(templates), len(seeds))):
            if i < len(seeds):
                self._add(seeds[i], "database", out)
            if i < len(beam):
                self._add(beam[i], "policy-beam", out)
            if i < len(templates):
                self._add(templates[i], "template", out)
        return self._parallel_early(out)

    def _parallel_early(self, out: list[Schedule]) -> list[Schedule]:
        """With threads > 1, a first batch cut to two candidates still measures threads: the first
        parallel candidate moves up to second place if neither of the first two is parallel, and
        the first one over the other loop (m blocks / n blocks) follows it when the grammar allows
        one (``mutate.parallel_mutations``)."""
        if self.problem.threads <= 1 or not out:
            return out
        parallel = [s for s in out if s.nest.parallel]
        if not parallel:
            moved = parallel_mutations(out[0], self.problem)
            extra = [m for m in moved if m.nest.parallel][:1]
            for sched in extra:
                self._add(sched, self.sources[canonical_key(out[0].nest)] + "+parallel", out)
            parallel = [s for s in out if s.nest.parallel]
            if not parallel:
                return out
        lead = parallel[0]
        if not any(s.nest.parallel for s in out[:2]):
            out.remove(lead)
            out.insert(1, lead)
        other = [m for m in parallel_mutations(lead, self.problem)
                 if m.nest.parallel and m.nest.parallel != lead.nest.parallel][:1]
        for sched in other:
            key = canonical_key(sched.nest)
            if key in self.sources:
                sched = next(s for s in out if canonical_key(s.nest) == key)
                out.remove(sched)
            else:
                self.sources[key] = self.sources[canonical_key(lead.nest)] + "+parallel"
                sched = canonical_schedule(sched.nest)
            out.insert(out.index(lead) + 1, sched)
        return out

    def _neighbours(self, schedule: Schedule) -> list[tuple[Schedule, str]]:
        """The next ``refine`` untried schedules next to ``schedule``, each with who chose it.
        Without a policy the whole neighbourhood is ordered once per schedule (later rounds take
        the next ones from it)."""
        if self.guide is not None:
            return refine_proposals(self.guide, self.problem, schedule, self.refine, set(self.sources))
        key = canonical_key(schedule.nest)
        if self.climb[0] != key:
            self.climb = (key, refine_candidates(None, self.problem, schedule, MAX_NEIGHBOURS, set(self.sources),
                                                 self.seed))
        untried = [s for s in self.climb[1] if canonical_key(s.nest) not in self.sources]
        self.climb = (key, untried[self.refine:])
        return [(s, SEARCH) for s in untried[:self.refine]]

    def ask(self, budget: Optional[Budget] = None) -> list[Schedule]:
        if not self.started:
            self.started = True
            return self._first()
        out: list[Schedule] = []
        while not out:
            if budget is not None and not budget.fits(2):
                return []
            best_key = canonical_key(self.best[1].nest) if self.best is not None else None
            if self.refine and best_key is not None:
                if best_key not in self.refined:
                    self.refined.add(best_key)
                    for s, who in self._neighbours(self.best[1]):
                        self._add(s, "refine", out, who)
                    continue
                if self.guide is None:
                    # no beam to widen: the hill-climb goes on through the rest of the neighbourhood
                    for s, who in self._neighbours(self.best[1]):
                        self._add(s, "refine", out, who)
                    if out:
                        continue
            if self.guide is None:
                return []
            # a beam twice as wide costs about twice the last one (numpy, no measuring)
            if self.width >= MAX_BEAM_WIDTH or (budget is not None and not budget.fits(2, 2.2 * self.beam_s)):
                return []
            self.width *= 2
            for sched in self._beam():
                self._add(sched, "policy-beam", out)
        return out

    def tell(self, candidates: Sequence[Schedule], results: Sequence[RunResult]) -> None:
        for s, r in zip(candidates, results):
            g = gflops_of(r)
            if g is not None and (self.best is None or g > self.best[0]):
                self.best = (g, s)
        if self.policy is not None:
            self.contest.score([self.proposed_by.get(canonical_key(s.nest), SEARCH) for s in candidates],
                               [gflops_of(r) for r in results])

    def found_by(self, candidate: Schedule) -> str:
        return self.sources[canonical_key(candidate.nest)]


def resolve_policy(policy: Union[Policy, str, os.PathLike, None]) -> Optional[Policy]:
    """``tune()``'s ``policy`` argument as the policy to follow, or None for none: a ``Policy`` as
    it is; None: the policy in use (``Policy.in_use``: this machine's own, else the shipped one;
    None if neither can be loaded); ``NO_POLICY`` ("none"): None; any other string or path: a
    weights file (``PolicyError`` if there is none)."""
    if policy is None:
        try:
            return Policy.in_use()
        except PolicyError:
            return None
    if isinstance(policy, (str, os.PathLike)):
        return None if policy == NO_POLICY else Policy.load(os.fspath(policy))
    return policy


def tune(problem: MatmulProblem, *, budget_s: float = 2.0, policy: Union[Policy, str, os.PathLike, None] = None,
         evaluator: Optional[Evaluator] = None, include_default: bool = True, first_width: int = 4,
         batch: int = 4, refine: int = REFINE, seed: int = 0, callbacks: Sequence[Callback] = (),
         databases: bool = True, proxy: Optional[MatmulProblem] = None) -> TuneResult:
    """Tune ``problem`` within ``budget_s`` seconds (wall clock, compiles and measurements included).

    ``policy``: a ``policy.Policy``; None for the policy in use (this machine's own from
    ``looptune train``, else the shipped weights; if none can be loaded, the tuner goes on
    without a policy); ``NO_POLICY`` ("none") for the ablation baseline
    without one; or the path of other weights (see ``resolve_policy``).  ``seed``: the order
    of the hill-climb's neighbours without a policy.  ``evaluator``: where measurements go
    (default: a fresh isolated ``LocalRunner``, closed on return).  ``callbacks``: called after
    every measured batch (see ``loop.run``).  ``databases``: seed the first batch with the
    nearest records of the user's and the embedded database (``seeds``).  ``proxy``: the problem
    to search on (default ``proxy.proxy_problem(problem)``: ``problem`` itself unless one timing
    is expensive); the best few are then timed on ``problem``, and the result is that timing.
    """
    t0 = time.perf_counter()
    seeds: Callable[[], list[Seed]] = DatabaseSeeds(problem).get if databases else list
    followed = resolve_policy(policy)
    own = evaluator is None
    if own:
        evaluator = Evaluator.local()
    try:
        strategy = PolicyTune(problem, followed, include_default=include_default, first_width=first_width,
                              refine=refine, seed=seed, seeds=seeds)
        return run(strategy, evaluator, budget_s, batch=batch, confirm=CONFIRM, callbacks=callbacks, start=t0,
                   proxy=proxy or proxy_problem(problem), rates=lambda: seed_rates(problem, seeds()))
    finally:
        if own:
            evaluator.close()
