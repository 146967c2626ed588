"""In-worker measurement: load a kernel, verify it against numpy, then time it.

This module is the body of the worker process that ``looptune.tuner.measure.runner.LocalRunner``
starts as ``python -m looptune.tuner.measure.worker``.  It runs in its own process because the
code it calls is untrusted machine code: a kernel may segfault, never return, write out of
bounds or compute garbage, and none of that may take the tuner down with it.

Protocol (one JSON object per line; the parent enforces every timeout)::

    parent -> worker  {"op": "run", "problem": KEY, "so_path": P, "symbol": S, "config": {...}}
                      {"op": "reference", "problem": KEY, "config": {...}}
    worker -> parent  {"status": "ok" | "wrong_answer" | "kernel_error" | "build_error" |
                       "runner_error", "seconds": [...], "number": N, "error": "..."}

The worker writes its answers to a private duplicate of fd 1 and points fd 1 at stderr, so a
kernel that ``printf``s cannot corrupt the protocol.  Thread counts are pinned by the parent
through the environment (OMP/OpenBLAS variables are read once, when numpy and libgomp load)
and again here with threadpoolctl when it is installed.
"""
from __future__ import annotations

import enum
import faulthandler
import gc
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

# Environment variables that size the thread pools of BLAS and OpenMP runtimes.  They must be
# set before numpy (OpenBLAS) or the first OpenMP kernel (libgomp) is loaded.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

KERNEL_ERRORS = {-1: "out of memory", -2: "strides do not satisfy a layout precondition of this kernel"}

_GUARD = 1024          # sentinel elements on each side of C, to catch out-of-bounds writes
_SENTINEL = 12345.678  # any value a correct kernel never writes into the guard zone


class RunStatus(str, enum.Enum):
    """How a candidate ended.  Only OK carries a time."""

    OK = "ok"
    WRONG_ANSWER = "wrong_answer"    # verification against numpy failed (or wrote out of bounds)
    CRASH = "crash"                  # the worker died while running the kernel (signal, exit)
    TIMEOUT = "timeout"              # no answer within MeasureConfig.timeout_seconds; worker killed
    KERNEL_ERROR = "kernel_error"    # the kernel returned a non-zero code (-1 OOM, -2 bad strides)
    BUILD_ERROR = "build_error"      # no artifact, or the .so / symbol could not be loaded
    RUNNER_ERROR = "runner_error"    # our fault, not the kernel's (worker failed to start, ...)


def default_tolerance(dtype: str, k: int) -> tuple[float, float]:
    """(rtol, atol) for ``|C - ref| <= atol + rtol * |ref|`` with unit-normal operands.

    A length-K dot product summed in ``dtype`` has worst-element error ~1.2 * eps * K against a
    float64 reference, measured for K = 16 .. 16384 with sequential accumulation (the worst
    order; blocked kernels do better).  8x that leaves room for any summation order, while a
    kernel that drops or repeats a single k term errs by ~1, far above the bound for any
    realistic K.
    """
    eps = 1.1920929e-07 if dtype == "float32" else 2.220446049250313e-16
    return 16 * eps, 8 * eps * max(k, 16)


