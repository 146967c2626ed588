"""Training smoke runs (a few hundred steps on synthetic measurements) and numpy == torch inference."""
from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from agent_fakes import SyntheticRunner

torch = pytest.importorskip("torch")

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent import dqn
from looptune.tuner.agent import ppo
from looptune.tuner.agent.actions import STOP, AgentState, apply, legal_mask
from looptune.tuner.agent.env import LoopTuneEnv
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.agent.nets import export_npz, make_qnet, to_torch
from looptune.tuner.agent.observe import observe, stack
from looptune.tuner.agent.policy import Policy, PolicyError

PROBLEMS = [MatmulProblem(m, n, k) for m, n, k in [(64, 64, 64), (128, 96, 80), (96, 160, 112), (256, 64, 128)]]


def random_graphs(count: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        p = MatmulProblem(rng.randint(1, 400), rng.randint(1, 400), rng.randint(1, 400), batch=rng.randint(1, 4),
                          dtype=rng.choice(["float32", "float64"]), layout=rng.choice(["nn", "tn", "nt", "tt"]),
                          threads=rng.choice([1, 2, 4]))
        s = AgentState.initial()
        for _ in range(rng.randint(0, 14)):
            legal = [a for a in np.flatnonzero(legal_mask(s, p)) if a != STOP]
            s = apply(s, rng.choice(legal), p)
        out.append((observe(s, p, rng.random()), legal_mask(s, p)))
    return out


@pytest.mark.parametrize("arch", ["gnn", "mlp"])
def test_numpy_inference_equals_torch(tmp_path, arch):
    torch.manual_seed(0)
    net = make_qnet(arch)
    with torch.no_grad():                       # larger weights than the default init: a harder parity test
        for prm in net.parameters():
            prm.mul_(3.0)
    path = tmp_path / "w.npz"
    export_npz(net, str(path))
    pol = Policy.load(str(path))
    graphs = random_graphs(64, seed=1)
    batch = stack([g for g, _ in graphs])
    with torch.no_grad():
        qt = net(*to_torch(batch)).numpy()
    qn = pol.q_batch(batch)
    assert np.allclose(qn, qt, rtol=1e-4, atol=1e-4 * np.abs(qt).max())
    for (g, m), row in zip(graphs, qt):
        assert pol.act(g, m) == int(np.argmax(np.where(m, row, -np.inf)))


def test_policy_module_does_not_import_torch():
    code = ("import sys; import looptune.tuner.agent.policy, looptune.tuner.search.tune, looptune.tuner.search.strategies; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_policy_refuses_other_action_space(tmp_path):
    net = make_qnet("gnn", hidden=8, layers=1)
    export_npz(net, str(tmp_path / "w.npz"), {"action_space": "something-else"})
    with pytest.raises(PolicyError):
        Policy.load(str(tmp_path / "w.npz"))


def random_policy_speedup(evaluator: Evaluator, problems, max_steps: int, episodes: int, seed: int) -> float:
    """Geometric-mean final speedup of uniformly random legal actions (seeded) on ``problems``."""
    rng, env, logs = random.Random(seed), LoopTuneEnv(evaluator, max_steps=max_steps), []
    for p in problems:
        for _ in range(episodes):
            _, info = env.reset(p)
            for _ in range(max_steps):
                _, _, term, trunc, info = env.step(rng.choice(np.flatnonzero(info["mask"]).tolist()))
                if term or trunc:
                    break
            logs.append(np.log(env.gflops / env.initial_gflops))
    return float(np.exp(np.mean(logs)))


def test_dqn_smoke_run_learns_and_exports(tmp_path):
    """A few hundred steps on synthetic measurements (register-tiled nests run ~30x faster than
    untiled ones, ``agent_fakes``): the greedy policy learns to tile.  Its measured speedup beats
    the same network untrained and random actions by far, it improved over training, and the
    exported numpy policy tiles every problem; the export matches torch; the run is reproducible."""
    args = dqn.Args(seed=0, total_steps=320, num_envs=4, max_steps=6, hidden=16, layers=2, learning_starts=64,
                    batch_size=32, eval_every=160, buffer_size=2000, target_update=20)
    logs = []
    ev = Evaluator(SyntheticRunner())
    out = tmp_path / "dqn.npz"
    net = dqn.train(args, ev, PROBLEMS[:3], PROBLEMS[3:], log=logs.append, export_path=str(out))
    assert any(r["kind"] == "episode" for r in logs)
    evals = [r["speedup_geomean"] for r in logs if r["kind"] == "eval"]
    assert len(evals) == 2 and evals[-1] > 5 * evals[0], evals          # held-out problem, over training

    # learning: the trained greedy policy against the same network untrained and random actions
    net.eval()
    trained = dqn.greedy_eval(net, ev, PROBLEMS, args.max_steps)["speedup_geomean"]
    torch.manual_seed(args.seed)
    untrained = dqn.greedy_eval(make_qnet(args.arch, hidden=args.hidden, layers=args.layers).eval(), ev, PROBLEMS,
                                args.max_steps)["speedup_geomean"]
    rand = random_policy_speedup(ev, PROBLEMS, args.max_steps, episodes=25, seed=0)
    assert trained > 20, (trained, untrained, rand)              # tiled: ~30x the naive nest's speed
    assert trained > 10 * untrained and trained > 3 * rand, (trained, untrained, rand)

    pol = Policy.load(str(out))
    assert pol.name.startswith("dqn") and pol.max_steps == 6
    g = stack([observe(AgentState.initial(), PROBLEMS[0])])
    with torch.no_grad():
        assert np.allclose(pol.q_batch(g), net(*to_torch(g)).numpy(), atol=1e-5)
    for p in PROBLEMS:
        states = pol.rollout(p)
        assert 1 <= len(states) <= 7 and states[-1].nest.tile is not None, (p, states[-1].nest)
    assert pol.beam(PROBLEMS[0], width=3)
    # same seed, same synthetic measurements: the same network
    net2 = dqn.train(args, Evaluator(SyntheticRunner()), PROBLEMS[:3], PROBLEMS[3:])
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)


def test_ppo_smoke_run(tmp_path):
    args = ppo.Args(seed=0, total_steps=256, num_envs=4, num_steps=32, max_steps=6, hidden=16, layers=2,
                    eval_every=256)
    logs = []
    out = tmp_path / "ppo.npz"
    ppo.train(args, Evaluator(SyntheticRunner()), PROBLEMS[:3], PROBLEMS[3:], log=logs.append, export_path=str(out))
    assert any(r["kind"] == "eval" for r in logs)
    assert Policy.load(str(out)).rollout(PROBLEMS[1])
