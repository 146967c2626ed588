"""LoopTune's thread pool (``looptune.runtime.compiler.pool``): every iteration runs once, on a
thread number below the thread count; a second caller is never queued behind a busy pool;
kernels really run on it; numpy's OpenBLAS runs its parallel calls on it and stays right (from
many threads at once, after a fork); the settings come from the environment."""
import ctypes
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime.compiler import environment, pool
from looptune.runtime.compiler.build import BuildSettings
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.workload import MatmulProblem

TASK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int)


@pytest.fixture(scope="module")
def lib():
    library = pool.load()
    if library is None:
        pytest.skip("no thread pool library here")
    library.lt_pool_for.argtypes = [ctypes.c_int, ctypes.c_int64, TASK, ctypes.c_void_p]
    return library


def run_loop(lib, nthreads: int, count: int) -> list[tuple[int, int, int]]:
    """(iteration, tid, OS thread) of each iteration the pool ran."""
    seen: list[tuple[int, int, int]] = []

    @TASK
    def task(_ctx, it, tid):
        seen.append((it, tid, threading.get_native_id()))

    assert lib.lt_pool_for(nthreads, count, task, None) == 0
    return seen


@pytest.mark.parametrize("nthreads", [1, 2, 3, 8, 16, 64])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 300])
def test_every_iteration_runs_once_on_a_thread_number_below_the_count(lib, nthreads, count):
    seen = run_loop(lib, nthreads, count)
    assert sorted(it for it, _, _ in seen) == list(range(count))
    threads_of_tid: dict[int, set[int]] = {}
    tids_of_thread: dict[int, set[int]] = {}
    for _, tid, thread in seen:
        assert 0 <= tid < max(1, min(nthreads, count))
        threads_of_tid.setdefault(tid, set()).add(thread)
        tids_of_thread.setdefault(thread, set()).add(tid)
    # one thread per thread number, one number per thread: the kernel's per-thread copies never race
    assert all(len(v) == 1 for v in threads_of_tid.values())
    assert all(len(v) == 1 for v in tids_of_thread.values())
    assert threads_of_tid.get(0, {threading.get_native_id()}) == {threading.get_native_id()}   # the caller is 0


BACKOFF_DEFAULTS = (1_000_000, 128_000_000, 500_000, 50_000)   # pool.c's: min, max, solo head, stall (ns)


@pytest.fixture
def backoff(lib):
    lib.lt_pool_set_backoff.argtypes = [ctypes.c_int64] * 4
    lib.lt_pool_stalls.restype = lib.lt_pool_solo_calls.restype = ctypes.c_int64
    yield lib
    lib.lt_pool_set_backoff(*BACKOFF_DEFAULTS)


def busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_worker_that_holds_the_caller_makes_the_next_loops_start_alone(backoff):
    """A worker descheduled in the middle of its iteration (here: it sleeps) holds the caller
    far longer than the caller's own iterations take: the pool backs off, and the next short
    loops run on the caller alone, so another library's spinning thread on the worker's core
    cannot hold them too."""
    backoff.lt_pool_set_backoff(10_000_000_000, 20_000_000_000, 500_000_000, 1_000_000)   # back off 10 s
    stalls = backoff.lt_pool_stalls()
    held = []

    @TASK
    def task(_ctx, it, tid):
        if tid != 0 and not held:
            held.append(it)
            time.sleep(0.05)
        else:
            busy_wait(2e-4)

    for _ in range(20):                      # until a worker has taken an iteration
        assert backoff.lt_pool_for(2, 50, task, None) == 0
        if held:
            break
    if not held:
        pytest.skip("no worker joined a loop of 10 ms here")
    assert backoff.lt_pool_stalls() == stalls + 1
    solo = backoff.lt_pool_solo_calls()
    seen = run_loop(backoff, 4, 300)         # well within the solo head: the caller alone
    assert sorted(it for it, _, _ in seen) == list(range(300))
    assert {(tid, thread) for _, tid, thread in seen} == {(0, threading.get_native_id())}
    assert backoff.lt_pool_solo_calls() == solo + 1


