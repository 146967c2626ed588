"""Action masks agree with legality on random states; canonical traces replay to the same nest."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from looptune.runtime.compiler.ir import ScheduleError
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.machine import CpuInfo
from looptune.tuner.agent.actions import (ACTION_INDEX, ACTION_NAMES, ACTIONS, NUM_ACTIONS, STOP, TILE_SHAPES, AgentState,
                                          apply, legal_mask, neighbors, tile_size)
from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
from looptune.tuner.agent.observe import N_NODES, observe

problems = st.builds(MatmulProblem, st.integers(1, 300), st.integers(1, 300), st.integers(1, 300),
                     batch=st.integers(1, 3), dtype=st.sampled_from(["float32", "float64"]),
                     layout=st.sampled_from(["nn", "tn", "nt", "tt"]), threads=st.sampled_from([1, 2]))


def random_state(problem: MatmulProblem, rng: random.Random, steps: int) -> AgentState:
    s = AgentState.initial()
    for _ in range(steps):
        legal = [a for a in np.flatnonzero(legal_mask(s, problem)) if a != STOP]
        if not legal:
            break
        s = apply(s, int(rng.choice(legal)), problem)
    return s


def test_action_list_is_named_and_closed():
    assert len(set(ACTION_NAMES)) == NUM_ACTIONS
    assert {"up", "down", "swap_up", "swap_down", "stop", "pack_A", "pack_B", "vec_m", "parallel"} <= set(ACTION_NAMES)
    assert sum(a.kind == "split" for a in ACTIONS) > 3     # wider than the paper's 4, 8, 16


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems, seed=st.integers(0, 2**31), steps=st.integers(0, 14))
def test_mask_matches_legality(problem, seed, steps):
    rng = random.Random(seed)
    s = random_state(problem, rng, steps)
    mask = legal_mask(s, problem)
    assert mask[STOP]
    for a in range(NUM_ACTIONS):
        if mask[a]:
            nxt = apply(s, a, problem)                      # every unmasked action is legal ...
            nxt.nest.check()
            assert 0 <= nxt.cursor < len(nxt.nest.loops)
            # ... and yields a replayable trace whose canonical form is the same nest
            assert Schedule.from_trace(nxt.schedule.trace).nest == nxt.nest
            assert canonical_schedule(nxt.nest).nest == nxt.nest
        else:
            try:                                            # every masked one is illegal
                apply(s, a, problem)
            except ScheduleError:
                pass
            else:
                raise AssertionError(f"{ACTION_NAMES[a]} is masked but applies")


@settings(max_examples=25, deadline=None)
@given(problem=problems, seed=st.integers(0, 2**31), steps=st.integers(0, 10))
def test_observation_shapes_and_neighbors(problem, seed, steps):
    s = random_state(problem, random.Random(seed), steps)
    g = observe(s, problem)
    L = len(s.nest.loops)
    assert g.nodes.shape[0] == N_NODES and g.node_mask.sum() == L + 3
    assert g.nodes[s.cursor, 8] == 1.0 and np.isfinite(g.nodes).all() and np.isfinite(g.adj).all()
    assert g.flat().ndim == 1
    keys = {canonical_key(n.nest) for _, _, n in neighbors(s, problem)}
    assert canonical_key(s.nest) not in keys             # every legal edit changes the nest


def _cpu(*features: str) -> CpuInfo:
    return CpuInfo("x86_64", "test CPU", tuple(sorted(features)), 2, 48 << 10, 2 << 20, 32 << 20)


def test_tiles_are_in_the_cpus_own_vector_units(monkeypatch):
    """One action is the same share of the register file on AVX2 and AVX-512: 12 rows of 2 vectors
    is 12x32 float32 on AVX-512 and 12x16 on AVX2 (where it would not fit: 24 accumulators + 3 >
    16 registers); float64 counts its own lanes; a tile that does not fit is an error."""
    monkeypatch.delenv("LOOPTUNE_ISA", raising=False)      # the CI's AVX2 rerun caps every CpuInfo
    avx512, avx2 = _cpu("avx", "avx2", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma"), _cpu("avx", "avx2", "fma")
    f32, f64 = MatmulProblem(64, 64, 64), MatmulProblem(64, 64, 64, dtype="float64")
    assert tile_size(12, 2, f32, avx512) == (12, 32) and tile_size(12, 2, f64, avx512) == (12, 16)
    assert tile_size(6, 2, f32, avx2) == (6, 16) and tile_size(14, 1, f32, avx2) == (14, 8)
    for rows, vectors in [(12, 2), (8, 2)]:
        with pytest.raises(ScheduleError, match="vector registers"):
            tile_size(rows, vectors, f32, avx2)
    assert all(tile_size(r, v, f32, avx512) for r, v in TILE_SHAPES)     # every tile fits AVX-512


def test_tile_macro_and_cursor_semantics():
    p = MatmulProblem(128, 128, 128)
    s = AgentState.initial()
    assert s.nest.names[s.cursor] == "m"
    s = apply(s, ACTION_INDEX["tile_8x1v"], p)
    assert s.nest.tile == ("m.i", "n.i") and s.nest.names[-2:] == ("m.i", "n.i")
    assert s.nest.names[s.cursor] == "m.o"                  # the cursor follows its loop
    s = apply(s, ACTION_INDEX["swap_down"], p)
    assert s.nest.names[:3] == ("b", "n.o", "m.o") and s.nest.names[s.cursor] == "m.o"
    assert not legal_mask(s, p)[ACTION_INDEX["tile_8x1v"]]   # one register tile per nest
    assert not legal_mask(s, p)[ACTION_INDEX["parallel"]]    # single-threaded problem
    # split factors at least the trip count are masked (one outer iteration)
    assert not legal_mask(AgentState.initial(), MatmulProblem(16, 16, 16))[ACTION_INDEX["split_16"]]
