"""Agent schedules replay on other shapes of their family, on awkward operands, at any thread count.

What nearest-neighbour lookup does in production: a schedule the agent found for one problem is
stored as a trace, loaded, replayed and compiled, then run on a *different* shape of the same
family (dtype, layout, threads).  Hypothesis draws the tuned problem and a sequence of legal agent
actions; the kernel of the replayed trace (and of its canonical form, built in the same batch)
runs on another shape with transposed or strided operand views and with C a strided view inside a
sentinel-filled buffer, at 1, 2 and 4 threads (4 is more than this machine's cores).  Every call
must succeed (a schedule runs on every shape of its family: no -2 refusal, whatever the strides);
results are checked against numpy with the measurement code's tolerance; the sentinels and inputs
must be untouched.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.schedule import Schedule, canonical_schedule
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.abi import OUTPUT_DTYPE
from looptune.runtime.compiler.workload import DTYPES, LAYOUTS, MatmulProblem, numpy_dtype
from looptune.tuner.agent.actions import STOP, AgentState, apply, legal_mask
from looptune.tuner.measure.protocol import default_tolerance

SENTINEL = -7777.25          # exactly representable in both dtypes
SIZE = st.integers(1, 70)


@st.composite
def agent_schedules(draw) -> tuple[MatmulProblem, Schedule]:
    """A tuned problem and the schedule a legal sequence of agent actions reaches on it."""
    problem = MatmulProblem(draw(SIZE), draw(SIZE), draw(SIZE), batch=draw(st.integers(1, 2)),
                            dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)),
                            threads=draw(st.sampled_from([1, 2])))
    state = AgentState.initial()
    for _ in range(draw(st.integers(0, 14))):
        legal = [int(a) for a in np.flatnonzero(legal_mask(state, problem)) if a != STOP]
        if not legal:
            break
        state = apply(state, draw(st.sampled_from(legal)), problem)
    return problem, state.schedule


def other_shape(draw, tuned: MatmulProblem) -> tuple[int, int, int, int]:
    """(batch, m, n, k) of a different member of the tuned problem's family."""
    sizes = (draw(st.integers(1, 3)), draw(SIZE), draw(SIZE), draw(SIZE))
    if sizes == (tuned.batch, tuned.m, tuned.n, tuned.k):
        sizes = sizes[:1] + (sizes[1] + 1,) + sizes[2:]
    return sizes


def operand(rng, shape, dtype, transposed: bool, view: str) -> np.ndarray:
    """A (batch, rows, cols) operand: stored transposed or not (the family's layout), and either
    contiguous, a slice of a padded buffer, or every other column of a wider buffer."""
    b, r, c = shape
    if transposed:
        return operand(rng, (b, c, r), dtype, False, view).transpose(0, 2, 1)
    dtype = numpy_dtype(dtype)
    if view == "padded":
        return rng.standard_normal((b, r + 3, c + 5)).astype(dtype)[:, 2:r + 2, 1:c + 1]
    if view == "stepped":
        return rng.standard_normal((b, r, 2 * c)).astype(dtype)[:, :, ::2]
    return rng.standard_normal(shape).astype(dtype)


