"""LoopTune's thread pool: where generated kernels run their parallel loop.

Why our own pool and not OpenMP's.  A ``#pragma omp parallel for`` ends in a barrier: the
calling thread waits until every thread of the team has run its share.  In a program that also
calls numpy (OpenBLAS keeps its own threads, which spin and yield between calls) or torch
(libgomp's threads spin), a worker of ours that the scheduler has not yet run holds the caller
for a whole time slice (BENCHMARKS.md, "Right after a numpy or torch call": 128³ at 0.5 GFLOPS
on OpenMP).  This pool never waits for a worker that has not started.

**How a parallel loop runs.**  The calling thread publishes the loop (a task function, its
context, the iteration count) and takes iterations itself, one at a time, by a compare-and-swap
on one 64-bit word: ``generation << 32 | participants << 20 | next iteration``.  Idle workers,
woken by the publication, take iterations the same way.  The caller waits only for iterations
already taken; if no worker shows up, it runs the whole loop, at one thread's speed.  The
caller is thread number 0; each worker gets a distinct ``tid`` below ``nthreads`` the first
time it takes an iteration, which is what indexes the kernel's per-thread workspace copies.
Iterations are the schedule's parallel blocks, so a slow worker delays the call by one block.

**Backing off when a core is shared.**  A worker that shares its core with another runnable thread
(the one OpenBLAS leaves spinning for 0.1 s after each of numpy's parallel calls, another
process, or our own caller) runs at half speed or stops for a whole scheduler time slice, and the
caller waits for the block it took (right after numpy's call, 2-thread 256³ ran at 150 GFLOPS,
below one thread's 180).  So the pool watches: a worker compares the CPU time it got with the wall
time of its blocks (``CLOCK_THREAD_CPUTIME_ID``; it lost its core if it lost a fifth of the time
and over 50 µs), and the caller, how long it waits for workers' blocks against how long its own
take (over two of them and 50 µs: a stall).  Either makes the pool back off: for 1 ms, doubled by
each further sign up to 128 ms and halved by each clean call with workers, loops start on the
caller alone, and one still running after 0.5 ms brings the workers in for the rest if more than
two iterations are left (one or two the caller finishes sooner than a worker at half a core's
speed would finish one).  A short call after numpy's then runs at one thread's speed instead of
below it (BENCHMARKS.md, "The pool backs off"), a long one still gets the workers (on 64 cores,
63 workers at half speed still beat the caller alone), and on cores of its own the pool never
backs off.  The constants are ``lt_pool_set_backoff``'s (``pool.c``); ``lt_pool_stalls`` and
``lt_pool_solo_calls`` count what happened.

**Waiting.**  Idle workers spin on the word for ``worker_spin_us`` (``pause`` between looks, so
back-to-back calls do not pay a wake-up) and then sleep on a condition variable, so between
calls the pool holds no core that numpy's threads could use.  The caller spins for
``caller_spin_us`` on iterations in flight, then sleeps too.

**One pool per process**, in a small shared library built once per compiler (cached like
kernels) and loaded with ``RTLD_GLOBAL`` before the first kernel library.  Kernels refer to
``lt_pool_for`` as a weak symbol: when the pool cannot be built (or ``LOOPTUNE_NO_POOL=1``) it
is NULL and kernels fall back to OpenMP.  The exported C library compiles this same source into
its one translation unit, with ``LT_POOL_LINKAGE`` static.  A second thread calling a kernel
while the pool is busy runs its loop alone (one thread) rather than queueing.  A forked child
starts with an empty pool (``pthread_atfork``); its first parallel call starts new workers.

**numpy's OpenBLAS on the pool (opt-in, ``LOOPTUNE_BLAS_POOL=1``).**  After each parallel call
an OpenBLAS thread spins for about 0.1 s on a core our kernels need; OpenBLAS 0.3.27 and later
can run its parallel calls on the application's threads (``serve_openblas``), and then the
process has one pool.  It is off by default: with OpenBLAS 0.3.31 (numpy 2.4's), two Python
threads calling ``np.linalg.solve`` at the same time hang with any threads callback installed,
ours or a trivial one (``getrf`` mixes the callback's path with OpenBLAS's own asynchronous
queue), and a hang in a user's numpy call is worse than a slow matmul.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

from looptune.runtime.compiler import environment
from looptune.runtime.compiler.build import BuildSettings, cached_helper, compiler_identity

__all__ = ["POOL_C", "load", "active", "openblas_served", "serve_openblas", "serve_new_openblas"]

log = logging.getLogger("looptune.runtime")

# The pool's C source (also compiled into every exported library, with LT_POOL_LINKAGE static).
POOL_C = Path(__file__).with_name("pool.c").read_text()


@functools.lru_cache(maxsize=1)
def load() -> Optional[ctypes.CDLL]:
    """The pool library, loaded into the global symbol scope (once per process), or None when
    it is turned off (``LOOPTUNE_NO_POOL``) or cannot be built: kernels then use OpenMP."""
    settings = environment.pool_settings()
    if settings is None:
        return None
    try:
        build = BuildSettings.from_env()
        name = "lt_pool_" + hashlib.sha256(f"{compiler_identity(build.compiler)}|{POOL_C}".encode()).hexdigest()[:12]
        path = cached_helper(name, POOL_C, ("-O2", "-std=gnu11", "-shared", "-fPIC", "-pthread"), ".so", build)
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        lib.lt_pool_set_spin(ctypes.c_int64(settings.worker_spin_ns), ctypes.c_int64(settings.caller_spin_ns))
        lib.lt_pool_workers.restype = ctypes.c_int
        lib.lt_pool_openblas_calls.restype = ctypes.c_int64
        if settings.serve_openblas:
            serve_openblas(lib)
        return lib
    except Exception as e:  # any failure: kernels still run, on OpenMP
        log.warning("looptune: no thread pool library (%s); parallel kernels use OpenMP", e)
        return None


# OpenBLAS's setter, as numpy's and scipy's wheels name it (symbol prefix and 64-bit-integer suffix)
_OPENBLAS_SETTERS = tuple(f"{prefix}openblas_set_threads_callback_function{suffix}"
                          for prefix in ("", "scipy_") for suffix in ("", "64_", "_64"))
_openblas_served: list[str] = []      # paths of the OpenBLAS libraries whose threads are ours


def serve_openblas(lib: ctypes.CDLL) -> list[str]:
    """Make every OpenBLAS already loaded in this process (numpy's) run its parallel calls on our
    pool (OpenBLAS >= 0.3.27, ``openblas_set_threads_callback_function``).  Then the process has
    one pool: OpenBLAS's own threads, which otherwise spin for about 0.1 s after each parallel
    call (2^28 cycles) on the cores our kernels need, go to sleep for good.  Returns the paths
    of the libraries served; an OpenBLAS without the callback keeps its threads."""
    callback = ctypes.cast(lib.lt_pool_openblas, ctypes.c_void_p)
    for path in _loaded_openblas_paths():
        if path in _openblas_served:
            continue
        try:
            blas = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            setter = getattr(blas, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_void_p]
                setter.restype = None
                setter(callback)
                _openblas_served.append(path)
                log.debug("looptune: OpenBLAS at %s runs its threads on our pool", path)
                break
    return list(_openblas_served)


def openblas_served() -> list[str]:
    """Paths of the OpenBLAS libraries that run their parallel calls on our pool."""
    return list(_openblas_served)


def _loaded_openblas_paths() -> list[str]:
    """Shared objects mapped into this process whose name says OpenBLAS (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5 and "openblas" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/") and ".so" in os.path.basename(p))


def serve_new_openblas() -> None:
    """Hand OpenBLAS libraries loaded since the last look (scipy's, say) our pool as well."""
    lib = load()
    settings = environment.pool_settings()
    if lib is not None and settings is not None and settings.serve_openblas:
        serve_openblas(lib)


def active() -> bool:
    """Whether kernels loaded from now on run their parallel loops on this pool."""
    return load() is not None
