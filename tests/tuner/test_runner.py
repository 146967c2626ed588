"""LocalRunner classifies good, crashing, hanging, wrong and refusing kernels; replay is exact.

The kernels are tiny hand-written C files with the kernel ABI, compiled here with gcc, so
these tests do not depend on the code generator.  No assertion is about speed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.replay import RecordingRunner, ReplayMissError, ReplayRunner, ResultStore
from looptune.tuner.measure.runner import (Artifact, Candidate, LocalRunner, MeasureConfig, RunResult, RunStatus,
                                           default_tolerance)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

SIGNATURE = """int {name}(int64_t batch, int64_t M, int64_t N, int64_t K,
    const T *A, int64_t sAb, int64_t sAm, int64_t sAk,
    const T *B, int64_t sBb, int64_t sBk, int64_t sBn,
    T *C, int64_t sCb, int64_t sCm, int64_t sCn, int32_t accumulate, int32_t nthreads)"""

NAIVE_BODY = """{
    (void)nthreads;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          T acc = accumulate ? C[b*sCb + m*sCm + n*sCn] : (T)0;
          for (int64_t k = 0; k < K; ++k)
            acc += A[b*sAb + m*sAm + k*sAk] * B[b*sBb + k*sBk + n*sBn];
          C[b*sCb + m*sCm + n*sCn] = acc;
        }
    return 0;
}"""

KERNELS = {
    "naive": NAIVE_BODY,
    "segfault": "{ volatile int *p = (int *)0; *p = 1; return 0; }",
    "forever": "{ volatile int64_t i = 0; for (;;) ++i; return 0; }",
    # Drops the last k term: a plausible tiling bug, off by ~|a*b| per element.
    "wrong": NAIVE_BODY.replace("k < K", "k < K - 1"),
    # Accepts only unit-stride n, as a vectorized kernel would.
    "picky": "{ if (sCn != 1 || sBn != 1) return -2; return 0; }",
    # Correct values, then one element past the end of C.
    "overrun": NAIVE_BODY.replace("return 0;", "C[(batch-1)*sCb + (M-1)*sCm + N*sCn] = 0; return 0;"),
    # Correct values, but scribbles on its const input (a packing bug).
    "clobber": NAIVE_BODY.replace("return 0;", "((T *)A)[0] = 42; return 0;"),
    "noisy": NAIVE_BODY.replace("(void)nthreads;", '(void)nthreads; printf("hello from the kernel\\n");'),
    # Correct only when called as runtime.matmul would call it: one thread below its small-problem size.
    "serial_only": NAIVE_BODY.replace("(void)nthreads;", "if (nthreads != 1) return -1;"),
}


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """dtype -> kernel name -> Artifact, one .so per dtype."""
    out = {}
    d = tmp_path_factory.mktemp("kernels")
    for dtype, ctype in (("float32", "float"), ("float64", "double")):
        src = d / f"kernels_{dtype}.c"
        src.write_text("#include <stdint.h>\n#include <stdio.h>\ntypedef " + ctype + " T;\n" + "\n".join(
            SIGNATURE.format(name=f"k_{name}") + body for name, body in KERNELS.items()))
        so = d / f"kernels_{dtype}.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
        out[dtype] = {name: Artifact(str(so), f"k_{name}") for name in KERNELS}
    return out


FAST = MeasureConfig(warmup=1, min_repeats=3, max_repeats=20, min_total_seconds=0.005, timeout_seconds=2.0)


@pytest.fixture(scope="module")
def runner():
    with LocalRunner(FAST) as r:
        yield r


def cand(libs, kernel, problem=MatmulProblem(24, 20, 16), tag=""):
    return Candidate(problem, libs[problem.dtype][kernel], tag=tag or kernel)


def assert_measured(r: RunResult):
    assert r.status is RunStatus.OK, r.error
    assert r.seconds is not None and r.seconds > 0 and r.samples and r.number >= 1
    assert r.q1_seconds <= r.seconds <= r.q3_seconds
    assert r.gflops is not None and 0 < r.gflops < 1e5 and math.isfinite(r.gflops)
    assert r.numpy_gflops is not None and r.numpy_gflops > 0


@pytest.mark.parametrize("problem", [
    MatmulProblem(24, 20, 16),
    MatmulProblem(7, 9, 33, batch=3, dtype="float64", layout="tn"),
    MatmulProblem(5, 16, 12, layout="nt"),
    MatmulProblem(8, 3, 257, batch=2, layout="tt"),
], ids=str)
def test_naive_kernel_is_measured(runner, libs, problem):
    [r] = runner.run([cand(libs, "naive", problem)])
    assert_measured(r)
    assert r.problem_key == problem.key() and r.tag == "naive"


def test_segfault_is_a_crash_and_the_runner_goes_on(runner, libs):
    before = runner.restarts
    crash, ok = runner.run([cand(libs, "segfault"), cand(libs, "naive")])
    assert crash.status is RunStatus.CRASH and crash.seconds is None
    assert "SIGSEGV" in crash.error
    assert_measured(ok)
    assert runner.restarts == before + 1


def test_hang_is_a_timeout_and_the_runner_recovers(runner, libs):
    pid = runner.worker_pids()
    hang, ok = runner.run([cand(libs, "forever"), cand(libs, "naive")])
    assert hang.status is RunStatus.TIMEOUT and hang.seconds is None
    assert_measured(ok)
    assert runner.worker_pids() != pid


def test_wrong_values_get_no_time(runner, libs):
    [r] = runner.run([cand(libs, "wrong")])
    assert r.status is RunStatus.WRONG_ANSWER
    assert r.seconds is None and r.gflops is None and r.samples == ()
    assert "elements wrong" in r.error


def test_out_of_bounds_write_is_a_wrong_answer(runner, libs):
    [r] = runner.run([cand(libs, "overrun")])
    assert r.status is RunStatus.WRONG_ANSWER and "outside C" in r.error


def test_writing_an_input_is_a_wrong_answer_and_does_not_poison_the_next(runner, libs):
    p = MatmulProblem(6, 5, 4, layout="tn")
    bad, good = runner.run([cand(libs, "clobber", p), cand(libs, "naive", p)])
    assert bad.status is RunStatus.WRONG_ANSWER and "input operand" in bad.error
    assert_measured(good)


def test_negative_return_is_a_kernel_error(runner, libs):
    [r] = runner.run([cand(libs, "picky", MatmulProblem(8, 8, 8, layout="nt"))])
    assert r.status is RunStatus.KERNEL_ERROR and "-2" in r.error and r.seconds is None


def test_kernel_stdout_does_not_break_the_protocol(runner, libs):
    assert_measured(runner.run([cand(libs, "noisy")])[0])


def test_build_errors_are_results(runner, libs, tmp_path):
    class FailedBuild:
        ok, so_path, symbol, error, seconds = False, None, None, "gcc: error: boom", 0.1

    p = MatmulProblem(4, 4, 4)
    failed = Candidate.from_build(p, FailedBuild(), tag="t")
    missing_file = Candidate(p, Artifact(str(tmp_path / "nope.so"), "k_naive"))
    missing_symbol = Candidate(p, Artifact(libs["float32"]["naive"].so_path, "k_absent"))
    rs = runner.run([failed, missing_file, missing_symbol])
    assert [r.status for r in rs] == [RunStatus.BUILD_ERROR] * 3
    assert "boom" in rs[0].error and "k_absent" in rs[2].error


def test_numpy_reference_is_cached_per_problem(runner, libs):
    # Measured once; again only if the first measurement was disturbed (then the best is kept).
    p = MatmulProblem(16, 16, 16, batch=2)
    a, b = runner.run([cand(libs, "naive", p), cand(libs, "naive", p, tag="again")])
    assert b.numpy_seconds is not None and b.numpy_seconds <= a.numpy_seconds
    seconds, tries, settled = runner._reference[p]
    assert tries <= 2 and seconds == b.numpy_seconds


def test_threads_get_their_own_worker_and_close_kills_workers(libs):
    with LocalRunner(FAST) as r:
        [res] = r.run([cand(libs, "naive", MatmulProblem(16, 16, 16, threads=2))])
        assert_measured(res)
        pids = r.worker_pids()
        assert set(pids) == {2}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert r.run([cand(libs, "naive")])[0].status is RunStatus.RUNNER_ERROR


def test_cache_flush_times_single_calls(libs):
    with LocalRunner(MeasureConfig(warmup=0, min_repeats=2, max_repeats=2, min_total_seconds=0, flush_cache=True),
                     measure_numpy=False) as r:
        [res] = r.run([cand(libs, "naive")])
    assert res.status is RunStatus.OK and res.number == 1 and len(res.samples) == 2 and res.numpy_seconds is None


def test_a_kernel_far_slower_than_numpy_is_timed_once(libs):
    """slow_cutoff: the naive kernel on 96^3 is far more than 1.01x numpy's time, so one call is the sample."""
    p = MatmulProblem(96, 96, 96)
    with LocalRunner(MeasureConfig(warmup=0, min_repeats=5, min_total_seconds=0, slow_cutoff=1.01)) as r:
        [res] = r.run([cand(libs, "naive", p)])
    assert res.status is RunStatus.OK and len(res.samples) == 1 and res.number == 1
    with LocalRunner(MeasureConfig(warmup=0, min_repeats=5, min_total_seconds=0)) as r:
        [res] = r.run([cand(libs, "naive", p)])
    assert len(res.samples) >= 5


