"""Observations: the loop nest as a graph (the LoopTune paper's), and a flat vector for MLPs.

numpy only: the tuner and the runtime build observations without torch.

Nodes are the loops (outer to inner) and three tensor nodes, A, B and C::

    b -> m.o -> n.o -> k -> m.i -> n.i          nesting edges (both directions)
          \\      |      |      |     /
           A[m,k]   B[k,n]   C[m,n]             loop-to-tensor edges, labelled with the
                                                stride (elements) the loop induces on the tensor

Loop node features: dimension, trip count and tail for the problem, block (elements per
iteration), depth, cursor, inside-micro-kernel, register-tile/vector/unroll/parallel/pack
annotations, and the bytes the loop's body touches (its footprint, which says what fits in
which cache).  Tensor nodes: operand, dtype, footprint, packed.  ``OBSERVATION_VERSION``
names this encoding; a trained policy is only valid for it.

The dtype is one feature (tensor node feature 23 and global feature 4), ``DTYPE_FEATURE``:
float32 0, float64 1 and bfloat16 0.5 (between them, like its element size, and inside the
[0, 1] range of flags, so the gym observation bounds hold).  Footprints count each tensor's own
element size (bfloat16: 2 bytes for A and B, 4 for the float32 C).  Adding bfloat16 this way left
the shapes and every float32 / float64 observation unchanged, so policies trained before stay
valid; one trained before has never seen 0.5, so on bfloat16 it extrapolates.

float16 is 0.25: a value no other dtype has, inside [0, 1], and nearest float32's 0 because a
float16 kernel is a float32 kernel (float32 panels, tile and accumulator lanes) with a rounding
store, so a policy that has not seen it extrapolates from the dtype whose schedules fit it best.
Its footprints are bfloat16's: 2 bytes for A and B, 4 for C, the float32 scratch C the nest's
loops write (``spaces.ACCUMULATOR_DTYPE``).  Adding it changed no other dtype's observation.

The graph is returned dense (``adj[r]`` row-normalized adjacency per relation, ``eagg[r]``
the mean stride label of the edges into each node), because graphs are tiny (<= 27 nodes) and
dense batched matmuls are the fastest thing on a CPU in both numpy and torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from looptune.runtime.compiler.ir import DIMS, MAX_LOOPS, TENSOR_DIMS
from looptune.runtime.compiler.workload import ITEMSIZE, MatmulProblem

from looptune.tuner.agent.actions import AgentState, sizes_of
from looptune.tuner.search.spaces import ACCUMULATOR_DTYPE

OBSERVATION_VERSION = "looptune-graph-v1"

N_NODES = MAX_LOOPS + 3
NODE_FEATURES = 26
GLOBAL_FEATURES = 8
RELATIONS = 4            # 0: parent -> child, 1: child -> parent, 2: loop -> tensor, 3: tensor -> loop
FLAT_FEATURES = N_NODES * NODE_FEATURES + GLOBAL_FEATURES
TENSORS = tuple(TENSOR_DIMS)     # A, B, C: the tensor nodes, in this order after the loop nodes
DTYPE_FEATURE = {"float32": 0.0, "float64": 1.0, "bfloat16": 0.5, "float16": 0.25}


@dataclass(frozen=True)
class Graph:
    """One observation.  Arrays are float32 except ``cursor`` (node index of the cursor loop).

    ``edges`` lists the graph sparsely as (source, target, relation, stride): the readable form;
    ``adj``/``eagg`` are the dense form the networks consume.
    """

    nodes: np.ndarray        # [N_NODES, NODE_FEATURES]
    adj: np.ndarray          # [RELATIONS, N_NODES, N_NODES], row-normalized
    eagg: np.ndarray         # [RELATIONS, N_NODES]
    node_mask: np.ndarray    # [N_NODES] 1 for real nodes
    glob: np.ndarray         # [GLOBAL_FEATURES]
    cursor: int
    edges: tuple[tuple[int, int, int, int], ...] = ()

    def flat(self) -> np.ndarray:
        """Fixed-size flat encoding for MLP baselines."""
        return np.concatenate([self.nodes.ravel(), self.glob]).astype(np.float32)


def _log2(x: float) -> float:
    return math.log2(max(1.0, float(x)))


def _element_strides(problem: MatmulProblem) -> dict[str, dict[str, int]]:
    """Element stride of each dimension in each tensor, for the problem's layout."""
    m, n, k = problem.m, problem.n, problem.k
    a = {"m": 1, "k": m} if problem.layout[0] == "t" else {"m": k, "k": 1}
    b = {"k": 1, "n": k} if problem.layout[1] == "t" else {"k": n, "n": 1}
    return {"A": {**a, "b": m * k}, "B": {**b, "b": k * n}, "C": {"m": n, "n": 1, "b": m * n}}


