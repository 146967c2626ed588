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


def test_dqn_smoke_run_learns_and_exports(tmp_path):
    args = dqn.Args(seed=0, total_steps=320, num_envs=4, max_steps=6, hidden=16, layers=2, learning_starts=64,
                    batch_size=32, eval_every=160, buffer_size=2000, target_update=20)
    logs = []
    ev = Evaluator(SyntheticRunner())
    out = tmp_path / "dqn.npz"
    net = dqn.train(args, ev, PROBLEMS[:3], PROBLEMS[3:], log=logs.append, export_path=str(out))
    assert any(r["kind"] == "eval" for r in logs) and any(r["kind"] == "episode" for r in logs)
    pol = Policy.load(str(out))
    assert pol.name.startswith("dqn") and pol.max_steps == 6
    g = stack([observe(AgentState.initial(), PROBLEMS[0])])
    with torch.no_grad():
        assert np.allclose(pol.q_batch(g), net(*to_torch(g)).numpy(), atol=1e-5)
    states = pol.rollout(PROBLEMS[0])
    assert 1 <= len(states) <= 7
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
