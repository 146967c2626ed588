"""``matmul``: numpy.matmul semantics, served by tuned kernels.

The fast path covers what our kernels compute: float32 and float64 (after numpy's type
promotion), 1-D, 2-D and stacked operands with broadcast batch dimensions, any strides
where one of each operand's two core strides is 1.  Everything else (other dtypes,
array subclasses, mismatched shapes, zero-size problems, a bad ``out``) goes to
``numpy.matmul`` itself, so results and exceptions are numpy's own.
"""
from __future__ import annotations

import functools
import logging
import os
import threading

import numpy as np

from looptune.runtime.compiler.abi import error_message
from looptune.runtime.compiler.kernel import call_threads
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.resolve import Resolution, Resolver, serial_after_fork
from looptune.runtime.configuration import RuntimeSettings

log = logging.getLogger("looptune.runtime")

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_KERNEL_DTYPES = {_F32: "float32", _F64: "float64"}
_ndarray = np.ndarray
_empty = np.empty

_state_lock = threading.Lock()
_settings: RuntimeSettings | None = None
_resolver: Resolver | None = None


def _get_resolver() -> Resolver:
    global _resolver, _settings
    r = _resolver
    if r is None:
        with _state_lock:
            if _resolver is None:
                if _settings is None:
                    _settings = RuntimeSettings.from_env()
                _resolver = Resolver(_settings)
            r = _resolver
    return r


def current_resolver() -> Resolver:
    """The resolver serving this process's calls (its databases, kernel caches, live-tuning queue)."""
    return _resolver or _get_resolver()


def configure(**changes) -> RuntimeSettings:
    """Change runtime settings (fallback=, max_distance=, tune_budget_s=, threads=, user_db=, embedded_db=).
    Cached kernel choices are dropped; compiled kernels stay cached on disk."""
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


def _layout_char(rows: int, cols: int, s_row: int, s_col: int, item: int) -> str | None:
    """From byte strides: 'n' when the column stride is one element (row-major), 't' when the row
    stride is; None if neither, or if a stride is not a whole number of elements (a field of a
    structured array), which the kernels cannot address."""
    if s_row % item or s_col % item:
        return None
    if s_col == item or cols == 1:
        return "n"
    if s_row == item or rows == 1:
        return "t"
    return None


def _delegate(a, b, out, why: str):
    log.debug("looptune: numpy.matmul handles this call (%s)", why)
    if out is None:
        return np.matmul(a, b)
    return np.matmul(a, b, out=out)


def matmul(a, b, out=None, *, threads: int | None = None):
    """Matrix product with numpy.matmul semantics; float32/float64 run LoopTune kernels."""
    # ---- fast path: two 2-D arrays of one kernel dtype; a fresh output or a matching out= -------
    if type(a) is _ndarray and type(b) is _ndarray and a.ndim == 2 and b.ndim == 2:
        dt = a.dtype
        if dt is b.dtype or dt == b.dtype:
            name = _KERNEL_DTYPES.get(dt)
            m, k = a.shape
            k2, n = b.shape
            if name is not None and k == k2 and m and n and k:
                item = dt.itemsize
                sa, sb = a.strides, b.strides
                la = _layout_char(m, k, sa[0], sa[1], item)
                lb = _layout_char(k, n, sb[0], sb[1], item)
                if la and lb:
                    if out is None:
                        c = _empty((m, n), dt)
                    elif type(out) is _ndarray and out.dtype == dt and out.shape == (m, n):
                        c = out     # written in place; the call path answers -4 if it overlaps a or b
                    else:
                        return _general(a, b, out, threads)
                    resolver = _resolver or _get_resolver()
                    t = resolver.settings.threads if threads is None else _check_threads(threads)
                    if 2.0 * m * n * k < resolver.settings.small_flops:    # call_threads, inlined
                        t = 1
                    key = (name, m, n, k, 1, la + lb, t)
                    hit = resolver.dispatch.get(key)
                    if hit is None:
                        hit = resolver.lookup(key, lambda: MatmulProblem(m, n, k, 1, name, la + lb, t))
                    rc = hit[0].invoke(a, b, c, 0, t)
                    if rc == 0:
                        return c
                    if rc != -3 and rc != -4:    # -3 misaligned, -4 overlap: the general path copies
                        return _recover(resolver, key, hit[0], rc, a, b, c, t)
    return _general(a, b, out, threads)


def _recover(resolver: Resolver, key: tuple, kernel, rc: int, a, b, c, t: int):
    """A kernel refused these operands (-2: its layout precondition) or failed: retry with
    contiguous copies, then hand the key to numpy for good (one warning naming the cause)."""
    if rc == -2:
        rc = kernel.invoke(np.ascontiguousarray(a), np.ascontiguousarray(b), c, 0, t)
        if rc == 0:
            return c
    fallback = resolver.demote(key, f"{kernel.symbol} returned {rc}: {error_message(rc)}")
    fallback.invoke(a, b, c, 0, t)
    return c


