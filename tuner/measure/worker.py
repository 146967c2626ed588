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

Kernels are loaded by the runtime's loader (``looptune.runtime.compiler.kernel``: a file
rebuilt in place is loaded from a fresh copy; a load failure is a BUILD_ERROR result) and
verified through ``Kernel.invoke`` and timed through ``runtime.matmul(a, b, out=c)`` itself (its
Python entry, the compiled trampoline's ``serve``: key, dispatch-table lookup, operand checks;
without the trampoline, ``Kernel.invoke``), with the kernel in the runtime's dispatch table and
the thread count matmul passes by default, on operands of the
problem's very sizes: the artifact is the kernel the runtime serves from the problem's record,
its exact-size kernel (``protocol.Candidate``), so a measured time is what the runtime serves.
A fused problem (an op with an epilogue) is verified and timed as ``looptune.tuner.measure.fused``
describes, through ``runtime.matmul(a, b, out=c, bias=, activation=, residual=)``.

The worker writes its answers to a private duplicate of fd 1 and points fd 1 at stderr, so a
kernel that ``printf``s cannot corrupt the protocol.  Thread counts are pinned by the parent
through the environment (OMP/OpenBLAS variables are read once, when numpy and libgomp load)
and again here with threadpoolctl when it is installed.
"""
from __future__ import annotations

import faulthandler
import functools
import gc
import json
import math
import os
import sys
import threading
import time
from typing import Any, Callable

import numpy as np   # the parent set the thread variables before this process started

from looptune.runtime.compiler import pool, trampoline
from looptune.runtime.compiler.abi import OUTPUT_DTYPE, error_message
from looptune.runtime.compiler.dispatch import call_threads, dispatch_key
from looptune.runtime.compiler.kernel import Kernel, KernelLoadError
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime import api as runtime_api
from looptune.tuner.measure.fused import (FusedReference, fused_reference, fused_runtime_call, is_fused,
                                          numpy_unfused_call)
from looptune.tuner.measure.placement import copy_keeping_layout, placed
from looptune.tuner.measure.protocol import MeasureConfig, RunStatus

_GUARD = 1024          # sentinel elements on each side of C, to catch out-of-bounds writes
_SENTINEL = 12345.678  # any value a correct kernel never writes into the guard zone (float16: 12344)


class _Failure(Exception):
    """Ends one request with a status other than OK (inside the worker only)."""

    def __init__(self, status: RunStatus, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- operands

class Operands:
    """A, B (copies in the problem's layout) and C inside a guarded buffer, and the kernel calls
    on them: ``Kernel.invoke`` (verification, accumulate) and the call ``runtime.matmul(a, b,
    out=c)`` makes (timing), with the thread count matmul would pass for this problem.  C has
    the kernel's output dtype (float32 for bfloat16 inputs, float16 for float16's).  A fused
    problem's bias and residual are copies too, and its calls pass them (``Kernel.invoke_fused``,
    ``runtime.matmul(..., bias=, activation=, residual=)``)."""

    def __init__(self, problem, a0, b0, kernel: Kernel, shift: int = 0, bias0=None, residual0=None):
        self.a, self.b = copy_keeping_layout(a0, shift), copy_keeping_layout(b0, shift)
        self.bias, self.residual = (None if x is None else copy_keeping_layout(x, shift) for x in (bias0, residual0))
        size = problem.batch * problem.m * problem.n
        dtype = np.dtype(OUTPUT_DTYPE[problem.dtype])
        self.buf = placed((size + 2 * _GUARD,), dtype, (dtype.itemsize,), first=_GUARD, shift=shift)
        self.buf[...] = _SENTINEL
        self.c = self.buf[_GUARD:_GUARD + size].reshape(problem.batch, problem.m, problem.n)
        self.threads = call_threads(problem.flops, problem.threads)
        self.problem, self.kernel, self.invoke = problem, kernel, kernel.invoke

    def call(self, accumulate: int) -> int:
        if self.kernel.fused:
            return self.kernel.invoke_fused(self.a, self.b, self.c, self.bias, self.residual, accumulate, self.threads)
        return self.invoke(self.a, self.b, self.c, accumulate, self.threads)

    def timed_call(self) -> tuple[Callable[[], Any], Callable[[Any, str], None]]:
        """(the very call an application makes, ``runtime.matmul(a, b, out=c)`` with the default
        thread count, with this kernel in the runtime's dispatch table under the problem's key:
        its Python entry, the compiled ``serve`` and the kernel, as a partial with no frame of
        ours; the check of what it returns).  Without the trampoline: ``call(0)`` and its code.
        A fused kernel: ``runtime.matmul(a, b, out=c, bias=, activation=, residual=)``, once
        first with a counting twin of the kernel served, to see that the call reaches it."""
        module = trampoline.load()
        if module is None and not self.kernel.fused:
            return functools.partial(self.invoke, self.a, self.b, self.c, 0, self.threads), _check_rc
        p = self.problem
        if p.dtype == "bfloat16" and module is not None:   # serve takes bfloat16 operands once told their type number
            module.set_bfloat16(self.a.dtype.num)
        if runtime_api.settings().threads != p.threads:
            # this process serves nothing else: no databases, and the problem's threads as the default
            runtime_api.configure(threads=p.threads, user_db=None, embedded_db=None, fallback="off")
        if not self.kernel.fused:
            self._serve(self.kernel)
            return functools.partial(runtime_api.matmul, self.a, self.b, out=self.c), self.check_served
        call, rc = fused_runtime_call(self, self._serve)
        if rc is None:
            raise _Failure(RunStatus.RUNNER_ERROR, "runtime.matmul did not serve the fused call with the kernel")
        _check_rc(rc, "called by runtime.matmul")
        return call, _returned_c(self.c, "runtime.matmul")

    def _serve(self, kernel: Kernel) -> None:
        """``kernel`` in the runtime's dispatch table for this problem, under every layout's key:
        serve names a layout by the strides, and a core dimension of 1 has both (the kernel
        takes any strides); ``dispatch.dispatch_key`` adds a fused problem's op."""
        p, dispatch = self.problem, runtime_api.current_resolver().dispatch
        for la in "nt":
            for lb in "nt":
                dispatch[dispatch_key(p.dtype, p.m, p.n, p.k, p.batch, la + lb, self.threads, op=p.op)] = (kernel, None)

    def check_served(self, result: Any, when: str) -> None:
        """matmul returns C through ``serve``; anything else means the compiled path declined the call
        (the kernel's code, if any, says why)."""
        if result is not self.c:
            rc = self.call(0)
            _check_rc(rc, when)
            raise _Failure(RunStatus.RUNNER_ERROR, f"runtime.matmul's compiled path declined the call {when}")

    def guard_intact(self) -> bool:
        g = self.buf
        return bool(np.all(g[:_GUARD] == _SENTINEL) and np.all(g[-_GUARD:] == _SENTINEL))


