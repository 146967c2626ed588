"""``LoopTuneEnv`` as a real ``gymnasium.Env``, registered as ``LoopTune/Matmul-v0``.

Needs the optional ``gymnasium`` dependency (``pip install looptune[gym]``); this is the only
module of the package that imports it.  Importing the module registers the environment (gymnasium
1.x dropped entry-point plugin discovery; its ``"module:id"`` form of ``make`` does the import)::

    import gymnasium
    env = gymnasium.make("looptune.tuner.agent.gym_env:LoopTune/Matmul-v0",   # imports + registers
                         problems=[MatmulProblem(128, 128, 128)], evaluator=Evaluator.replay("rec.jsonl"))
    obs, info = env.reset(seed=0)                  # or options={"problem": MatmulProblem(...)}
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

Spaces:

* ``action_space = Discrete(NUM_ACTIONS)``: the index into ``actions.ACTIONS``;
* ``observation_space = Dict(observation=Box(0, OBS_HIGH, (FLAT_FEATURES,)),
  action_mask=MultiBinary(NUM_ACTIONS))``: ``observe.Graph.flat()`` (what ``nets.FlatQNet``
  consumes) and the legal-action mask under ``"action_mask"``, the usual key of masked-action
  policies.  ``action_masks()`` returns the same mask as booleans, the convention of
  sb3-contrib's ``MaskablePPO``; ``info["action_mask"]`` carries it too.

Rewards, truncation after ``max_steps`` and ``stop`` are ``LoopTuneEnv``'s (see env.py).  An
illegal action (one the mask excludes) is a no-op with the penalty ``env.FAIL_REWARD``: the
nest stays as it was, the step counts toward ``max_steps``, the episode goes on.  That is
``LoopTuneEnv``'s own treatment; ending the episode instead would let an unmasked agent escape
a bad start by acting illegally.

Episodes are reproducible: ``reset(seed=s)`` seeds ``self.np_random``, which alone chooses the
problem, and with a deterministic evaluator (``Evaluator.replay``, a synthetic runner) the same
seed and actions give the same observations, rewards and infos.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces

from looptune.runtime.compiler.workload import MAX_DIM, MatmulProblem
from looptune.tuner.agent.actions import NUM_ACTIONS, sizes_of
from looptune.tuner.agent.env import LoopTuneEnv
from looptune.tuner.agent.observe import FLAT_FEATURES, Graph
from looptune.tuner.agent.trainset import paper_grid
from looptune.tuner.measure.evaluator import Evaluator

ENV_ID = "LoopTune/Matmul-v0"
ENTRY_POINT = "looptune.tuner.agent.gym_env:LoopTuneGymEnv"

# Every feature of ``observe`` is non-negative, and the largest any valid problem produces is a
# trip count's log2(MAX_DIM) / 8 = 3.0 (the other features are flags, fractions or smaller
# log-scaled sizes); the bound keeps one unit of headroom.
OBS_HIGH = math.log2(MAX_DIM) / 8 + 1.0


class LoopTuneGymEnv(gymnasium.Env):
    """One matmul problem per episode, sampled from ``problems`` (or given in ``reset``'s options);
    without ``problems``, from the LoopTune paper's grid (``trainset.paper_grid``: m, n, k each in
    64..256 step 16, float32, one thread), measured live on this machine as CompilerGym's
    environments default to a benchmark set.

    ``evaluator`` measures the schedules; the default is ``Evaluator.local()``, which compiles
    and times kernels on this machine (and is closed with the environment).  Tests and offline
    training pass ``Evaluator.replay(path)`` or a synthetic one.  ``max_steps`` truncates an
    episode (``stop`` ends it earlier).  ``core`` is the wrapped ``LoopTuneEnv``: its ``state``
    (schedule + cursor) gives the relational ``observe.Graph`` for graph networks.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1, **LoopTuneEnv.metadata}

    def __init__(self, problems: Sequence[MatmulProblem] = (), evaluator: Optional[Evaluator] = None, *,
                 max_steps: int = 12, render_mode: Optional[str] = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.problems = list(problems) or paper_grid()
        self.owns_evaluator = evaluator is None
        self.core = LoopTuneEnv(Evaluator.local() if evaluator is None else evaluator, max_steps=max_steps)
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        self.observation_space = spaces.Dict({
            "observation": spaces.Box(0.0, OBS_HIGH, shape=(FLAT_FEATURES,), dtype=np.float32),
            "action_mask": spaces.MultiBinary(NUM_ACTIONS),
        })

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        """Start an episode.  ``options``: ``"problem"`` (default: one of ``problems``, drawn with
        ``np_random``) and ``"start"`` (a starting ``Schedule``; default the natural nest)."""
        super().reset(seed=seed)
        options = options or {}
        problem = options.get("problem")
        if problem is None:
            problem = self.problems[int(self.np_random.integers(len(self.problems)))]
        graph, info = self.core.reset(problem, start=options.get("start"))
        return self._obs(graph), self._info(info)

    def step(self, action):
        graph, reward, terminated, truncated, info = self.core.step(int(action))
        return self._obs(graph), float(reward), bool(terminated), bool(truncated), self._info(info)

    def action_masks(self) -> np.ndarray:
        """The legal-action mask (booleans over ``actions.ACTIONS``), as ``MaskablePPO`` asks for it."""
        return self.core.action_mask()

    def render(self) -> Optional[str]:
        """``"ansi"``: the problem, the step, the speed so far and the loop nest, cursor marked."""
        if self.render_mode is None:
            gymnasium.logger.warn("render() called without a render_mode; make the env with render_mode='ansi'")
            return None
        core = self.core
        nest = core.state.nest
        cursor = nest.loops[core.state.cursor].name
        marker = f"for {cursor} ("
        lines = [line + "   <- cursor" if marker in line else line
                 for line in nest.pretty(sizes_of(core.problem)).splitlines()]
        head = (f"{core.problem}  step {core.t}/{core.max_steps}  {core.gflops:.2f} GFLOPS "
                f"(start {core.initial_gflops:.2f}, best {core.best_gflops:.2f})  cursor: {cursor}")
        return "\n".join([head, *lines]) + "\n"

    def close(self) -> None:
        if self.owns_evaluator:
            self.core.evaluator.close()
        super().close()

    def _obs(self, graph: Graph) -> dict[str, np.ndarray]:
        return {"observation": graph.flat(), "action_mask": self.action_masks().astype(np.int8)}

    def _info(self, info: dict) -> dict:
        return dict(info, action_mask=self.action_masks(), problem=self.core.problem)


def register_envs() -> None:
    """Register ``ENV_ID`` with gymnasium (idempotent: re-importing the module is harmless)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point=ENTRY_POINT)


register_envs()
