"""Fork safety and threads: fork after (or during) multi-threaded use, compiles or kernel loads,
fork-based pools, one compile per cold key under concurrency, no per-thread workspace leak (nor a
per-process limit on workspace reuse), more threads than cores.

Anything that could hang (a child stuck in libgomp) runs in a subprocess with a timeout, so a
regression fails the test instead of hanging the suite.
"""
import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime import resolve

# shared by the scripts below: a 512x512 float32 problem big enough to run on 2 threads
PRELUDE = """
import os, sys, threading, time
import numpy as np
from looptune import runtime
# our kernels from the first call on (no trial against numpy, no hand-off): these tests are about their threads
runtime.configure(user_db=None, embedded_db=None, fallback="off", threads=2, numpy_handoff=False)
rng = np.random.default_rng(0)
a = rng.standard_normal((512, 512)).astype(np.float32)
want = a.astype(np.float64) @ a.astype(np.float64)
def ok(c):
    return bool(np.allclose(c, want, rtol=1e-3, atol=1e-2))
def child_status(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
def threads_now():
    return set(os.listdir("/proc/self/task"))      # this process's OS threads (ids)
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fork-kernel-cache"))


def run_script(body: str, cache_dir: str, timeout_s: float = 60, **extra_env: str) -> str:
    """Run PRELUDE + body in a fresh interpreter (its own session, so that a hung forked child is
    killed with it); return its stdout."""
    env = dict(os.environ, LOOPTUNE_CACHE_DIR=cache_dir, PYTHONWARNINGS="ignore::DeprecationWarning", **extra_env)
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"script hung for {timeout_s} s (a forked child stuck in the thread pool?)")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)      # forked children that outlived the script
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out + err
    return out


def test_fork_after_multithreaded_call(cache_dir):
    """Our thread pool starts afresh in a forked child: the child keeps its threads and runs
    2-thread kernels (new workers), and so does its own child.  The parent keeps its pool: the
    same workers, the same OS threads, and its next 2-thread calls start no others."""
    run_script("""
        from looptune.runtime.api import settings
        from looptune.runtime.compiler import pool
        base = threads_now()
        assert ok(runtime.matmul(a, a)) and pool.load().lt_pool_workers() >= 1
        workers = threads_now() - base        # the OS threads the first 2-thread call added: the pool's
        assert len(workers) == pool.load().lt_pool_workers()
        pid = os.fork()
        if pid == 0:
            from looptune.runtime.api import settings
            good = ok(runtime.matmul(a, a)) and ok(runtime.matmul(a, a, threads=2)) and settings().threads == 2
            good = good and pool.load().lt_pool_workers() >= 1       # workers started in the child
            part = runtime.matmul(a[:300], a)      # a key first seen in the child
            good = good and np.allclose(part, want[:300], rtol=1e-3, atol=1e-2)
            grand = os.fork()          # a child of the child inherits the same state
            if grand == 0:
                os._exit(0 if ok(runtime.matmul(a, a, threads=4)) else 1)
            good = good and child_status(grand) == 0
            os._exit(0 if good else 1)
        assert child_status(pid) == 0
        # the parent keeps its threads: the pool still counts the workers it had, and they still run
        # (OpenBLAS ends its own threads at a fork, hence the comparison with what our calls added)
        after = (pool.load().lt_pool_workers(), threads_now() - base)
        assert after == (len(workers), workers), f"pool workers/threads {after} after the fork, {workers} before"
        assert settings().threads == 2
        for _ in range(3):
            assert ok(runtime.matmul(a, a))
            assert np.allclose(runtime.matmul(a[:300], a), want[:300], rtol=1e-3, atol=1e-2)
        assert pool.load().lt_pool_workers() == len(workers) and threads_now() - base == workers   # none added
    """, cache_dir)


def test_fork_after_multithreaded_openmp_call(cache_dir):
    """Without our pool, kernels use OpenMP, which cannot run in a forked child: the child of a
    process that ran 2-thread kernels runs every kernel on one thread.  The parent keeps its
    threads: still 2 per call, on the same OpenMP team (its OS threads neither lost nor added)."""
    run_script("""
        from looptune.runtime.api import settings
        base = threads_now()
        assert ok(runtime.matmul(a, a))
        team = threads_now() - base           # the OS threads the first 2-thread call added: OpenMP's
        assert team
        pid = os.fork()
        if pid == 0:
            from looptune.runtime.api import settings
            good = ok(runtime.matmul(a, a)) and ok(runtime.matmul(a, a, threads=2)) and settings().threads == 1
            part = runtime.matmul(a[:300], a)      # a key first seen in the child
            good = good and np.allclose(part, want[:300], rtol=1e-3, atol=1e-2)
            grand = os.fork()          # a child of the child inherits the same state
            if grand == 0:
                os._exit(0 if ok(runtime.matmul(a, a)) else 1)
            good = good and child_status(grand) == 0
            os._exit(0 if good else 1)
        assert child_status(pid) == 0
        # the parent keeps its threads: 2 per call, on the same OpenMP team, still running
        assert settings().threads == 2, settings().threads
        assert threads_now() - base == team, f"OpenMP threads {threads_now() - base} after the fork, {team} before"
        for _ in range(3):
            assert ok(runtime.matmul(a, a))
        assert threads_now() - base == team
    """, cache_dir, LOOPTUNE_NO_POOL="1")


def test_child_forked_before_any_parallel_call_keeps_its_threads(cache_dir):
    run_script("""
        pid = os.fork()
        if pid == 0:
            from looptune.runtime.api import settings
            good = ok(runtime.matmul(a, a)) and settings().threads == 2
            os._exit(0 if good else 1)
        assert child_status(pid) == 0
    """, cache_dir)


def test_fork_while_another_thread_compiles(cache_dir):
    run_script("""
        from looptune.runtime import resolve
        real_build, compiling = resolve.build, threading.Event()
        def slow_build(*args, **kwargs):     # holds the key's lock for a while
            compiling.set()
            time.sleep(1.0)
            return real_build(*args, **kwargs)
        resolve.build = slow_build
        assert ok(runtime.matmul(a, a))
        b = rng.standard_normal((257, 333)).astype(np.float32)
        t = threading.Thread(target=runtime.matmul, args=(b, b.T))
        t.start()
        assert compiling.wait(30)
        pid = os.fork()
        if pid == 0:
            good = np.allclose(runtime.matmul(b, b.T), b.astype(np.float64) @ b.T, rtol=1e-3, atol=1e-2)
            os._exit(0 if good and ok(runtime.matmul(a, a)) else 1)
        t.join()
        assert child_status(pid) == 0
    """, cache_dir)


def test_fork_while_another_thread_loads_a_kernel(cache_dir):
    """A fork while another thread is inside ``load_library`` (holding the loader's lock): the
    child's first kernel load must not wait for a lock no thread of the child will release."""
    run_script("""
        import ctypes
        real_cdll, loading = ctypes.CDLL, threading.Event()
        def slow_cdll(*args, **kwargs):      # holds the loader's lock for a while
            loading.set()
            time.sleep(1.0)
            return real_cdll(*args, **kwargs)
        ctypes.CDLL = slow_cdll
        b = rng.standard_normal((131, 77)).astype(np.float32)
        t = threading.Thread(target=runtime.matmul, args=(b, b.T))
        t.start()
        assert loading.wait(50)
        pid = os.fork()
        if pid == 0:
            good = np.allclose(runtime.matmul(b, b.T), b.astype(np.float64) @ b.T, rtol=1e-3, atol=1e-2)
            os._exit(0 if good and ok(runtime.matmul(a, a)) else 1)
        t.join()
        assert child_status(pid) == 0
    """, cache_dir)


def test_fork_pool_workers_use_matmul(cache_dir):
    run_script("""
        import multiprocessing as mp
        def work(i):
            return ok(runtime.matmul(a, a))
        assert ok(runtime.matmul(a, a))
        with mp.get_context("fork").Pool(2) as pool:
            assert all(pool.map_async(work, range(4)).get(timeout=50))
    """, cache_dir)


def test_no_workspace_leak_per_thread(cache_dir):
    """RSS after 200 short-lived threads, each doing one 512x512 matmul, stays close to the RSS
    after the first one: a thread's packing workspace is freed when the thread exits."""
    out = run_script("""
        def rss_mb():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
        def one_thread():
            t = threading.Thread(target=lambda: runtime.matmul(a, a))
            t.start()
            t.join()
        one_thread()
        first = rss_mb()
        for _ in range(199):
            one_thread()
        print(rss_mb() - first)
    """, cache_dir, timeout_s=120)
    assert float(out) < 30, f"RSS grew by {float(out):.0f} MB over 200 threads"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="reads glibc's malloc statistics (mallinfo2)")
