"""Search strategies for the budgeted loop (``loop.run``): the baselines, and build-db's random search.

Each proposes candidates (``ask``) and hears their measurements (``tell``); ``loop.run`` owns
the clock, the evaluator (a live ``LocalRunner``, or a replay of recordings) and the budget,
and keeps the anytime history, so one run answers "what would a 1 s, 10 s, 60 s budget have
found".  Time includes compiles.

Done right where the LoopTune paper's baselines were not:

* ``RandomWalkSearch``: random legal action sequences from the start state (no duplicates
  measured);
* ``GreedySearch``: looks at every state one *edit* away at any cursor position (cursor moves
  are free, so they are looked through rather than ending the search) and moves to the best
  measured one; with no improvement it looks two edits ahead from the best few before
  giving up;
* ``BeamSearch``: beam ranked by *measured* GFLOPS (the paper ranked by action name);
* ``PolicyBeamSearch``: beams on the policy's Q-values (free), measuring only their end
  states; the width doubles each round until the budget runs out;
* ``BlockingSearch``: the analytic default, then random points of the BLIS-shaped blocking
  space (``spaces.blocking_candidates``): build-db's tuner when no policy is available.
"""
from __future__ import annotations

import abc
import random
from typing import Optional, Sequence

import numpy as np

from looptune.runtime.compiler.schedule import Schedule, canonical_key, canonical_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.actions import STOP, AgentState, apply, legal_mask, neighbors
from looptune.tuner.measure.evaluator import gflops_of
from looptune.tuner.measure.protocol import RunResult
from looptune.tuner.search.budget import Budget
from looptune.tuner.search.loop import Strategy
from looptune.tuner.search.spaces import blocking_candidates


class SearchStrategy(Strategy):
    """A search in the agent's action space: proposes ``AgentState``s, remembers their GFLOPS."""

    name = "search"

    def __init__(self, problem: MatmulProblem, *, start: Optional[Schedule] = None, seed: int = 0, batch: int = 4):
        super().__init__(problem)
        self.start = AgentState.initial(start)
        self.rng = random.Random(seed)
        self.batch = batch
        self.measured: dict[str, float] = {}      # canonical key -> GFLOPS (0 for failures)

    @abc.abstractmethod
    def ask(self, budget: Optional[Budget] = None) -> list[AgentState]:
        """The next states to measure; [] when the strategy has nothing left to try."""

    def tell(self, states: Sequence[AgentState], results: Sequence[RunResult]) -> None:
        for s, r in zip(states, results):
            self.measured[canonical_key(s.nest)] = gflops_of(r) or 0.0

    def _new(self, states: Sequence[AgentState]) -> list[AgentState]:
        out, seen = [], set()
        for s in states:
            k = canonical_key(s.nest)
            if k not in self.measured and k not in seen:
                seen.add(k)
                out.append(s)
        return out

    def score(self, s: AgentState) -> float:
        return self.measured.get(canonical_key(s.nest), 0.0)


class RandomWalkSearch(SearchStrategy):
    name = "random"

    def __init__(self, problem, *, max_steps: int = 12, **kw):
        super().__init__(problem, **kw)
        self.max_steps = max_steps
        self.tries = 0

    def ask(self, budget: Optional[Budget] = None) -> list[AgentState]:
        out: list[AgentState] = []
        while len(out) < self.batch and self.tries < 100000:
            self.tries += 1
            s = self.start
            for _ in range(self.rng.randint(1, self.max_steps)):
                legal = np.flatnonzero(legal_mask(s, self.problem))
                a = int(self.rng.choice(legal.tolist()))
                if a == STOP:
                    break
                s = apply(s, a, self.problem)
            out = self._new(out + [s])
        return out


