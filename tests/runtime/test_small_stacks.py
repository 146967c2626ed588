"""Stacks of small matrices (``defaults.small_stack_schedule``): the schedule's form, golden C of
its kernel (exact matrix sizes for any batch, the batch loop parallel in chunks), the kernel
against numpy on every stack height, layout and thread count, its refusal of other matrix sizes,
and how the runtime serves such stacks (one kernel for every height, never a record tuned for
other sizes)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pathlib import Path

from looptune import runtime
from looptune.runtime.api import current_resolver
from looptune.runtime.compiler import codegen_quads as quads
from looptune.runtime.compiler.build import build
from looptune.runtime.compiler.codegen import FixedSizes, Target, render
from looptune.runtime.compiler.defaults import SMALL_MATRIX, default_schedule, small_stack_schedule
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.workload import MatmulProblem

pytestmark = pytest.mark.target      # the tiles follow the target's vector width

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_NAME = "small_stack_8x8x8_float32_avx2_parallel"


def test_small_stacks_get_their_own_form():
    p = MatmulProblem(8, 8, 8, batch=100)
    s = small_stack_schedule(p)
    assert s is not None and default_schedule(p) == s
    assert not s.nest.pack                                      # operands read in place
    assert s.nest.tile_sizes[1] == 8                            # whole rows (one tile for all of it but on portable C)
    assert [l.name for l in s.nest.loops][0] == "b"
    assert Schedule.from_json(s.to_json()) == s                 # a trace like any other
    threaded = small_stack_schedule(MatmulProblem(8, 8, 8, batch=100, threads=4))
    assert threaded.nest.parallel == "b"
    # not stacks, big matrices, rows that are not whole vectors, bfloat16: the usual default
    for other in (MatmulProblem(8, 8, 8), MatmulProblem(SMALL_MATRIX + 1, 8, 8, batch=9),
                  MatmulProblem(8, 5, 8, batch=9), MatmulProblem(8, 8, 8, batch=9, dtype="bfloat16")):
        assert small_stack_schedule(other) is None


def test_small_stack_c_matches_golden(update_golden):
    # the form small_stack_schedule gives on AVX2 (an 8x8 tile of 8-lane vectors), written out so
    # that the golden file does not depend on the CPU or LOOPTUNE_ISA the suite runs under
    sched = (Schedule.initial().step("split", loop="m", factor=8).step("split", loop="n", factor=8)
             .step("split", loop="k", factor=8).step("reorder", order=["b", "n.o", "k.o", "m.o", "k.i", "m.i", "n.i"])
             .step("register_tile", m="m.i", n="n.i").step("unroll", loop="k.i", factor=8)
             .step("parallel", loop="b"))
    text = render(sched, "float32", Target("avx2", 32), symbol=f"golden_{GOLDEN_NAME}",
                  sizes=FixedSizes(None, 8, 8, 8)).text
    path = GOLDEN / f"{GOLDEN_NAME}.c"
    if update_golden:
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: generate it with --update-golden and review it"
    assert text == path.read_text(), f"generated C for {GOLDEN_NAME} changed; review and rerun with --update-golden"
    assert "if (M != 8 || N != 8 || K != 8) return -2;" in text           # any batch
    assert "lt_pool_for(nthreads, ctx.lt_chunks," in text                # the stack in chunks


@pytest.fixture(scope="module")
def stack_kernel():
    p = MatmulProblem(4, 8, 4, batch=2, threads=2)
    source = render(small_stack_schedule(p), "float32", sizes=FixedSizes.of_matrices(p))
    result = build(source)
    assert result.ok, result.error
    return Kernel(result.so_path, result.symbol, "float32")


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 8, 9, 1000, 4097])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_one_kernel_serves_every_stack_height(stack_kernel, batch, threads):
    """Heights below, at and above threads x chunks, uneven divisions, more threads than cores."""
    rng = np.random.default_rng(batch * 10 + threads)
    a = rng.standard_normal((batch, 4, 4), dtype=np.float32)
    b = rng.standard_normal((batch, 4, 8), dtype=np.float32)
    c = np.full((batch, 4, 8), np.nan, np.float32)
    assert stack_kernel.invoke(a, b, c, 0, threads) == 0
    np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
    assert stack_kernel.invoke(a, b[0], c, 1, threads) == 0              # a broadcast B, accumulating
    np.testing.assert_allclose(c, a @ b + a @ b[0], rtol=1e-5, atol=1e-5)


def test_the_kernel_refuses_other_matrix_sizes(stack_kernel):
    for shape_a, shape_b in (((3, 5, 4), (3, 4, 8)), ((3, 4, 4), (3, 4, 12)), ((3, 4, 5), (3, 5, 8))):
        a, b = np.ones(shape_a, np.float32), np.ones(shape_b, np.float32)
        c = np.full((3, shape_a[1], shape_b[2]), 7.0, np.float32)
        assert stack_kernel.invoke(a, b, c, 0, 1) == -2
        assert np.all(c == 7.0)


@pytest.fixture
def kernels_only():
    before = runtime.settings()
    runtime.configure(numpy_handoff=False, small_flops=0)
    yield
    runtime.configure(numpy_handoff=before.numpy_handoff, small_flops=before.small_flops)


def _view(x: np.ndarray, how: str) -> np.ndarray:
    if how == "T":          # the same values, transposed in memory
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if how == "step":
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.integers(2, 300), m=st.integers(1, SMALL_MATRIX), n=st.sampled_from([4, 8, 12, 16, 24, 32, 2, 6]),
       k=st.integers(1, SMALL_MATRIX), dtype=st.sampled_from(["float32", "float64"]),
       how_a=st.sampled_from(["C", "T", "step"]), how_b=st.sampled_from(["C", "T", "bcast"]),
       threads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99))
def test_runtime_stacks_match_numpy(kernels_only, batch, m, n, k, dtype, how_a, how_b, threads, seed):
    rng = np.random.default_rng(seed)
    a = _view(rng.standard_normal((batch, m, k)).astype(dtype), how_a)
    b = rng.standard_normal((k, n)).astype(dtype) if how_b == "bcast" else \
        _view(rng.standard_normal((batch, k, n)).astype(dtype), how_b)
    got = runtime.matmul(a, b, threads=threads)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=tol, atol=tol * k)


def test_stacks_share_one_kernel_and_skip_other_records(kernels_only):
    """Every height of a stack runs the one batch-free kernel; the resolution says so."""
    a1, b1 = np.ones((10, 8, 8), np.float32), np.ones((10, 8, 8), np.float32)
    a2, b2 = np.ones((777, 8, 8), np.float32), np.ones((777, 8, 8), np.float32)
    runtime.matmul(a1, b1, threads=1)
    runtime.matmul(a2, b2, threads=1)
    r1, r2 = runtime.explain(a1, b1, threads=1), runtime.explain(a2, b2, threads=1)
    assert r1.source == r2.source == "default"
    assert r1.schedule == r2.schedule == small_stack_schedule(r1.problem)
    assert "for any batch" in r1.describe()
    resolver = current_resolver()
    k1 = resolver.dispatch[("float32", 8, 8, 8, 10, "nn", 1)][0]
    k2 = resolver.dispatch[("float32", 8, 8, 8, 777, "nn", 1)][0]
    assert k1 is k2


@pytest.fixture(scope="module", params=[("float32", 1), ("float64", 1), ("float32", 3), ("float64", 2)])
def kernel_4x4x4(request):
    dtype, threads = request.param          # threads > 1: the schedule's batch loop is parallel
    p = MatmulProblem(4, 4, 4, batch=2, dtype=dtype, threads=threads)
    source = render(small_stack_schedule(p), dtype, sizes=FixedSizes.of_matrices(p))
    target = Target.detect()
    ctype = "float" if dtype == "float32" else "double"
    # a target whose registers hold whole rows computes the product in them (codegen_quads)
    assert ("the whole product in registers" in source.text) == (quads.form(ctype, target.vector_bytes) is not None)
    result = build(source)
    assert result.ok, result.error
    return Kernel(result.so_path, result.symbol, dtype), dtype, threads


def _padded(x: np.ndarray, axis: int) -> np.ndarray:
    """``x``'s values in a view whose ``axis`` has twice the stride."""
    shape = list(x.shape)
    shape[axis] *= 2
    wide = np.zeros(shape, x.dtype)
    index = [slice(None)] * x.ndim
    index[axis] = slice(None, None, 2)
    wide[tuple(index)] = x
    return wide[tuple(index)]