def test_workspace_is_reused_in_every_one_of_1100_kernel_libraries(tmp_path):
    """A tuning worker loads thousands of kernel libraries: each keeps its workspace across calls
    (no free at the end of a call), with no per-process limit such as PTHREAD_KEYS_MAX (1024).
    The libraries are 1100 copies of one built kernel: distinct libraries to the dynamic loader,
    each with its own workspace state, without 1100 compiles."""
    out = run_script(f"""
        import ctypes, shutil
        from looptune.runtime.compiler.build import build
        from looptune.runtime.compiler.codegen import render
        from looptune.runtime.compiler.kernel import Kernel
        from looptune.runtime.compiler.schedule import Schedule
        from looptune.runtime.compiler.trace import Step, Trace

        class Mallinfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in ("arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                                       "uordblks fordblks keepcost").split()]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = Mallinfo2
        def in_use_bytes():
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        # a 4x8 register tile loading B unpacked: its workspace holds an 8 x K edge panel
        trace = Trace((Step.make("split", loop="m", factor=4), Step.make("split", loop="n", factor=8),
                       Step.make("reorder", order=["b", "m.o", "n.o", "k", "m.i", "n.i"]),
                       Step.make("register_tile", m="m.i", n="n.i")))
        built = build(render(Schedule.from_trace(trace), "float32"))
        assert built.ok, built.error
        m, n, k = 4, 8, 4000
        workspace_bytes = 8 * k * 4
        x, y, z = np.ones((m, k), np.float32), np.ones((k, n), np.float32), np.zeros((m, n), np.float32)
        freed_after_call = 0
        for i in range(1100):
            path = os.path.join({str(tmp_path)!r}, f"kernel{{i}}.so")
            shutil.copyfile(built.so_path, path)
            kernel = Kernel(path, built.symbol, "float32")
            before = in_use_bytes()
            kernel(x, y, z)
            freed_after_call += in_use_bytes() - before < workspace_bytes // 2
            assert z[0, 0] == k
        print(freed_after_call)
    """, str(tmp_path), timeout_s=120)
    assert int(out) == 0, f"{int(out)} of 1100 kernel libraries freed their workspace after a call"


