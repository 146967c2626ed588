"""float16 (IEEE half, numpy's) through ``runtime.matmul``: differential tests against numpy.matmul
(result type, dtype, shape, values, numpy's exceptions), bit-exact agreement where the float32
sums are exact, special values, threads, and float16 records.

The bound (``error_bound``): numpy and the kernels both sum float16 products in float32 and
round the sum once to float16.  Against the float64 product ``ref`` of the same operands, a
float32 dot product of K terms (any order, blocked or not) is off by at most
``g = gamma(K + 1) * sum_k |a_k b_k|`` with ``gamma(n) = n u / (1 - n u)``, ``u = 2**-24`` (one
more term than K covers operands whose products float32 rounds, as float16 x int16), and the
rounding to float16 adds at most ``2**-11 * (|ref| + g)`` (half an ulp), or ``2**-25`` for a
subnormal result.  The same bound holds for numpy's own result, which is checked too, so the
two are within one float16 rounding of each other plus float32 accumulation.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtype_cases import VECTOR_AND_EDGE_SHAPES, VIEWS, batch_shapes, with_broadcast_ones

from looptune import runtime
from looptune.database import MachineKey, Record, save
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.configuration import RuntimeSettings

pytestmark = pytest.mark.target      # kernels differ per target ISA: CI reruns this file per ISA

F16 = np.dtype(np.float16)


def f16_array(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F16)


def error_of(call):
    try:
        call()
    except Exception as e:      # noqa: BLE001 - the exception's type is what is compared
        return type(e)
    return None


def error_bound(a, b, result_dtype) -> np.ndarray:
    """|result - ref| may be this much (see the module doc): float32 accumulation for float16 and
    float32 (float64 for float64), one rounding to numpy's computing dtype and one to
    ``result_dtype`` (an out= of another dtype)."""
    a, b = np.asarray(a), np.asarray(b)
    compute = np.result_type(a, b)
    terms = (a.shape[-1] if a.ndim else 1) + 1
    u = 2.0 ** -53 if compute == np.float64 else 2.0 ** -24
    gamma = terms * u / (1 - terms * u)
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    err = gamma * np.matmul(np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)))
    for dt in dict.fromkeys((compute, np.dtype(result_dtype))):
        if dt.kind == "f":
            info = np.finfo(dt)
            err = err + float(info.eps) / 2 * (np.abs(ref) + err) + float(info.smallest_subnormal) / 2
    return err


def assert_like_numpy(a, b, out=None, threads=None):
    """``runtime.matmul(a, b[, out])`` returns what numpy.matmul returns (type, dtype, shape, values
    within ``error_bound`` of the float64 product, as numpy's are), or raises the same exception."""
    kw = {} if threads is None else {"threads": threads}
    ref_out = None if out is None else np.empty_like(out)
    expected_error = error_of(lambda: np.matmul(a, b) if out is None else np.matmul(a, b, out=ref_out))
    if expected_error is not None:
        with pytest.raises(expected_error):
            runtime.matmul(a, b, **kw) if out is None else runtime.matmul(a, b, out=out, **kw)
        return
    expected = np.matmul(a, b) if out is None else np.matmul(a, b, out=ref_out)
    got = runtime.matmul(a, b, **kw) if out is None else runtime.matmul(a, b, out=out, **kw)
    if out is not None:
        assert got is out
    assert type(got) is type(expected)
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    exact = np.matmul(np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64))
    bound = error_bound(a, b, got.dtype)
    assert np.all(np.abs(expected.astype(np.float64) - exact) <= bound)     # the bound holds for numpy
    excess = np.abs(got.astype(np.float64) - exact) - bound
    assert np.all(excess <= 0), f"{np.sum(excess > 0)} elements beyond the bound, worst by {np.max(excess)}"


@pytest.fixture
def settings_restored():
    yield
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


dims = st.integers(0, 300)


@settings(max_examples=12)
@given(m=dims, n=dims, k=dims, seed=st.integers(0, 2**16))
def test_2d_like_numpy(m, n, k, seed):
    assert_like_numpy(f16_array((m, k), seed), f16_array((k, n), seed + 1))


@settings(max_examples=12)
@given(m=st.integers(1, 67), n=st.integers(1, 67), k=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_odd_sizes_like_numpy(m, n, k, seed):
    assert_like_numpy(f16_array((m, k), seed, 4.0), f16_array((k, n), seed + 1, 0.25))


@settings(max_examples=10)
@given(ba=batch_shapes, bb=batch_shapes, m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 40),
       ones=st.integers(0, 7))
def test_stacks_broadcast_like_numpy(ba, bb, m, n, k, ones):
    ba = with_broadcast_ones(ba, ones)
    assert_like_numpy(f16_array(ba + (m, k), 1), f16_array(bb + (k, n), 2))


