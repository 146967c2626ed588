"""``matmul``: numpy.matmul semantics, served by tuned kernels.

Kernels serve what they compute: float32 and float64 (after numpy's type promotion) and
ml_dtypes' bfloat16 (a float32 result, as numpy's; ``looptune.runtime.bf16``); 1-D, 2-D and
stacked operands with broadcast batch dimensions, any strides (an operand without a unit core
stride is copied first).  Everything else (other dtypes, array subclasses,
mismatched shapes, zero-size problems, an ``out`` numpy would cast into or reject) goes to
``numpy.matmul`` itself, so results and exceptions are numpy's own.

Three paths keep a call within about a microsecond of numpy's own.  The compiled trampoline's
``serve`` (``looptune.runtime.compiler.trampoline``) runs the common calls whole in C: plain
arrays numpy computes in float32/float64, batches that fold into one kernel call, whose kernel
is in the dispatch table.  Else two 2-D arrays of one kernel dtype go straight to the kernel
from Python; every other call looks its signature (shapes, strides, dtypes) up in
``looptune.runtime.call_plan``, which works out once what the call needs (promotion, copies,
views, the kernel problem).  The dispatch key is built the same way on every path, so
``explain`` names the kernel any of them runs.  Misaligned operands and an ``out`` that
overlaps an input are caught by the call path and computed from copies.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np

from looptune.runtime import bf16
from looptune.runtime.call_plan import KERNEL_DTYPES, PLANS, Plan, layout_char, plan_for, prepare
from looptune.runtime.compiler import trampoline
from looptune.runtime.compiler.abi import error_message
from looptune.runtime.compiler.dispatch import dispatch_key, key_problem
from looptune.runtime.resolve import Resolution, Resolver, serial_after_fork
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.fused import matmul_fused

log = logging.getLogger("looptune.runtime")

_ndarray = np.ndarray
_empty = np.empty

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


def _delegate(a, b, out, why: str):
    log.debug("looptune: numpy.matmul handles this call (%s)", why)
    if out is None:
        return np.matmul(a, b)
    return np.matmul(a, b, out=out)


def matmul(a, b, out=None, *, threads: int | None = None, bias=None, activation: str | None = None, residual=None):
    """Matrix product with numpy.matmul semantics; float16/float32/float64 and bfloat16 run LoopTune
    kernels.  ``bias``, ``activation``, ``residual``: ``activation(a @ b + bias) + residual`` in
    the same kernel (``looptune.runtime.fused``; activations ``relu``, ``gelu``, ``gelu_tanh``, ``silu``)."""
    resolver = _resolver or _get_resolver()
    if threads is not None:     # checked on every path alike, whether a kernel or numpy serves the call
        threads = _check_threads(threads)
    if bias is not None or activation is not None or residual is not None:
        return matmul_fused(matmul, resolver, a, b, out, threads, bias, activation, residual)
    if _serve is not None:      # the common calls, whole, in C; None: they take the paths below
        c = _serve(a, b, out, resolver.dispatch, resolver.settings.threads if threads is None else threads,
                   resolver.settings.small_flops)
        if c is not None:
            return c
    if type(a) is _ndarray and type(b) is _ndarray:
        # ---- fast path: two 2-D arrays of one kernel dtype; a fresh output or a matching out= ---
        if a.ndim == 2 and b.ndim == 2:
            dt = a.dtype
            if dt is b.dtype or dt == b.dtype:
                name = KERNEL_DTYPES.get(dt)
                m, k = a.shape
                k2, n = b.shape
                if name is not None and k == k2 and m and n and k:
                    item = dt.itemsize
                    sa, sb = a.strides, b.strides
                    # row-major operands, the common case, without a call (layout_char decides the rest)
                    la = "n" if sa[1] == item else layout_char(m, k, sa[0], sa[1], item)
                    lb = "n" if sb[1] == item else layout_char(k, n, sb[0], sb[1], item)
                    if la and lb:
                        if out is None:
                            c = _empty((m, n), dt)
                        elif type(out) is _ndarray and out.dtype == dt and out.shape == (m, n):
                            c = out     # written in place; the call path answers -4 if it overlaps a or b
                        else:
                            return _general(a, b, out, threads)
                        settings = resolver.settings    # the key and the thread rule: dispatch_key
                        key = dispatch_key(name, m, n, k, 1, la + lb, settings.threads if threads is None else threads,
                                           settings.small_flops)
                        hit = resolver.dispatch.get(key)
                        if hit is None:
                            hit = resolver.lookup(key, lambda: key_problem(key))
                        t = key[6]
                        rc = hit[0].invoke(a, b, c, 0, t)
                        if rc == 0:
                            return c
                        if rc != -3 and rc != -4:    # -3 misaligned, -4 overlap: the planned path copies
                            return _recover(resolver, key, hit[0], rc, a, b, c, t)
        # ---- every other plain-array call: its signature's cached plan --------------------------
        plan = PLANS.get((a.shape, b.shape, a.strides, b.strides, a.dtype, b.dtype))
        if type(plan) is Plan:
            return _execute(plan, a, b, out, threads)
    return _general(a, b, out, threads)


def _recover(resolver: Resolver, key: tuple, kernel, rc: int, a, b, c, t: int):
    """A kernel refused these operands (-2: its layout precondition) or failed: retry with
    contiguous copies, then hand the key to numpy for good (one warning naming the cause)."""
    if rc == -2:
        # aligned, contiguous copies (an unaligned ``out`` gets the product through a temporary), so
        # that only the kernel itself can refuse again: a one-off odd operand never demotes the key
        target = c if c.flags.aligned else np.empty_like(c, order="C")
        rc = kernel.invoke(np.ascontiguousarray(a), np.ascontiguousarray(b), target, 0, t)
        if rc == 0:
            if target is not c:
                np.copyto(c, target)
            return c
    fallback = resolver.demote(key, f"{kernel.symbol} returned {rc}: {error_message(rc)}")
    fallback.invoke(a, b, c, 0, t)
    return c


def _check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


def _general(a, b, out, threads):
    """Calls the fast paths do not take: other operand types, signatures not planned yet,
    and calls numpy serves (its values, its exceptions)."""
    pa = a if type(a) is _ndarray else _plain_array(a)
    pb = b if type(b) is _ndarray else _plain_array(b)
    if pa is None or pb is None:      # numpy sees the originals: subclasses keep their own matmul
        return _delegate(a, b, out, "array subclass or foreign array")
    a, b = pa, pb
    plan = plan_for(a, b)
    if type(plan) is str:
        return _delegate(a, b, out, plan)
    if plan.name == bf16.BFLOAT16 and a.dtype == b.dtype and _bf16_typenum != a.dtype.num:
        _register_bfloat16(a.dtype.num)
    return _execute(plan, a, b, out, threads)


# ml_dtypes' bfloat16 type number, once this process has met it: the compiled ``serve`` then
# takes calls on two bfloat16 arrays as well (it cannot know the number before ml_dtypes registers it)
_bf16_typenum = -1


def _register_bfloat16(typenum: int) -> None:
    global _bf16_typenum
    module = trampoline.load()
    if module is not None and hasattr(module, "set_bfloat16"):
        module.set_bfloat16(typenum)
    _bf16_typenum = typenum


def _plain_array(x):
    """``x`` as a base-class ndarray, or None when numpy.matmul must see it as it is (an
    ndarray subclass, or a foreign array with its own ``__array_function__``)."""
    if isinstance(x, _ndarray) or hasattr(x, "__array_function__") and not isinstance(x, (list, tuple)):
        return None
    return np.asarray(x)


def _execute(plan: Plan, a: np.ndarray, b: np.ndarray, out, threads):
    """``a @ b`` as ``plan`` says, into ``out`` (written in place when it is a suitable array)
    or a fresh array; an ``out`` numpy would cast into or reject goes to numpy, except that a
    bfloat16 kernel's result is cast into an ``out`` as numpy would (its 'same_kind' rule)."""
    rdt, shape, pa, va, pb, vb, vc, name, m, n, k, count, layout, loop, odt = plan
    if out is None:
        c = _empty(shape, rdt)
    elif (type(out) is _ndarray and out.shape == shape and (out.dtype is rdt or out.dtype == rdt)
          and out.flags.writeable):
        c = out
    elif name == bf16.BFLOAT16 and bf16.out_casts(out, shape, rdt):
        np.copyto(out, _execute(plan, a, b, None, threads), casting="same_kind")
        return out
    else:
        return _delegate(a, b, out, "out= needs numpy's handling")
    x = prepare(a, pa, odt) if pa else a
    y = prepare(b, pb, odt) if pb else b
    if va is not None:
        x = x.reshape(va)           # a view: make_plan checked the strides allow one
    if vb is not None:
        y = y.reshape(vb)
    c3 = c
    if vc is not None:
        c3 = c.view()
        try:
            c3.shape = vc
        except AttributeError:      # out's strides do not fold: compute into a fresh array
            np.copyto(out, _execute(plan, a, b, None, threads))
            return out
    if loop is None:
        # _run, inlined: this is every planned call's path
        resolver = _resolver or _get_resolver()
        key = dispatch_key(name, m, n, k, count, layout, resolver.settings.threads if threads is None else threads,
                           resolver.settings.small_flops)
        hit = resolver.dispatch.get(key)
        if hit is None or hit[0].invoke(x, y, c3, 0, key[6]) != 0:
            _run(plan, x, y, c3, count, threads)
    else:
        _run_looped(plan, x, y, c3, loop, threads)
    if out is None and not shape:
        return c[()]                # vector @ vector: numpy returns a scalar
    return c


