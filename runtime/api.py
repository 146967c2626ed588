"""``matmul``: numpy.matmul semantics, served by tuned kernels.

Kernels serve what they compute: float16, float32 and float64 (after numpy's type promotion) and
ml_dtypes' bfloat16 (a float32 result, as numpy's; ``looptune.runtime.bf16``); 1-D, 2-D and
stacked operands with broadcast batch dimensions, any strides (an operand without a unit core
stride is copied first).  Everything else (other dtypes, array subclasses,
mismatched shapes, zero-size problems, an ``out`` numpy would cast into or reject) goes to
``numpy.matmul`` itself, so results and exceptions are numpy's own.

A call reads in one direction: ``looptune.runtime.call_plan`` plans it (promotion, casts, copies,
views, result shape and dtype, the dispatch key, one kernel call, one per batch index, or
numpy), cached per signature; ``looptune.runtime.execute`` runs the plan
(``looptune.runtime.fused`` a call with an epilogue).  The compiled trampoline's ``serve``
(``looptune.runtime.compiler.trampoline``) runs the common calls whole in C before any of it:
plain arrays numpy computes in float32/float64 (bfloat16 once met), batches that fold into one
kernel call, whose kernel is in the dispatch table; it builds the very key the plan holds, so
``explain`` names the kernel any path runs.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from looptune.runtime import bf16
from looptune.runtime.call_plan import PLANS, Plan, plain_operand, plan_for, plan_fused
from looptune.runtime.compiler import trampoline
from looptune.runtime.compiler.dispatch import dispatch_key, key_problem
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.execute import execute, numpy_matmul
from looptune.runtime.fused import execute_fused
from looptune.runtime.resolve import Resolution, Resolver, serial_after_fork

_ndarray = np.ndarray

_state_lock = threading.Lock()
_settings: RuntimeSettings | None = None
_resolver: Resolver | None = None


# the compiled trampoline's ``serve`` (runtime.matmul's common calls, whole, in C); set with the
# first resolver, None where no trampoline can be built
_serve = None


def _get_resolver() -> Resolver:
    global _resolver, _settings, _serve
    r = _resolver
    if r is None:
        with _state_lock:
            if _resolver is None:
                if _settings is None:
                    _settings = RuntimeSettings.from_env()
                module = trampoline.load()
                _serve = module.serve if module is not None else None
                _resolver = Resolver(_settings)
            r = _resolver
    return r


def current_resolver() -> Resolver:
    """The resolver serving this process's calls (its databases, kernel caches, live-tuning queue)."""
    return _resolver or _get_resolver()


def configure(**changes) -> RuntimeSettings:
    """Change runtime settings (fallback=, max_distance=, tune_budget_s=, threads=, user_db=, embedded_db=,
    float32_via_bfloat16= ...; see ``RuntimeSettings``).  Cached kernel choices are dropped; compiled
    kernels stay cached on disk."""
    global _settings, _resolver
    with _state_lock:
        base = _settings or RuntimeSettings.from_env()
        _settings = base.updated(**changes) if changes else base
        if _resolver is not None:
            _resolver.close()          # its database watcher; kernels stay cached on disk
        _resolver = None
        return _settings


def settings() -> RuntimeSettings:
    _get_resolver()
    return _settings  # type: ignore[return-value]