def _check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


def _general(a, b, out, threads):
    """Every call the 2-D fast path does not take: promotion, 1-D operands, stacks and broadcast
    batch dimensions, ``out=`` checks, views the kernels cannot read.  The common cases cost a
    few attribute reads and tuple compares; ``numpy.matmul`` gets what the kernels do not serve."""
    if type(a) is not _ndarray:
        a = _plain_array(a)
    if type(b) is not _ndarray:
        b = _plain_array(b)
    if a is None or b is None:
        return _delegate(a, b, out, "array subclass or foreign array")
    plan = _plan(a, b)
    if type(plan) is str:
        return _delegate(a, b, out, plan)
    a2, b2, batch, shape, rdt = plan
    if out is not None:
        if (type(out) is not _ndarray or out.shape != shape or (out.dtype is not rdt and out.dtype != rdt)
                or not out.flags.writeable):
            return _delegate(a, b, out, "out= needs numpy's handling")
        c = out
    else:
        c = _empty(shape, rdt)
    m, k = a2.shape[-2:]
    n = b2.shape[-1]
    if not (m and n and k) or 0 in batch:
        return _delegate(a, b, out, "zero-size operand")
    a2, la = _kernel_operand(a2, rdt)
    b2, lb = _kernel_operand(b2, rdt)
    c2 = c if len(c.shape) == len(batch) + 2 else c.reshape(batch + (m, n))   # a view: 1-D operands add a 1
    _run_batched(a2, b2, c2, batch, la + lb, threads)
    if out is None and not shape:
        return c[()]            # vector @ vector: numpy returns a scalar
    return c


def _plain_array(x):
    """``x`` as a base-class ndarray, or None when numpy.matmul must see it as it is (an
    ndarray subclass, or a foreign array with its own ``__array_function__``)."""
    if isinstance(x, _ndarray) or hasattr(x, "__array_function__") and not isinstance(x, (list, tuple)):
        return None
    return np.asarray(x)


_promotions: dict = {}      # (dtype of a, dtype of b) -> the kernel dtype numpy computes in, or None


def _promoted(da: np.dtype, db: np.dtype):
    """numpy's result dtype for ``da @ db`` when a kernel computes it (native float32/float64
    from bool, integer or float inputs), else None; cached per pair (``np.result_type`` costs
    a microsecond)."""
    try:
        return _promotions[da, db]
    except KeyError:
        pass
    rdt = None
    if da.kind in "biuf" and db.kind in "biuf":
        try:
            rdt = np.result_type(da, db)
        except TypeError:
            rdt = None
        rdt = rdt if rdt in _KERNEL_DTYPES else None
    if len(_promotions) < 256:
        _promotions[da, db] = rdt
    return rdt


def _plan(a: np.ndarray, b: np.ndarray):
    """(a2, b2, batch shape, result shape, result dtype) for ``a @ b``, a2/b2 having 1-D
    operands as a 1-row / 1-column matrix (views), or the reason numpy serves the call."""
    if not a.ndim or not b.ndim:
        return "scalar operand"
    rdt = _promoted(a.dtype, b.dtype)
    if rdt is None:
        return f"dtypes {a.dtype} and {b.dtype}"
    a2 = a[None] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    sa, sb = a2.shape, b2.shape
    if sa[-1] != sb[-2]:
        return "core dimensions differ"
    ba, bb = sa[:-2], sb[:-2]
    batch = ba if ba == bb or not bb else bb if not ba else _broadcast(ba, bb)
    if batch is None:
        return "batch dimensions do not broadcast"
    shape = batch if a.ndim == 1 else batch + sa[-2:-1]
    if b.ndim > 1:
        shape += sb[-1:]
    return a2, b2, batch, shape, rdt


@functools.lru_cache(maxsize=256)
def _broadcast(x: tuple, y: tuple):
    """numpy's broadcast of two batch shapes, or None when they do not broadcast."""
    if len(x) < len(y):
        x, y = y, x
    y = (1,) * (len(x) - len(y)) + y
    out = []
    for p, q in zip(x, y):
        if p != q and p != 1 and q != 1:
            return None
        out.append(q if p == 1 else p)
    return tuple(out)


def _kernel_operand(x: np.ndarray, dtype: np.dtype):
    """(x in ``dtype`` with strides a kernel can read, its layout character): cast as numpy's
    loop would (a copy that keeps x's memory order), copied to C order when no core stride is
    one element."""
    if x.dtype is not dtype and x.dtype != dtype:
        x = x.astype(dtype)
    st = x.strides
    layout = _layout_char(x.shape[-2], x.shape[-1], st[-2], st[-1], dtype.itemsize)
    if layout is None:
        return x.copy(order="C"), "n"
    return x, layout


