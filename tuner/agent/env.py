"""The LoopTune environment (gymnasium-style, CompilerGym-like) and the schedule evaluator.

    env = LoopTuneEnv(Evaluator.local(record_path="tools/out/recordings.jsonl"))
    obs, info = env.reset(MatmulProblem(128, 128, 128))
    obs, reward, terminated, truncated, info = env.step(ACTION_INDEX["tile_8x1v"])
    info["mask"], info["gflops"], info["best_schedule"]

Reward (``REWARD_VERSION``): ``log(gflops_after / gflops_before)``, 0 for cursor moves and
``stop``, ``FAIL_REWARD`` (and the episode ends) when the new kernel fails to build, verify or
finish.  Why a log-ratio rather than the paper's delta over machine peak: the return of an
episode telescopes to ``log(final / initial)``, the log speedup the tuner is judged on, for
every problem size alike.  Delta-over-peak rewards a 2x gain on a small, memory-bound problem
less than a 10 % gain on a big one, and depends on a peak figure measured separately.  Because
the tuner keeps the best state, the env also tracks it (``info["best_*"]``), but the reward
does not use it: the policy's rollout is scored by where it *stops*, since at tuning time
intermediate states are not measured.

The evaluator measures schedules by their canonical trace (``actions.canonical_key``), so a
nest reached by different action sequences is compiled once and measured once per problem;
with a record path every measurement is appended to a JSONL file, and a later run over the
same file replays it (``ReplayRunner`` semantics: same state, same number).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule

from looptune.tuner.agent.actions import (ACTION_SPACE_VERSION, ACTIONS, NUM_ACTIONS, STOP, AgentState, apply, legal_mask)

from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
from looptune.tuner.agent.observe import OBSERVATION_VERSION, Graph, observe
from looptune.tuner.agent.trainset import measured_problem
from looptune.tuner.measure.evaluator import Evaluator, gflops_of

REWARD_VERSION = "log-gflops-ratio-v1"
FAIL_REWARD = -1.0


class LoopTuneEnv:
    """One problem at a time; ``reset(problem)`` then ``step(action)`` until terminated/truncated.

    States are measured on ``trainset.measured_problem(problem)``: the problem itself, or for a
    large one the proxy ``tune()`` searches it on; the agent observes the real problem.

    ``start`` chooses the initial schedule: ``None`` is the paper's natural nest (b, m, n, k, no
    splits).  Observations are ``observe.Graph``; ``info["mask"]`` is the legal-action mask.
    """

    metadata = {"actions": ACTION_SPACE_VERSION, "observation": OBSERVATION_VERSION, "reward": REWARD_VERSION}

    def __init__(self, evaluator: Evaluator, problems: Sequence[MatmulProblem] = (), *, max_steps: int = 12,
                 seed: int = 0):
        self.evaluator = evaluator
        self.problems = list(problems)
        self.max_steps = max_steps
        self.rng = random.Random(seed)
        self.problem: Optional[MatmulProblem] = None
        self.state: Optional[AgentState] = None

    # -- gymnasium API ------------------------------------------------------------------------
    def reset(self, problem: Optional[MatmulProblem] = None, *, seed: Optional[int] = None,
              start: Optional[Schedule] = None) -> tuple[Graph, dict]:
        if seed is not None:
            self.rng = random.Random(seed)
        if problem is None:
            problem = self.rng.choice(self.problems)
        self.problem = problem
        self.measured = measured_problem(problem)
        self.state = AgentState.initial(start)
        self.t = 0
        [r] = self.evaluator.evaluate([(self.measured, self.state.nest)])
        self.gflops = gflops_of(r) or 1e-3
        self.initial_gflops = self.gflops
        self.best_gflops, self.best_state = self.gflops, self.state
        return self._obs(), self._info(r)

    def step(self, action: int):
        nxt = self.propose(action)
        result = None
        if nxt is not None and nxt.nest != self.state.nest:
            [result] = self.evaluator.evaluate([(self.measured, nxt.nest)])
        return self.accept(action, nxt, result)

    def action_mask(self) -> np.ndarray:
        return legal_mask(self.state, self.problem)

    # -- the two halves of step, so VecEnv can batch measurements across environments -----------
    def propose(self, action: int) -> Optional[AgentState]:
        """The next state (None for an illegal action); nothing is measured."""
        if not 0 <= action < NUM_ACTIONS or not self.action_mask()[action]:
            return None
        return apply(self.state, action, self.problem)

    def accept(self, action: int, nxt: Optional[AgentState], result: Optional[RunResult]):
        self.t += 1
        terminated, reward = False, 0.0
        if nxt is None:                                  # illegal: penalize, stay put
            reward = FAIL_REWARD
        elif action == STOP:
            terminated = True
        elif result is not None:
            g = gflops_of(result)
            if g is None:
                reward, terminated = FAIL_REWARD, True
            else:
                reward = math.log(g / self.gflops)
                self.gflops = g
                self.state = nxt
                if g > self.best_gflops:
                    self.best_gflops, self.best_state = g, nxt
        else:
            self.state = nxt                             # cursor move or same nest: free
        truncated = not terminated and self.t >= self.max_steps
        return self._obs(), reward, terminated, truncated, self._info(result)

    def _obs(self) -> Graph:
        return observe(self.state, self.problem, self.t / self.max_steps)

    def _info(self, result: Optional[RunResult]) -> dict:
        return {"mask": self.action_mask(), "gflops": self.gflops, "best_gflops": self.best_gflops,
                "best_schedule": canonical_schedule(self.best_state.nest), "initial_gflops": self.initial_gflops,
                "status": None if result is None else result.status.value}


class VecEnv:
    """Several environments stepped in lockstep; their new kernels are built in one batch.

    With gcc as the bottleneck, one ``build_many`` of 8 kernels on 2 cores costs about what 2
    sequential builds do.  Finished environments reset automatically (as gymnasium's
    ``SyncVectorEnv``); the final observation is in ``infos[i]["final_obs"]``.
    """

    def __init__(self, envs: Sequence[LoopTuneEnv], seed: int = 0):
        self.envs = list(envs)
        self.rng = random.Random(seed)

    def reset(self) -> tuple[list[Graph], list[dict]]:
        out = [e.reset(seed=self.rng.randrange(1 << 30)) for e in self.envs]
        return [o for o, _ in out], [i for _, i in out]

    def step(self, actions: Sequence[int]):
        props = [e.propose(a) for e, a in zip(self.envs, actions)]
        pairs, who = [], []
        for i, (e, s) in enumerate(zip(self.envs, props)):
            if s is not None and s.nest != e.state.nest and actions[i] != STOP:
                pairs.append((e.measured, s.nest))
                who.append(i)
        results: list[Optional[RunResult]] = [None] * len(self.envs)
        for i, r in zip(who, self.evaluator.evaluate(pairs) if pairs else []):
            results[i] = r
        obs, rews, terms, truncs, infos = [], [], [], [], []
        for e, a, s, r in zip(self.envs, actions, props, results):
            o, rew, term, trunc, info = e.accept(a, s, r)
            if term or trunc:
                info = dict(info, final_obs=o, episode_return=math.log(e.gflops / e.initial_gflops),
                            episode_best=e.best_gflops / e.initial_gflops, final_gflops=e.gflops,
                            problem=e.problem)
                info["final_mask"] = info["mask"]
                o, reset_info = self._reset_one(e)
                info["mask"] = reset_info["mask"]
            obs.append(o); rews.append(rew); terms.append(term); truncs.append(trunc); infos.append(info)
        return obs, rews, terms, truncs, infos

    def _reset_one(self, env: LoopTuneEnv):
        return env.reset(seed=self.rng.randrange(1 << 30))

    @property
    def evaluator(self) -> Evaluator:
        return self.envs[0].evaluator


def split_problems(problems: Sequence[MatmulProblem], test_fraction: float = 0.1, seed: int = 0):
    """The fixed train/test split of a shape file: (train, test), test is ``test_fraction`` of it."""
    idx = list(range(len(problems)))
    random.Random(seed).shuffle(idx)
    n_test = int(round(len(problems) * test_fraction))
    test = sorted(idx[:n_test])
    train = sorted(idx[n_test:])
    return [problems[i] for i in train], [problems[i] for i in test]