def _after_fork_in_child() -> None:
    """A forked child starts with fresh locks, and on one thread if the parent ran kernels on
    several (``looptune.runtime.resolve.serial_after_fork``; later ``configure`` calls keep that)."""
    global _state_lock, _settings
    _state_lock = threading.Lock()
    if _settings is not None:
        _settings = serial_after_fork(_settings)
    if _resolver is not None:
        _resolver.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def matmul(a, b, out=None, *, threads: int | None = None, bias=None, activation: str | None = None, residual=None):
    """Matrix product with numpy.matmul semantics; float16/float32/float64 and bfloat16 run LoopTune
    kernels.  ``bias``, ``activation``, ``residual``: ``activation(a @ b + bias) + residual`` in
    the same kernel (``looptune.runtime.fused``; activations ``relu``, ``gelu``, ``gelu_tanh``, ``silu``)."""
    resolver = _resolver or _get_resolver()
    settings = resolver.settings
    # threads= is checked on every path alike, whether a kernel or numpy serves the call
    if threads is None:
        threads = settings.threads
    elif type(threads) is not int or threads < 1:
        threads = _check_threads(threads)
    if bias is not None or activation is not None or residual is not None:
        return execute_fused(plan_fused(a, b, out, bias, activation, residual, threads, settings.small_flops),
                             out, resolver, matmul)
    if _serve is not None:      # the common calls, whole, in C; None: they take the paths below
        c = _serve(a, b, out, resolver.dispatch, threads, settings.small_flops)
        if c is not None:
            return c
    if type(a) is _ndarray and type(b) is _ndarray:
        # the signature's plan, built inline (call_plan.plan_for's cache key) to save a call
        plan = PLANS.get((a.shape, b.shape, a.strides, b.strides, a.dtype, b.dtype, threads, settings.small_flops))
        if type(plan) is Plan:
            return execute(plan, a, b, out, resolver)
    return _plan_and_execute(a, b, out, threads, resolver)


def _plan_and_execute(a, b, out, threads: int, resolver: Resolver):
    """The calls ``matmul`` finds no plan for: a signature's first call, other operand types,
    and calls numpy serves (its values, its exceptions)."""
    pa, pb = plain_operand(a), plain_operand(b)
    if pa is None or pb is None:      # numpy sees the originals: subclasses keep their own matmul
        return numpy_matmul(a, b, out, "array subclass or foreign array")
    plan = plan_for(pa, pb, threads, resolver.settings.small_flops)
    if type(plan) is not Plan:
        return numpy_matmul(pa, pb, out, plan.reason)
    if plan.name == bf16.BFLOAT16 and pa.dtype == pb.dtype and _bf16_typenum != pa.dtype.num:
        _register_bfloat16(pa.dtype.num)
    return execute(plan, pa, pb, out, resolver)


def _check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


# ml_dtypes' bfloat16 type number, once this process has met it: the compiled ``serve`` then
# takes calls on two bfloat16 arrays as well (it cannot know the number before ml_dtypes registers it)
_bf16_typenum = -1


def _register_bfloat16(typenum: int) -> None:
    global _bf16_typenum
    module = trampoline.load()
    if module is not None and hasattr(module, "set_bfloat16"):
        module.set_bfloat16(typenum)
    _bf16_typenum = typenum


def explain(a, b=None, *, dtype=None, batch: int = 1, threads: int | None = None) -> Resolution:
    """Where the schedule for ``a @ b`` (arrays) or ``explain((m, n, k), dtype=...)`` comes from:
    exact record, nearest record (with its distance), tuned, or the analytic default.  For
    arrays it is the problem ``matmul(a, b)`` runs (its plan: promotion, layouts, batch); a
    call numpy serves raises TypeError.  ``dtype`` is the inputs' ("bfloat16" needs no
    ml_dtypes); with ``float32_via_bfloat16`` a float32 problem says it computes in bfloat16."""
    resolver = _resolver or _get_resolver()
    settings = resolver.settings
    threads = settings.threads if threads is None else _check_threads(threads)
    if b is None:
        m, n, k = a
        bfloat16 = isinstance(dtype, str) and dtype == bf16.BFLOAT16     # np.dtype() may not know the name
        name = bf16.BFLOAT16 if bfloat16 else np.dtype(dtype or np.float32).name
        key = dispatch_key(name, m, n, k, batch, "nn", threads, settings.small_flops)
    else:
        plan = plan_for(np.asarray(a), np.asarray(b), threads, settings.small_flops)
        if type(plan) is not Plan:
            raise TypeError(f"LoopTune kernels do not serve this call ({plan.reason}); numpy.matmul does")
        key = plan.key
    return (resolver.dispatch.get(key) or resolver.lookup(key, lambda: key_problem(key)))[1]