def test_sixteen_cold_threads_compile_one_key_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPTUNE_CACHE_DIR", str(tmp_path))
    runtime.configure(user_db=None, embedded_db=None, fallback="off")
    builds, real_build = [], resolve.build

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(resolve, "build", counting_build)
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((71, 53)), rng.standard_normal((53, 67))
    barrier, results = threading.Barrier(16), [None] * 16

    def worker(i):
        barrier.wait()
        results[i] = runtime.matmul(a, b)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert len(builds) == 1
    for r in results:
        np.testing.assert_allclose(r, a @ b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("threads", [4, 8, 16])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_more_threads_than_cores(threads, dtype):
    runtime.configure(user_db=None, embedded_db=None, fallback="off")
    rng = np.random.default_rng(threads)
    a = rng.standard_normal((300, 257)).astype(dtype)
    b = rng.standard_normal((257, 131)).astype(dtype)
    tol = 1e-3 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(runtime.matmul(a, b, threads=threads), a.astype(np.float64) @ b, rtol=tol, atol=tol)
    batched = rng.standard_normal((3, 64, 200)).astype(dtype)
    np.testing.assert_allclose(runtime.matmul(batched, b[:200], threads=threads),
                               batched.astype(np.float64) @ b[:200], rtol=tol, atol=tol)
