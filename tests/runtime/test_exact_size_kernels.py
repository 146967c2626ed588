"""Exact-size kernels (``render(..., sizes=...)``, ``codegen_sizes``): golden C, numpy's values on
sizes that divide the blocks and sizes that do not, -2 for other sizes, and who serves them: the
runtime for a problem its own record serves (a kernel cached apart from the generic one), the
measurement worker for every candidate it times."""
from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import numpy as np
import pytest

from looptune import runtime
from looptune.database import MachineKey, Record, save
from looptune.runtime import api
from looptune.runtime.compiler.build import BuildSettings, build, build_many, cache_key
from looptune.runtime.compiler.codegen import FixedSizes, KernelSource, Target, kernel_symbol, render
from looptune.runtime.compiler.defaults import BlockingParams, default_schedule
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.resolve import Resolver
from looptune.tuner.measure.protocol import MeasureConfig, RunStatus
from looptune.tuner.measure.worker import Worker

GOLDEN = Path(__file__).parent / "golden"
# m and n leave tails (64 = 10 x 6 + 4, 67 = 4 x 16 + 3), k fits one block
GOLDEN_CASE = ("blis_6x16_float32_avx2_exact_1x64x67x61", BlockingParams(6, 16, 72, 256, 1024).schedule(),
               Target("avx2", 32), FixedSizes(1, 64, 67, 61))


def test_exact_size_c_matches_golden(update_golden):
    name, sched, target, sizes = GOLDEN_CASE
    text = render(sched, "float32", target, symbol=f"golden_{name}", sizes=sizes).text
    path = GOLDEN / f"{name}.c"
    if update_golden:
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: generate it with --update-golden and review it"
    assert text == path.read_text(), f"generated C for {name} changed; review and rerun with --update-golden"
    assert "if (batch != 1 || M != 64 || N != 67 || K != 61) return -2;" in text
    assert "LT_MIN((int64_t)" not in text.split(f"int golden_{name}(")[1]     # no run-time block lengths


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 code needs an x86-64 compiler")
def test_exact_size_golden_compiles(tmp_path):
    """The golden file itself builds for its target (AVX2 flags: the compiler takes them on any
    x86-64 CPU, nothing runs)."""
    name = GOLDEN_CASE[0]
    source = KernelSource(f"golden_{name}", "float32", (GOLDEN / f"{name}.c").read_text())
    [result] = build_many([source], BuildSettings(cache_dir=tmp_path, arch_flags=("-mavx2", "-mfma")))
    assert result.ok, result.error
    assert result.symbol == f"golden_{name}" and Path(result.so_path).is_file()


SCHEDULES = {
    "blis_6x16": BlockingParams(6, 16, 72, 256, 1024).schedule(),
    "vector_m_parallel": BlockingParams(16, 6, 64, 128, 96, unroll_k=1, pack_a=False, parallel="n.o",
                                        vector="m").schedule(),
    "naive": Schedule.initial(),
}
# (batch, m, n, k): blocks divide (48 = 8 x 6, 64 = 4 x 16 = 8 x 8 ...); tails everywhere; a stack of
# 8^3; GEMV-like rows and columns
SIZES = [(1, 48, 64, 64), (1, 131, 67, 263), (8, 8, 8, 8), (1, 1, 64, 64), (2, 64, 1, 33)]
DTYPES = ("float32", "float64")


@pytest.fixture(scope="module")
def kernels():
    cases = [(name, FixedSizes(*s), dt) for name in SCHEDULES for s in SIZES for dt in DTYPES]
    cases += [("default", FixedSizes(*s), dt) for s in SIZES for dt in DTYPES]
    scheds = {c: SCHEDULES[c[0]] if c[0] != "default" else default_schedule(MatmulProblem(c[1].m, c[1].n, c[1].k,
                                                                                          c[1].batch, c[2]))
              for c in cases}
    results = build_many([render(scheds[c], c[2], sizes=c[1]) for c in cases])
    out = {}
    for c, r in zip(cases, results):
        assert r.ok, r.error
        out[c] = Kernel(r.so_path, r.symbol, c[2])
    return out


