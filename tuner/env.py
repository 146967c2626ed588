"""The LoopTune environment (gymnasium-style, CompilerGym-like) and the schedule evaluator.

    env = LoopTuneEnv(Evaluator.local(record_path="tools/out/recordings.jsonl"))
    obs, info = env.reset(MatmulProblem(128, 128, 128))
    obs, reward, terminated, truncated, info = env.step(ACTION_INDEX["tile_8x16"])
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

from looptune.runtime.ir import LoopNest
from looptune.runtime.problem import MatmulProblem
from looptune.runtime.schedule import Schedule

from .actions import (ACTION_SPACE_VERSION, ACTIONS, NUM_ACTIONS, STOP, AgentState, apply, canonical_key,
                      canonical_schedule, legal_mask)
from .observe import OBSERVATION_VERSION, Graph, observe
from .runner import Candidate, MeasureConfig, ReplayMissError, ReplayRunner, ResultStore, Runner, RunResult, RunStatus

REWARD_VERSION = "log-gflops-ratio-v1"
FAIL_REWARD = -1.0

# The timing protocol for tuning and training: short (kernels here take 0.05-5 ms) but with
# enough repeats that the median is stable to a few percent on a quiet core.  A kernel more than
# 4x slower than numpy on its first timed call is timed once (it cannot win; see MeasureConfig).
TUNE_MEASURE = MeasureConfig(warmup=1, min_repeats=5, max_repeats=100, min_total_seconds=0.02,
                             min_sample_seconds=5e-4, timeout_seconds=20.0, slow_cutoff=4.0)


@dataclass
class EvalStats:
    hits: int = 0
    measured: int = 0
    built: int = 0
    build_seconds: float = 0.0
    run_seconds: float = 0.0


class Evaluator:
    """Measure (problem, nest) pairs through a runner, recording by canonical trace.

    ``runner=None`` is replay-only: a miss raises ``ReplayMissError`` unless ``on_missing`` is
    given.  A ``ReplayRunner`` (or any runner with ``needs_build = False``) is asked directly,
    without compiling anything.  Misses of one call are built in one ``build_many`` batch (parallel gcc, kernel
    cache), then timed serially by the runner.
    """

    def __init__(self, runner: Optional[Runner] = None, store: Optional[ResultStore] = None, *,
                 record_path: Optional[str] = None, on_missing: Optional[RunResult] = None):
        self.runner = runner
        self.store = store if store is not None else ResultStore()
        self.record_path = record_path
        self.on_missing = on_missing
        self.stats = EvalStats()
        self._warm = None
        if record_path and os.path.exists(record_path) and store is None:
            self.store = ResultStore.load(record_path)

    @classmethod
    def local(cls, record_path: Optional[str] = None, config: MeasureConfig = TUNE_MEASURE) -> "Evaluator":
        from .runner import LocalRunner
        return cls(LocalRunner(config), record_path=record_path)

    @classmethod
    def replay(cls, path_or_store, on_missing: Optional[RunResult] = None) -> "Evaluator":
        store = path_or_store if isinstance(path_or_store, ResultStore) else ResultStore.load(path_or_store)
        return cls(None, store, on_missing=on_missing)

    def close(self) -> None:
        self.wait()
        if self.runner is not None:
            self.runner.close()

    def prefetch(self, problem: MatmulProblem) -> None:
        """Start the measurement worker and time numpy for ``problem`` in the background, so both
        overlap with compiling the first candidates (worker start-up is ~0.3 s of Python + numpy)."""
        fn = getattr(self.runner, "_numpy_seconds", None)
        if fn is not None and self._warm is None:
            import threading
            self._warm = threading.Thread(target=lambda: _quietly(fn, problem), daemon=True)
            self._warm.start()

    def wait(self) -> None:
        if self._warm is not None:
            self._warm.join()
            self._warm = None

    def lookup(self, problem: MatmulProblem, nest: LoopNest) -> Optional[RunResult]:
        return self.store.get(problem.key(), canonical_key(nest))

    def evaluate(self, pairs: Sequence[tuple[MatmulProblem, LoopNest]]) -> list[RunResult]:
        keys = [(p, canonical_key(n)) for p, n in pairs]
        out: list[Optional[RunResult]] = [self.store.get(p.key(), k) for p, k in keys]
        self.stats.hits += sum(r is not None for r in out)
        todo: dict[tuple[str, str], tuple[MatmulProblem, str]] = {}
        for (p, k), r in zip(keys, out):
            if r is None:
                todo.setdefault((p.key(), k), (p, k))
        if todo:
            if self.runner is None:
                if self.on_missing is None:
                    p, k = next(iter(todo.values()))
                    raise ReplayMissError(f"no recorded result for {p.key()} {k[:200]}")
                fresh = [replace(self.on_missing, problem_key=p.key(), tag=k) for p, k in todo.values()]
            else:
                fresh = self._measure(list(todo.values()))
            for r in fresh:
                self.store.add(r)
            if self.record_path:
                with open(self.record_path, "a") as f:
                    for r in fresh:
                        f.write(json.dumps(r.to_json(), sort_keys=True) + "\n")
            out = [self.store.get(p.key(), k) for p, k in keys]
        return out  # type: ignore[return-value]

    def remeasure(self, pairs: Sequence[tuple[MatmulProblem, LoopNest]]) -> list[RunResult]:
        """Measure again, ignoring (and not changing) what is stored: a second opinion on
        finalists.  Replay-only evaluators answer from the store."""
        if self.runner is None:
            return self.evaluate(pairs)
        return self._measure([(p, canonical_key(n)) for p, n in pairs])

    def _measure(self, todo: list[tuple[MatmulProblem, str]]) -> list[RunResult]:
        if not getattr(self.runner, "needs_build", True) or isinstance(self.runner, ReplayRunner):
            self.wait()
            results = self.runner.run([Candidate(p, None, tag=k) for p, k in todo])  # type: ignore[union-attr]
            self.stats.measured += len(results)
            return results
        from looptune.runtime.build import build_many
        from looptune.runtime.codegen import render

        t0 = time.perf_counter()
        scheds = {k: Schedule.from_json(k) for _, k in todo}
        by_dtype = sorted({(p.dtype, k) for p, k in todo})
        builds = build_many([render(scheds[k], dt) for dt, k in by_dtype])
        built = dict(zip(by_dtype, builds))
        self.stats.built += sum(1 for b in builds if not b.cached)
        self.wait()
        t1 = time.perf_counter()
        cands = [Candidate.from_build(p, built[(p.dtype, k)], tag=k) for p, k in todo]
        results = self.runner.run(cands)  # type: ignore[union-attr]
        self.stats.build_seconds += t1 - t0
        self.stats.run_seconds += time.perf_counter() - t1
        self.stats.measured += len(results)
        return results


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:       # a failed warm-up is retried (and reported) by the real request
        pass


def gflops_of(r: Optional[RunResult]) -> Optional[float]:
    return r.gflops if r is not None and r.ok and r.gflops else None


class LoopTuneEnv:
    """One problem at a time; ``reset(problem)`` then ``step(action)`` until terminated/truncated.

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
        self.state = AgentState.initial(start)
        self.t = 0
        [r] = self.evaluator.evaluate([(problem, self.state.nest)])
        self.gflops = gflops_of(r) or 1e-3
        self.initial_gflops = self.gflops
        self.best_gflops, self.best_state = self.gflops, self.state
        return self._obs(), self._info(r)

    def step(self, action: int):
        nxt = self.propose(action)
        result = None
        if nxt is not None and nxt.nest != self.state.nest:
            [result] = self.evaluator.evaluate([(self.problem, nxt.nest)])
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
                pairs.append((e.problem, s.nest))
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