def _run(plan: Plan, a: np.ndarray, b: np.ndarray, c: np.ndarray, count: int, threads) -> None:
    """One kernel call: c (count, m, n) = a @ b (2-D a or b broadcast over the batch); resolves a
    cold key, and copies or recovers when the call path refuses the operands."""
    resolver = _resolver or _get_resolver()
    key = dispatch_key(plan.name, plan.m, plan.n, plan.k, count, plan.layout,
                       resolver.settings.threads if threads is None else threads, resolver.settings.small_flops)
    hit = resolver.dispatch.get(key)
    if hit is None:
        hit = resolver.lookup(key, lambda: key_problem(key))
    t = key[6]
    rc = hit[0].invoke(a, b, c, 0, t)
    if rc == -3 or rc == -4:
        # misaligned (-3) or an output overlapping an input (-4): aligned copies, a fresh output
        tmp = _empty(c.shape, c.dtype)
        rc = hit[0].invoke(a.copy(order="K"), b.copy(order="K"), tmp, 0, t)
        if rc == 0:
            c[...] = tmp
            return
    if rc != 0:
        _recover(resolver, key, hit[0], rc, a, b, c, t)


def _run_looped(plan: Plan, a: np.ndarray, b: np.ndarray, c: np.ndarray, batch: tuple, threads) -> None:
    """c = a @ b over a batch that does not fold into one call: one call per index of all but
    the last batch dimension (broadcasting is a view; the call path reads 0 strides)."""
    a = np.broadcast_to(a, batch + a.shape[-2:])
    b = np.broadcast_to(b, batch + b.shape[-2:])
    for index in np.ndindex(*batch[:-1]):
        x, y, z = a[index], b[index], c[index]
        if plan.count == 1:
            x, y, z = x[0], y[0], z[0]
        _run(plan, x, y, z, plan.count, threads)