def test_a_small_problem_is_timed_with_the_threads_matmul_would_use(libs):
    """The worker calls kernels as runtime.matmul does: a problem below the runtime's
    small_flops runs on one thread whatever its thread count."""
    with LocalRunner(FAST, measure_numpy=False) as r:
        [res] = r.run([cand(libs, "serial_only", MatmulProblem(16, 16, 16, threads=2))])
    assert res.status is RunStatus.OK, res.error


def test_a_library_rebuilt_in_place_is_measured_afresh(runner, tmp_path):
    """dlopen would hand back the first library for the same path; the worker loads a fresh copy."""
    path = tmp_path / "rebuilt.so"
    results = []
    for body in (NAIVE_BODY, KERNELS["wrong"]):
        src = tmp_path / "k.c"
        src.write_text("#include <stdint.h>\ntypedef float T;\n" + SIGNATURE.format(name="k_rebuilt") + body)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(tmp_path / "new.so"), str(src)], check=True)
        os.replace(tmp_path / "new.so", path)
        [res] = runner.run([Candidate(MatmulProblem(24, 20, 16), Artifact(str(path), "k_rebuilt"))])
        results.append(res.status)
    assert results == [RunStatus.OK, RunStatus.WRONG_ANSWER]


def test_tolerance_scales_with_k_and_dtype():
    r32, a32 = default_tolerance("float32", 4096)
    r64, a64 = default_tolerance("float64", 4096)
    assert a32 > a64 * 1e6 and default_tolerance("float32", 8192)[1] == 2 * a32
    assert MeasureConfig(atol=0.5).tolerance("float32", 4096) == (r32, 0.5)