@pytest.mark.parametrize("a_shape,b_shape", VECTOR_AND_EDGE_SHAPES)
def test_vectors_empty_and_mismatched_like_numpy(a_shape, b_shape):
    assert_like_numpy(f16_array(a_shape, 3), f16_array(b_shape, 4))


@pytest.mark.parametrize("view_a", sorted(VIEWS))
@pytest.mark.parametrize("view_b", ["transposed", "negative strides", "strided"])
def test_views_like_numpy(view_a, view_b):
    a = VIEWS[view_a](f16_array((90, 90), 5))
    b = VIEWS[view_b](f16_array((90, 90), 6))
    b = b[: a.shape[1]] if b.shape[0] >= a.shape[1] else b
    if a.shape[1] != b.shape[0]:
        a = a[:, : b.shape[0]]
    assert_like_numpy(a, b)


def test_a_transposed_stack_like_numpy():
    a = f16_array((3, 50, 40), 7).transpose(0, 2, 1)          # (3, 40, 50), M contiguous
    b = f16_array((60, 50), 8)[::-1].T                         # (50, 60), negative row stride
    assert_like_numpy(a, b)


# numpy's result dtype of float16 with another: the float16 kernel where numpy stays in float16
# (the integers are cast exactly), float32's or float64's where numpy widens
MIXED = {"int8": "float16", "uint8": "float16", "bool": "float16", "float32": "float32", "int16": "float32",
         "float64": "float64", "int32": "float64"}


@pytest.mark.parametrize("other", sorted(MIXED))
@pytest.mark.parametrize("f16_first", [True, False])
def test_mixed_dtypes_like_numpy(other, f16_first):
    x = f16_array((33, 40), 7, scale=4.0)
    y = (np.random.default_rng(8).standard_normal((40, 21)) * 20).astype(other)
    a, b = (x, y) if f16_first else (y.T, x.T)
    assert np.matmul(a, b).dtype == MIXED[other]
    assert runtime.explain(a, b).problem.dtype == MIXED[other]
    assert_like_numpy(a, b)


@pytest.mark.parametrize("out_dtype", ["float16", "float32", "float64", "int32"])
def test_out_like_numpy(out_dtype):
    a, b = f16_array((50, 70), 10), f16_array((70, 30), 11)
    out = np.zeros((50, 30), out_dtype)
    assert_like_numpy(a, b, out=out)
    wrong_shape = np.zeros((50, 31), out.dtype)
    assert error_of(lambda: runtime.matmul(a, b, out=wrong_shape)) is error_of(lambda: np.matmul(a, b, out=wrong_shape))
    if out.dtype.kind == "f":       # numpy rounds to float16, then casts into out: so must we, bit for bit
        x, y = integer_operands(50, 30, 300, 43)
        np.testing.assert_array_equal(runtime.matmul(x, y, out=np.zeros_like(out)), np.matmul(x, y, out=np.zeros_like(out)))


def test_out_stack_views_and_read_only():
    a, b = f16_array((4, 20, 30), 12), f16_array((30, 10), 13)
    assert_like_numpy(a, b, out=np.full((4, 20, 10), np.nan, F16))
    assert_like_numpy(a, b, out=np.zeros((4, 10, 20), F16).transpose(0, 2, 1))     # a transposed out
    assert_like_numpy(a, b, out=np.zeros((4, 20, 30), F16)[:, :, ::3])             # a strided out
    ro = np.zeros((4, 20, 10), F16)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        runtime.matmul(a, b, out=ro)


def integer_operands(m, n, k, seed, batch=()):
    """Small integers (-1 .. 8, K <= 512: sums below 32768): every float32 sum is exact, so the result
    is the exact sum rounded once to float16 (sums over 2048 have ties, rounded to even), whatever
    the summation order."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-1, 9, batch + (m, k)).astype(F16), rng.integers(-1, 9, batch + (k, n)).astype(F16))


@pytest.mark.parametrize("m, n, k, batch", [(1, 1, 300, ()), (37, 29, 301, ()), (64, 64, 512, ()), (9, 100, 257, ()),
                                                 (5, 7, 260, (3,))],
                         ids=str)
def test_exact_sums_round_to_float16_as_numpy_does_bit_for_bit(m, n, k, batch):
    a, b = integer_operands(m, n, k, 20, batch)
    expected = np.matmul(a, b)
    assert np.abs(expected.astype(np.float64)).max() > 2048          # float16 spacing 2 and more: ties
    got = runtime.matmul(a, b)
    assert got.dtype == F16
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


TINY = 2.0 ** -24        # the smallest float16 subnormal (6e-8)


def special_operands(m: int, n: int, k: int, seed: int = 30):
    """A (m x k) and B (k x n) with special rows in A over B's first rows (all ones, then 0.5, 1.5,
    TINY), small integers elsewhere: every float32 sum is exact, so numpy's result is exact too."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-3, 4, (m, k)).astype(F16)
    b = rng.integers(-3, 4, (k, n)).astype(F16)
    b[0:4] = 1
    b[4], b[5], b[6] = 0.5, 1.5, TINY
    a[:, :7] = 0
    rows = [
        {0: np.inf},                               # inf
        {0: np.inf, 1: -np.inf},                   # inf - inf: nan
        {0: np.nan},                               # nan
        {0: 65504, 1: 65504},                      # 131008: overflows to inf
        {0: 65504, 1: 16},                         # 65520: the tie above the largest half, to inf
        {0: 65504, 1: 15},                         # 65519: 65504
        {0: 60000, 1: 60000, 2: -60000},           # 60000 (summed in float16 it would be inf)
        {0: TINY, 1: TINY, 2: TINY, 3: TINY},      # subnormal sums: 4 TINY
        {4: TINY},                                 # TINY / 2: a tie, to even (0)
        {5: TINY},                                 # 1.5 TINY: a tie, to even (2 TINY)
        {5: 3 * TINY, 4: 4 * TINY},                # 6.5 TINY: a tie, to 6 TINY
        {6: TINY},                                 # TINY squared: 0
        {6: 1024},                                 # 2**-14: the smallest normal
        {0: -np.inf, 6: 1},                        # -inf
    ]
    for r, entries in enumerate(rows):
        a[r] = 0
        for col, value in entries.items():
            a[r, col] = value
    return a, b, len(rows)


