"""runtime.matmul stays a drop-in when LoopTune cannot or should not serve a call: numpy
computes, one warning names the cause, and later calls go straight to numpy."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from looptune import runtime
from looptune.database import MachineKey, Record, save
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.resolve import Resolver
from looptune.runtime.configuration import RuntimeSettings



@pytest.fixture
def user_db(tmp_path):
    path = tmp_path / "user.h5"
    runtime.configure(user_db=path, embedded_db=None, fallback="off", numpy_handoff=True)
    yield path
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def record(problem, trace=Trace((Step.make("split", loop="n", factor=16),)), gflops=50.0, numpy_gflops=40.0):
    return Record(problem, MachineKey.current(), trace, gflops, 1.0, numpy_gflops, True, "test", "test", 1, 1.7e9)


def test_numpy_handoff_when_no_candidate_beat_numpy(user_db, caplog):
    save(user_db, [record(MatmulProblem(64, 48, 32), gflops=20.0, numpy_gflops=60.0),
                   record(MatmulProblem(64, 48, 40), gflops=80.0, numpy_gflops=60.0)])
    runtime.configure(user_db=user_db)
    a, b = np.ones((64, 32), np.float32), np.ones((32, 48), np.float32)
    np.testing.assert_array_equal(runtime.matmul(a, b), a @ b)
    out = np.empty((64, 48), np.float32)
    assert runtime.matmul(a, b, out=out) is out and np.array_equal(out, a @ b)     # the compiled path calls numpy
    slow = runtime.explain(a, b)
    assert slow.source == "numpy" and "20.0 vs 60.0" in slow.reason and "why:" in slow.describe()
    fast = runtime.explain(np.ones((64, 40), np.float32), np.ones((40, 48), np.float32))
    assert fast.source == "exact"
    runtime.configure(numpy_handoff=False)                 # the generated code alone, for benchmarks
    assert runtime.explain(a, b).source == "exact"


def test_a_matrix_times_a_vector_goes_to_numpy_unless_its_record_says_otherwise(user_db):
    """N = 1 with K contiguous in A is a dot product per output, which no schedule vectorizes:
    numpy's gemv serves it, by default and by nearest records; its own record that beat numpy,
    a transposed A (M contiguous), bfloat16 and the hand-off switch keep the generated kernel."""
    save(user_db, [record(MatmulProblem(64, 1, 48), gflops=80.0, numpy_gflops=60.0)])
    runtime.configure(user_db=user_db, embedded_db=None, fallback="off")
    rng = np.random.default_rng(0)
    a, v = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    served = runtime.explain(a, v)
    assert served.source == "numpy" and "dot product along K" in served.reason
    np.testing.assert_allclose(runtime.matmul(a, v), a @ v, rtol=1e-5, atol=1e-5)
    assert runtime.explain(a[:, :48], v[:48]).source == "exact"              # its record beat numpy
    assert runtime.explain(a.T, v).source != "numpy"                          # M contiguous: vectorizes
    assert runtime.explain(np.ones((64, 64)), np.ones((64, 1))).source == "numpy"     # float64, (K, 1) B
    runtime.configure(numpy_handoff=False)
    assert runtime.explain(a, v).source != "numpy"
    np.testing.assert_allclose(runtime.matmul(a, v), a @ v, rtol=1e-4, atol=1e-4)


def test_on_several_threads_numpy_takes_problems_it_beat_per_thread(user_db):
    """Next to numpy's parallel calls our kernel gets one core: a 2-thread record whose kernel
    beat numpy (77 vs 71) but runs at half that per thread goes to numpy (a memory-bound GEMV);
    one that stays ahead on one core keeps its kernel, and so does every one-thread record."""
    save(user_db, [record(MatmulProblem(1, 2048, 2048, threads=2), gflops=77.0, numpy_gflops=71.0),
                   record(MatmulProblem(256, 256, 256, threads=2), gflops=500.0, numpy_gflops=250.0),
                   record(MatmulProblem(1, 2048, 2048), gflops=77.0, numpy_gflops=71.0)])
    runtime.configure(user_db=user_db)
    a, b = np.ones((1, 2048), np.float32), np.ones((2048, 2048), np.float32)
    gemv = runtime.explain(a, b, threads=2)
    assert gemv.source == "numpy" and "per thread" in gemv.reason and "38.5" in gemv.reason
    np.testing.assert_array_equal(runtime.matmul(a, b, threads=2), a @ b)
    square = np.ones((256, 256), np.float32)
    assert runtime.explain(square, square, threads=2).source == "exact"
    assert runtime.explain(a, b, threads=1).source == "exact"
    runtime.configure(numpy_handoff=False)
    assert runtime.explain(a, b, threads=2).source == "exact"


def test_the_per_thread_rule_counts_a_margin():
    from looptune.runtime.handoff import numpy_beats_one_core
    assert numpy_beats_one_core(77.0, 71.0, 2) and numpy_beats_one_core(400.0, 50.0, 16)
    assert not numpy_beats_one_core(500.0, 250.0, 2)       # within the margin: ours on one core is about as fast
    assert not numpy_beats_one_core(77.0, 71.0, 1) and not numpy_beats_one_core(77.0, None, 2)


def test_handoff_switch_is_read_from_the_environment():
    assert RuntimeSettings.from_env({"LOOPTUNE_NO_NUMPY_HANDOFF": "1"}).numpy_handoff is False
    assert RuntimeSettings.from_env({}).numpy_handoff is True


class RefusesLargeM:
    """A kernel that refuses (-2, its layout precondition) operands of 16 rows or more, as a
    kernel with a precondition on strides would refuse larger shapes of its family."""

    def __init__(self, kernel) -> None:
        self.kernel, self.symbol = kernel, kernel.symbol

    def invoke(self, a, b, c, accumulate, nthreads):
        return -2 if a.shape[-2] >= 16 else self.kernel.invoke(a, b, c, accumulate, nthreads)


def test_kernel_refusing_a_larger_shape_hands_it_to_numpy(user_db, caplog, monkeypatch):
    """A kernel that refuses (-2) a larger shape of its family served by nearest lookup, even
    from contiguous copies: the call computes anyway and the key goes to numpy."""
    real_kernel = Resolver.kernel
    monkeypatch.setattr(Resolver, "kernel",
                        lambda self, schedule, dtype: RefusesLargeM(real_kernel(self, schedule, dtype)))
    save(user_db, [record(MatmulProblem(4, 64, 64))])
    runtime.configure(user_db=user_db, fallback="nearest")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        for _ in range(2):
            np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a @ b, rtol=1e-4, atol=1e-4)
    r = runtime.explain(a, b, threads=1)
    assert r.source == "numpy" and "returned -2" in r.reason
    assert caplog.text.count("numpy.matmul serves") == 1      # warned once, then served quietly


class RefusesStridedA:
    """A kernel whose precondition is a contiguous A (it refuses a row-step view with -2)."""

    def __init__(self, kernel) -> None:
        self.kernel, self.symbol = kernel, kernel.symbol

    def invoke(self, a, b, c, accumulate, nthreads):
        return self.kernel.invoke(a, b, c, accumulate, nthreads) if a.flags.c_contiguous else -2


def test_a_refusal_with_a_misaligned_out_does_not_demote_the_shape(user_db, monkeypatch):
    """The retry after -2 computes into an aligned temporary when ``out`` is misaligned, so an odd
    ``out`` on one call does not hand the shape to numpy for the rest of the process."""
    real_kernel = Resolver.kernel
    monkeypatch.setattr(Resolver, "kernel",
                        lambda self, schedule, dtype: RefusesStridedA(real_kernel(self, schedule, dtype)))
    rng = np.random.default_rng(4)
    a = rng.standard_normal((96, 48)).astype(np.float32)[::2]           # 48 x 48, row step 2
    b = rng.standard_normal((48, 40)).astype(np.float32)
    raw = np.zeros(48 * 40 * 4 + 1, np.uint8)
    out = np.frombuffer(raw.data, np.float32, 48 * 40, offset=1).reshape(48, 40)   # misaligned
    assert not out.flags.aligned
    assert runtime.matmul(a, b, out=out, threads=1) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)
    assert runtime.explain(a, b, threads=1).source != "numpy"


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


CALL = """
    import logging, numpy as np
    logging.basicConfig(level=logging.WARNING)
    from looptune import runtime
    a = np.arange(61 * 67, dtype=np.float32).reshape(61, 67) / 1000
    b = np.arange(67 * 59, dtype=np.float32).reshape(67, 59) / 1000
    for _ in range(3):
        np.testing.assert_allclose(runtime.matmul(a, b), a @ b, rtol=1e-5)
    print(runtime.explain(a, b).source)
