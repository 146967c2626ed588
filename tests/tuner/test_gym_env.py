"""The gymnasium environment: API conformance, registration, masks, seeding, optional dependency.

Measurements come from the synthetic runner (or a replay of its recording): no compiling.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from agent_fakes import SyntheticRunner

gymnasium = pytest.importorskip("gymnasium")
from gymnasium.utils.env_checker import check_env  # noqa: E402

from looptune.runtime.compiler.workload import MAX_DIM, MAX_THREADS, MatmulProblem  # noqa: E402
from looptune.tuner.agent.actions import NUM_ACTIONS, legal_mask  # noqa: E402
from looptune.tuner.agent.env import FAIL_REWARD  # noqa: E402
from looptune.tuner.agent.gym_env import ENV_ID, LoopTuneGymEnv  # noqa: E402
from looptune.tuner.measure.evaluator import Evaluator  # noqa: E402
from looptune.tuner.measure.runner import LocalRunner  # noqa: E402

PROBLEMS = [MatmulProblem(64, 80, 96), MatmulProblem(128, 64, 64), MatmulProblem(96, 96, 160, threads=2)]
REPO = pathlib.Path(__file__).resolve().parents[2]


def make_env(**kw) -> LoopTuneGymEnv:
    return LoopTuneGymEnv(kw.pop("problems", PROBLEMS), kw.pop("evaluator", None) or Evaluator(SyntheticRunner()), **kw)


def masked_random_episode(env, rng: np.random.Generator, seed=None, options=None) -> list[tuple]:
    """One episode of a uniformly random legal policy: [(problem key, action, reward, gflops), ...]."""
    obs, info = env.reset(seed=seed, options=options)
    trace = []
    while True:
        a = int(rng.choice(np.flatnonzero(obs["action_mask"])))
        obs, reward, terminated, truncated, info = env.step(a)
        trace.append((info["problem"].key(), a, reward, info["gflops"]))
        if terminated or truncated:
            return trace


def test_check_env_passes_without_warnings():
    env = gymnasium.make(ENV_ID, problems=PROBLEMS, evaluator=Evaluator(SyntheticRunner()), render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # gymnasium reports most API problems as warnings
        check_env(env.unwrapped)
    env.close()


def test_make_registers_and_passes_kwargs():
    env = gymnasium.make(ENV_ID, problems=PROBLEMS[:1], evaluator=Evaluator(SyntheticRunner()), max_steps=3)
    assert env.spec.id == ENV_ID and env.spec.kwargs["max_steps"] == 3
    assert env.action_space == gymnasium.spaces.Discrete(NUM_ACTIONS)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and info["problem"] == PROBLEMS[0]
    # the "module:id" form imports the module (registering the env) first
    env2 = gymnasium.make(f"looptune.tuner.agent.gym_env:{ENV_ID}", evaluator=Evaluator(SyntheticRunner()))
    obs, info = env2.reset(options={"problem": PROBLEMS[1]})
    assert info["problem"] == PROBLEMS[1]


def test_masks_match_legal_mask():
    env = make_env(max_steps=30)
    rng = np.random.default_rng(0)
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        for _ in range(30):
            expected = legal_mask(env.core.state, env.core.problem)
            assert obs["action_mask"].dtype == np.int8 and (obs["action_mask"] == expected).all()
            assert env.action_masks().dtype == bool and (env.action_masks() == expected).all()
            assert (info["action_mask"] == expected).all() and (info["mask"] == expected).all()
            obs, _, terminated, truncated, info = env.step(int(rng.choice(np.flatnonzero(expected))))
            if terminated or truncated:
                break


def test_seeding_reproduces_episodes_under_replay(tmp_path):
    rec = str(tmp_path / "rec.jsonl")
    live_env = make_env(evaluator=Evaluator(SyntheticRunner(), record_path=rec), max_steps=8)
    live = [masked_random_episode(live_env, np.random.default_rng(7), seed=s) for s in (3, None, None, 11)]
    replay_env = make_env(evaluator=Evaluator.replay(rec), max_steps=8)
    again = [masked_random_episode(replay_env, np.random.default_rng(7), seed=s) for s in (3, None, None, 11)]
    assert again == live
    problems = [masked_random_episode(make_env(), np.random.default_rng(0), seed=s)[0][0] for s in range(12)]
    assert len(set(problems)) > 1            # the seed chooses the problem


def test_random_masked_rollout_terminates():
    env = make_env(max_steps=10)
    rng = np.random.default_rng(1)
    for seed in range(10):
        trace = masked_random_episode(env, rng, seed=seed)
        assert 1 <= len(trace) <= 10
        assert all(np.isfinite(r) for _, _, r, _ in trace)


def test_illegal_action_is_a_penalized_no_op():
    env = make_env()
    obs, _ = env.reset(options={"problem": PROBLEMS[0]})
    illegal = int(np.flatnonzero(obs["action_mask"] == 0)[0])
    nest = env.core.state.nest
    obs2, reward, terminated, truncated, _ = env.step(illegal)
    assert reward == FAIL_REWARD and not terminated and not truncated
    assert env.core.state.nest == nest and (obs2["action_mask"] == obs["action_mask"]).all()


def test_observations_of_extreme_problems_stay_in_the_space():
    huge = MatmulProblem(MAX_DIM, MAX_DIM, MAX_DIM, batch=MAX_DIM, dtype="float64", threads=MAX_THREADS)
    env = make_env(problems=[huge, MatmulProblem(1, 1, 1)], max_steps=20)
    rng = np.random.default_rng(2)
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        for _ in range(20):
            assert obs in env.observation_space
            obs, _, terminated, truncated, _ = env.step(int(rng.choice(np.flatnonzero(obs["action_mask"]))))
            if terminated or truncated:
                break


def test_render_ansi_shows_the_nest_and_cursor():
    env = make_env(render_mode="ansi")
    env.reset(options={"problem": PROBLEMS[0]})
    text = env.render()
    assert "64 80 96" in text and "for k (k): 96 iters" in text and "<- cursor" in text
    with pytest.raises(ValueError):
        make_env(render_mode="human")


def test_default_evaluator_measures_locally_and_is_closed_with_the_env():
    env = LoopTuneGymEnv(PROBLEMS)             # nothing is compiled or started until reset
    assert isinstance(env.core.evaluator.runner, LocalRunner) and env.owns_evaluator
    env.close()
    env.close()                                # gymnasium allows closing twice


def test_gymnasium_stays_optional():
    """Only gym_env.py imports gymnasium, and the tuner imports without it."""
    pattern = re.compile(r"^\s*(import|from)\s+gymnasium\b", re.M)
    importers = [p.relative_to(REPO).as_posix() for top in ("runtime", "database", "tuner")
                 for p in (REPO / top).rglob("*.py") if pattern.search(p.read_text())]
    assert importers == ["tuner/agent/gym_env.py"]
    code = ("import sys; sys.modules['gymnasium'] = None\n"       # makes `import gymnasium` fail
            "import looptune.tuner, looptune.tuner.agent.env, looptune.tuner.cli\n"
            "try:\n    import looptune.tuner.agent.gym_env\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_bfloat16_problems_are_episodes_too():
    """bfloat16 (dtype feature 0.5, 2-byte A and B footprints) stays in the observation space."""
    bf16 = [MatmulProblem(96, 64, 128, dtype="bfloat16"), MatmulProblem(MAX_DIM, 1, MAX_DIM, dtype="bfloat16")]
    env = make_env(problems=bf16, max_steps=8)
    rng = np.random.default_rng(3)
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        assert info["problem"].dtype == "bfloat16" and obs in env.observation_space
        for _ in range(8):
            obs, reward, terminated, truncated, _ = env.step(int(rng.choice(np.flatnonzero(obs["action_mask"]))))
            assert obs in env.observation_space and np.isfinite(reward)
            if terminated or truncated:
                break


def test_make_without_problems_tunes_the_papers_grid():
    """As CompilerGym's environments do, the default is a documented problem set: the paper's grid."""
    env = gymnasium.make(ENV_ID, evaluator=Evaluator(SyntheticRunner()))
    sizes = set(range(64, 257, 16))
    seen = set()
    for seed in range(5):
        obs, info = env.reset(seed=seed)
        p = info["problem"]
        assert {p.m, p.n, p.k} <= sizes and p.dtype == "float32" and p.threads == 1
        seen.add(p)
    assert len(env.unwrapped.problems) == 13 ** 3 and len(seen) > 1
    env.close()