def _returned_c(c, who: str = "numpy.matmul") -> Callable[[Any, str], None]:
    """A ``time_calls`` check for a call that returns its output array ``c`` (numpy raises on failure)."""
    def check(result: Any, when: str) -> None:
        if result is not c:
            raise _Failure(RunStatus.RUNNER_ERROR, f"{who} did not write into out= {when}")
    return check


def _check_rc(rc: int, when: str) -> None:
    if rc != 0:
        raise _Failure(RunStatus.KERNEL_ERROR, f"kernel returned {rc} ({error_message(rc)}) {when}")


def verify(kernel: Kernel, problem, config: MeasureConfig, reference) -> Operands:
    """Check the kernel on ``config.seeds`` operand sets; return the last set for timing.

    C starts as NaN for accumulate=0, so a kernel that forgets to zero C fails; accumulate=1
    is then checked on the kernel's own result (expect 2 * A @ B).  The guard zones around C
    and the inputs are checked too: writing outside C, or into A or B, is a wrong answer.
    ``reference(seed)`` returns pristine (A, B, A @ B in float64); the kernel gets copies.
    bfloat16 products are exact in float64 (and in float32), so for bf16 inputs the tolerance is
    float32's: what remains is the kernel's float32 accumulation.  float16 results add their
    rounding to float16 (``protocol.default_tolerance``: float32's bound plus 2**-10 relative).
    A fused problem's ``reference(seed)`` is a ``fused.FusedReference`` (its bias and residual
    are inputs too, its tolerance is derived element by element; accumulate=0 only).
    """
    rtol, atol = config.tolerance(problem.dtype, problem.k)
    ops = None
    for seed in range(config.seeds):
        data = reference(seed)
        if isinstance(data, FusedReference):
            a0, b0, extra = data.a, data.b, (data.bias, data.residual)
            checks = [(0, data.expect, data.bound(rtol, atol))]
        else:
            (a0, b0, ref), extra = data, ()
            checks = [(0, ref, atol + rtol * np.abs(ref))]
            checks += [(1, 2 * ref, 2 * atol + rtol * np.abs(2 * ref))] if config.verify_accumulate else []
        ops = Operands(problem, a0, b0, kernel, config.operand_shift_bytes, *extra)
        ops.c[...] = np.nan
        inputs = [(x, x0) for x, x0 in zip((ops.a, ops.b, ops.bias, ops.residual), (a0, b0, *extra)) if x0 is not None]
        for accumulate, expect, bound in checks:
            _check_rc(ops.call(accumulate), f"during verification (accumulate={accumulate})")
            what = f"seed {seed}, accumulate={accumulate}"
            if not ops.guard_intact():
                raise _Failure(RunStatus.WRONG_ANSWER, f"wrote outside C ({what})")
            if not all(np.array_equal(x, x0) for x, x0 in inputs):
                raise _Failure(RunStatus.WRONG_ANSWER, f"modified an input operand ({what})")
            bad = ~(np.abs(ops.c - expect) <= bound)    # also catches NaN
            if bad.any():
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                raise _Failure(RunStatus.WRONG_ANSWER,
                               f"{int(bad.sum())} of {bad.size} elements wrong ({what}); first at "
                               f"[b,m,n]={list(idx)}: got {float(ops.c[idx])!r}, expected {float(expect[idx])!r} "
                               f"(tolerance {float(bound[idx]):.3g} there; rtol={rtol:.3g}, atol={atol:.3g})")
    assert ops is not None
    return ops