def _operands(sizes: FixedSizes, dtype: str, layout: str, seed: int):
    a, b, c = MatmulProblem(sizes.m, sizes.n, sizes.k, sizes.batch, dtype, layout).make_operands(seed)
    return a, b, np.full_like(c, np.nan)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES) + ["default"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_size_kernels_match_numpy(kernels, schedule, sizes, dtype):
    sizes = FixedSizes(*sizes)
    kernel = kernels[(schedule, sizes, dtype)]
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == "float32" else {"rtol": 1e-10, "atol": 1e-10}
    for seed, (layout, threads) in enumerate([("nn", 1), ("tn", 3), ("nt", 2), ("tt", 1)]):
        a, b, c = _operands(sizes, dtype, layout, seed)
        assert kernel.invoke(a, b, c, 0, threads) == 0
        np.testing.assert_allclose(c, a @ b, **tol)
        assert kernel.invoke(a, b, c, 1, threads) == 0        # accumulate
        np.testing.assert_allclose(c, 2 * (a @ b), **tol)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES) + ["default"])
def test_exact_size_kernels_refuse_other_sizes(kernels, schedule):
    """Called with sizes other than its own, an exact-size kernel returns -2 and writes nothing."""
    sizes = FixedSizes(1, 48, 64, 64)
    kernel = kernels[(schedule, sizes, "float32")]
    for other in (FixedSizes(1, 47, 64, 64), FixedSizes(1, 48, 65, 64), FixedSizes(1, 48, 64, 63),
                  FixedSizes(2, 48, 64, 64)):
        a, b, c = _operands(other, "float32", "nn", 0)
        c[...] = 7.0
        assert kernel.invoke(a, b, c, 0, 1) == -2
        assert np.all(c == 7.0)


def test_exact_size_bfloat16_kernel_matches_numpy():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sizes = FixedSizes(1, 37, 45, 70)
    problem = MatmulProblem(sizes.m, sizes.n, sizes.k, 1, "bfloat16")
    source = render(default_schedule(problem), "bfloat16", sizes=sizes)
    result = build(source)
    assert result.ok, result.error
    kernel = Kernel(result.so_path, result.symbol, "bfloat16")
    a, b, c = problem.make_operands(0)
    assert kernel.invoke(a, b, c, 0, 1) == 0
    ref = a.astype(np.float32) @ b.astype(np.float32)
    np.testing.assert_allclose(c, ref, rtol=1e-3, atol=1e-3)
    assert a.dtype == ml_dtypes.bfloat16


def test_exact_size_kernels_have_their_own_names_and_cache_entries():
    sched, target, settings = SCHEDULES["blis_6x16"], Target.detect(), BuildSettings.from_env()
    generic = render(sched, "float32", target)
    exact = render(sched, "float32", target, sizes=FixedSizes(1, 64, 64, 64))
    other = render(sched, "float32", target, sizes=FixedSizes(1, 64, 64, 65))
    symbols = {generic.symbol, exact.symbol, other.symbol}
    assert len(symbols) == 3
    assert generic.symbol == kernel_symbol(sched, "float32", target)        # generic names do not change
    assert exact.symbol == kernel_symbol(sched, "float32", target, sizes=FixedSizes(1, 64, 64, 64))
    assert len({cache_key(s, settings) for s in (generic, exact, other)}) == 3
    with pytest.raises(ValueError):
        render(sched, "float32", target, sizes=FixedSizes(1, 0, 64, 64))


@pytest.fixture
def user_db(tmp_path):
    path = tmp_path / "user.h5"
    runtime.configure(user_db=path, embedded_db=None, fallback="nearest", numpy_handoff=False, threads=1)
    yield path
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def _record(problem):
    trace = Trace((Step.make("split", loop="n", factor=16),))
    return Record(problem, MachineKey.current(), trace, 50.0, 1.0, 40.0, True, "test", "test", 1, 1.7e9)


def test_runtime_serves_exact_records_with_exact_size_kernels(user_db, monkeypatch):
    """An exact record's problem runs its exact-size kernel; a shape the same record serves by
    nearest lookup runs the generic one; the resolver caches them apart (sizes in the key)."""
    asked = []
    real_kernel = Resolver.kernel

    def kernel(self, schedule, dtype, inputs=None, sizes=None):
        asked.append(sizes)
        return real_kernel(self, schedule, dtype, inputs, sizes)

    monkeypatch.setattr(Resolver, "kernel", kernel)
    save(user_db, [_record(MatmulProblem(40, 36, 20))])
    runtime.configure(user_db=user_db)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 20)).astype(np.float32), rng.standard_normal((20, 36)).astype(np.float32)
    a2 = rng.standard_normal((41, 20)).astype(np.float32)
    out = np.empty((40, 36), np.float32)
    np.testing.assert_allclose(runtime.matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)
    assert runtime.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runtime.matmul(a2, b), a2 @ b, rtol=1e-5, atol=1e-5)
    assert runtime.explain(a, b).source == "exact" and runtime.explain(a2, b).source == "nearest"
    assert "exact-size" in runtime.explain(a, b).describe() and "exact-size" not in runtime.explain(a2, b).describe()
    assert asked == [FixedSizes(1, 40, 36, 20), None]
    resolver = api.current_resolver()
    exact_kernel = resolver.dispatch[("float32", 40, 36, 20, 1, "nn", 1)][0]
    generic_kernel = resolver.dispatch[("float32", 41, 36, 20, 1, "nn", 1)][0]
    assert exact_kernel.symbol != generic_kernel.symbol
    sched = runtime.explain(a, b).schedule
    assert resolver.kernel(sched, "float32", sizes=FixedSizes(1, 40, 36, 20)) is exact_kernel     # cached apart
    assert resolver.kernel(sched, "float32") is generic_kernel


