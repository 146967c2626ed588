"""runtime.matmul against numpy.matmul: values, shapes, dtypes, exception types, views, out=, threads."""
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from looptune import runtime
from looptune.runtime.compiler import trampoline


@pytest.fixture(autouse=True, scope="module")
def _no_databases():
    runtime.configure(user_db=None, embedded_db=None, fallback="nearest")
    yield


def error_bound(result_dtype, a, b) -> np.ndarray | float:
    """Largest |computed - exact| an element of ``matmul(a, b)`` may show, derived from how it is
    computed rather than scaled up until anything passes.

    A dot product of k terms summed in a working precision with unit roundoff u is within
    gamma_k * (|a| @ |b|) of the exact value, gamma_k = k u / (1 - k u) (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1), whatever the order or blocking and with or without
    FMA.  The working precision is the result's, but never below float32: numpy computes a float16
    matmul in float32 and rounds the sum once, so a float16 result is also up to half an ulp of
    float16 from the float32 sum.  The float64 reference the result is compared with carries the
    same gamma_k error when the working precision is float64, hence 2 gamma_k; complex products add
    a few roundings per term (k + 2).  Integers and booleans are exact."""
    result_dtype = np.dtype(result_dtype)
    if result_dtype.kind not in "fc":
        return 0.0
    k = a.shape[-1]
    real = np.empty(0, result_dtype).real.dtype                  # complex64 -> float32
    u = np.finfo(np.promote_types(real, np.float32)).eps / 2     # unit roundoff of the accumulation
    terms = k + 2 if result_dtype.kind == "c" else k
    gamma = terms * u / (1 - terms * u)
    magnitude = np.matmul(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64))
    return 2 * gamma * magnitude


def reference(a, b):
    """matmul(a, b) computed in float64 (complex128) from the very same input values."""
    wide = np.complex128 if np.result_type(a, b).kind == "c" else np.float64
    return np.matmul(np.asarray(a).astype(wide), np.asarray(b).astype(wide))


def check_same(got, want, a, b):
    """``got`` (runtime.matmul(a, b)) is what numpy's ``want`` is: the same type, shape and dtype,
    and values within ``error_bound`` of the float64 product plus one ulp of the result's dtype
    (its rounding).  numpy's own answer is held to the same bound, which checks the bound."""
    assert type(got) is type(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    if not got.size:
        return
    if want.dtype.kind not in "fc":
        np.testing.assert_array_equal(got, want)
        return
    ref = reference(a, b)
    real = np.asarray(want).real.dtype
    ulp = np.spacing(np.abs(ref).astype(real)).astype(np.float64)   # one ulp of the result type at |ref|
    if want.dtype.kind == "c":
        ulp = ulp * np.sqrt(2)
    bound = error_bound(want.dtype, a, b) + ulp
    bound = np.broadcast_to(bound, ref.shape)
    for name, value in (("numpy", want), ("looptune", got)):
        err = np.abs(np.asarray(value).astype(ref.dtype) - ref)
        if not np.all(err <= bound):
            i = tuple(int(x) for x in np.unravel_index(np.argmax(err - bound), ref.shape))
            raise AssertionError(f"{name} is {err[i]:.3g} from the float64 product at {i}, bound {bound[i]:.3g} "
                                 f"({want.dtype}, k={a.shape[-1]}: {np.asarray(value)[i]!r} vs {ref[i]!r})")


DIM = st.one_of(st.integers(0, 3), st.integers(1, 300))
DTYPES = st.sampled_from(["float32", "float64", "float32", "int32", "int64", "float16", "complex64", "bool"])


def make(rng, shape, dtype, view):
    if view == "t" and len(shape) >= 2:
        x = rng.standard_normal(shape[:-2] + (shape[-1], shape[-2])) * 3
        x = np.swapaxes(x, -1, -2)
    elif view == "slice" and len(shape) >= 1:
        x = (rng.standard_normal(shape[:-1] + (shape[-1] * 2,)) * 3)[..., ::2]
    else:
        x = rng.standard_normal(shape) * 3
    return x.astype(dtype)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=DIM, n=DIM, k=DIM, batch_a=st.sampled_from([(), (), (1,), (3,), (2, 1), (2, 3)]),
       batch_b=st.sampled_from([(), (), (3,), (1, 3), (2, 3)]), ndim=st.sampled_from(["22", "22", "12", "21", "11"]),
       dta=DTYPES, dtb=DTYPES, views=st.tuples(st.sampled_from("cts"), st.sampled_from("cts")),
       seed=st.integers(0, 1000))
