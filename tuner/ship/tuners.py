"""The tuners build-db can run, by name: ``make_tuner("agent" | "search" | "auto" | "module:callable")``.

A *tuner* is any callable ``tuner(problem, budget_s) -> TuneResult`` (the one result type of
``looptune.tuner.search.loop``); the built-in ones are strategies on the budgeted loop.  Executors
(``executors.SerialExecutor``, ``distributed``'s workers) make one per process and close it
(``close_tuner``) when done.
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.policy import Policy, PolicyError
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.search.loop import TuneResult, run
from looptune.tuner.search.strategies import BlockingSearch
from looptune.tuner.search.tune import tune


class Tuner(Protocol):
    def __call__(self, problem: MatmulProblem, budget_s: float) -> TuneResult: ...


class AgentTuner:
    """``tune()`` with ``policy`` (``make_tuner`` gives it the policy in use), through one
    measurement runner shared by every problem of the build (a fresh runner per problem costs a
    process start)."""

    name = "agent"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.evaluator = Evaluator.local()

    def __call__(self, problem: MatmulProblem, budget_s: float) -> TuneResult:
        self.evaluator.forget()          # results never repeat across problems: keep the memo small
        return tune(problem, budget_s=budget_s, policy=self.policy, evaluator=self.evaluator)

    def close(self) -> None:
        self.evaluator.close()


class SearchTuner:
    """Random search over the BLIS-shaped blocking space (``strategies.BlockingSearch``), best
    measured under the budget: the tuner when no policy can be loaded."""

    name = "search"

    def __init__(self, batch: int = 4, seed: int = 0) -> None:
        self.batch = batch
        self.seed = seed
        self.evaluator = Evaluator.local()

    def __call__(self, problem: MatmulProblem, budget_s: float) -> TuneResult:
        self.evaluator.forget()
        return run(BlockingSearch(problem, seed=self.seed, batch=self.batch), self.evaluator, budget_s,
                   batch=self.batch)

    def close(self) -> None:
        self.evaluator.close()


def make_tuner(spec: str | None = None) -> Tuner:
    """``"agent"``: ``tune()`` with the policy in use (``Policy.in_use``: this machine's own, else
    the shipped one); ``"search"``: random blocking search; ``None``/``"auto"``: the agent if a
    policy loads, else the search; or
    ``"package.module:name"``: a callable ``f(problem, budget_s) -> TuneResult`` (a class is
    instantiated first, so it can keep state such as a runner)."""
    spec = spec or "auto"
    if spec in ("auto", "agent"):
        try:
            return AgentTuner(Policy.in_use())
        except PolicyError:
            if spec == "agent":
                raise
            return SearchTuner()
    if spec == "search":
        return SearchTuner()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"tuner must be auto, agent, search or 'module:callable', got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if isinstance(obj, type) else obj


def close_tuner(tuner: Any) -> None:
    close = getattr(tuner, "close", None)
    if callable(close):
        close()