# ----------------------------------------------------------------------------- timing

class _Flusher:
    """Evicts caches by writing a buffer twice the size of L2 + L3 (done outside the timer)."""

    def __init__(self):
        cpu = detect_cpu()
        self.buf = np.zeros(2 * (cpu.l2_bytes + cpu.l3_bytes) // 8, dtype=np.float64)

    def __call__(self) -> None:
        self.buf += 1.0


def time_calls(call: Callable[[], Any], config: MeasureConfig, flush: Callable[[], None] | None,
               threads: int = 1, give_up_after: float | None = None,
               check: Callable[[Any, str], None] = _check_rc) -> tuple[list[float], int, float]:
    """Per-call seconds (one entry per sample), calls per sample, and the CPU share.

    ``give_up_after``: when the first timed call takes longer (seconds), it is the only sample.
    ``check(what call returned, when)`` raises when a call failed (default: a non-zero code).

    The CPU share is process CPU time over wall time x threads while timing: ~1 when the
    kernel had its cores, well below 1 when other processes took them (the samples are then
    suspect; on a 2-core machine a busy neighbour halves a 2-thread kernel's speed).
    """
    perf = time.perf_counter
    start = perf()
    for _ in range(config.warmup):   # a slow kernel is warm after one call; don't burn its timeout
        check(call(), "during warm-up")
        if perf() - start > config.min_total_seconds:
            break
    t0 = perf()
    check(call(), "during warm-up")
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
            check(rc, "during timing")
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

    def __init__(self):
        self._kernels: dict[tuple, Kernel] = {}     # (path, symbol, dtype, file identity) -> kernel
        self._flusher: _Flusher | None = None
        self._refs: dict[tuple[Any, int], tuple[Any, Any, Any]] = {}

    def kernel(self, so_path: str, symbol: str, dtype: str, fused: bool = False) -> Kernel:
        """The kernel, loaded by the runtime's loader (a file rebuilt in place is loaded afresh;
        ``fused``: with a fused epilogue's arguments); a load failure is a BUILD_ERROR result."""
        try:
            st = os.stat(so_path)
        except OSError as e:
            raise _Failure(RunStatus.BUILD_ERROR, f"cannot open {so_path}: {e.strerror}") from None
        key = (so_path, symbol, dtype, fused, st.st_ino, st.st_size, st.st_mtime_ns)
        kernel = self._kernels.get(key)
        if kernel is None:
            try:
                kernel = self._kernels[key] = Kernel(so_path, symbol, dtype, fused)
            except KernelLoadError as e:
                raise _Failure(RunStatus.BUILD_ERROR, str(e)) from None
        return kernel

    def reference_data(self, problem, seed: int):
        """(A, B, A @ B in float64) for one seed, kept for the current problem only (a fused
        problem: its ``fused.FusedReference``).

        Search measures many candidates of one problem in a row; recomputing a float64 matmul
        for each would, for large problems, cost more than timing the kernel.
        """
        if any(p != problem for p, _ in self._refs):
            self._refs.clear()
        if (problem, seed) not in self._refs and is_fused(problem):
            self._refs[(problem, seed)] = fused_reference(problem, seed)
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
        try:
            problem = MatmulProblem.from_key(req["problem"])
            config = MeasureConfig(**req["config"])
            if req["op"] == "run":
                kernel = self.kernel(req["so_path"], req["symbol"], problem.dtype, is_fused(problem))
                ops = verify(kernel, problem, config, lambda s: self.reference_data(problem, s))
                ref = req.get("reference_seconds")
                give_up = config.slow_cutoff * ref if config.slow_cutoff > 0 and ref else None
                call, check = ops.timed_call()
                samples, number, cpu = time_calls(call, config, self.flusher(config), ops.threads,
                                                  give_up_after=give_up, check=check)
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
        """Time ``np.matmul(A, B, out=C)`` on the same layouts and thread count as the kernel (for
        bfloat16, on the ml_dtypes arrays into a float32 C; for float16, numpy's own loop into a
        float16 C: what a numpy user gets).  A fused problem: numpy's unfused composition
        (``fused.numpy_unfused``: the product into C, then the bias, activation and residual)."""
        a, b, c = (copy_keeping_layout(x) for x in problem.make_operands(0))   # placed as the kernel's
        # a C-level callable, as the kernel's call is: no Python frame per call on either side
        call, check = functools.partial(np.matmul, a, b, out=c), _returned_c(c)
        if is_fused(problem):
            call, check = numpy_unfused_call(self.reference_data(problem, 0), c), lambda result, when: None
        result = time_calls(call, config, self.flusher(config), problem.threads, check=check)
        if problem.threads > 1 and not pool.openblas_served():
            time.sleep(0.05)   # let OpenBLAS's spinning workers go idle before the kernel runs
        return result


def _pin_threads() -> Any:
    """Limit BLAS/OpenMP pools to the count the parent put in the environment."""
    n = int(os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        from threadpoolctl import threadpool_limits     # tolerated if missing: the thread variables alone pin then
    except ImportError:
        return None
    return threadpool_limits(limits=n)


def _orphan_watchdog(parent: int) -> None:
    """Exit if the parent dies, even while a kernel hangs (the trampoline releases the GIL in all
    but tiny calls; a tiny call that hangs is killed by the parent's timeout)."""
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

    limits = _pin_threads()
    # the thread pool first, as in an application after its first kernel (with LOOPTUNE_BLAS_POOL=1
    # numpy's OpenBLAS then runs its parallel calls on it for every timing of numpy)
    pool.serve_new_openblas()
    worker = Worker()
    hello = {"status": "ready", "pid": os.getpid(), "numpy": np.__version__,
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