def test_matches_numpy_matmul(m, n, k, batch_a, batch_b, ndim, dta, dtb, views, seed):
    m, n, k = m % 120, n % 120, k % 120      # keep single examples cheap; big sizes have their own test
    rng = np.random.default_rng(seed)
    sa = (k,) if ndim[0] == "1" else batch_a + (m, k)
    sb = (k,) if ndim[1] == "1" else batch_b + (k, n)
    vmap = {"c": "c", "t": "t", "s": "slice"}
    a, b = make(rng, sa, dta, vmap[views[0]]), make(rng, sb, dtb, vmap[views[1]])
    a0, b0 = a.copy(), b.copy()
    try:
        want = np.matmul(a, b)
    except Exception as e:
        with pytest.raises(type(e)):
            runtime.matmul(a, b)
        return
    got = runtime.matmul(a, b)
    check_same(got, want, a, b)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("m,n,k", [(0, 5, 3), (5, 0, 3), (5, 3, 0), (1, 1, 1), (300, 300, 300), (257, 1, 299)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edges_and_large(m, n, k, dtype):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    check_same(runtime.matmul(a, b), np.matmul(a, b), a, b)


@pytest.mark.parametrize("a,b", [
    (np.float32(3.0), np.ones((2, 2), np.float32)),
    (np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)),
    (np.ones((2, 2, 3)), np.ones((3, 3, 2))),
    (np.ones(3), np.ones(4)),
    ("ab", np.ones(2)),
])
def test_errors_are_numpys(a, b):
    with pytest.raises(Exception) as want:
        np.matmul(a, b)
    with pytest.raises(type(want.value)):
        runtime.matmul(a, b)


def test_out_argument():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 30, 20)).astype(np.float32), rng.standard_normal((20, 10)).astype(np.float32)
    out = np.empty((4, 30, 10), np.float32)
    r = runtime.matmul(a, b, out=out)
    assert r is out
    check_same(out, np.matmul(a, b), a, b)
    # out overlapping an input: numpy gives the product of the old values
    x = rng.standard_normal((16, 16))
    x0 = x.copy()
    want = np.matmul(x, x)
    runtime.matmul(x, x, out=x)
    check_same(x, want, x0, x0)
    # a non-contiguous out
    big = np.zeros((30, 20), np.float32)
    view = big[:, ::2]
    runtime.matmul(a[0], b, out=view)
    check_same(view, a[0] @ b, a[0], b)
    with pytest.raises(ValueError):
        runtime.matmul(a, b, out=np.empty((4, 30, 11), np.float32))
    ro = np.empty((30, 10), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        runtime.matmul(a[0], b, out=ro)


def test_nan_inf_propagate():
    a = np.ones((8, 8), np.float32)
    b = np.ones((8, 8), np.float32)
    a[1, 2], b[3, 4] = np.nan, np.inf
    got, want = runtime.matmul(a, b), np.matmul(a, b)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


def test_threads_argument():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((200, 300)), rng.standard_normal((300, 150))
    check_same(runtime.matmul(a, b, threads=2), a @ b, a, b)
    with pytest.raises(ValueError):
        runtime.matmul(a, b, threads=0)


def test_concurrent_cold_calls_from_16_threads():
    runtime.configure()      # drop the in-memory caches: every key below is cold
    rng = np.random.default_rng(3)
    shapes = [(37 + i, 41 + 2 * i, 29 + 3 * i) for i in range(4)]
    inputs = [(rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32))
              for m, n, k in shapes]
    errors, barrier = [], threading.Barrier(16)

    def worker(i):
        a, b = inputs[i % len(inputs)]
        barrier.wait()
        try:
            for _ in range(5):
                check_same(runtime.matmul(a, b), a @ b, a, b)
        except Exception as e:      # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors, errors[:3]


