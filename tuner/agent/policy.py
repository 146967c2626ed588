"""Torch-free inference of a trained LoopTune policy: numpy weights (npz), numpy forward pass.

    from looptune.tuner.agent.policy import Policy
    policy = Policy.in_use()                        # the policy in use: this machine's own, else the shipped one
    policy = Policy.load()                          # the weights shipped in looptune/tuner/agent/data/policy.npz
    policy = Policy.load("other.npz")               # other weights (PolicyError if they cannot drive the agent)
    states = policy.beam(problem, width=4, depth=10)   # best-first final states, by Q-value
    state = policy.rollout(problem)[-1]             # greedy rollout until `stop`

The forward pass mirrors ``nets.GraphQNet`` / ``nets.FlatQNet`` operation for operation, so
numpy and torch pick the same actions (tests check it on random graphs).  Importing this
module does not import torch.

``tune()``, ``build-db``, live tuning and ``looptune info`` follow ``Policy.in_use()``: this
machine's policy, which ``looptune train`` fine-tunes on its measurements
(``weights.machine_policy_path``), when its file is usable here, else the shipped weights
(``policy.describe()`` says which).  A weights file whose metadata or arrays cannot make a policy
(a ``max_steps`` that is no count, arrays of strings, shapes that do not fit) is a ``PolicyError``
naming it, never a ``TypeError`` from deep inside.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from looptune.database import MachineKey
from looptune.runtime.compiler import environment
from looptune.runtime.compiler.errors import LoopTuneError
from looptune.runtime.compiler.schedule import Schedule, canonical_key
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.actions import STOP, AgentState, apply, legal_mask
from looptune.tuner.agent.observe import Graph, observe, stack
from looptune.tuner.agent.weights import (SHIPPED_WEIGHTS, PolicyError, machine_policy_path, machine_policy_problem,
                                          read_weights, version_problem)

__all__ = ["DEFAULT_WEIGHTS", "Node", "Policy", "PolicyError", "SHIPPED", "MACHINE"]

DEFAULT_WEIGHTS = SHIPPED_WEIGHTS     # the weights shipped in the package
SHIPPED, MACHINE = "shipped", "machine"     # ``Policy.source``: the package's weights, or this machine's own
# How metadata or arrays that do not make a policy fail when used (a count that is None or a
# string, a string array, a missing array, shapes that do not multiply): all mean "bad weights".
BAD_WEIGHTS = (KeyError, ValueError, IndexError, TypeError, AttributeError)


def _fresh_mask(state: AgentState, problem: MatmulProblem, visited) -> np.ndarray:
    """Legal actions that do not lead back to a (nest, cursor) this path has already been in.

    Greedy Q-policies can cycle (unroll 8, unroll 2, unroll 8, ...) outside their training
    distribution; at inference a cycle is never useful, so it is masked out.
    """
    mask = legal_mask(state, problem)
    for a in np.flatnonzero(mask):
        if a != STOP and _key(apply(state, int(a), problem)) in visited:
            mask[a] = False
    return mask


def _key(state: AgentState) -> tuple[str, int]:
    return canonical_key(state.nest), state.cursor


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _lin(p: dict[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    y = x @ p[name + ".weight"].T
    b = p.get(name + ".bias")
    return y + b if b is not None else y


@dataclass
class Node:
    """A beam-search node: a state, its action history and the Q-value sum that ranks it."""

    state: AgentState
    actions: tuple[int, ...]
    score: float                 # predicted return of the whole path from the start
    stopped: bool = False
    acc: float = 0.0             # predicted rewards of the steps before the last one
    last_q: Optional[float] = None
    visited: frozenset = frozenset()


def _count(value, what: str, least: int = 1) -> int:
    """A whole number of at least ``least`` from metadata (a JSON int; not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what} is {value!r}, not a whole number from {least}")
    return value


