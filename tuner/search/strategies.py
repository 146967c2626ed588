"""Search baselines on the agent's environment, each under a wall-clock budget, ask/tell style.

A strategy proposes states (``ask``) and hears their measurements (``tell``); ``run_search``
owns the clock and the evaluator (one runner interface for all: a live ``LocalRunner``, or a
replay of recordings), and keeps the anytime history ``(seconds, best GFLOPS)`` so one run
answers "what would a 1 s, 10 s, 60 s budget have found".  Time includes compiles.

Done right where the LoopTune paper's baselines were not:

* ``RandomWalkSearch``: random legal action sequences from the start state (no duplicates
  measured);
* ``GreedySearch``: looks at every state one *edit* away at any cursor position (cursor moves
  are free, so they are looked through rather than ending the search) and moves to the best
  measured one; with no improvement it looks two edits ahead from the best few before
  giving up;
* ``BeamSearch``: beam ranked by *measured* GFLOPS (the paper ranked by action name);
* ``PolicyBeamSearch``: beams on the policy's Q-values (free), measuring only their end
  states; the width doubles each round until the budget runs out.
"""
from __future__ import annotations

import abc
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule

from looptune.tuner.agent.actions import EDIT_ACTIONS, STOP, AgentState, apply, legal_mask, neighbors

from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
from looptune.tuner.measure.evaluator import Evaluator, gflops_of
from looptune.tuner.measure.runner import RunResult


class SearchStrategy(abc.ABC):
    name = "search"

    def __init__(self, problem: MatmulProblem, *, start: Optional[Schedule] = None, seed: int = 0, batch: int = 4):
        self.problem = problem
        self.start = AgentState.initial(start)
        self.rng = random.Random(seed)
        self.batch = batch
        self.measured: dict[str, float] = {}      # canonical key -> GFLOPS (0 for failures)

    @abc.abstractmethod
    def ask(self) -> list[AgentState]:
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

    def ask(self) -> list[AgentState]:
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

    def ask(self) -> list[AgentState]:
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
            return self.ask()
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

    def ask(self) -> list[AgentState]:
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
            return self.ask() if self.level < self.max_depth else []
        out, self.pending = self.pending[: self.batch], self.pending[self.batch:]
        return out


class PolicyBeamSearch(SearchStrategy):
    name = "policy-beam"

    def __init__(self, problem, policy, *, width: int = 2, max_width: int = 64, extra: Sequence[Schedule] = (), **kw):
        super().__init__(problem, **kw)
        self.policy, self.width, self.max_width = policy, width, max_width
        self.extra = [AgentState(canonical_schedule(s.nest), 1) for s in extra]
        self.pending: list[AgentState] = []

    def ask(self) -> list[AgentState]:
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


@dataclass
class SearchResult:
    name: str
    problem: MatmulProblem
    best_state: Optional[AgentState]
    best_result: Optional[RunResult]
    history: list[tuple[float, float]] = field(default_factory=list)   # (seconds since start, best GFLOPS so far)
    evaluated: int = 0
    seconds: float = 0.0
    best_states: list[tuple[float, AgentState]] = field(default_factory=list)   # (seconds, best state so far)

    @property
    def best_gflops(self) -> float:
        return gflops_of(self.best_result) or 0.0

    def best_at(self, seconds: float) -> float:
        """Best GFLOPS among results that had arrived ``seconds`` after the start (0 if none)."""
        g = 0.0
        for t, b in self.history:
            if t <= seconds:
                g = b
        return g

    def best_state_at(self, seconds: float) -> Optional[AgentState]:
        """The best state among results that had arrived ``seconds`` after the start."""
        out = None
        for t, s in self.best_states:
            if t <= seconds:
                out = s
        return out


def run_search(strategy: SearchStrategy, evaluator: Evaluator, budget_s: float,
               clock: Callable[[], float] = time.perf_counter) -> SearchResult:
    """Ask, measure, tell until the budget is spent or the strategy is done.

    A batch is only started while budget remains, so a run overshoots by at most one batch;
    ``history`` timestamps each batch's arrival, so ``best_at(b)`` never credits work that
    finished after ``b``.
    """
    t0 = clock()
    res = SearchResult(strategy.name, strategy.problem, None, None)
    best = 0.0
    while clock() - t0 < budget_s:
        states = strategy.ask()
        if not states:
            break
        results = evaluator.evaluate([(strategy.problem, s.nest) for s in states])
        strategy.tell(states, results)
        res.evaluated += len(states)
        for s, r in zip(states, results):
            g = gflops_of(r)
            if g is not None and g > best:
                best, res.best_state, res.best_result = g, s, r
        now = clock() - t0
        res.history.append((now, best))
        if res.best_state is not None and (not res.best_states or res.best_states[-1][1] is not res.best_state):
            res.best_states.append((now, res.best_state))
    res.seconds = clock() - t0
    return res


STRATEGIES = {"random": RandomWalkSearch, "greedy": GreedySearch, "beam": BeamSearch, "policy-beam": PolicyBeamSearch}