def test_safe_after_fork():
    code = """
import os, numpy as np
from looptune import runtime
runtime.configure(user_db=None, embedded_db=None)
a = np.ones((20, 30), np.float32); b = np.ones((30, 10), np.float32)
runtime.matmul(a, b)
pid = os.fork()
if pid == 0:
    ok = np.allclose(runtime.matmul(a, b), 30) and np.allclose(runtime.matmul(a[:, :7], b[:7]), 7)
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.WEXITSTATUS(status))
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_import_is_light():
    code = "import sys, looptune.runtime; bad = [m for m in ('torch', 'sklearn', 'h5py') if m in sys.modules]; print(bad); raise SystemExit(bool(bad))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_misaligned_buffers():
    """Arrays whose data is not aligned to the element size (numpy allows them) still work."""
    def misaligned(shape):
        raw = np.zeros(int(np.prod(shape)) * 4 + 1, np.uint8)[1:]
        return raw.view(np.float32).reshape(shape)
    a, b, out = misaligned((9, 7)), misaligned((7, 5)), misaligned((9, 5))
    a[:] = np.arange(63).reshape(9, 7)
    b[:] = 1
    assert not a.flags.aligned
    check_same(runtime.matmul(a, b), np.matmul(a, b), a, b)
    runtime.matmul(a, b, out=out)
    check_same(out, np.matmul(a, b), a, b)


def test_stored_schedule_that_fails_to_build_falls_back_to_the_default(monkeypatch):
    from looptune.runtime import api
    from looptune.runtime.compiler.build import BuildError
    from looptune.runtime.resolve import Resolution

    runtime.configure(numpy_handoff=False)     # no trial against numpy: the kernel serves from the first call
    resolver = api._get_resolver()
    real_kernel = resolver.kernel
    real_resolve = resolver.resolve

    def resolve(problem):        # pretend a database record matched exactly
        return Resolution(problem, "exact", real_resolve(problem).schedule.step("unroll", loop="b", factor=2))

    def kernel(schedule, dtype, **more):     # more: the exact-size kernel's sizes
        if any(step.op == "unroll" and step["loop"] == "b" for step in schedule.trace):
            raise BuildError("compiler says no")
        return real_kernel(schedule, dtype, **more)

    monkeypatch.setattr(resolver, "resolve", resolve)
    monkeypatch.setattr(resolver, "kernel", kernel)
    a, b = np.ones((23, 17), np.float32), np.ones((17, 9), np.float32)
    check_same(runtime.matmul(a, b), a @ b, a, b)
    assert runtime.explain(a, b).source == "default"


@pytest.mark.parametrize("case", ["2d", "transposed", "1d_2d", "2d_1d", "stack", "stack_2d", "deep", "deep_2d", "mixed",
                                  "int_float", "step"])
def test_explain_names_the_problem_matmul_runs(case):
    """explain(a, b) resolves the very dispatch key matmul(a, b) serves (promotion, layouts, batch)."""
    from looptune.runtime import api
    rng = np.random.default_rng(4)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    a, b = {"2d": (f32(9, 7), f32(7, 5)), "transposed": (f32(7, 9).T, f32(5, 7).T), "1d_2d": (f32(7), f32(7, 5)),
            "2d_1d": (f32(9, 7), f32(7)), "stack": (f32(3, 9, 7), f32(3, 7, 5)), "stack_2d": (f32(3, 9, 7), f32(7, 5)),
            "deep": (f32(2, 3, 9, 7), f32(3, 7, 5)), "deep_2d": (f32(2, 3, 9, 7), f32(7, 5)),
            "mixed": (f32(9, 7), rng.standard_normal((7, 5))), "int_float": (np.arange(63).reshape(9, 7), f32(7, 5)),
            "step": (f32(9, 14)[:, ::2], f32(7, 5))}[case]
    runtime.configure(numpy_handoff=False)     # no trial against numpy: the kernel serves from the first call
    for _ in range(2):          # cold, then warm (the compiled path where there is one)
        check_same(runtime.matmul(a, b), np.matmul(a, b), a, b)
    p = runtime.explain(a, b).problem
    resolver = api.current_resolver()
    assert list(resolver.dispatch) == [(p.dtype, p.m, p.n, p.k, p.batch, p.layout, p.threads)]
    module = trampoline.load()
    if module is not None and case != "deep":     # a partly broadcast batch takes the Python path
        got = module.serve(a, b, None, resolver.dispatch, 1, resolver.settings.small_flops)
        assert got is not None
        check_same(got, np.matmul(a, b), a, b)


def test_planned_paths_check_threads_and_out():
    a, b = np.ones((3, 4, 5), np.float32), np.ones((5, 2), np.float32)
    with pytest.raises(ValueError):
        runtime.matmul(a, b, threads=0)
    out = np.empty((3, 4, 2), np.float32)
    assert runtime.matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, 5)
    wrong = np.empty((3, 4, 2), np.float64)      # numpy casts into an out of another float dtype
    assert runtime.matmul(a, b, out=wrong) is wrong
    np.testing.assert_array_equal(wrong, 5)
    assert runtime.matmul(np.ones(3), np.ones(3)) == 3.0 and type(runtime.matmul(np.ones(3), np.ones(3))) is np.float64