def test_stacked_exact_record_is_served_by_its_kernel(user_db):
    save(user_db, [_record(MatmulProblem(8, 8, 8, 6))])
    runtime.configure(user_db=user_db)
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 8, 8)).astype(np.float32), rng.standard_normal((6, 8, 8)).astype(np.float32)
    out = np.empty((6, 8, 8), np.float32)
    assert runtime.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)
    assert runtime.explain(a, b).source == "exact"


NO_ML_DTYPES = pytest.mark.skipif(importlib.util.find_spec("ml_dtypes") is None, reason="needs ml_dtypes")


@pytest.mark.parametrize("problem", [MatmulProblem(24, 40, 16), MatmulProblem(24, 40, 16, 3, "float64", "tn"),
                                     MatmulProblem(1, 40, 16, 1, "float32", "tt"),
                                     pytest.param(MatmulProblem(33, 40, 70, 2, "bfloat16", "nt"), marks=NO_ML_DTYPES)],
                         ids=str)
def test_worker_times_the_runtime_call_path_of_an_exact_size_kernel(problem):
    """The worker verifies and times an exact-size kernel through ``serve`` (runtime.matmul's
    compiled path), on operands of the problem's own sizes."""
    source = render(default_schedule(problem), problem.dtype, sizes=FixedSizes.of(problem))
    result = build(source)
    assert result.ok, result.error
    config = MeasureConfig(warmup=1, min_repeats=2, max_repeats=3, min_total_seconds=0.0, min_sample_seconds=1e-4)
    reply = Worker().handle({"op": "run", "problem": problem.key(), "so_path": result.so_path,
                             "symbol": result.symbol, "config": config.to_json()})
    assert reply["status"] == RunStatus.OK.value, reply
    assert len(reply["seconds"]) >= 2


def test_worker_reports_a_kernel_for_other_sizes():
    built_for = MatmulProblem(24, 40, 16)
    result = build(render(default_schedule(built_for), "float32", sizes=FixedSizes.of(built_for)))
    config = MeasureConfig(warmup=1, min_repeats=2, max_repeats=3, min_total_seconds=0.0)
    reply = Worker().handle({"op": "run", "problem": MatmulProblem(24, 40, 17).key(), "so_path": result.so_path,
                             "symbol": result.symbol, "config": config.to_json()})
    assert reply["status"] == RunStatus.KERNEL_ERROR.value and "-2" in reply["error"]


def test_a_fused_product_runs_the_plain_records_exact_size_kernel(user_db, monkeypatch):
    """A fused epilogue with no record of its own takes the plain product's: tuned for these very
    sizes, it is compiled as an exact-size kernel (with the epilogue); at other sizes, generic."""
    asked = []
    real_kernel = Resolver.kernel

    def kernel(self, schedule, dtype, inputs=None, sizes=None, op="matmul"):
        asked.append((sizes, op))
        return real_kernel(self, schedule, dtype, inputs, sizes, op)

    monkeypatch.setattr(Resolver, "kernel", kernel)
    save(user_db, [_record(MatmulProblem(40, 36, 20))])
    runtime.configure(user_db=user_db)
    rng = np.random.default_rng(3)
    a, b, bias = (rng.standard_normal(s).astype(np.float32) for s in ((40, 20), (20, 36), (36,)))
    a2 = rng.standard_normal((41, 20)).astype(np.float32)
    np.testing.assert_allclose(runtime.matmul(a, b, bias=bias, activation="relu"), np.maximum(a @ b + bias, 0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runtime.matmul(a2, b, bias=bias, activation="relu"), np.maximum(a2 @ b + bias, 0),
                               rtol=1e-5, atol=1e-5)
    assert asked == [(FixedSizes(1, 40, 36, 20), "matmul+bias+relu"), (None, "matmul+bias+relu")]