def observe(state: AgentState, problem: MatmulProblem, step_fraction: float = 0.0) -> Graph:
    nest = state.nest
    loops = nest.loops
    L = len(loops)
    sizes = sizes_of(problem)
    trips = nest.trip_counts(sizes)
    start = nest.kernel_start()
    unroll = dict(nest.unroll)
    packs = dict(nest.pack)
    item = problem.itemsize                              # A and B
    out_item = ITEMSIZE[ACCUMULATOR_DTYPE[problem.dtype]]     # C, as the loops write it
    dtype_feature = DTYPE_FEATURE[problem.dtype]
    x = np.zeros((N_NODES, NODE_FEATURES), dtype=np.float32)
    span = dict(sizes)
    for i, l in enumerate(loops):
        f = x[i]
        f[DIMS.index(l.dim)] = 1.0
        f[4] = _log2(trips[i][0]) / 8
        f[5] = _log2(l.block) / 8
        f[6] = float(trips[i][1])
        f[7] = i / MAX_LOOPS
        f[8] = float(i == state.cursor)
        f[9] = float(i >= start)
        if nest.tile:
            f[10] = float(l.name == nest.tile[0])
            f[11] = float(l.name == nest.tile[1])
            f[12] = float(l.name == nest.vector)
        f[13] = _log2(unroll.get(l.name, 1)) / 3
        f[14] = float(nest.parallel == l.name)
        f[15] = float(packs.get("A") == l.name)
        f[16] = float(packs.get("B") == l.name)
        f[17] = float(l.extent is not None)
        f[18] = 1.0
        span[l.dim] = min(span[l.dim], l.block)     # one iteration of loop i covers `block` of its dim
        inputs = span["m"] * span["k"] + span["k"] * span["n"]
        touched = span["b"] * (inputs * item + span["m"] * span["n"] * out_item)
        f[24] = _log2(touched) / 24
    strides = _element_strides(problem)
    for t, name in enumerate(TENSORS):
        f = x[MAX_LOOPS + t]
        f[19] = 1.0
        f[20 + t] = 1.0
        f[23] = dtype_feature
        d = TENSOR_DIMS[name]
        f[24] = _log2(np.prod([sizes[q] for q in d]) * (out_item if name == "C" else item)) / 24
        f[25] = float(name in packs)
    edges = []
    for i in range(1, L):
        edges.append((i - 1, i, 0, 0))
        edges.append((i, i - 1, 1, 0))
    for i, l in enumerate(loops):
        for t, name in enumerate(TENSORS):
            if l.dim in TENSOR_DIMS[name]:
                stride = l.block * strides[name][l.dim]
                edges.append((i, MAX_LOOPS + t, 2, stride))
                edges.append((MAX_LOOPS + t, i, 3, stride))
    adj = np.zeros((RELATIONS, N_NODES, N_NODES), dtype=np.float32)
    eagg = np.zeros((RELATIONS, N_NODES), dtype=np.float32)
    for src, dst, rel, stride in edges:
        adj[rel, dst, src] = 1.0
        eagg[rel, dst] += _log2(stride) / 24
    deg = adj.sum(axis=2)
    nz = deg > 0
    adj[nz] /= deg[nz][:, None]
    eagg[nz] /= deg[nz]
    node_mask = np.zeros(N_NODES, dtype=np.float32)
    node_mask[:L] = 1.0
    node_mask[MAX_LOOPS:] = 1.0
    glob = np.array([_log2(problem.m) / 12, _log2(problem.n) / 12, _log2(problem.k) / 12, _log2(problem.batch) / 12,
                     dtype_feature, _log2(problem.threads) / 4, step_fraction,
                     float(nest.tile is not None)], dtype=np.float32)
    return Graph(x, adj, eagg, node_mask, glob, state.cursor, tuple(edges))


def stack(graphs: list[Graph]) -> dict[str, np.ndarray]:
    """Batch observations for the networks (numpy arrays; torch wraps them without copying)."""
    return {
        "nodes": np.stack([g.nodes for g in graphs]),
        "adj": np.stack([g.adj for g in graphs]),
        "eagg": np.stack([g.eagg for g in graphs]),
        "node_mask": np.stack([g.node_mask for g in graphs]),
        "glob": np.stack([g.glob for g in graphs]),
        "cursor": np.array([g.cursor for g in graphs], dtype=np.int64),
    }