def _resolve(name: str, m: int, n: int, k: int, batch: int, layout: str, threads):
    """(kernel, resolution) for a problem, looked up as ``_run`` does."""
    resolver = _resolver or _get_resolver()
    key = dispatch_key(name, m, n, k, batch, layout, resolver.settings.threads if threads is None else _check_threads(threads),
                       resolver.settings.small_flops)
    return resolver.dispatch.get(key) or resolver.lookup(key, lambda: key_problem(key))


def explain(a, b=None, *, dtype=None, batch: int = 1, threads: int | None = None) -> Resolution:
    """Where the schedule for ``a @ b`` (arrays) or ``explain((m, n, k), dtype=...)`` comes from:
    exact record, nearest record (with its distance), tuned, or the analytic default.  For
    arrays it is the problem ``matmul(a, b)`` runs (its plan: promotion, layouts, batch); a
    call numpy serves raises TypeError.  ``dtype`` is the inputs' ("bfloat16" needs no
    ml_dtypes); with ``float32_via_bfloat16`` a float32 problem says it computes in bfloat16."""
    if b is None:
        m, n, k = a
        bfloat16 = isinstance(dtype, str) and dtype == bf16.BFLOAT16     # np.dtype() may not know the name
        name = bf16.BFLOAT16 if bfloat16 else np.dtype(dtype or np.float32).name
        layout = "nn"
    else:
        plan = plan_for(np.asarray(a), np.asarray(b))
        if type(plan) is str:
            raise TypeError(f"LoopTune kernels do not serve this call ({plan}); numpy.matmul does")
        name, m, n, k, batch, layout = plan.name, plan.m, plan.n, plan.k, plan.count, plan.layout
    return _resolve(name, m, n, k, batch, layout, threads)[1]
