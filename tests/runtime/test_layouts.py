"""runtime.matmul against numpy.matmul over every memory layout numpy can make.

Operands and ``out`` in C and Fortran order, with negative strides, steps, swapped axes,
0-stride broadcast batch views (``np.broadcast_to``), misaligned buffers, read-only inputs;
0 to 3 batch dimensions with size-1 broadcast dimensions; 1-D operands; float32, float64,
integer and bool inputs mixed; sizes including 0 and 1.  Each call must give numpy's values
(within a tolerance scaled by K), shape, dtype and ``out`` identity, and an invalid call
numpy's exception type.  One part runs at threads=1, one at threads=2 and 4 (more threads than
cores, for correctness) with every problem big enough for threads.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from looptune import runtime

LAYOUTS = ("C", "F", "T", "T", "neg", "step", "swap", "bcast", "misaligned", "readonly")
DTYPES = ("float32", "float64", "float32", "float64", "float32", "int32", "int64", "bool", "float16")


@pytest.fixture(autouse=True, scope="module")
def _no_databases():
    small_flops = runtime.settings().small_flops
    # the generated kernels on every layout: no problem class handed to numpy (matrix-vector products)
    runtime.configure(user_db=None, embedded_db=None, fallback="off", numpy_handoff=False)
    yield
    runtime.configure(small_flops=small_flops, numpy_handoff=True)


def values(rng, shape, dtype):
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if np.dtype(dtype).kind in "iu":
        return rng.integers(-3, 4, shape).astype(dtype)
    return (rng.standard_normal(shape) * 2).astype(dtype)


def make(seed: int, shape: tuple, dtype: str, layout: str, axis: int) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` laid out as ``layout`` says (``axis`` picks the axis
    flipped, stepped or swapped with the next; "T" swaps the last two); the same arguments give
    the same array."""
    rng = np.random.default_rng(seed)
    nd = len(shape)
    axis = axis % nd if nd else 0
    if layout == "F":
        return np.asfortranarray(values(rng, shape, dtype))
    if layout == "neg" and nd:
        return np.flip(values(rng, shape, dtype), axis)
    if layout == "step" and nd:
        wide = list(shape)
        wide[axis] *= 2
        return values(rng, tuple(wide), dtype)[(slice(None),) * axis + (slice(None, None, 2),)]
    if layout in ("swap", "T") and nd >= 2:
        axis, other = (nd - 2, nd - 1) if layout == "T" else (axis, (axis + 1) % nd)
        swapped = list(shape)
        swapped[axis], swapped[other] = swapped[other], swapped[axis]
        return np.swapaxes(values(rng, tuple(swapped), dtype), axis, other)
    if layout == "bcast" and nd >= 3:
        base = values(rng, (1,) * (nd - 2) + shape[-2:], dtype)
        return np.broadcast_to(base, shape)
    if layout == "misaligned" and np.dtype(dtype).itemsize > 1:
        x = values(rng, shape, dtype)
        raw = np.zeros(x.nbytes + 1, np.uint8)[1:]
        y = raw.view(dtype).reshape(shape)
        y[...] = x
        return y
    x = values(rng, shape, dtype)
    if layout == "readonly":
        x.flags.writeable = False
    return x


def tolerance(a, b, want, k: int) -> float:
    """|error| bound for a K-term sum computed in want's dtype: a few ulps per term of |a| @ |b|."""
    eps = np.finfo(want.dtype).eps if want.dtype.kind == "f" else 0.0
    bound = np.matmul(np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)))
    return 4 * eps * max(k, 1) * float(np.max(bound, initial=1.0)) + 1e-30


def check(a, b, out_layout, out_dtype, seed, axis, threads):
    """matmul(a, b[, out=]) against numpy.matmul on an identical ``out``."""
    a0, b0 = a.copy(), b.copy()
    outs = [None, None]
    if out_layout is not None:
        try:
            shape = np.matmul(a, b).shape
        except Exception:
            shape = (2, 3)
        outs = [make(seed + 1, shape, out_dtype, out_layout, axis) for _ in range(2)]
    try:
        want = np.matmul(a, b) if outs[0] is None else np.matmul(a, b, out=outs[0])
    except Exception as e:
        with pytest.raises(Exception) as got:
            runtime.matmul(a, b, out=outs[1], threads=threads)
        assert type(got.value) is type(e), (got.value, e)
        return
    for _ in range(2):      # a cold call (resolves the kernel), then a warm one (the compiled path)
        if outs[1] is not None:
            outs[1][...] = 0
        got = runtime.matmul(a, b, out=outs[1], threads=threads)
        if outs[1] is not None:
            assert got is outs[1]
        assert type(got) is type(want)
        assert np.shape(got) == np.shape(want) and got.dtype == want.dtype
        if want.dtype.kind in "fc":
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(a, b, want, a.shape[-1]))
        else:
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(a, a0)       # inputs untouched
        np.testing.assert_array_equal(b, b0)