# ----------------------------------------------------------------------------- replay

def _recorded():
    p = MatmulProblem(64, 64, 64)
    ok = RunResult(RunStatus.OK, p.key(), '{"steps": []}', seconds=1e-4, q1_seconds=9e-5, q3_seconds=1.1e-4,
                   samples=(9e-5, 1e-4, 1.1e-4), number=10, gflops=p.flops / 1e-4 / 1e9,
                   numpy_seconds=5e-5, numpy_gflops=p.flops / 5e-5 / 1e9)
    bad = RunResult(RunStatus.WRONG_ANSWER, p.key(), '{"steps": [1]}', error="3 of 4096 elements wrong")
    return p, [ok, bad]


def test_replay_is_deterministic_and_strict():
    p, recs = _recorded()
    replay = ReplayRunner(recs)
    cands = [Candidate(p, None, tag=r.tag) for r in recs]
    assert replay.run(cands) == replay.run(cands) == recs
    with pytest.raises(ReplayMissError):
        replay.run([Candidate(p, None, tag="never measured")])
    lenient = ReplayRunner(recs, on_missing=RunResult(RunStatus.TIMEOUT, error="not recorded"))
    [miss] = lenient.run([Candidate(p, None, tag="x")])
    assert miss.status is RunStatus.TIMEOUT and miss.tag == "x" and miss.problem_key == p.key()


def test_jsonl_round_trip(tmp_path):
    _, recs = _recorded()
    path = tmp_path / "runs.jsonl"
    ResultStore(recs).save(path)
    assert all(json.loads(line)["v"] == 1 for line in path.read_text().splitlines())
    assert list(ResultStore.load(path)) == recs
    assert ReplayRunner.load(path).run([Candidate(MatmulProblem.from_key(r.problem_key), None, r.tag)
                                        for r in recs]) == recs


def test_recording_runner_feeds_replay(runner, libs, tmp_path):
    path = tmp_path / "rec.jsonl"
    rec = RecordingRunner(runner, path=path)
    cands = [cand(libs, "naive"), cand(libs, "wrong")]
    measured = rec.run(cands)
    assert [r.status for r in measured] == [RunStatus.OK, RunStatus.WRONG_ANSWER]
    assert ReplayRunner(rec.store).run(cands) == measured
    assert ReplayRunner.load(path).run(cands) == measured