@pytest.mark.parametrize("m, n, k, threads", [(37, 29, 70, None), (200, 150, 100, 2), (200, 150, 100, 4)], ids=str)
def test_special_values_like_numpy(m, n, k, threads):
    a, b, rows = special_operands(m, n, k)
    kw = {} if threads is None else {"threads": threads}
    assert runtime.explain(a, b, **kw).source != "numpy"
    with np.errstate(all="ignore"):
        expected = np.matmul(a, b)
        got = runtime.matmul(a, b, **kw)
        # the transposed problem puts the special values in B
        got_t, expected_t = runtime.matmul(b.T, a.T, **kw), np.matmul(b.T, a.T)
    col = expected[:rows, 7].astype(np.float64)          # numpy's answers, as the rows say
    assert np.isposinf(col[[0, 3, 4]]).all() and np.isnan(col[[1, 2]]).all() and np.isneginf(col[13])
    assert list(col[5:7]) == [65504, 60000] and list(col[7:13] / TINY) == [4, 0, 2, 6, 0, 1024]
    np.testing.assert_array_equal(got.view(np.uint16)[rows:], expected.view(np.uint16)[rows:])
    np.testing.assert_array_equal(got, expected)          # NaN where numpy has NaN, signed zeros alike
    np.testing.assert_array_equal(got_t, expected_t)


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("shape", [(300, 200, 150, ()), (97, 260, 131, ()), (64, 64, 96, (4,)), (3, 700, 400, ())],
                         ids=str)
def test_threads_like_numpy(threads, shape):
    m, n, k, batch = shape
    a, b = f16_array(batch + (m, k), 40), f16_array(batch + (k, n), 41)
    assert runtime.explain(a, b, threads=threads).problem.threads == threads      # really on threads
    assert_like_numpy(a, b, threads=threads)
    assert_like_numpy(a.swapaxes(-1, -2).copy().swapaxes(-1, -2), b, out=np.empty(batch + (m, n), F16), threads=threads)
    x, y = integer_operands(m, n, k, 42, batch)
    np.testing.assert_array_equal(runtime.matmul(x, y, threads=threads).view(np.uint16), np.matmul(x, y).view(np.uint16))


def test_a_f16_record_is_served_like_float32s(tmp_path, settings_restored):
    path = tmp_path / "user.h5"
    trace = Trace((Step.make("split", loop="n", factor=16),))
    problem = MatmulProblem(64, 48, 32, dtype="float16")
    save(path, [Record(problem, MachineKey.current(), trace, 50.0, 1.0, 4.0, True, "test", "test", 1, 1.7e9)])
    runtime.configure(user_db=path, embedded_db=None, fallback="off")
    a, b = f16_array((64, 32), 14), f16_array((32, 48), 15)
    found = runtime.explain(a, b)
    assert found.source == "exact" and found.problem == problem
    assert_like_numpy(a, b)
    assert runtime.explain((64, 48, 32), dtype="float16").source == "exact"
    # neither float32 nor bfloat16 shares float16's family; without a record (fallback off): the default
    assert runtime.explain(a.astype(np.float32), b.astype(np.float32)).source == "default"
    assert runtime.explain((64, 48, 32), dtype="bfloat16").source == "default"
    assert runtime.explain(f16_array((64, 40), 1), f16_array((40, 48), 2)).source == "nearest"
    assert runtime.explain(f16_array((640, 40), 1), f16_array((40, 480), 2)).source == "default"
