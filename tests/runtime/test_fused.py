"""Fused epilogues (``runtime.matmul(a, b, bias=, activation=, residual=)``, ``compiler.epilogue``):
the activations' accuracy against float64 math, values against numpy's unfused composition (and
torch where installed) on odd sizes, stacks and broadcast residuals, numpy's result dtypes and
shapes for every call the kernels do not serve, clear errors for bad arguments, golden C of the
store stage, and the epilogue's place in the problem key."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from looptune import runtime
from looptune.runtime.api import current_resolver
from looptune.runtime.compiler.codegen import Target, render
from looptune.runtime.compiler.defaults import BlockingParams
from looptune.runtime.compiler.epilogue import ACTIVATIONS, OPS, Epilogue
from looptune.runtime.compiler.workload import MatmulProblem

pytestmark = pytest.mark.target

GOLDEN = Path(__file__).parent / "golden"


def exact(x: np.ndarray, activation):
    x = x.astype(np.float64)
    if activation == "relu":
        return np.maximum(x, 0)
    if activation == "gelu":
        return x * 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2))
    if activation == "gelu_tanh":
        # 0.5 x (1 + tanh(u)) without 1 + tanh's cancellation (float64's own would lose the tail)
        with np.errstate(over="ignore"):
            return x / (1 + np.exp(-2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if activation == "silu":
        with np.errstate(over="ignore"):
            return x / (1 + np.exp(-x))
    return x


@pytest.fixture
def kernels_only():
    before = runtime.settings()
    runtime.configure(numpy_handoff=False)
    yield
    runtime.configure(numpy_handoff=before.numpy_handoff)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_activation_accuracy(kernels_only, activation, dtype):
    """Products with K = 1 against ones feed the epilogue exact values; float32 within 2e-6
    relative (16 ulp; 1e-6 where |x| < 4) where |value| >= 1e-6, and 3e-5 in the far tails below
    it (there exp's argument is large, and float32's rounding of it is the error); float64 within
    1e-14 (1e-12 where |x| >= 4, for the same reason)."""
    x = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 30.0, -30.0, -90.0, 90.0]])
    a = x.astype(dtype)[:, None]
    b = np.ones((1, 16), dtype)
    got = runtime.matmul(a, b, activation=activation)[:, 0].astype(np.float64)
    want = exact(a[:, 0], activation)
    rtol = (np.where(np.abs(want) < 1e-6, 3e-5, np.where(np.abs(x) < 4, 1e-6, 2e-6)) if dtype == "float32"
            else np.where(np.abs(x) < 4, 1e-14, 1e-12))
    tiny = np.finfo(dtype).tiny * 1e8
    bad = np.abs(got - want) > rtol * np.abs(want) + tiny
    assert not bad.any(), list(zip(x[bad][:5], got[bad][:5], want[bad][:5]))


def _operands(rng, shape_a, shape_b, dtype="float32"):
    k = shape_a[-1]
    return ((rng.standard_normal(shape_a) * (2 / math.sqrt(k))).astype(dtype),
            rng.standard_normal(shape_b).astype(dtype))


def _unfused(a, b, bias, activation, residual):
    y = np.matmul(a.astype(np.float64), b.astype(np.float64))
    if bias is not None:
        y = y + bias
    y = exact(y, activation)
    return y if residual is None else y + residual


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 70), n=st.integers(1, 70), k=st.integers(1, 90), batch=st.sampled_from([(), (3,), (2, 2)]),
       bias=st.booleans(), activation=st.sampled_from([None, *ACTIVATIONS]),
       residual=st.sampled_from([None, "full", "row", "column", "stack"]), threads=st.sampled_from([1, 2, 4]),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 99), use_out=st.booleans())
def test_fused_matches_the_unfused_product(kernels_only, m, n, k, batch, bias, activation, residual, threads, dtype,
                                           seed, use_out):
    if not (bias or activation or residual):
        activation = "relu"
    rng = np.random.default_rng(seed)
    a, b = _operands(rng, batch + (m, k), (k, n), dtype)
    shape = batch + (m, n)
    bv = rng.standard_normal(n).astype(dtype) if bias else None
    rv = {None: None, "full": shape, "row": (n,), "column": (m, 1), "stack": batch + (1, n)}[residual]
    rv = None if rv is None else rng.standard_normal(rv).astype(dtype)
    out = np.full(shape, np.nan, dtype) if use_out else None
    got = runtime.matmul(a, b, out=out, threads=threads, bias=bv, activation=activation, residual=rv)
    if use_out:
        assert got is out
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    want = _unfused(a, b, bv, activation, rv)
    tol = 2e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max(initial=0))))


def test_fused_runs_one_fused_kernel(kernels_only):
    a, b = np.ones((64, 32), np.float32), np.ones((32, 48), np.float32)
    runtime.matmul(a, b, bias=np.ones(48, np.float32), activation="silu", threads=1)
    hits = [hit for key, hit in current_resolver().dispatch.items() if key[-1] == "matmul+bias+silu"]
    assert hits and hits[0][0].fused and hits[0][1].problem.op == "matmul+bias+silu"


def test_residual_may_be_the_output(kernels_only):
    rng = np.random.default_rng(1)
    a, b = _operands(rng, (40, 30), (30, 20))
    x = rng.standard_normal((40, 20)).astype(np.float32)
    want = _unfused(a, b, None, "gelu_tanh", x)
    got = runtime.matmul(a, b, out=x, activation="gelu_tanh", residual=x)
    assert got is x
    np.testing.assert_allclose(x, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["float64 bias", "int operands", "enlarging residual", "vector b", "float16",
                                  "list operands"])
def test_calls_the_kernels_do_not_serve_keep_numpys_semantics(case):
    rng = np.random.default_rng(2)
    a, b = _operands(rng, (5, 4), (4, 3))
    kwargs = {"bias": rng.standard_normal(3).astype(np.float32), "activation": "relu"}
    if case == "float64 bias":
        kwargs["bias"] = kwargs["bias"].astype(np.float64)
    elif case == "int operands":
        a, b = a.astype(np.int32), b.astype(np.int32)
    elif case == "enlarging residual":
        kwargs["residual"] = rng.standard_normal((2, 5, 3)).astype(np.float32)
    elif case == "vector b":
        b, kwargs["bias"] = b[:, 0], kwargs["bias"][:1]
    elif case == "float16":
        a, b = a.astype(np.float16), b.astype(np.float16)
    elif case == "list operands":
        a, b = a.tolist(), b.tolist()
    want = np.matmul(a, b) + kwargs["bias"]
    want = np.maximum(want, 0)
    if "residual" in kwargs:
        want = want + kwargs["residual"]
    got = runtime.matmul(a, b, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    ({"bias": np.ones(4, np.float32)}, "bias must be a vector of length 3"),
    ({"bias": np.ones((1, 3), np.float32)}, "bias must be a vector of length 3"),
    ({"residual": np.ones((4, 3), np.float32)}, "does not broadcast"),
    ({"activation": "tanh"}, "unknown activation 'tanh'"),
])
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        runtime.matmul(np.ones((5, 4), np.float32), np.ones((4, 3), np.float32), **kwargs)


def test_torch_agrees(kernels_only):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    for shape_a, n in (((37, 65), 41), ((3, 17, 100), 130)):
        a, w = _operands(rng, shape_a, (n, shape_a[-1]))
        bias = rng.standard_normal(n).astype(np.float32)
        for activation, reference in (("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu),
                                      ("gelu_tanh", lambda y: F.gelu(y, approximate="tanh"))):
            want = reference(F.linear(torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(bias))).numpy()
            got = runtime.matmul(a, np.ascontiguousarray(w.T), bias=bias, activation=activation)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_the_epilogue_is_part_of_the_problem():
    e = Epilogue.parse("bias, gelu_tanh")
    assert e.op == "matmul+bias+gelu_tanh" and e.op in OPS and Epilogue.parse(e.op) == e
    p = MatmulProblem(128, 3072, 768, op=e.op)
    assert MatmulProblem.from_key(p.key()) == p and p.family != MatmulProblem(128, 3072, 768).family
    for bad in ("gelu,relu", "bias,bias", "tanh"):
        with pytest.raises(ValueError):
            Epilogue.parse(bad)


def test_store_stage_c_matches_golden(update_golden):
    name = "epilogue_bias_gelu_tanh_residual_6x16_float32_avx2"
    text = render(BlockingParams(6, 16, 72, 256, 1024).schedule(), "float32", Target("avx2", 32),
                  symbol=f"golden_{name}", op="matmul+bias+gelu_tanh+residual").text
    path = GOLDEN / f"{name}.c"
    if update_golden:
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: generate it with --update-golden and review it"
    assert text == path.read_text(), f"generated C for {name} changed; review and rerun with --update-golden"
    assert "if (lo_k_o + len_k_o == K) golden_" in text       # the tile's last k block finishes it


def test_a_fused_call_follows_the_plain_products_verdict():
    """Where numpy serves the plain product (its trial, or a record's hand-off), the fused call is
    composed from numpy's product and the epilogue; where a kernel serves it, the fused kernel runs."""
    from looptune.runtime.compiler.dispatch import dispatch_key
    from looptune.runtime.numpy_kernel import NumpyKernel

    before = runtime.settings()
    runtime.configure(numpy_handoff=True)
    try:
        resolver = current_resolver()
        rng = np.random.default_rng(4)
        a, b = _operands(rng, (48, 40), (40, 56))
        bias = rng.standard_normal(56).astype(np.float32)
        plain = dispatch_key("float32", 48, 56, 40, 1, "nn", 1)
        fused = dispatch_key("float32", 48, 56, 40, 1, "nn", 1, op="matmul+bias+relu")
        calls = []

        class Counting:         # numpy, counted (no ``address``: the compiled serve path leaves it to Python)
            symbol, dtype = "counting numpy", "float32"

            def invoke(self, *args):
                calls.append(1)
                return NumpyKernel("float32", "numpy won this shape's trial").invoke(*args)

        resolver.dispatch[plain] = (Counting(), None)
        want = np.maximum(a.astype(np.float64) @ b + bias, 0)
        np.testing.assert_allclose(runtime.matmul(a, b, bias=bias, activation="relu", threads=1), want, rtol=2e-5, atol=2e-5)
        assert calls and resolver.dispatch[fused][0].fused           # composed: numpy's product ran
        compiled = resolver.kernel(resolver.dispatch[fused][1].schedule, "float32")
        resolver.dispatch[plain] = (compiled, None)                   # a kernel serves the product
        calls.clear()
        np.testing.assert_allclose(runtime.matmul(a, b, bias=bias, activation="relu", threads=1), want, rtol=2e-5, atol=2e-5)
        assert not calls
    finally:
        runtime.configure(numpy_handoff=before.numpy_handoff)


def test_a_nest_without_a_tile_finishes_c_once_after_its_parallel_loop():
    """Without a register tile the epilogue is one pass over C after every loop: not inside the
    outlined parallel body, where each iteration would apply it to all of C again."""
    from looptune.runtime.compiler.build import build
    from looptune.runtime.compiler.kernel import Kernel
    from looptune.runtime.compiler.schedule import Schedule

    source = render(Schedule.initial().step("parallel", loop="m"), "float32", op="matmul+bias+silu+residual")
    result = build(source)
    assert result.ok, result.error
    kernel = Kernel(result.so_path, result.symbol, "float32", fused=True)
    rng = np.random.default_rng(5)
    a, b = _operands(rng, (2, 9, 7), (2, 7, 5))
    bias, residual = rng.standard_normal(5).astype(np.float32), rng.standard_normal((2, 9, 5)).astype(np.float32)
    c = np.full((2, 9, 5), np.nan, np.float32)
    assert kernel.invoke_fused(a, b, c, bias, residual, 0, 3) == 0
    np.testing.assert_allclose(c, _unfused(a, b, bias, "silu", residual), rtol=2e-5, atol=2e-5)
