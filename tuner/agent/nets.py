"""Torch networks over ``observe.Graph`` batches: a relational GNN Q-network (dueling) and an MLP
baseline over the flat encoding.  Training only; ``policy.py`` runs the same maths in numpy.

GNN layer (R relations, row-normalized adjacency ``A_r``, mean edge stride label ``e_r``)::

    H' = H + relu(H W_self + b + sum_r (A_r H) W_r + [e_1 .. e_R] U)      (then zero the padding)

Readout: the cursor node, the masked mean and max over nodes, and the problem's global
features, through one hidden layer, into a dueling head ``Q = V + A - mean(A)``.

Parameter names are the contract with ``policy.py`` (``export_npz`` writes them as they are).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from looptune.tuner.agent.actions import ACTION_NAMES, ACTION_SPACE_VERSION, NUM_ACTIONS
from looptune.tuner.agent.observe import FLAT_FEATURES, GLOBAL_FEATURES, NODE_FEATURES, OBSERVATION_VERSION, RELATIONS

BATCH_KEYS = ("nodes", "adj", "eagg", "node_mask", "glob", "cursor")


class _DuelingQ(nn.Module):
    """The Q-value head both Q-networks share: ``V(z) + A(z) - mean A(z)`` (or ``A(z)``)."""

    def q_head(self, z: torch.Tensor) -> torch.Tensor:
        a = self.adv(z)
        if not self.dueling:
            return a
        return self.val(z) + a - a.mean(dim=-1, keepdim=True)

    def config(self) -> dict:
        return {"arch": self.arch, "hidden": self.hidden, "layers": self.layers, "dueling": self.dueling}


class GraphQNet(_DuelingQ):
    arch = "gnn"

    def __init__(self, hidden: int = 64, layers: int = 3, n_actions: int = NUM_ACTIONS, dueling: bool = True):
        super().__init__()
        self.hidden, self.layers, self.dueling = hidden, layers, dueling
        self.inp = nn.Linear(NODE_FEATURES, hidden)
        self.self_w = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
        self.rel_w = nn.ModuleList([nn.Linear(RELATIONS * hidden, hidden, bias=False) for _ in range(layers)])
        self.edge_w = nn.ModuleList([nn.Linear(RELATIONS, hidden, bias=False) for _ in range(layers)])
        self.glob = nn.Linear(GLOBAL_FEATURES, hidden)
        self.head = nn.Linear(4 * hidden, hidden)
        self.adv = nn.Linear(hidden, n_actions)
        self.val = nn.Linear(hidden, 1)

    def forward(self, nodes, adj, eagg, node_mask, glob, cursor):
        mask = node_mask.unsqueeze(-1)                              # [B, N, 1]
        h = torch.relu(self.inp(nodes)) * mask
        e = eagg.transpose(1, 2)                                    # [B, N, R]
        for sw, rw, ew in zip(self.self_w, self.rel_w, self.edge_w):
            msgs = torch.cat([torch.bmm(adj[:, r], h) for r in range(adj.shape[1])], dim=-1)
            h = (h + torch.relu(sw(h) + rw(msgs) + ew(e))) * mask
        cur = h[torch.arange(h.shape[0]), cursor]
        mean = h.sum(1) / mask.sum(1)
        mx = h.max(1).values                                        # h >= 0 and padding is 0
        z = torch.relu(self.head(torch.cat([cur, mean, mx, torch.relu(self.glob(glob))], dim=-1)))
        return self.q_head(z)


class FlatQNet(_DuelingQ):
    """MLP baseline on ``Graph.flat()`` (nodes flattened + globals)."""

    arch = "mlp"

    def __init__(self, hidden: int = 128, layers: int = 2, n_actions: int = NUM_ACTIONS, dueling: bool = True):
        super().__init__()
        self.hidden, self.layers, self.dueling = hidden, layers, dueling
        dims = [FLAT_FEATURES] + [hidden] * layers
        self.body = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
        self.adv = nn.Linear(hidden, n_actions)
        self.val = nn.Linear(hidden, 1)

    def forward(self, nodes, adj, eagg, node_mask, glob, cursor):
        z = torch.cat([nodes.flatten(1), glob], dim=-1)
        for layer in self.body:
            z = torch.relu(layer(z))
        return self.q_head(z)


class ActorCritic(nn.Module):
    """PPO's network: the GNN trunk with a policy head (logits) and a value head."""

    def __init__(self, hidden: int = 64, layers: int = 3, n_actions: int = NUM_ACTIONS):
        super().__init__()
        self.trunk = GraphQNet(hidden, layers, n_actions, dueling=True)

    def forward(self, *batch):
        t = self.trunk
        # reuse the Q-net's layers: advantage head = logits, value head = V
        nodes, adj, eagg, node_mask, glob, cursor = batch
        mask = node_mask.unsqueeze(-1)
        h = torch.relu(t.inp(nodes)) * mask
        e = eagg.transpose(1, 2)
        for sw, rw, ew in zip(t.self_w, t.rel_w, t.edge_w):
            msgs = torch.cat([torch.bmm(adj[:, r], h) for r in range(adj.shape[1])], dim=-1)
            h = (h + torch.relu(sw(h) + rw(msgs) + ew(e))) * mask
        cur = h[torch.arange(h.shape[0]), cursor]
        z = torch.relu(t.head(torch.cat([cur, h.sum(1) / mask.sum(1), h.max(1).values, torch.relu(t.glob(glob))], -1)))
        return t.adv(z), t.val(z).squeeze(-1)


def to_torch(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[k])) for k in BATCH_KEYS)


def make_qnet(arch: str = "gnn", **kw) -> nn.Module:
    return {"gnn": GraphQNet, "mlp": FlatQNet}[arch](**kw)


def arrays_of(net: nn.Module) -> dict[str, np.ndarray]:
    """The network's parameters as float32 numpy arrays, under the names ``policy.py`` reads."""
    return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in net.state_dict().items()}


def net_from_arrays(params: dict[str, np.ndarray], config: dict) -> nn.Module:
    """A Q-network of ``config`` (a policy's ``meta["config"]``) holding ``params`` (a policy's
    arrays): the way back from npz weights, to fine-tune them."""
    net = make_qnet(config["arch"], hidden=int(config["hidden"]), layers=int(config["layers"]),
                    dueling=bool(config.get("dueling", True)))
    net.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params.items()})
    return net


def policy_meta(net: nn.Module, extra: dict | None = None) -> dict:
    """The metadata a weights file of ``net`` carries (``weights.read_weights``)."""
    return {"config": net.config(), "actions": list(ACTION_NAMES), "action_space": ACTION_SPACE_VERSION,
            "observation": OBSERVATION_VERSION, **(extra or {})}


def export_npz(net: nn.Module, path: str, extra: dict | None = None) -> None:
    """Write the network as plain numpy arrays plus a JSON metadata string (never pickle)."""
    arrays = arrays_of(net)
    arrays["__meta__"] = np.frombuffer(json.dumps(policy_meta(net, extra)).encode(), dtype=np.uint8)
    np.savez_compressed(path, **arrays)
