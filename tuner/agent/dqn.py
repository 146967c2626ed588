"""APEX-DQN-style learner for the LoopTune environment, CleanRL style: one file, top to bottom.

The recipe that won in the LoopTune paper, minus what does not pay on a 2-core machine:

* double DQN (online net picks the next action, target net values it), dueling head (nets.py);
* prioritized replay (proportional, alpha / beta-annealed importance weights);
* n-step returns;
* APEX's many actors become ``num_envs`` environments stepped in lockstep in one process
  (``env.VecEnv``): the cost of an environment step is compiling and timing kernels, and
  batching the compiles of all actors into one parallel gcc call is what helps here;
  separate actor processes would fight the measurement worker for the two cores and make
  timings noisy.

Rewards come from measurements through an ``env.Evaluator`` that records every (problem,
canonical schedule) it measures in a JSONL file and answers repeats from it, so each distinct
schedule is compiled once and measured once per problem, and a rerun with the same seed over
the same recordings replays exactly.  Logs one JSON line per episode and per evaluation.
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from looptune.runtime.compiler.workload import MatmulProblem

from looptune.tuner.agent.actions import NUM_ACTIONS, STOP
from looptune.tuner.agent.env import LoopTuneEnv, VecEnv
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.agent.nets import BATCH_KEYS, export_npz, make_qnet, to_torch
from looptune.tuner.agent.observe import N_NODES, NODE_FEATURES, GLOBAL_FEATURES, RELATIONS, Graph, stack


@dataclass
class Args:
    seed: int = 1
    total_steps: int = 16000          # environment steps, summed over environments
    num_envs: int = 8
    max_steps: int = 12               # episode length limit
    arch: str = "gnn"                 # "gnn" or "mlp"
    hidden: int = 64
    layers: int = 3
    buffer_size: int = 25000
    batch_size: int = 64
    gamma: float = 0.9
    n_step: int = 3
    lr: float = 3e-4
    learning_starts: int = 800
    updates_per_step: int = 2         # gradient steps per lockstep step of all environments
    target_update: int = 250          # gradient steps between target-network copies
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.5         # of total_steps to anneal epsilon over
    per_alpha: float = 0.6
    per_beta0: float = 0.4
    per_eps: float = 1e-3
    max_grad_norm: float = 10.0
    eval_every: int = 2000            # environment steps between greedy evaluations
    torch_threads: int = 1


class PrioritizedReplay:
    """Proportional prioritized replay over preallocated numpy arrays (observations stored densely)."""

    def __init__(self, size: int, alpha: float, seed: int):
        self.size, self.alpha = size, alpha
        self.rng = np.random.default_rng(seed)
        shapes = {"nodes": (N_NODES, NODE_FEATURES), "adj": (RELATIONS, N_NODES, N_NODES), "eagg": (RELATIONS, N_NODES),
                  "node_mask": (N_NODES,), "glob": (GLOBAL_FEATURES,)}
        self.obs = {k: np.zeros((size, *s), np.float32) for k, s in shapes.items()}
        self.nxt = {k: np.zeros((size, *s), np.float32) for k, s in shapes.items()}
        self.obs["cursor"] = np.zeros(size, np.int64)
        self.nxt["cursor"] = np.zeros(size, np.int64)
        self.action = np.zeros(size, np.int64)
        self.ret = np.zeros(size, np.float32)
        self.discount = np.zeros(size, np.float32)      # gamma^k, 0 when the episode terminated
        self.next_mask = np.zeros((size, NUM_ACTIONS), bool)
        self.prio = np.zeros(size, np.float64)
        self.n = self.pos = 0

    def add(self, obs: Graph, action: int, ret: float, discount: float, nxt: Graph, next_mask: np.ndarray) -> None:
        i = self.pos
        for store, g in ((self.obs, obs), (self.nxt, nxt)):
            store["nodes"][i], store["adj"][i], store["eagg"][i] = g.nodes, g.adj, g.eagg
            store["node_mask"][i], store["glob"][i], store["cursor"][i] = g.node_mask, g.glob, g.cursor
        self.action[i], self.ret[i], self.discount[i], self.next_mask[i] = action, ret, discount, next_mask
        self.prio[i] = self.prio[: self.n].max() if self.n else 1.0
        self.pos = (self.pos + 1) % self.size
        self.n = min(self.n + 1, self.size)

    def sample(self, batch: int, beta: float):
        p = self.prio[: self.n] ** self.alpha
        p /= p.sum()
        idx = self.rng.choice(self.n, size=batch, p=p)
        w = (self.n * p[idx]) ** (-beta)
        return idx, (w / w.max()).astype(np.float32)

    def update(self, idx: np.ndarray, td: np.ndarray, eps: float) -> None:
        self.prio[idx] = np.abs(td) + eps


class TrainControl(Protocol):
    """Steers ``train`` from outside (``finetune``: a wall-clock budget, its own evaluation)."""

    def keep_going(self, step: int) -> bool:
        """Called after every lockstep step; False ends training (after a last evaluation), and
        nothing else does: ``Args.total_steps`` then only paces exploration."""

    def evaluate_now(self, step: int) -> bool:
        """Whether to evaluate after this step."""

    def evaluate(self, qnet: torch.nn.Module, step: int) -> dict:
        """Evaluate the network as it is now; the record is logged."""


def masked_argmax(q: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.argmax(np.where(mask, q, -np.inf), axis=-1)


def greedy_eval(qnet, evaluator: Evaluator, problems: Sequence[MatmulProblem], max_steps: int) -> dict:
    """Greedy rollouts (no exploration) on fixed problems; final-state speedups, measured."""
    env = LoopTuneEnv(evaluator, max_steps=max_steps)
    speedups, vs_numpy, lengths = [], [], []
    for p in problems:
        obs, info = env.reset(p)
        for _ in range(max_steps):
            with torch.no_grad():
                q = qnet(*to_torch(stack([obs]))).numpy()[0]
            a = int(masked_argmax(q, info["mask"]))
            obs, _, term, trunc, info = env.step(a)
            if term or trunc:
                break
        r = evaluator.lookup(p, env.state.nest)
        speedups.append(env.gflops / env.initial_gflops)
        if r is not None and r.ok and r.numpy_gflops:
            vs_numpy.append(env.gflops / r.numpy_gflops)
        lengths.append(env.t)
    geo = lambda xs: float(math.exp(np.mean(np.log(xs)))) if xs else float("nan")
    return {"speedup_geomean": geo(speedups), "vs_numpy_geomean": geo(vs_numpy), "mean_length": float(np.mean(lengths))}


def train(args: Args, evaluator: Evaluator, train_problems: Sequence[MatmulProblem],
          eval_problems: Sequence[MatmulProblem] = (), log: Optional[Callable[[dict], None]] = None,
          export_path: Optional[str] = None, start: Optional[torch.nn.Module] = None,
          control: Optional[TrainControl] = None) -> torch.nn.Module:
    """Train a Q-network (``start``: from these weights, else a fresh one of ``args.arch``) for
    ``args.total_steps`` environment steps or, with a ``control``, until it says stop (the steps
    then only pace epsilon's decay and the replay's importance weights).  Evaluates every
    ``args.eval_every`` steps on ``eval_problems`` (``greedy_eval``), or when and as ``control``
    says, and once more at the end; ``export_path``: written after each evaluation."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    log = log or (lambda rec: None)
    t_start = time.perf_counter()

    kw = {"hidden": args.hidden, "layers": args.layers}
    if start is None:
        qnet, target = make_qnet(args.arch, **kw), make_qnet(args.arch, **kw)
        target.load_state_dict(qnet.state_dict())
    else:
        qnet, target = start, copy.deepcopy(start)
    opt = torch.optim.Adam(qnet.parameters(), lr=args.lr, eps=1e-5)
    rb = PrioritizedReplay(args.buffer_size, args.per_alpha, args.seed)
    rng = random.Random(args.seed)

    envs = VecEnv([LoopTuneEnv(evaluator, train_problems, max_steps=args.max_steps, seed=args.seed * 1000 + i)
                   for i in range(args.num_envs)], seed=args.seed)
    obs, infos = envs.reset()
    masks = [i["mask"] for i in infos]
    queues: list[collections.deque] = [collections.deque() for _ in envs.envs]
    grad_steps, episodes, step = 0, 0, 0
    recent: collections.deque = collections.deque(maxlen=100)

    def emit(q: collections.deque, nxt: Graph, next_mask: np.ndarray, terminal: bool, flush: bool) -> None:
        while q and (flush or len(q) >= args.n_step):
            ret = sum(args.gamma ** j * r for j, (_, _, r) in enumerate(q))
            disc = 0.0 if terminal else args.gamma ** len(q)
            o, a, _ = q.popleft()
            rb.add(o, a, ret, disc, nxt, next_mask)
            if not flush:
                break

    finished = control is None and step >= args.total_steps
    while not finished:
        eps = max(args.eps_end, args.eps_start - (args.eps_start - args.eps_end) * step / (args.eps_fraction * args.total_steps))
        with torch.no_grad():
            qs = qnet(*to_torch(stack(obs))).numpy()
        actions = []
        for q, m in zip(qs, masks):
            if rng.random() < eps:
                actions.append(rng.choice(np.flatnonzero(m).tolist()))
            else:
                actions.append(int(masked_argmax(q, m)))
        next_obs, rews, terms, truncs, infos = envs.step(actions)
        for i in range(len(envs.envs)):
            queues[i].append((obs[i], actions[i], rews[i]))
            done = terms[i] or truncs[i]
            real_next = infos[i]["final_obs"] if done else next_obs[i]
            real_mask = infos[i]["final_mask"] if done else infos[i]["mask"]
            emit(queues[i], real_next, real_mask, terms[i], flush=done)
            if done:
                episodes += 1
                recent.append(infos[i]["episode_return"])
                log({"kind": "episode", "step": step, "episode": episodes, "return": infos[i]["episode_return"],
                     "best": math.log(infos[i]["episode_best"]), "problem": infos[i]["problem"].key(),
                     "eps": eps, "wall": time.perf_counter() - t_start})
        obs, masks = next_obs, [i["mask"] for i in infos]
        step += len(envs.envs)

        if rb.n >= args.learning_starts:
            beta = args.per_beta0 + (1 - args.per_beta0) * min(1.0, step / args.total_steps)
            for _ in range(args.updates_per_step):
                idx, w = rb.sample(args.batch_size, beta)
                b_obs = to_torch({k: v[idx] for k, v in rb.obs.items()})
                b_nxt = to_torch({k: v[idx] for k, v in rb.nxt.items()})
                with torch.no_grad():
                    q_next_online = qnet(*b_nxt)
                    q_next_online[~torch.from_numpy(rb.next_mask[idx])] = -1e9
                    a_star = q_next_online.argmax(1, keepdim=True)
                    q_next = target(*b_nxt).gather(1, a_star).squeeze(1)
                    disc = torch.from_numpy(rb.discount[idx])
                    y = torch.from_numpy(rb.ret[idx]) + disc * torch.where(disc > 0, q_next, torch.zeros_like(q_next))
                q = qnet(*b_obs).gather(1, torch.from_numpy(rb.action[idx]).unsqueeze(1)).squeeze(1)
                td = y - q
                loss = (torch.from_numpy(w) * F.smooth_l1_loss(q, y, reduction="none")).mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(qnet.parameters(), args.max_grad_norm)
                opt.step()
                rb.update(idx, td.detach().numpy(), args.per_eps)
                grad_steps += 1
                if grad_steps % args.target_update == 0:
                    target.load_state_dict(qnet.state_dict())

        finished = not control.keep_going(step) if control is not None else step >= args.total_steps
        if control is not None:
            due = finished or control.evaluate_now(step)
        else:
            due = bool(eval_problems) and (step % args.eval_every < len(envs.envs) or finished)
        if due:
            qnet.eval()
            rec = control.evaluate(qnet, step) if control is not None else \
                greedy_eval(qnet, evaluator, eval_problems, args.max_steps)
            qnet.train()
            rec.update({"kind": "eval", "step": step, "episodes": episodes, "grad_steps": grad_steps,
                        "train_return_mean100": float(np.mean(recent)) if recent else None,
                        "wall": time.perf_counter() - t_start, "measured": evaluator.stats.measured,
                        "built": evaluator.stats.built})
            log(rec)
            if export_path:
                export_npz(qnet, export_path, {"gamma": args.gamma, "max_steps": args.max_steps,
                                               "name": f"dqn-{args.arch}-s{args.seed}", "args": asdict(args)})
    if export_path:
        export_npz(qnet, export_path, {"gamma": args.gamma, "max_steps": args.max_steps,
                                       "name": f"dqn-{args.arch}-s{args.seed}", "args": asdict(args)})
    return qnet