def c_in_sentinels(shape, dtype, view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C as a strided view inside a larger sentinel-filled buffer: (buffer, C view, mask of C's cells)."""
    b, m, n = shape
    dtype = OUTPUT_DTYPE[dtype]      # bfloat16 inputs give a float32 C
    buf = np.full((b + 1, m + 4, 2 * n + 6), SENTINEL, dtype)
    owned = np.zeros(buf.shape, bool)
    pick = {"rows": np.s_[1:, 2:m + 2, 3:n + 3], "stepped": np.s_[1:, 2:m + 2, 3:2 * n + 3:2]}
    if view == "transposed":     # C[b, m, n] at buf[1 + b, 2 + n, 3 + m]: column-major inside the buffer
        buf = np.full((b + 1, n + 4, m + 6), SENTINEL, dtype)
        owned = np.zeros(buf.shape, bool)
        owned[1:, 2:n + 2, 3:m + 3] = True
        return buf, buf[1:, 2:n + 2, 3:m + 3].transpose(0, 2, 1), owned
    owned[pick[view]] = True
    return buf, buf[pick[view]], owned


def strides(x: np.ndarray) -> list[int]:
    return [s // x.itemsize for s in x.strides]


def run_and_check(kernel: Kernel, schedule: Schedule, a, b, shape, dtype, c_view, accumulate, nthreads, seed):
    batch, m, n, k = shape
    buf, c, owned = c_in_sentinels((batch, m, n), dtype, c_view)
    c[...] = np.random.default_rng(seed).standard_normal(c.shape)
    c0, a0, b0 = c.copy(), a.copy(), b.copy()
    rc = kernel.raw(batch, m, n, k, a.ctypes.data, strides(a), b.ctypes.data, strides(b),
                    c.ctypes.data, strides(c), int(accumulate), nthreads)
    what = f"{schedule.to_json()} on {shape}, nthreads={nthreads}, C {c_view}"
    assert rc == 0, (rc, what)
    ref = np.matmul(a0.astype(np.float64), b0.astype(np.float64)) + (c0 if accumulate else 0)
    rtol, atol = default_tolerance(dtype, k)
    np.testing.assert_allclose(c, ref, rtol=rtol, atol=atol, err_msg=what)
    assert (buf[~owned] == SENTINEL).all(), f"wrote outside C: {what}"
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=agent_schedules(), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_agent_schedules_replay_on_other_shapes(case, data, seed):
    tuned, schedule = case
    replayed = Schedule.from_trace(Trace.from_json(schedule.to_json()))     # stored, loaded, replayed
    assert replayed.nest == schedule.nest
    canonical = canonical_schedule(replayed.nest)
    sources = [render(s, tuned.dtype) for s in (replayed, canonical)]
    built = build_many(sources)                                             # one batch, parallel compilers
    assert all(r.ok for r in built), [r.error for r in built if not r.ok][:1]
    kernels = [Kernel(r.so_path, r.symbol, tuned.dtype) for r in built]

    shape = other_shape(data.draw, tuned)
    batch, m, n, k = shape
    rng = np.random.default_rng(seed)
    views = data.draw(st.tuples(st.sampled_from(["contiguous", "padded", "stepped"]),
                                st.sampled_from(["contiguous", "padded", "stepped"]),
                                st.sampled_from(["rows", "stepped", "transposed"])))
    a = operand(rng, (batch, m, k), tuned.dtype, tuned.layout[0] == "t", views[0])
    b = operand(rng, (batch, k, n), tuned.dtype, tuned.layout[1] == "t", views[1])
    accumulate = data.draw(st.booleans())
    for nthreads in (1, 2, 4):
        run_and_check(kernels[0], replayed, a, b, shape, tuned.dtype, views[2], accumulate, nthreads, seed)
    run_and_check(kernels[1], canonical, a, b, shape, tuned.dtype, views[2], accumulate, tuned.threads, seed)


def _tiled(mr: int, nr: int, *extra: Step) -> Trace:
    return Trace((Step.make("split", loop="m", factor=mr), Step.make("split", loop="n", factor=nr),
                  Step.make("reorder", order=["b", "m.o", "n.o", "k", "m.i", "n.i"]),
                  Step.make("register_tile", m="m.i", n="n.i"), *extra))


@pytest.mark.parametrize("trace, layout", [
    (_tiled(16, 4, Step.make("vectorize", loop="m.i")), "nn"),                         # row-major A along m
    (_tiled(16, 4, Step.make("vectorize", loop="m.i"), Step.make("parallel", loop="m.o")), "nt"),
    (_tiled(4, 16), "nt"),                                                            # column-major B along n
    (_tiled(4, 16, Step.make("parallel", loop="n.o")), "tt"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpacked_vector_operand_across_its_layout(trace, layout, dtype):
    """A schedule that loads an unpacked operand as vectors along a dimension its layout does not
    store contiguously (tuned where that dimension is below the vector width, served by nearest
    lookup to larger shapes) runs on every shape of its family instead of refusing it."""
    schedule = Schedule.from_trace(trace)
    built = build_many([render(schedule, dtype)])[0]
    assert built.ok, built.error
    kernel = Kernel(built.so_path, built.symbol, dtype)
    rng = np.random.default_rng(3)
    for batch, m, n, k in [(1, 3, 5, 7), (2, 37, 41, 29), (1, 64, 64, 65), (1, 16, 16, 1)]:
        a = operand(rng, (batch, m, k), dtype, layout[0] == "t", "contiguous")
        b = operand(rng, (batch, k, n), dtype, layout[1] == "t", "padded")
        for nthreads in (1, 2):
            run_and_check(kernel, schedule, a, b, (batch, m, n, k), dtype, "rows", True, nthreads, m)