class GreedySearch(SearchStrategy):
    name = "greedy"

    def __init__(self, problem, *, lookahead_from: int = 3, **kw):
        super().__init__(problem, **kw)
        self.current = self.start
        self.pending: list[AgentState] = []
        self.round: list[AgentState] = []
        self.depth = 1
        self.done = False

    def _plan(self) -> None:
        if self.depth == 1:
            self.round = [n for _, _, n in neighbors(self.current, self.problem)]
        else:   # two edits ahead, from the best few one-edit neighbours
            firsts = sorted((n for _, _, n in neighbors(self.current, self.problem)), key=lambda s: -self.score(s))[:3]
            self.round = [n2 for n in firsts for _, _, n2 in neighbors(n, self.problem)]
        self.pending = self._new(self.round)

    def ask(self, budget: Optional[Budget] = None) -> list[AgentState]:
        if self.done:
            return []
        if not self.round:
            self._plan()
        if not self.pending:                      # the round is measured: move or look further
            best = max(self.round, key=self.score, default=None)
            if best is not None and self.score(best) > self.score(self.current) * 1.001:
                self.current, self.depth = best, 1
            elif self.depth == 1:
                self.depth = 2
            else:
                self.done = True
                return []
            self.round = []
            return self.ask(budget)
        out, self.pending = self.pending[: self.batch], self.pending[self.batch:]
        return out


class BeamSearch(SearchStrategy):
    name = "beam"

    def __init__(self, problem, *, width: int = 4, max_depth: int = 12, **kw):
        super().__init__(problem, **kw)
        self.width, self.max_depth = width, max_depth
        self.beam = [self.start]
        self.level = 0
        self.children: list[AgentState] = []
        self.pending: list[AgentState] = []

    def ask(self, budget: Optional[Budget] = None) -> list[AgentState]:
        if not self.children:
            if self.level >= self.max_depth:
                return []
            seen, kids = set(), []
            for s in self.beam:
                for _, _, n in neighbors(s, self.problem):
                    k = canonical_key(n.nest)
                    if k not in seen:
                        seen.add(k)
                        kids.append(n)
            self.children = kids
            self.pending = self._new(kids)
            self.level += 1
        if not self.pending:
            ranked = sorted(self.children, key=lambda s: -self.score(s))
            self.beam = [s for s in ranked[: self.width] if self.score(s) > 0] or self.beam
            self.children = []
            return self.ask(budget) if self.level < self.max_depth else []
        out, self.pending = self.pending[: self.batch], self.pending[self.batch:]
        return out


class PolicyBeamSearch(SearchStrategy):
    name = "policy-beam"

    def __init__(self, problem, policy, *, width: int = 2, max_width: int = 64, extra: Sequence[Schedule] = (), **kw):
        super().__init__(problem, **kw)
        self.policy, self.width, self.max_width = policy, width, max_width
        self.policy_name = getattr(policy, "name", "")
        self.extra = [AgentState(canonical_schedule(s.nest), 1) for s in extra]
        self.pending: list[AgentState] = []

    def ask(self, budget: Optional[Budget] = None) -> list[AgentState]:
        while not self.pending:
            if self.width > self.max_width:
                return []
            nodes = self.policy.beam(self.problem, width=self.width, start=self.start.schedule
                                     if self.start.schedule.trace.steps else None)
            self.pending = self._new([n.state for n in nodes] + self.extra)
            self.extra = []
            self.width *= 2
        out, self.pending = self.pending[: self.batch], self.pending[self.batch:]
        return out


class BlockingSearch(Strategy):
    """The analytic default first, then random points of the blocking space, ``batch`` at a time."""

    name = "random-search"

    def __init__(self, problem: MatmulProblem, *, count: int = 64, seed: int = 0, batch: int = 4):
        super().__init__(problem)
        self.schedules = [canonical_schedule(p.schedule().nest) for p in blocking_candidates(problem, count, seed=seed)]
        self.default_key = canonical_key(self.schedules[0].nest)
        self.batch = batch
        self.next = 0

    def ask(self, budget: Optional[Budget] = None) -> list[Schedule]:
        out = self.schedules[self.next:self.next + self.batch]
        self.next += len(out)
        return out

    def found_by(self, candidate: Schedule) -> str:
        return "default" if canonical_key(candidate.nest) == self.default_key else self.name


STRATEGIES = {"random": RandomWalkSearch, "greedy": GreedySearch, "beam": BeamSearch, "policy-beam": PolicyBeamSearch}