def _as_batch(x: np.ndarray, batch: tuple, count: int):
    """``x`` as an operand of one (count, r, c) kernel call without copying: 2-D when its batch
    dimensions are all broadcast (the call path broadcasts it), else 3-D; None if its batch
    strides do not flatten to one."""
    xb = x.shape[:-2]
    if xb == batch and len(xb) == 1:
        return x
    if not xb or count == 1 or all(d == 1 for d in xb):
        return x.reshape(x.shape[-2:]) if xb else x
    if xb != batch:
        x = np.broadcast_to(x, batch + x.shape[-2:])
    v = x.view()
    try:
        v.shape = (count,) + x.shape[-2:]
    except AttributeError:
        return None
    return v


def _run_batched(a: np.ndarray, b: np.ndarray, c: np.ndarray, batch: tuple, layout: str, threads) -> None:
    """c = a @ b over ``batch`` (c has the full batch shape; a and b broadcast to it)."""
    count = 1
    for d in batch:
        count *= d
    a3, b3, c3 = _as_batch(a, batch, count), _as_batch(b, batch, count), _as_batch(c, batch, count)
    if a3 is None or b3 is None or c3 is None:
        # batch strides that do not flatten: one call per leading batch index (broadcasting is a view)
        a = np.broadcast_to(a, batch + a.shape[-2:])
        b = np.broadcast_to(b, batch + b.shape[-2:])
        for i in range(batch[0]):
            _run_batched(a[i], b[i], c[i], batch[1:], layout, threads)
        return
    m, k = a3.shape[-2:]
    n = b3.shape[-1]
    resolver = _resolver or _get_resolver()
    t = resolver.settings.threads if threads is None else _check_threads(threads)
    if 2.0 * count * m * n * k < resolver.settings.small_flops:    # call_threads, inlined
        t = 1
    key = (_KERNEL_DTYPES[c3.dtype], m, n, k, count, layout, t)
    hit = resolver.dispatch.get(key)
    if hit is None:
        hit = resolver.lookup(key, lambda: MatmulProblem(m, n, k, count, key[0], layout, t))
    rc = hit[0].invoke(a3, b3, c3, 0, t)
    if rc == -3 or rc == -4:
        # misaligned (-3) or an output overlapping an input (-4): aligned copies, a fresh output
        tmp = _empty(c3.shape, c3.dtype)
        rc = hit[0].invoke(a3.copy(order="K"), b3.copy(order="K"), tmp, 0, t)
        if rc == 0:
            c3[...] = tmp
            return
    if rc != 0:
        _recover(resolver, key, hit[0], rc, a3, b3, c3, t)


def _resolve(name: str, m: int, n: int, k: int, batch: int, layout: str, threads):
    """(kernel, resolution) for a problem, as ``_run_batched`` looks it up."""
    resolver = _resolver or _get_resolver()
    t = call_threads(2.0 * batch * m * n * k, resolver.settings.threads if threads is None else _check_threads(threads),
                     resolver.settings.small_flops)
    key = (name, m, n, k, batch, layout, t)
    return resolver.dispatch.get(key) or resolver.lookup(key, lambda: MatmulProblem(m, n, k, batch, name, layout, t))


def explain(a, b=None, *, dtype=None, batch: int = 1, threads: int | None = None) -> Resolution:
    """Where the schedule for ``a @ b`` (arrays) or ``explain((m, n, k), dtype=...)`` comes from:
    exact record, nearest record (with its distance), tuned, or the analytic default.  For
    arrays it is the problem ``matmul(a, b)`` runs (after promotion, with the layout of the
    operands the kernel reads); numpy-served calls raise TypeError."""
    if b is None:
        m, n, k = a
        name = np.dtype(dtype or np.float32).name
        layout = "nn"
    else:
        a, b = np.asarray(a), np.asarray(b)
        plan = _plan(a, b)
        if type(plan) is str:
            raise TypeError(f"LoopTune kernels do not serve this call ({plan}); it goes to numpy.matmul")
        a2, b2, batch_shape, _, rdt = plan
        name = _KERNEL_DTYPES[rdt]
        a2, la = _kernel_operand(a2, rdt)
        b2, lb = _kernel_operand(b2, rdt)
        m, k = a2.shape[-2:]
        n = b2.shape[-1]
        batch = 1
        for d in batch_shape:
            batch *= d
        layout = la + lb
    return _resolve(name, m, n, k, batch, layout, threads)[1]
