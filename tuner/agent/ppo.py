"""PPO baseline for the LoopTune environment, CleanRL style (``cleanrl/ppo.py``), with action masks.

Same environment, evaluator (recorded measurements) and GNN trunk as the DQN learner; the
policy head is a categorical over legal actions (illegal logits set to -1e8, as in CleanRL's
``ppo_mask``).  Exported weights load in ``policy.Policy`` (logits play the role of Q-values
for greedy rollouts; the Q-value beam is only meaningful for DQN weights).
"""
from __future__ import annotations

import collections
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.distributions import Categorical

from looptune.runtime.compiler.workload import MatmulProblem

from looptune.tuner.agent.dqn import greedy_eval
from looptune.tuner.agent.env import LoopTuneEnv, VecEnv
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.agent.nets import ActorCritic, export_npz, to_torch
from looptune.tuner.agent.observe import stack


@dataclass
class Args:
    seed: int = 1
    total_steps: int = 8000
    num_envs: int = 8
    num_steps: int = 32               # steps per environment per rollout
    max_steps: int = 12
    hidden: int = 64
    layers: int = 3
    lr: float = 3e-4
    gamma: float = 0.9
    gae_lambda: float = 0.95
    update_epochs: int = 4
    num_minibatches: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    eval_every: int = 2000
    torch_threads: int = 1


class _Greedy(torch.nn.Module):
    """Greedy view of the actor-critic for ``greedy_eval`` (logits as Q-values)."""

    def __init__(self, ac: ActorCritic):
        super().__init__()
        self.ac = ac

    def forward(self, *batch):
        return self.ac(*batch)[0]


def _masked_dist(logits: torch.Tensor, mask: torch.Tensor) -> Categorical:
    return Categorical(logits=torch.where(mask, logits, torch.full_like(logits, -1e8)))


def _export(ac: ActorCritic, path: str, args: Args) -> None:
    trunk = ac.trunk
    trunk.dueling = False        # numpy policy: Q := logits
    try:
        export_npz(trunk, path, {"gamma": args.gamma, "max_steps": args.max_steps, "name": f"ppo-s{args.seed}",
                                 "args": asdict(args)})
    finally:
        trunk.dueling = True


def train(args: Args, evaluator: Evaluator, train_problems: Sequence[MatmulProblem],
          eval_problems: Sequence[MatmulProblem] = (), log: Optional[Callable[[dict], None]] = None,
          export_path: Optional[str] = None) -> ActorCritic:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    log = log or (lambda rec: None)
    t_start = time.perf_counter()
    ac = ActorCritic(args.hidden, args.layers)
    opt = torch.optim.Adam(ac.parameters(), lr=args.lr, eps=1e-5)
    envs = VecEnv([LoopTuneEnv(evaluator, train_problems, max_steps=args.max_steps, seed=args.seed * 1000 + i)
                   for i in range(args.num_envs)], seed=args.seed)
    obs, infos = envs.reset()
    masks = np.stack([i["mask"] for i in infos])
    E, T = args.num_envs, args.num_steps
    step, episodes, next_eval = 0, 0, args.eval_every
    recent: collections.deque = collections.deque(maxlen=100)
    while step < args.total_steps:
        b_obs, b_mask = [], []
        b_act = torch.zeros(T, E, dtype=torch.long)
        b_logp, b_rew, b_done, b_val = (torch.zeros(T, E) for _ in range(4))
        for t in range(T):
            b_obs.append(obs)
            b_mask.append(masks)
            with torch.no_grad():
                logits, value = ac(*to_torch(stack(obs)))
                dist = _masked_dist(logits, torch.from_numpy(masks))
                action = dist.sample()
            b_act[t], b_logp[t], b_val[t] = action, dist.log_prob(action), value
            obs, rews, terms, truncs, infos = envs.step(action.tolist())
            b_rew[t] = torch.tensor(rews, dtype=torch.float32)
            # truncation treated as termination (CleanRL's simplification; episodes are short)
            b_done[t] = torch.tensor([float(a or b) for a, b in zip(terms, truncs)])
            masks = np.stack([i["mask"] for i in infos])
            for i, info in enumerate(infos):
                if "episode_return" in info:
                    episodes += 1
                    recent.append(info["episode_return"])
                    log({"kind": "episode", "step": step, "episode": episodes, "return": info["episode_return"],
                         "best": math.log(info["episode_best"]), "problem": info["problem"].key(),
                         "wall": time.perf_counter() - t_start})
            step += E
        with torch.no_grad():
            _, next_value = ac(*to_torch(stack(obs)))
            adv = torch.zeros(T, E)
            last = torch.zeros(E)
            for t in reversed(range(T)):
                nv = next_value if t == T - 1 else b_val[t + 1]
                nonterm = 1.0 - b_done[t]
                delta = b_rew[t] + args.gamma * nv * nonterm - b_val[t]
                last = delta + args.gamma * args.gae_lambda * nonterm * last
                adv[t] = last
            ret = adv + b_val
        flat_obs = stack([g for row in b_obs for g in row])
        flat_mask = torch.from_numpy(np.concatenate(b_mask))
        fa, flp, fadv, fret = b_act.reshape(-1), b_logp.reshape(-1), adv.reshape(-1), ret.reshape(-1)
        n = T * E
        mb = n // args.num_minibatches
        for _ in range(args.update_epochs):
            perm = np.random.permutation(n)
            for s in range(0, n, mb):
                idx = perm[s:s + mb]
                logits, value = ac(*to_torch({k: v[idx] for k, v in flat_obs.items()}))
                dist = _masked_dist(logits, flat_mask[idx])
                ratio = (dist.log_prob(fa[idx]) - flp[idx]).exp()
                a = fadv[idx]
                a = (a - a.mean()) / (a.std() + 1e-8)
                pg = torch.max(-a * ratio, -a * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_loss = 0.5 * ((value - fret[idx]) ** 2).mean()
                loss = pg - args.ent_coef * dist.entropy().mean() + args.vf_coef * v_loss
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ac.parameters(), args.max_grad_norm)
                opt.step()
        if eval_problems and (step >= next_eval or step >= args.total_steps):
            next_eval += args.eval_every
            rec = greedy_eval(_Greedy(ac), evaluator, eval_problems, args.max_steps)
            rec.update({"kind": "eval", "step": step, "episodes": episodes,
                        "train_return_mean100": float(np.mean(recent)) if recent else None,
                        "wall": time.perf_counter() - t_start, "measured": evaluator.stats.measured,
                        "built": evaluator.stats.built})
            log(rec)
            if export_path:
                _export(ac, export_path, args)
    if export_path:
        _export(ac, export_path, args)
    return ac
