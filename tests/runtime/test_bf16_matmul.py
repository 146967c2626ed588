"""bfloat16 (ml_dtypes) through ``runtime.matmul``: differential tests against numpy.matmul
(result type, dtype, shape, values within float32 accumulation, numpy's exceptions), bf16
records, the ``float32_via_bfloat16`` opt-in, and the portable path (``LOOPTUNE_BF16=convert``)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

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

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

pytestmark = pytest.mark.target      # kernels differ per target ISA and bf16 mode: CI reruns this file per ISA

RTOL = 1e-5      # float32 accumulation, relative to the largest |entry| of the reference


def bf16_array(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(BF16)


def error_of(call):
    try:
        call()
    except Exception as e:      # noqa: BLE001 - the exception's type is what is compared
        return type(e)
    return None


def assert_like_numpy(a, b, out=None, got=None):
    """``runtime.matmul(a, b[, out])`` returns what numpy.matmul returns (type, dtype, shape, values
    within float32 accumulation), or raises the same exception type."""
    ref_out = None if out is None else np.empty_like(out)
    expected_error = error_of(lambda: np.matmul(a, b) if out is None else np.matmul(a, b, out=ref_out))
    if expected_error is not None:
        with pytest.raises(expected_error):
            runtime.matmul(a, b) if out is None else runtime.matmul(a, b, out=out)
        return
    ref = np.matmul(a, b) if out is None else np.matmul(a, b, out=ref_out)
    got = runtime.matmul(a, b) if out is None else runtime.matmul(a, b, out=out)
    if out is not None:
        assert got is out
    assert type(got) is type(ref)
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    wide = np.complex128 if ref.dtype.kind == "c" else np.float64
    got64, ref64 = got.astype(wide), ref.astype(wide)
    scale = np.max(np.abs(ref64), initial=0.0)
    # a bfloat16 out holds the float32 result rounded: one bf16 ulp (2**-7 relative) apart at most
    tol = RTOL * scale + (np.abs(ref64) * 2.0 ** -7 if got.dtype == BF16 else 0.0)
    assert np.all(np.abs(got64 - ref64) <= tol), np.max(np.abs(got64 - ref64))


@pytest.fixture
def settings_restored():
    yield
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


dims = st.integers(0, 300)


@settings(max_examples=12)
@given(m=dims, n=dims, k=dims, seed=st.integers(0, 2**16))
def test_2d_like_numpy(m, n, k, seed):
    assert_like_numpy(bf16_array((m, k), seed), bf16_array((k, n), seed + 1))


@settings(max_examples=10)
@given(ba=batch_shapes, bb=batch_shapes, m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 40),
       ones=st.integers(0, 7))
def test_stacks_broadcast_like_numpy(ba, bb, m, n, k, ones):
    ba = with_broadcast_ones(ba, ones)
    assert_like_numpy(bf16_array(ba + (m, k), 1), bf16_array(bb + (k, n), 2))


@pytest.mark.parametrize("a_shape,b_shape", VECTOR_AND_EDGE_SHAPES)
def test_vectors_empty_and_mismatched_like_numpy(a_shape, b_shape):
    assert_like_numpy(bf16_array(a_shape, 3), bf16_array(b_shape, 4))


@pytest.mark.parametrize("view_a", sorted(VIEWS))
@pytest.mark.parametrize("view_b", ["transposed", "negative strides"])
def test_views_like_numpy(view_a, view_b):
    a = VIEWS[view_a](bf16_array((90, 90), 5))
    b = VIEWS[view_b](bf16_array((90, 90), 6))
    b = b[: a.shape[1]] if b.shape[0] >= a.shape[1] else b
    if a.shape[1] != b.shape[0]:
        a = a[:, : b.shape[0]]
    assert_like_numpy(a, b)


@pytest.mark.parametrize("other", ["float32", "float64", "int8", "uint8", "bool", "int16", "int32", "float16",
                                   "complex64"])
@pytest.mark.parametrize("bf16_first", [True, False])
def test_mixed_dtypes_like_numpy(other, bf16_first):
    x = bf16_array((33, 40), 7, scale=20.0)
    y = (np.random.default_rng(8).standard_normal((40, 21)) * 20).astype(other)
    a, b = (x, y) if bf16_first else (y.T, x.T)
    assert_like_numpy(a, b)


def test_integers_exact_in_bf16_use_the_bf16_kernel():
    a, b = bf16_array((40, 64), 9), np.arange(64 * 30, dtype=np.int8).reshape(64, 30)
    assert runtime.explain(a, b).problem.dtype == "bfloat16"
    assert runtime.explain(a, b.astype(np.float32)).problem.dtype == "float32"     # numpy casts bf16 up
    assert runtime.explain(a, b.astype(np.float64)).problem.dtype == "float64"


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float64", "int32", "float16"])
def test_out_like_numpy(out_dtype):
    a, b = bf16_array((50, 70), 10), bf16_array((70, 30), 11)
    out = np.zeros((50, 30), BF16 if out_dtype == "bfloat16" else out_dtype)
    assert_like_numpy(a, b, out=out)
    wrong_shape = np.zeros((50, 31), out.dtype)
    assert error_of(lambda: runtime.matmul(a, b, out=wrong_shape)) is error_of(lambda: np.matmul(a, b, out=wrong_shape))


def test_out_stack_and_read_only():
    a, b = bf16_array((4, 20, 30), 12), bf16_array((30, 10), 13)
    assert_like_numpy(a, b, out=np.zeros((4, 20, 10), np.float32))
    assert_like_numpy(a, b, out=np.zeros((4, 20, 10), BF16))
    ro = np.zeros((4, 20, 10), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        runtime.matmul(a, b, out=ro)


def test_a_bf16_record_is_served_like_float32s(tmp_path, settings_restored):
    path = tmp_path / "user.h5"
    trace = Trace((Step.make("split", loop="n", factor=16),))
    problem = MatmulProblem(64, 48, 32, dtype="bfloat16")
    save(path, [Record(problem, MachineKey.current(), trace, 50.0, 1.0, 40.0, True, "test", "test", 1, 1.7e9)])
    runtime.configure(user_db=path, embedded_db=None, fallback="off")
    a, b = bf16_array((64, 32), 14), bf16_array((32, 48), 15)
    found = runtime.explain(a, b)
    assert found.source == "exact" and found.problem == problem
    assert "bfloat16 inputs" in found.describe()
    assert_like_numpy(a, b)
    assert runtime.explain((64, 48, 32), dtype="bfloat16").source == "exact"
    # float32 does not share bf16's family; without a record (fallback off) it gets the default
    assert runtime.explain(a.astype(np.float32), b.astype(np.float32)).source == "default"
    assert runtime.explain(bf16_array((64, 40), 1), bf16_array((40, 48), 2)).source == "nearest"
    assert runtime.explain(bf16_array((640, 40), 1), bf16_array((40, 480), 2)).source == "default"


def test_float32_via_bfloat16_opt_in(settings_restored):
    rng = np.random.default_rng(16)
    a, b = rng.standard_normal((70, 300), np.float32), rng.standard_normal((300, 50), np.float32)
    exact = runtime.matmul(a, b)
    assert runtime.explain(a, b).problem.dtype == "float32"
    runtime.configure(float32_via_bfloat16=True)
    assert runtime.settings().float32_via_bfloat16
    got = runtime.matmul(a, b)
    assert got.dtype == np.float32 and got.shape == (70, 50)
    rounded = np.matmul(a.astype(BF16).astype(np.float32), b.astype(BF16).astype(np.float32))
    np.testing.assert_allclose(got, rounded, rtol=0, atol=RTOL * np.max(np.abs(rounded)))
    assert not np.allclose(got, exact, rtol=0, atol=1e-4 * np.max(np.abs(exact)))    # it did round
    out = np.empty((70, 50), np.float32)
    assert runtime.matmul(a, b, out=out) is out and np.array_equal(out, got)
    how = runtime.explain(a, b)
    assert how.problem.dtype == "bfloat16" and how.inputs == "float32"
    assert "float32_via_bfloat16" in how.describe()
    assert runtime.explain((70, 50, 300)).inputs == "float32"
    # float64 and bfloat16 operands are not affected
    assert runtime.explain(a.astype(np.float64), b).inputs is None
    runtime.configure(float32_via_bfloat16=False)
    np.testing.assert_array_equal(runtime.matmul(a, b), exact)
    with pytest.raises(ValueError):
        runtime.configure(float32_via_bfloat16="yes")


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_portable_path_forced_with_LOOPTUNE_BF16_convert():
    code = """
        import numpy as np, ml_dtypes
        from looptune import runtime
        from looptune.runtime.compiler.machine import detect_cpu
        assert detect_cpu().bf16_isa == "convert", detect_cpu().bf16_isa
        bf16 = ml_dtypes.bfloat16
        rng = np.random.default_rng(0)
        for m, n, k in [(1, 1, 1), (33, 17, 5), (100, 70, 301), (5, 300, 77)]:
            a, b = rng.standard_normal((m, k)).astype(bf16), rng.standard_normal((k, n)).astype(bf16)
            for x, y in [(a, b), (a.T.copy().T, b[::-1][::-1]), (b.T, a.T)]:
                got, ref = runtime.matmul(x, y), np.matmul(x, y)
                assert got.dtype == ref.dtype and got.shape == ref.shape
                assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref)), (m, n, k)
        runtime.configure(float32_via_bfloat16=True)
        a, b = rng.standard_normal((64, 128), np.float32), rng.standard_normal((128, 40), np.float32)
        r = np.matmul(a.astype(bf16).astype(np.float32), b.astype(bf16).astype(np.float32))
        assert np.max(np.abs(runtime.matmul(a, b) - r)) <= 1e-5 * np.max(np.abs(r))
        print("ok")
    """
    done = _run(code, {"LOOPTUNE_BF16": "convert"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_float_calls_do_not_import_ml_dtypes():
    code = """
        import sys, numpy as np
        from looptune import runtime
        a = np.ones((40, 30), np.float32)
        runtime.matmul(a, a.T); runtime.matmul(a.astype(np.int8), a.T)
        runtime.configure(float32_via_bfloat16=True)      # bf16 kernels reading float32 need no ml_dtypes
        assert runtime.explain(a, a.T).inputs == "float32"
        np.testing.assert_allclose(runtime.matmul(a, a.T), a @ a.T)
        print("ml_dtypes" in sys.modules)
    """
    done = _run(code, {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("mode", ["convert", "avx512bf16", "amx"])
def test_subnormal_inputs_per_form(mode):
    """The portable form widens subnormal bf16 exactly (numpy's result); the BF16 instructions
    treat them as zero, as documented in ``looptune.runtime.bf16``."""
    from looptune.runtime.compiler.build import build
    from looptune.runtime.compiler.codegen import Target, render
    from looptune.runtime.compiler.defaults import default_schedule
    from looptune.runtime.compiler.kernel import Kernel
    from looptune.runtime.compiler.machine import BF16_LEVELS, amx_permitted, detect_cpu

    cpu = detect_cpu()
    if BF16_LEVELS.index(mode) > BF16_LEVELS.index(cpu.bf16_isa) or (mode == "amx" and not amx_permitted()):
        pytest.skip(f"this CPU has no {mode}")
    problem = MatmulProblem(64, 64, 64, dtype="bfloat16")
    target = Target(cpu.vector_isa, cpu.vector_bytes, mode)
    source = render(default_schedule(problem, cpu), "bfloat16", target)
    kernel = Kernel(build(source).so_path, source.symbol, "bfloat16")
    a = np.full((64, 64), 3e-39, ml_dtypes.bfloat16)       # subnormal in bf16 (and float32)
    b = np.full((64, 64), 1e30, ml_dtypes.bfloat16)
    c = np.empty((64, 64), np.float32)
    kernel(a, b, c)
    expected = np.matmul(a, b) if mode == "convert" else np.zeros((64, 64), np.float32)
    np.testing.assert_allclose(c, expected, rtol=1e-5)


def cpu_flags() -> set[str]:
    """The feature flags Linux reports for this CPU (those of the first processor listed)."""
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


AMX_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import numpy as np
    from looptune import runtime
    SYS_ARCH_PRCTL, GET_SUPP, GET_PERM, REQ_PERM, XTILEDATA = 158, 0x1021, 0x1022, 0x1023, 18
    libc = ctypes.CDLL(None, use_errno=True)
    def state(code):
        mask = ctypes.c_uint64(0)
        rc = libc.syscall(SYS_ARCH_PRCTL, code, ctypes.byref(mask))
        return [rc, ctypes.get_errno() if rc else 0, int(mask.value >> XTILEDATA & 1)]
    a = np.ones((64, 64), np.float32)
    runtime.matmul(a, a, threads=1)
    runtime.matmul(a.astype(np.float64), a, threads=2)
    out = {"supported": state(GET_SUPP), "permitted": state(GET_PERM)}
    # the probe itself: asking for the tile data state must show in it where the CPU has AMX
    rc = libc.syscall(SYS_ARCH_PRCTL, REQ_PERM, XTILEDATA)
    out["request"] = [rc, ctypes.get_errno() if rc else 0]
    out["permitted_after_request"] = state(GET_PERM)
    print(json.dumps(out))
""")


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="the AMX state is asked for with x86-64 Linux's arch_prctl")
def test_float_only_process_never_asks_for_amx():
    """The AMX grant enlarges every signal frame of the process (a small sigaltstack then fails),
    so only rendering a bf16 kernel asks for it: after float32 and float64 calls the process
    holds no AMX tile permission (``arch_prctl(ARCH_GET_XCOMP_PERM)``, return code checked).  The
    probe is checked against the CPU: Linux supports the tile state exactly when /proc/cpuinfo
    lists amx_tile, and there a request for it succeeds and then shows in the same probe."""
    done = subprocess.run([sys.executable, "-c", AMX_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    if got["supported"][0] != 0 and got["supported"][1] == errno.EINVAL:
        pytest.skip("this kernel predates arch_prctl's XCOMP calls (Linux < 5.16): it never grants AMX")
    has_amx = "amx_tile" in cpu_flags()
    assert got["supported"] == [0, 0, int(has_amx)], got         # the syscall worked and agrees with cpuinfo
    assert got["permitted"] == [0, 0, 0], got                    # float calls asked for nothing
    if has_amx:
        assert got["request"] == [0, 0] and got["permitted_after_request"] == [0, 0, 1], got
    else:
        assert got["request"][0] != 0 and got["permitted_after_request"] == [0, 0, 0], got


def test_compiled_serve_takes_bfloat16_calls():
    """After the first bf16 call the compiled serve path takes two bf16 arrays whole (fresh output,
    a float32 out=, stacks, views); an out= numpy would cast into is left to the Python path."""
    from looptune.runtime.api import current_resolver
    from looptune.runtime.compiler import trampoline

    module = trampoline.load()
    if module is None:
        pytest.skip("no compiled trampoline here")
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 40, 24)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((24, 56)).astype(ml_dtypes.bfloat16)[:, ::-1]
    expected = np.matmul(a, b)
    assert np.allclose(runtime.matmul(a, b, threads=1), expected, rtol=1e-5, atol=1e-4)   # plans and registers
    resolver = current_resolver()
    served = module.serve(a, b, None, resolver.dispatch, 1, resolver.settings.small_flops)
    assert served is not None and served.dtype == np.float32
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-4)
    out = np.full(expected.shape, np.nan, np.float32)
    assert module.serve(a, b, out, resolver.dispatch, 1, resolver.settings.small_flops) is out
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    out16 = np.empty(expected.shape, ml_dtypes.bfloat16)
    assert module.serve(a, b, out16, resolver.dispatch, 1, resolver.settings.small_flops) is None
    assert runtime.matmul(a, b, out=out16, threads=1) is out16