def test_a_long_loop_while_backing_off_brings_the_workers_in_after_the_solo_head(backoff):
    backoff.lt_pool_set_backoff(10_000_000_000, 20_000_000_000, 2_000_000, 1_000_000)     # 2 ms alone
    seen: list[tuple[int, int, int]] = []

    @TASK
    def stall(_ctx, it, tid):
        if tid != 0:
            time.sleep(0.02)

    stalls = backoff.lt_pool_stalls()
    for _ in range(20):                      # provoke a stall: back off for 10 s
        backoff.lt_pool_for(2, 50, stall, None)
        if backoff.lt_pool_stalls() > stalls:
            break
    else:
        pytest.skip("no worker joined a loop here")

    @TASK
    def task(_ctx, it, tid):
        seen.append((it, tid, threading.get_native_id()))
        if tid == 0:
            busy_wait(1e-3)
        else:
            time.sleep(1e-3)

    assert backoff.lt_pool_for(3, 60, task, None) == 0
    assert sorted(it for it, _, _ in seen) == list(range(60))
    first = [tid for it, tid, _ in sorted(seen)[:2]]
    assert first == [0, 0]                   # the caller alone first
    assert {thread for _, tid, thread in seen if tid == 0} == {threading.get_native_id()}
    assert len({tid for _, tid, _ in seen}) >= 2    # then the workers, with numbers of their own


def test_a_second_caller_runs_alone_while_the_pool_is_busy(lib):
    started, release = threading.Event(), threading.Event()

    @TASK
    def blocking(_ctx, it, tid):
        started.set()
        release.wait(30)

    first = threading.Thread(target=lib.lt_pool_for, args=(2, 2, blocking, None))
    first.start()
    assert started.wait(30)
    try:
        seen = run_loop(lib, 4, 50)          # the pool is taken: this caller runs its loop itself
        assert sorted(it for it, _, _ in seen) == list(range(50))
        assert {tid for _, tid, _ in seen} == {0}
        assert {thread for _, _, thread in seen} == {threading.get_native_id()}
    finally:
        release.set()
        first.join(30)
    assert not first.is_alive()


def test_loops_one_after_another_reuse_the_workers(lib):
    for count in range(50):
        assert sorted(it for it, _, _ in run_loop(lib, 3, count)) == list(range(count))
    assert 2 <= lib.lt_pool_workers() <= 63      # workers are started on demand, up to the largest loop