"""


@pytest.mark.parametrize("case", ["no compiler", "cache is a file", "cache on a read-only file system"])
def test_unusable_toolchain_or_cache_falls_back_to_numpy(tmp_path, case):
    env = {"LOOPTUNE_DB": "", "LOOPTUNE_NO_EMBEDDED_DB": "1", "LOOPTUNE_CACHE_DIR": str(tmp_path / "cache")}
    if case == "no compiler":
        env["LOOPTUNE_CC"] = str(tmp_path / "no-such-cc")
    elif case == "cache is a file":
        (tmp_path / "cache").write_text("not a directory")
    else:   # (chmod would not stop root, who runs CI; nobody can create directories in /proc)
        env["LOOPTUNE_CACHE_DIR"] = "/proc/looptune-kernel-cache"
    done = _run(CALL, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "numpy"
    assert done.stderr.count("numpy.matmul serves") == 1, done.stderr


def test_structured_field_views_compute_like_numpy():
    s = np.zeros((40, 30), dtype=[("x", "f4"), ("y", "i2")])
    s["x"] = np.arange(1200, dtype=np.float32).reshape(40, 30) / 100
    t = np.zeros((30, 20), dtype=[("x", "f4"), ("y", "i2")])
    t["x"] = np.arange(600, dtype=np.float32).reshape(30, 20) / 100
    np.testing.assert_allclose(runtime.matmul(s["x"], t["x"]), np.matmul(s["x"], t["x"]), rtol=1e-5)
    out = np.zeros((40, 20), dtype=[("x", "f4"), ("y", "i2")])
    runtime.matmul(s["x"], t["x"], out=out["x"])
    np.testing.assert_allclose(out["x"], np.matmul(s["x"], t["x"]), rtol=1e-5)


def test_fortran_stack_times_other_dtype():
    a = np.asfortranarray(np.random.default_rng(1).standard_normal((3, 5, 7)).astype(np.float32))
    b = np.random.default_rng(2).standard_normal((7, 4))
    got, want = runtime.matmul(a, b), np.matmul(a, b)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("alias", ["a", "b", "a_part"])
def test_out_overlapping_an_input(alias):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((48, 48)).astype(np.float32)
    b = rng.standard_normal((48, 48)).astype(np.float32)
    want = a @ b
    if alias == "a":
        got = runtime.matmul(a, b, out=a)
    elif alias == "b":
        got = runtime.matmul(a, b, out=b)
    else:
        big = np.zeros((96, 48), np.float32)
        big[:48] = a
        got = runtime.matmul(big[:48], b, out=big[24:72])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shift", [1, 2])
def test_out_overlapping_an_input_across_a_looped_batch(shift):
    """A batch that does not fold runs one kernel call per index; out overlapping an input a few
    indices on must still get numpy's answer (each call alone sees no overlap)."""
    base = np.arange(4 * 6 * 2 * 16 * 16, dtype=np.float32).reshape(6 * 4, 2, 16, 16)[::4] / 5000
    b = (np.arange(2 * 16 * 16, dtype=np.float32).reshape(1, 2, 16, 16) / 7000)
    a, out = base[:-shift, :1], base[shift:]
    want = np.matmul(a.copy(), b)
    got = runtime.matmul(a, b, out=out)
    assert got is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_out_is_written_in_place_on_the_fast_path():
    a, b = np.ones((64, 64), np.float32), np.ones((64, 64), np.float32)
    out = np.empty((64, 64), np.float32)
    assert runtime.matmul(a, b, out=out) is out and np.all(out == 64)
    out_t = np.empty((64, 64), np.float32).T                # a transposed out is written through its strides
    assert runtime.matmul(a, b, out=out_t) is out_t and np.all(out_t == 64)
    ro = np.empty((64, 64), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        runtime.matmul(a, b, out=ro)


def test_the_handoff_counts_what_serving_through_numpy_costs():
    """A small problem goes to numpy only when numpy wins by more than our entry costs: the record
    times our kernel through runtime.matmul, numpy as a bare call."""
    from looptune.runtime.handoff import numpy_serves_faster
    small, large = MatmulProblem(64, 64, 64).flops, MatmulProblem(1024, 1024, 1024).flops
    assert not numpy_serves_faster(100.0, 120.0, small)      # 5.2 us ours, 4.4 + 1 us through numpy
    assert numpy_serves_faster(60.0, 120.0, small)
    assert numpy_serves_faster(100.0, 101.0, large)
    assert not numpy_serves_faster(101.0, 100.0, large)
    assert not numpy_serves_faster(50.0, None, small)