SIZE = st.sampled_from([0, 1, 1, 2, 3, 5, 8, 17])
BATCH = st.lists(st.sampled_from([1, 1, 2, 3]), min_size=0, max_size=3).map(tuple)


def operands(size, batch_a, batch_b, dta, dtb, la, lb, ndim, seed, axis):
    m, n, k = size
    shape_a = (k,) if ndim[0] == 1 else batch_a + (m, k)
    shape_b = (k,) if ndim[1] == 1 else batch_b + (k, n)
    return make(seed, shape_a, dta, la, axis), make(seed + 7, shape_b, dtb, lb, axis + 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=SIZE, n=SIZE, k=SIZE, batch_a=BATCH, batch_b=BATCH, dta=st.sampled_from(DTYPES), dtb=st.sampled_from(DTYPES),
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS), ndim=st.sampled_from([(2, 2), (2, 2), (1, 2), (2, 1), (1, 1)]),
       out=st.sampled_from([None, None, "C", "F", "neg", "step", "swap", "misaligned", "bcast"]),
       out_dtype=st.sampled_from(["same", "same", "same", "float64", "int32"]), seed=st.integers(0, 1000),
       axis=st.integers(0, 5))
def test_layouts_one_thread(m, n, k, batch_a, batch_b, dta, dtb, la, lb, ndim, out, out_dtype, seed, axis):
    a, b = operands((m, n, k), batch_a, batch_b, dta, dtb, la, lb, ndim, seed, axis)
    rdt = np.result_type(a.dtype, b.dtype).name if out_dtype == "same" else out_dtype
    check(a, b, out, rdt, seed, axis, threads=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.sampled_from([1, 7, 33]), n=st.sampled_from([1, 9, 40]), k=st.sampled_from([1, 16, 31]),
       batch_a=st.sampled_from([(), (3,), (2, 1)]), batch_b=st.sampled_from([(), (3,), (1, 3)]),
       dta=st.sampled_from(["float32", "float64", "int32", "float16"]), dtb=st.sampled_from(["float32", "float64", "float16"]),
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS), ndim=st.sampled_from([(2, 2), (1, 2), (2, 1)]),
       out=st.sampled_from([None, "C", "F", "step"]), threads=st.sampled_from([2, 4]), seed=st.integers(0, 1000),
       axis=st.integers(0, 5))
def test_layouts_several_threads(m, n, k, batch_a, batch_b, dta, dtb, la, lb, ndim, out, threads, seed, axis):
    if runtime.settings().small_flops:
        runtime.configure(small_flops=0)    # every problem runs on the threads asked for (until module teardown)
    a, b = operands((m, n, k), batch_a, batch_b, dta, dtb, la, lb, ndim, seed, axis)
    check(a, b, out, np.result_type(a.dtype, b.dtype).name, seed, axis, threads=threads)


@pytest.mark.parametrize("layout", ["C", "F", "neg", "step"])
@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_out_aliasing_an_input(layout, which):
    """out= one of the inputs (or a view of the same memory): numpy's answer is the product of
    the old values."""
    x = make(3, (9, 9), "float32", layout, 0)
    y = make(4, (9, 9), "float32", "C", 1)
    a, b = (x, y) if which == "a" else (y, x) if which == "b" else (x, x)
    want = np.matmul(a.copy(), b.copy())
    got = runtime.matmul(a, b, out=x)
    assert got is x
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape_a,shape_b", [((4, 1, 5, 3), (2, 3, 6)), ((2, 3), (4, 1, 3, 2)), ((5,), (2, 3, 5, 4)),
                                             ((3, 2, 6, 5), (5,)), ((3,), (3,))])
def test_one_d_and_deep_stacks_into_out_views(shape_a, shape_b):
    a, b = make(5, shape_a, "float32", "C", 0), make(6, shape_b, "float64", "neg", 1)
    want = np.matmul(a, b)
    out = np.zeros(want.shape[:-1] + (2 * want.shape[-1],) if want.ndim else (), np.float64)
    view = out[..., ::2] if want.ndim else out
    got = runtime.matmul(a, b, out=view)
    assert got is view
    np.testing.assert_allclose(view, want, rtol=0, atol=1e-5)