def test_parallel_kernels_run_on_the_pool(lib):
    """In a fresh interpreter (other tests here start workers by calling the pool directly, so
    only a process of its own shows what kernels did): no worker before the first parallel
    kernel, one or more after it, and every thread the kernels added to the process is a pool
    worker (no OpenMP team beside them)."""
    script = textwrap.dedent("""
        import json, os
        import numpy as np
        from looptune import runtime
        from looptune.runtime.compiler import pool
        # our kernels on every call (no trial against numpy, no hand-off): this is about where they run
        runtime.configure(user_db=None, embedded_db=None, fallback="off", numpy_handoff=False)
        lib = pool.load()
        rng = np.random.default_rng(0)
        a = rng.standard_normal((400, 300)).astype(np.float32)
        b = rng.standard_normal((300, 500)).astype(np.float32)
        want = a.astype(np.float64) @ b
        tasks = set(os.listdir("/proc/self/task"))
        report = {"before": lib.lt_pool_workers(), "after": [], "right": []}
        for threads in (1, 2, 5, 64):
            report["right"].append(bool(np.allclose(runtime.matmul(a, b, threads=threads), want, rtol=1e-3, atol=1e-3)))
            report["after"].append(lib.lt_pool_workers())
        report["new_threads"] = len(set(os.listdir("/proc/self/task")) - tasks)
        print(json.dumps(report))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LOOPTUNE_BLAS_POOL", "LOOPTUNE_NO_POOL")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["right"] == [True] * 4
    assert report["before"] == 0                     # nothing has started a worker yet
    one, two, five, many = report["after"]
    assert one == 0                                  # a one-thread call never touches the pool
    assert two >= 1 and two <= five <= many <= 63    # threads=2 started a worker; more threads, more workers
    assert report["new_threads"] == many             # every new thread is a pool worker


def test_pool_settings_from_the_environment(caplog):
    assert environment.pool_settings({"LOOPTUNE_NO_POOL": "1"}) is None
    default = environment.pool_settings({})
    assert default.worker_spin_ns == int(environment.POOL_WORKER_SPIN_US * 1000)
    assert not default.serve_openblas and environment.pool_settings({"LOOPTUNE_BLAS_POOL": "1"}).serve_openblas
    assert environment.pool_settings({"LOOPTUNE_POOL_SPIN_US": "0"}).worker_spin_ns == 0
    assert environment.pool_settings({"LOOPTUNE_POOL_SPIN_US": "12.5"}).worker_spin_ns == 12500
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        assert environment.pool_settings({"LOOPTUNE_POOL_SPIN_US": "-3 us"}) == default
    assert any("LOOPTUNE_POOL_SPIN_US" in r.getMessage() for r in caplog.records)


# ---- numpy's OpenBLAS on our pool ----------------------------------------------------------------

SCRIPT_PRELUDE = """
import os, sys, threading
import numpy as np
from threadpoolctl import threadpool_limits
from looptune import runtime
from looptune.runtime.compiler import pool
runtime.configure(user_db=None, embedded_db=None, fallback="off")
rng = np.random.default_rng(0)
a = rng.standard_normal((300, 257)).astype(np.float32)
b = rng.standard_normal((257, 400)).astype(np.float32)
want = a.astype(np.float64) @ b
def ok(c, w=want):
    return bool(np.allclose(c, w, rtol=1e-3, atol=1e-3))
assert ok(runtime.matmul(a, b, threads=2))       # loads the pool (and hands it to OpenBLAS)
lib = pool.load()
served = pool.openblas_served()
"""


def run_pool_script(body: str, timeout_s: float = 120, blas_pool: bool = True) -> str:
    """PRELUDE + body in a fresh interpreter (a hang fails the test instead of the suite), with
    OpenBLAS on our pool (``LOOPTUNE_BLAS_POOL=1``) unless ``blas_pool`` is False."""
    full = {k: v for k, v in os.environ.items() if k != "LOOPTUNE_BLAS_POOL"}
    full.update(PYTHONWARNINGS="ignore::DeprecationWarning", **({"LOOPTUNE_BLAS_POOL": "1"} if blas_pool else {}))
    done = subprocess.run([sys.executable, "-c", SCRIPT_PRELUDE + textwrap.dedent(body)], env=full, text=True,
                          capture_output=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_numpy_blas_runs_on_the_pool_and_stays_right():
    out = run_pool_script("""
        if not served:
            print("SKIP"); sys.exit(0)
        before = lib.lt_pool_openblas_calls()
        for threads in (2, 3, 8):
            with threadpool_limits(threads):
                for m, n, k in ((512, 512, 512), (1000, 64, 300), (64, 2000, 700), (7, 900, 900)):
                    x = rng.standard_normal((m, k)).astype(np.float32)
                    y = rng.standard_normal((k, n))
                    assert ok(x @ y.astype(np.float32), x.astype(np.float64) @ y), (threads, m, n, k)
                    assert np.allclose(x.astype(np.float64) @ y, x.astype(np.float64) @ y.astype(np.float32).astype(np.float64), rtol=1e-4, atol=1e-3)
        assert lib.lt_pool_openblas_calls() > before
        print("OK", lib.lt_pool_workers())
    """)
    if out.startswith("SKIP"):
        pytest.skip("numpy's BLAS is not an OpenBLAS with the threads callback")
    assert out.startswith("OK")


def test_kernels_and_numpy_blas_from_many_threads_at_once():
    """Python threads calling our kernels and numpy's BLAS together: no deadlock, right answers."""
    run_pool_script("""
        errors = []
        def ours():
            for _ in range(30):
                if not ok(runtime.matmul(a, b, threads=2)):
                    errors.append("ours")
        def theirs():
            x = rng.standard_normal((400, 400))
            for _ in range(30):
                if not np.allclose(x @ x, np.einsum("ij,jk->ik", x, x)):
                    errors.append("numpy")
        with threadpool_limits(2):
            threads = [threading.Thread(target=f) for f in (ours, theirs, ours, theirs)]
            for t in threads: t.start()
            for t in threads: t.join()
        assert not errors, errors
    """)


def test_a_forked_child_runs_numpy_blas_and_kernels_on_a_fresh_pool():
    run_pool_script("""
        with threadpool_limits(2):
            x = rng.standard_normal((500, 500))
            x @ x
            pid = os.fork()
            if pid == 0:
                good = np.allclose(x @ x, np.einsum("ij,jk->ik", x, x)) and ok(runtime.matmul(a, b, threads=2))
                os._exit(0 if good else 1)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    """)


def test_by_default_openblas_keeps_its_own_threads():
    out = run_pool_script("""
        with threadpool_limits(2):
            x = rng.standard_normal((500, 500))
            x @ x
        print(served, lib.lt_pool_openblas_calls())
    """, blas_pool=False)
    assert out.strip() == "[] 0"


@pytest.mark.parametrize("threads", [2, 3, 8, 16])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_block_shared_by_the_threads_is_packed_by_all_of_them(lib, threads, dtype):
    """The analytic default for a tall, narrow problem runs the m blocks in parallel with B packed
    above them (BLIS's ic loop): every thread packs a share of that B block, then the loop runs."""
    problem = MatmulProblem(1000, 48, 300, dtype=dtype, threads=threads)
    schedule = default_schedule(problem)
    assert schedule.nest.parallel == "m.o" and ("B", "k.o") in schedule.nest.pack
    assert "_packB_task" in render(schedule, dtype).text
    runtime.configure(user_db=None, embedded_db=None, fallback="off")
    rng = np.random.default_rng(threads)
    for m, n, k in ((1000, 48, 300), (999, 47, 301), (130, 33, 700)):
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        tol = 1e-3 if dtype == "float32" else 1e-10
        np.testing.assert_allclose(runtime.matmul(a, b, threads=threads), a.astype(np.float64) @ b, rtol=tol, atol=tol)


# ---- the pool's C, driven directly (a harness that includes pool.c sets its private state) ----------

WRAP_HARNESS = r"""
#include <stdio.h>
#include <unistd.h>
static _Atomic int arrived;
/* an OpenBLAS-like job: the jobs of one call wait for each other */
static void job(int i, void *data, int x) { (void)i; (void)data; (void)x; atomic_fetch_add(&arrived, 1);
                                            while (atomic_load(&arrived) < 2) sched_yield(); }
int main(void)
{
    alarm(60);      /* a deadlock fails the run */
    atomic_store(&lt_pool.state, (uint64_t)0xfffffffeu << 32 | LT_MAX_CHUNKS);   /* the last generation before the wrap */
    char data[2];
    lt_pool_openblas(1, job, 2, 1, data, 0);        /* one worker is started: the caller must take a job */
    printf("%llu %d\n", (unsigned long long)LT_GEN(atomic_load(&lt_pool.state)), lt_pool_workers());
    return 0;
}
"""


def test_a_gang_across_the_generation_wrap_still_has_the_caller(tmp_path):
    """The 32-bit generation wraps to 0 after 2^31 loops; the caller must still take part in the
    loop published at the wrap (it once compared against generation 2^32 and took nothing, so a
    gang with exactly numjobs - 1 workers, or a loop whose workers could not be started, hung)."""
    src = tmp_path / "wrap.c"
    src.write_text(pool.POOL_C + "\n" + WRAP_HARNESS)
    exe = tmp_path / "wrap"
    compiler = BuildSettings.from_env().compiler
    built = subprocess.run([compiler, "-O2", "-std=gnu11", "-pthread", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        pytest.skip(f"no C compiler for the harness: {built.stderr[-300:]}")
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.split() == ["0", "1"]      # wrapped to generation 0, on one worker