@dataclass(frozen=True)
class MeasureConfig:
    """The timing protocol, as a value (cf. TVM's EvaluatorConfig).

    A *sample* is the mean time of ``number`` back-to-back calls, where ``number`` is chosen
    so one sample lasts at least ``min_sample_seconds`` (timer and call overhead amortized
    for tiny kernels).  Samples are taken until both ``min_repeats`` and
    ``min_total_seconds`` are reached, or ``max_repeats``.  With ``flush_cache`` each call is
    its own sample, preceded (untimed) by a write over a buffer twice the size of L2+L3.

    ``slow_cutoff`` (0 = off): a candidate whose first timed call already takes more than
    ``slow_cutoff`` times numpy's time on the same problem is reported from that one call.  It
    cannot win, and on large problems the remaining repeats of a slow kernel cost seconds of a
    tuning budget (a 1024^3 kernel at 10 GFLOPS takes 0.2 s per call).
    """

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 200
    min_total_seconds: float = 0.05
    min_sample_seconds: float = 1e-3
    timeout_seconds: float = 10.0       # per candidate: load + verify + time
    seeds: int = 1                      # independent operand sets verified before timing
    verify_accumulate: bool = True      # also check accumulate=1 (C += A @ B)
    rtol: float | None = None           # None: default_tolerance(dtype, K)
    atol: float | None = None
    flush_cache: bool = False
    slow_cutoff: float = 0.0

    def __post_init__(self) -> None:
        if not (self.warmup >= 0 and 1 <= self.min_repeats <= self.max_repeats and self.seeds >= 1):
            raise ValueError(f"inconsistent MeasureConfig: {self}")
        if not (self.timeout_seconds > 0 and self.min_total_seconds >= 0 and self.min_sample_seconds >= 0):
            raise ValueError(f"inconsistent MeasureConfig: {self}")

    def tolerance(self, dtype: str, k: int) -> tuple[float, float]:
        rtol, atol = default_tolerance(dtype, k)
        return (rtol if self.rtol is None else self.rtol, atol if self.atol is None else self.atol)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Failure(Exception):
    """Ends one request with a status other than OK (inside the worker only)."""

    def __init__(self, status: RunStatus, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- kernel loading

_ABI_ARGS = ("int64_t, int64_t, int64_t, int64_t, "
             "const {T} *, int64_t, int64_t, int64_t, "
             "const {T} *, int64_t, int64_t, int64_t, "
             "{T} *, int64_t, int64_t, int64_t, int32_t, int32_t")


class KernelLoader:
    """dlopen .so files with cffi (ABI mode) and look up a kernel symbol.

    Libraries are never dlclose'd: unloading code that started OpenMP threads is unsafe.  The
    dynamic loader hands back an already-loaded library when the *path* matches, so a file
    rebuilt in place would silently run the old code; such a file is loaded from a uniquely
    named copy instead.
    """

    def __init__(self, scratch_dir: str):
        import cffi

        self.ffi = cffi.FFI()
        self.scratch_dir = scratch_dir
        self._libs: dict[str, tuple[tuple[int, int, int], Any]] = {}   # realpath -> (identity, lib)
        self._declared: dict[str, str] = {}                             # symbol -> C type
        self._copies = 0

    def load(self, so_path: str, symbol: str, ctype: str) -> Callable[..., int]:
        try:
            st = os.stat(so_path)
        except OSError as e:
            raise _Failure(RunStatus.BUILD_ERROR, f"cannot open {so_path}: {e}") from None
        if not symbol.isidentifier():
            raise _Failure(RunStatus.BUILD_ERROR, f"not a C identifier: {symbol!r}")
        if self._declared.get(symbol) != ctype:
            self.ffi.cdef(f"int {symbol}({_ABI_ARGS.format(T=ctype)});", override=True)
            self._declared[symbol] = ctype
        real = os.path.realpath(so_path)
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        entry = self._libs.get(real)
        if entry is None or entry[0] != ident:
            path = real
            if entry is not None:           # rebuilt in place: load a copy under a fresh name
                self._copies += 1
                path = os.path.join(self.scratch_dir, f"reload{self._copies}_{os.path.basename(real)}")
                with open(real, "rb") as src, open(path, "wb") as dst:
                    dst.write(src.read())
            try:
                lib = self.ffi.dlopen(path)
            except OSError as e:
                raise _Failure(RunStatus.BUILD_ERROR, f"dlopen failed: {e}") from None
            entry = (ident, lib)
            self._libs[real] = entry
        try:
            return getattr(entry[1], symbol)
        except AttributeError as e:
            raise _Failure(RunStatus.BUILD_ERROR, f"symbol {symbol!r} not found in {so_path}: {e}") from None


# ----------------------------------------------------------------------------- operands

class Operands:
    """A, B (views in the problem's layout) and C inside a guarded buffer, plus bound call args."""

    def __init__(self, problem, a0, b0, ffi):
        import numpy as np

        self.problem = problem
        self.a, self.b = _copy_keeping_layout(a0), _copy_keeping_layout(b0)
        c = np.empty((problem.batch, problem.m, problem.n), dtype=a0.dtype)
        size = c.size
        self.buf = np.full(size + 2 * _GUARD, _SENTINEL, dtype=c.dtype)
        self.c = self.buf[_GUARD:_GUARD + size].reshape(c.shape)
        t = "float" if problem.dtype == "float32" else "double"
        item = c.dtype.itemsize

        def ptr(x):
            return ffi.cast(f"{t} *", x.__array_interface__["data"][0])

        def strides(x):
            return tuple(s // item for s in x.strides)

        p = problem
        self.head = (p.batch, p.m, p.n, p.k, ptr(self.a), *strides(self.a), ptr(self.b), *strides(self.b),
                     ptr(self.c), *strides(self.c))
        # Time kernels through the same compiled call path the runtime uses (libffi adds ~1.3 us a call).
        from looptune.runtime.compiler import trampoline

        self.fast = trampoline.load()
        self.ffi = ffi
        self.typenum = c.dtype.num
        self._addresses: dict[int, int] = {}

    def call(self, fn, accumulate: int) -> int:
        if self.fast is not None:
            addr = self._addresses.get(id(fn))
            if addr is None:
                addr = self._addresses[id(fn)] = int(self.ffi.cast("uintptr_t", fn))
            return self.fast.call(addr, self.typenum, self.a, self.b, self.c, accumulate, self.problem.threads)
        return fn(*self.head, accumulate, self.problem.threads)

    def guard_intact(self) -> bool:
        import numpy as np

        g = self.buf
        return bool(np.all(g[:_GUARD] == _SENTINEL) and np.all(g[-_GUARD:] == _SENTINEL))


def _copy_keeping_layout(x):
    """A fresh copy with the same strides pattern (a transposed view stays transposed)."""
    import numpy as np

    y = np.empty_like(x, order="K")
    np.copyto(y, x)
    return y


def _check_rc(rc: int, when: str) -> None:
    if rc != 0:
        why = KERNEL_ERRORS.get(rc, "unknown error code")
        raise _Failure(RunStatus.KERNEL_ERROR, f"kernel returned {rc} ({why}) {when}")


def verify(fn, problem, config: MeasureConfig, ffi, reference) -> Operands:
    """Check the kernel on ``config.seeds`` operand sets; return the last set for timing.

    C starts as NaN for accumulate=0, so a kernel that forgets to zero C fails; accumulate=1
    is then checked on the kernel's own result (expect 2 * A @ B).  The guard zones around C
    and the inputs are checked too: writing outside C, or into A or B, is a wrong answer.
    ``reference(seed)`` returns pristine (A, B, A @ B in float64); the kernel gets copies.
    """
    import numpy as np

    rtol, atol = config.tolerance(problem.dtype, problem.k)
    ops = None
    for seed in range(config.seeds):
        a0, b0, ref = reference(seed)
        ops = Operands(problem, a0, b0, ffi)
        ops.c[...] = np.nan
        checks = [(0, ref, 1.0)] + ([(1, 2 * ref, 2.0)] if config.verify_accumulate else [])
        for accumulate, expect, scale in checks:
            _check_rc(ops.call(fn, accumulate), f"during verification (accumulate={accumulate})")
            what = f"seed {seed}, accumulate={accumulate}"
            if not ops.guard_intact():
                raise _Failure(RunStatus.WRONG_ANSWER, f"wrote outside C ({what})")
            if not (np.array_equal(ops.a, a0) and np.array_equal(ops.b, b0)):
                raise _Failure(RunStatus.WRONG_ANSWER, f"modified an input operand ({what})")
            err = np.abs(ops.c - expect)
            bad = ~(err <= scale * atol + rtol * np.abs(expect))    # also catches NaN
            if bad.any():
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                raise _Failure(RunStatus.WRONG_ANSWER,
                               f"{int(bad.sum())} of {bad.size} elements wrong ({what}); first at "
                               f"[b,m,n]={list(idx)}: got {float(ops.c[idx])!r}, expected {float(expect[idx])!r} "
                               f"(rtol={rtol:.3g}, atol={scale * atol:.3g})")
    assert ops is not None
    return ops


# ----------------------------------------------------------------------------- timing

class _Flusher:
    """Evicts caches by writing a buffer twice the size of L2 + L3 (done outside the timer)."""

    def __init__(self):
        import numpy as np
        from looptune.runtime.compiler.machine import detect_cpu

        cpu = detect_cpu()
        self.buf = np.zeros(2 * (cpu.l2_bytes + cpu.l3_bytes) // 8, dtype=np.float64)

    def __call__(self) -> None:
        self.buf += 1.0


def time_calls(call: Callable[[], int], config: MeasureConfig, flush: Callable[[], None] | None,
               threads: int = 1, give_up_after: float | None = None) -> tuple[list[float], int, float]:
    """Per-call seconds (one entry per sample), calls per sample, and the CPU share.

    ``give_up_after``: when the first timed call takes longer (seconds), it is the only sample.

    The CPU share is process CPU time over wall time x threads while timing: ~1 when the
    kernel had its cores, well below 1 when other processes took them (the samples are then
    suspect; on a 2-core machine a busy neighbour halves a 2-thread kernel's speed).
    """
    perf = time.perf_counter
    start = perf()
    for _ in range(config.warmup):   # a slow kernel is warm after one call; don't burn its timeout
        _check_rc(call(), "during warm-up")
        if perf() - start > config.min_total_seconds:
            break
    t0 = perf()
    _check_rc(call(), "during warm-up")
    once = max(perf() - t0, 1e-9)
    if give_up_after is not None and once > give_up_after:
        return [once], 1, 1.0
    number = 1 if flush else max(1, min(1 << 20, math.ceil(config.min_sample_seconds / once)))
    samples: list[float] = []
    total = 0.0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    cpu0, wall0 = time.process_time(), perf()
    try:
        while len(samples) < config.max_repeats:
            if flush:
                flush()
            t0 = perf()
            for _ in range(number):
                rc = call()
            dt = perf() - t0
            _check_rc(rc, "during timing")
            samples.append(dt / number)
            total += dt
            if len(samples) >= config.min_repeats and total >= config.min_total_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    cpu_share = (time.process_time() - cpu0) / max((perf() - wall0) * threads, 1e-9)
    return samples, number, cpu_share


# ----------------------------------------------------------------------------- worker

class Worker:
    """State that survives between requests: loaded kernels, verification data, the flush buffer."""

    def __init__(self, scratch_dir: str):
        self.loader = KernelLoader(scratch_dir)
        self._flusher: _Flusher | None = None
        self._refs: dict[tuple[Any, int], tuple[Any, Any, Any]] = {}

    def reference_data(self, problem, seed: int):
        """(A, B, A @ B in float64) for one seed, kept for the current problem only.

        Search measures many candidates of one problem in a row; recomputing a float64 matmul
        for each would, for large problems, cost more than timing the kernel.
        """
        import numpy as np

        if any(p != problem for p, _ in self._refs):
            self._refs.clear()
        if (problem, seed) not in self._refs:
            a, b, _ = problem.make_operands(seed)
            a.flags.writeable = b.flags.writeable = False
            self._refs[(problem, seed)] = (a, b, np.matmul(a.astype(np.float64), b.astype(np.float64)))
        return self._refs[(problem, seed)]

    def flusher(self, config: MeasureConfig):
        if not config.flush_cache:
            return None
        if self._flusher is None:
            self._flusher = _Flusher()
        return self._flusher

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        from looptune.runtime.compiler.workload import MatmulProblem

        try:
            problem = MatmulProblem.from_key(req["problem"])
            config = MeasureConfig(**req["config"])
            if req["op"] == "run":
                ctype = "float" if problem.dtype == "float32" else "double"
                fn = self.loader.load(req["so_path"], req["symbol"], ctype)
                ops = verify(fn, problem, config, self.loader.ffi, lambda s: self.reference_data(problem, s))
                ref = req.get("reference_seconds")
                give_up = config.slow_cutoff * ref if config.slow_cutoff > 0 and ref else None
                samples, number, cpu = time_calls(lambda: ops.call(fn, 0), config, self.flusher(config),
                                                  problem.threads, give_up_after=give_up)
            elif req["op"] == "reference":
                samples, number, cpu = self.reference(problem, config)
            else:
                raise _Failure(RunStatus.RUNNER_ERROR, f"unknown op {req['op']!r}")
            return {"status": RunStatus.OK.value, "seconds": samples, "number": number, "cpu_share": cpu}
        except _Failure as f:
            return {"status": f.status.value, "error": str(f)}
        except Exception as e:  # a bug or resource problem on our side, reported, never raised
            return {"status": RunStatus.RUNNER_ERROR.value, "error": f"{type(e).__name__}: {e}"}

    def reference(self, problem, config: MeasureConfig) -> tuple[list[float], int, float]:
        """Time ``np.matmul(A, B, out=C)`` on the same layouts and thread count as the kernel."""
        import numpy as np

        a, b, c = problem.make_operands(0)

        def call() -> int:
            np.matmul(a, b, out=c)
            return 0

        result = time_calls(call, config, self.flusher(config), problem.threads)
        if problem.threads > 1:
            time.sleep(0.05)   # let OpenBLAS's spinning workers go idle before the kernel runs
        return result


def _pin_threads() -> Any:
    """Limit BLAS/OpenMP pools to the count the parent put in the environment."""
    n = int(os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n)


def _orphan_watchdog(parent: int) -> None:
    """Exit if the parent dies, even while a kernel hangs (cffi releases the GIL in C calls)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def main() -> None:
    # Keep the protocol on private descriptors; fd 1 becomes stderr so kernel output is harmless.
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    faulthandler.enable(file=sys.stderr, all_threads=False)
    threading.Thread(target=_orphan_watchdog, args=(os.getppid(),), daemon=True).start()

    import numpy  # noqa: F401  (after the environment is set, as the parent arranged)

    limits = _pin_threads()
    scratch = os.environ.get("LOOPTUNE_WORKER_SCRATCH") or os.getcwd()
    worker = Worker(scratch)
    hello = {"status": "ready", "pid": os.getpid(), "numpy": numpy.__version__,
             "threads": int(os.environ.get("OMP_NUM_THREADS", "1")), "threadpoolctl": limits is not None}
    proto_out.write(json.dumps(hello).encode() + b"\n")
    proto_out.flush()
    for line in proto_in:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except ValueError as e:
            reply = {"status": RunStatus.RUNNER_ERROR.value, "error": f"bad request: {e}"}
        else:
            reply = worker.handle(req)
        proto_out.write(json.dumps(reply).encode() + b"\n")
        proto_out.flush()


if __name__ == "__main__":
    main()