_LAYOUTS = ["C", "rows apart", "T", "every other", "bcast"]


@pytest.mark.parametrize("layout_a,layout_b", [(x, y) for x in _LAYOUTS for y in _LAYOUTS if (x, y) != ("bcast", "bcast")])
@pytest.mark.parametrize("layout_c", ["C", "rows apart", "every other"])
def test_4x4x4_products_in_one_register_match_numpy(kernel_4x4x4, layout_a, layout_b, layout_c):
    """The whole-register form (unit strides along k of A and n of B and C; rows anywhere), the
    dense stack's own loop (rows 4 apart, any batch stride, over chunks of the batch on threads)
    and the tile loop they fall back to, overwriting and accumulating, on more threads than cores."""
    kernel, dtype, threads = kernel_4x4x4
    rng = np.random.default_rng(len(layout_a) * 7 + len(layout_b) * 3 + len(layout_c))
    batch = 37
    a = rng.standard_normal((4, 4) if layout_a == "bcast" else (batch, 4, 4)).astype(dtype)
    b = rng.standard_normal((4, 4) if layout_b == "bcast" else (batch, 4, 4)).astype(dtype)
    views = {"C": lambda x: x, "rows apart": lambda x: _padded(x, -2), "every other": lambda x: _padded(x, 0),
             "T": lambda x: np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2), "bcast": lambda x: x}
    a, b = views[layout_a](a), views[layout_b](b)
    c = views[layout_c](np.full((batch, 4, 4), np.nan, dtype))
    tol = 1e-5 if dtype == "float32" else 1e-13
    assert kernel.invoke(a, b, c, 0, 1) == 0
    np.testing.assert_allclose(c, a @ b, rtol=tol, atol=tol)
    assert kernel.invoke(a, b, c, 1, threads + 1) == 0
    np.testing.assert_allclose(c, 2 * (a @ b), rtol=tol, atol=tol)
    assert kernel.invoke(a, b, c, 0, threads) == 0
    np.testing.assert_allclose(c, a @ b, rtol=tol, atol=tol)
