"""Differential tests: generated kernels against numpy over random shapes, schedules, dtypes and views."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.workload import MatmulProblem
from schedules import random_schedules

DTYPES = ("float32", "float64")
N_SCHEDULES = 24


@pytest.fixture(scope="module")
def kernels():
    """Random legal schedules (plus the analytic defaults), built once for both dtypes in one batch."""
    schedules = random_schedules(N_SCHEDULES, seed=7)
    schedules += [default_schedule(MatmulProblem(200, 200, 200)), default_schedule(MatmulProblem(97, 300, 50, threads=2))]
    # narrow products' forms (``defaults.narrow_params``: nothing packed, long k blocks, tall tiles)
    schedules += [default_schedule(MatmulProblem(3000, 16, 40)), default_schedule(MatmulProblem(16, 16, 5000)),
                  default_schedule(MatmulProblem(600, 24, 20, threads=2)), default_schedule(MatmulProblem(9, 32, 70, layout="nt"))]
    sources = [(s, dt, render(s, dt)) for s in schedules for dt in DTYPES]
    built = build_many([src for _, _, src in sources])
    failed = [(s.to_json(), r.error) for (s, _, _), r in zip(sources, built) if not r.ok]
    assert not failed, failed[:2]
    return [(s, dt, Kernel(r.so_path, r.symbol, dt)) for (s, dt, _), r in zip(sources, built)]


SIZE = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 32, 33, 64, 97]), st.integers(1, 150))


def operand(rng, shape, dtype, view):
    """A (batch, r, c) operand as a contiguous array, a transposed view, or a strided slice."""
    b, r, c = shape
    if view == "t":
        return rng.standard_normal((b, c, r)).astype(dtype).transpose(0, 2, 1)
    if view == "slice":
        return rng.standard_normal((b, r + 3, 2 * c)).astype(dtype)[:, 1:r + 1, ::2]
    if view == "neg":
        return rng.standard_normal((b, r, c)).astype(dtype)[:, ::-1, :]
    return rng.standard_normal(shape).astype(dtype)


def tolerance(dtype, k):
    eps = np.finfo(dtype).eps
    return eps * 8 * np.sqrt(k) + eps * k * 0.5


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), m=SIZE, n=SIZE, k=SIZE, batch=st.sampled_from([1, 1, 2, 3]),
       views=st.tuples(*[st.sampled_from(["c", "c", "t", "slice", "neg"])] * 3),
       accumulate=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_kernels_match_numpy(kernels, data, m, n, k, batch, views, accumulate, threads, seed):
    sched, dtype, kernel = data.draw(st.sampled_from(kernels))
    rng = np.random.default_rng(seed)
    a = operand(rng, (batch, m, k), dtype, views[0])
    b = operand(rng, (batch, k, n), dtype, views[1])
    c = operand(rng, (batch, m, n), dtype, views[2] if views[2] != "slice" else "c")
    c0 = c.copy()
    a0, b0 = a.copy(), b.copy()
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64)) + (c0 if accumulate else 0)
    rc = kernel.raw(batch, m, n, k, a.ctypes.data, [s // a.itemsize for s in a.strides],
                    b.ctypes.data, [s // b.itemsize for s in b.strides],
                    c.ctypes.data, [s // c.itemsize for s in c.strides], int(accumulate), threads)
    assert rc == 0, (rc, sched.to_json())     # any strides, whatever the schedule vectorizes
    scale = np.abs(a).max() * np.abs(b).max() if a.size and b.size else 1
    np.testing.assert_allclose(c, ref, rtol=0, atol=tolerance(dtype, k) * scale * 4 + tolerance(dtype, k),
                               err_msg=sched.to_json())
    np.testing.assert_array_equal(a, a0)      # inputs are never modified
    np.testing.assert_array_equal(b, b0)


def test_nan_and_inf_propagate_like_numpy(kernels):
    for sched, dtype, kernel in kernels[:8]:
        a = np.ones((1, 5, 7), dtype)
        b = np.ones((1, 7, 9), dtype)
        a[0, 1, 2], b[0, 3, 4] = np.nan, np.inf
        c = np.full((1, 5, 9), 7.0, dtype)
        kernel(a, b, c)
        np.testing.assert_array_equal(np.isnan(c), np.isnan(a @ b), err_msg=sched.to_json())
        np.testing.assert_array_equal(np.isinf(c), np.isinf(a @ b), err_msg=sched.to_json())


def test_zero_sized_problems(kernels):
    for _, dtype, kernel in kernels[:4]:
        c = np.full((2, 3, 4), 5.0, dtype)
        kernel(np.ones((2, 3, 0), dtype), np.ones((2, 0, 4), dtype), c)
        assert (c == 0).all()
        kernel(np.ones((2, 3, 0), dtype), np.ones((2, 0, 4), dtype), c, accumulate=True)
        assert (c == 0).all()