def _numbers(name: str, array) -> np.ndarray:
    """A weights array as float32; arrays of strings, dates or complex numbers are refused rather
    than converted (numpy would turn "1.5" into 1.5 and drop imaginary parts)."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise TypeError(f"array {name} holds {getattr(array, 'dtype', type(array).__name__)}, not real numbers")
    return array.astype(np.float32)


class Policy:
    def __init__(self, params: dict[str, np.ndarray], meta: dict, path: Optional[str] = None, source: str = ""):
        """``PolicyError`` (naming ``path``) if ``meta`` and ``params`` cannot make a policy of this build."""
        where = f"{path}: " if path else ""
        try:
            problem = version_problem(meta)
            if problem is not None:
                raise PolicyError(f"{where}policy was {problem}")
            self.p = {k: _numbers(k, v) for k, v in params.items()}
            self.config = meta["config"]
            self.arch = self.config["arch"]
            self.layers = _count(self.config["layers"], "its layer count", 0) if self.arch in ("gnn", "mlp") else None
            if "hidden" in self.config:     # not read here, but fine-tuning builds the network from it
                _count(self.config["hidden"], "its width")
            self.max_steps = _count(meta.get("max_steps", 12), "max_steps")
            self.gamma = float(meta.get("gamma", 0.9))
            self.name = str(meta.get("name", "policy"))
        except BAD_WEIGHTS as e:
            raise PolicyError(f"{where}its metadata or arrays are not a policy's ({type(e).__name__}: {e})") from None
        if self.layers is None:
            raise PolicyError(f"{where}its network ({self.arch!r}, {self.config.get('layers')!r} layers) is not one "
                              "this build can run")
        if not 0.0 <= self.gamma <= 1.0:
            raise PolicyError(f"{where}its gamma {self.gamma!r} is not a discount in [0, 1]")
        self.meta = meta
        self.path = path             # the file it was read from, if any
        self.source = source         # SHIPPED, MACHINE or "" (other weights)

    @classmethod
    def load(cls, path: Optional[str | os.PathLike] = None) -> "Policy":
        """The weights at ``path`` (None: the shipped weights, ``DEFAULT_WEIGHTS``), checked by one
        forward pass; ``PolicyError`` naming the file if they cannot drive this build's agent.
        The policy ``tune()`` follows by default is ``in_use()``, not this."""
        path = SHIPPED_WEIGHTS if path is None else os.fspath(path)
        params, meta = read_weights(path)
        return cls(params, meta, path, SHIPPED if path == SHIPPED_WEIGHTS else "").checked()

    @classmethod
    def in_use(cls) -> "Policy":
        """This machine's own policy (``looptune train``) when its file serves here, else the
        shipped one.  A machine policy file that cannot serve (corrupt, another machine's, trained
        for another action space or observation, metadata or arrays that make no policy) is named
        in one warning per process, and the shipped policy serves."""
        try:
            machine = MachineKey.current()
        except LoopTuneError:            # no C compiler to name: no machine policy either
            machine = None
        path = machine_policy_path(machine) if machine is not None else None
        if path is not None and os.path.lexists(path):
            try:                         # the whole policy is built here: whatever is wrong with the file lands below
                params, meta = read_weights(path)
                problem = machine_policy_problem(meta, machine)
                if problem is not None:
                    raise PolicyError(problem)
                return cls(params, meta, str(path), MACHINE).checked()
            except PolicyError as e:
                why = str(e).removeprefix(f"{path}: ")
            except OSError as e:
                why = e.strerror or str(e)
            except BAD_WEIGHTS as e:     # metadata odd enough to trip a check itself
                why = f"its metadata is not a policy's ({type(e).__name__}: {e})"
            environment.warn_once(f"ignoring this machine's policy {path}: {why}; using the shipped policy")
        return cls.load()

    def checked(self) -> "Policy":
        """This policy after one forward pass: arrays missing or of the wrong shape, or Q-values
        that are not finite, fail here (``PolicyError``), not mid-tune."""
        where = f"{self.path}: " if self.path else ""
        try:
            q = self.q_values([observe(AgentState.initial(), MatmulProblem(64, 64, 64), 0.0)])
        except BAD_WEIGHTS as e:
            raise PolicyError(f"{where}its arrays do not fit its configuration ({type(e).__name__}: {e})") from None
        if not np.all(np.isfinite(q)):
            raise PolicyError(f"{where}its Q-values are not finite")
        return self

    def describe(self) -> str:
        """Which policy this is, for ``looptune info`` and reports."""
        if self.source == SHIPPED:
            return f"shipped ({self.name})"
        where = "this machine's" if self.source == MACHINE else "weights"
        return f"{where} {self.path} ({self.name})" if self.path else self.name

    # ---- forward ---------------------------------------------------------------------------
    def q_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Q-values [B, actions] for a stacked batch (``observe.stack``)."""
        if self.arch == "mlp":
            return self._q_mlp(batch)
        p = self.p
        nodes, adj, eagg, mask = batch["nodes"], batch["adj"], batch["eagg"], batch["node_mask"][..., None]
        h = _relu(_lin(p, "inp", nodes)) * mask
        e = np.swapaxes(eagg, 1, 2)
        for i in range(self.layers):
            msgs = np.concatenate([adj[:, r] @ h for r in range(adj.shape[1])], axis=-1)
            h = (h + _relu(_lin(p, f"self_w.{i}", h) + _lin(p, f"rel_w.{i}", msgs) + _lin(p, f"edge_w.{i}", e))) * mask
        cur = h[np.arange(h.shape[0]), batch["cursor"]]
        mean = h.sum(1) / mask.sum(1)
        mx = h.max(1)
        z = _relu(_lin(p, "head", np.concatenate([cur, mean, mx, _relu(_lin(p, "glob", batch["glob"]))], axis=-1)))
        return self._duel(z)

    def _q_mlp(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        z = np.concatenate([batch["nodes"].reshape(batch["nodes"].shape[0], -1), batch["glob"]], axis=-1)
        for i in range(self.layers):
            z = _relu(_lin(self.p, f"body.{i}", z))
        return self._duel(z)

    def _duel(self, z: np.ndarray) -> np.ndarray:
        a = _lin(self.p, "adv", z)
        if not self.config.get("dueling", True):
            return a
        return _lin(self.p, "val", z) + a - a.mean(axis=-1, keepdims=True)

    def q_values(self, graphs: Sequence[Graph]) -> np.ndarray:
        return self.q_batch(stack(list(graphs)))

    def act(self, graph: Graph, mask: np.ndarray) -> int:
        q = self.q_values([graph])[0]
        return int(np.argmax(np.where(mask, q, -np.inf)))

    # ---- rollouts --------------------------------------------------------------------------
    def rollout(self, problem: MatmulProblem, start: Optional[Schedule] = None,
                max_steps: Optional[int] = None) -> list[AgentState]:
        """Greedy rollout without measuring: the states visited, ending where the policy stops."""
        max_steps = max_steps or self.max_steps
        state = AgentState.initial(start)
        out = [state]
        visited = {_key(state)}
        for t in range(max_steps):
            a = self.act(observe(state, problem, t / max_steps), _fresh_mask(state, problem, visited))
            if a == STOP:
                break
            state = apply(state, a, problem)
            visited.add(_key(state))
            out.append(state)
        return out

    def beam(self, problem: MatmulProblem, width: int = 4, depth: Optional[int] = None,
             start: Optional[Schedule] = None, expand: int = 3) -> list[Node]:
        """Policy-guided beam search on Q-values alone (nothing measured).

        Each beam node is expanded by its ``expand`` best legal actions.  Nodes are ranked by the
        predicted return of their whole path, ``sum_t (Q(s_t, a_t) - gamma V(s_t+1)) + Q(s_T, a_T)``
        (each step's predicted reward, then the last Q-value), so paths of different lengths
        compare fairly.  Returns the distinct final nests, best first: the candidates the tuner
        then measures.
        """
        depth = depth or self.max_steps
        gamma = self.gamma
        root = AgentState.initial(start)
        beam = [Node(root, (), 0.0, visited=frozenset([_key(root)]))]
        finished: dict[str, Node] = {}
        for t in range(depth):
            live = [n for n in beam if not n.stopped]
            if not live:
                break
            graphs = [observe(n.state, problem, t / depth) for n in live]
            q = self.q_values(graphs)
            cand: list[Node] = []
            for n, qs in zip(live, q):
                qs = np.where(_fresh_mask(n.state, problem, n.visited), qs, -np.inf)
                v = float(qs.max())
                acc = 0.0 if n.last_q is None else n.acc + n.last_q - gamma * v
                for a in np.argsort(-qs)[:expand]:
                    if not np.isfinite(qs[a]):
                        break
                    a = int(a)
                    score = acc + float(qs[a])
                    nxt = n.state if a == STOP else apply(n.state, a, problem)
                    cand.append(Node(nxt, n.actions + (a,), score, a == STOP, acc, float(qs[a]),
                                     n.visited | {_key(nxt)}))
            cand += [n for n in beam if n.stopped]
            cand.sort(key=lambda n: -n.score)
            beam, seen = [], set()
            for n in cand:
                key = (canonical_key(n.state.nest), n.state.cursor, n.stopped)
                if key not in seen:
                    seen.add(key)
                    beam.append(n)
                if len(beam) >= width:
                    break
            for n in beam:
                if n.stopped:
                    k = canonical_key(n.state.nest)
                    if k not in finished or finished[k].score < n.score:
                        finished[k] = n
        for n in beam:   # depth reached: what is left counts as finished
            k = canonical_key(n.state.nest)
            if k not in finished:
                finished[k] = n
        return sorted(finished.values(), key=lambda n: -n.score)
