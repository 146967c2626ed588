"""``matmul``: numpy.matmul semantics, served by tuned kernels.

The fast path covers what our kernels compute: float32 and float64 (after numpy's type
promotion), 1-D, 2-D and stacked operands with broadcast batch dimensions, any strides
where one of each operand's two core strides is 1.  Everything else (other dtypes,
array subclasses, mismatched shapes, zero-size problems, a bad ``out``) goes to
``numpy.matmul`` itself, so results and exceptions are numpy's own.
"""
from __future__ import annotations

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
    if not (isinstance(a, _ndarray) and type(a) is _ndarray):
        if isinstance(a, _ndarray) or hasattr(a, "__array_function__") and not isinstance(a, (list, tuple)):
            return _delegate(a, b, out, "array subclass or foreign array")
        a = np.asarray(a)
    if not (isinstance(b, _ndarray) and type(b) is _ndarray):
        if isinstance(b, _ndarray) or hasattr(b, "__array_function__") and not isinstance(b, (list, tuple)):
            return _delegate(a, b, out, "array subclass or foreign array")
        b = np.asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        return _delegate(a, b, out, "scalar operand")
    try:
        rdt = np.result_type(a.dtype, b.dtype)
    except TypeError:
        return _delegate(a, b, out, "no common dtype")
    name = _KERNEL_DTYPES.get(rdt)
    if name is None or a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf":
        return _delegate(a, b, out, f"dtype {rdt}")
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    m, k = a2.shape[-2:]
    k2, n = b2.shape[-2:]
    if k != k2:
        return _delegate(a, b, out, "core dimensions differ")
    try:
        batch_shape = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        return _delegate(a, b, out, "batch dimensions do not broadcast")
    shape = batch_shape + ((m,) if a.ndim > 1 else ()) + ((n,) if b.ndim > 1 else ())
    if out is not None:
        if type(out) is not _ndarray or out.shape != shape or out.dtype != rdt or not out.flags.writeable:
            return _delegate(a, b, out, "out= needs numpy's handling")
    if m == 0 or n == 0 or k == 0 or 0 in batch_shape:
        return _delegate(a, b, out, "zero-size operand")
    # promote (numpy computes in the result dtype too), and make operands the kernels can read
    a2 = _kernel_operand(a2, rdt)
    b2 = _kernel_operand(b2, rdt)
    c_full = out.reshape(batch_shape + (m, n)) if out is not None and out.ndim == len(batch_shape) + 2 else None
    target = c_full
    if (target is None or not target.flags.aligned or not _has_unit_stride(target)
            or np.may_share_memory(target, a2) or np.may_share_memory(target, b2)):
        target = _empty(batch_shape + (m, n), rdt)
    _run_batched(a2, b2, target, name, threads)
    if out is not None:
        if target is not c_full:
            np.copyto(out, target.reshape(shape))
        return out
    if shape == ():
        return target.reshape(())[()]      # vector @ vector: numpy returns a scalar
    return target.reshape(shape) if target.shape != shape else target


def _has_unit_stride(x: np.ndarray) -> bool:
    return x.strides[-1] == x.itemsize or x.strides[-2] == x.itemsize


def _kernel_operand(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` in ``dtype`` with strides a kernel can read: cast as numpy's loop would (a copy that
    keeps x's memory order), and copied to C order when that still leaves no unit stride."""
    if x.dtype != dtype:
        x = x.astype(dtype)
    item = dtype.itemsize
    rows, cols = x.shape[-2:]
    if (not x.flags.aligned or any(s % item for s in x.strides)
            or _layout_char(rows, cols, x.strides[-2], x.strides[-1], item) is None):
        return x.copy(order="C")       # (ascontiguousarray would keep a misaligned contiguous array)
    return x


def _flatten_batch(x: np.ndarray, batch_shape: tuple) -> np.ndarray | None:
    """A (batch, r, c) view of x broadcast to batch_shape, without copying; None if impossible."""
    x = np.broadcast_to(x, batch_shape + x.shape[-2:]) if x.shape[:-2] != batch_shape else x
    if len(batch_shape) == 1:
        return x
    if len(batch_shape) == 0:
        return x[None]
    v = x.view()
    try:
        v.shape = (-1,) + x.shape[-2:]
    except AttributeError:
        return None
    return v


def _resolve(name: str, m: int, n: int, k: int, batch: int, layout: str, threads):
    """(kernel, resolution), its dispatch key and the thread count for a problem; the 2-D fast
    path in ``matmul`` inlines the same steps to save a call."""
    resolver = _resolver or _get_resolver()
    t = call_threads(2.0 * batch * m * n * k, resolver.settings.threads if threads is None else _check_threads(threads),
                     resolver.settings.small_flops)
    key = (name, m, n, k, batch, layout, t)
    hit = resolver.dispatch.get(key) or resolver.lookup(key, lambda: MatmulProblem(m, n, k, batch, name, layout, t))
    return hit, key, t


def _run_batched(a: np.ndarray, b: np.ndarray, c: np.ndarray, name: str, threads) -> None:
    batch_shape = c.shape[:-2]
    a3, b3, c3 = _flatten_batch(a, batch_shape), _flatten_batch(b, batch_shape), _flatten_batch(c, batch_shape)
    if a3 is None or b3 is None or c3 is None:
        # strides that do not flatten: one call per leading batch index (broadcasting is a view)
        a = np.broadcast_to(a, batch_shape + a.shape[-2:])
        b = np.broadcast_to(b, batch_shape + b.shape[-2:])
        for i in range(batch_shape[0]):
            _run_batched(a[i], b[i], c[i], name, threads)
        return
    batch, m, k = a3.shape
    n = b3.shape[2]
    item = a3.itemsize
    la = _layout_char(m, k, a3.strides[1], a3.strides[2], item)
    lb = _layout_char(k, n, b3.strides[1], b3.strides[2], item)
    hit, key, t = _resolve(name, m, n, k, batch, la + lb, threads)
    rc = hit[0].invoke(a3, b3, c3, 0, t)
    if rc != 0:
        _recover(_resolver or _get_resolver(), key, hit[0], rc, a3, b3, c3, t)


def explain(a, b=None, *, dtype=None, batch: int = 1, threads: int | None = None) -> Resolution:
    """Where the schedule for ``a @ b`` (arrays) or ``explain((m, n, k), dtype=...)`` comes from:
    exact record, nearest record (with its distance), tuned, or the analytic default."""
    if b is None:
        m, n, k = a
        name = np.dtype(dtype or np.float32).name
        layout = "nn"
    else:
        a, b = np.asarray(a), np.asarray(b)
        rdt = np.result_type(a.dtype, b.dtype)
        name = _KERNEL_DTYPES.get(rdt)
        if name is None:
            raise TypeError(f"LoopTune kernels serve float32 and float64; {rdt} goes to numpy.matmul")
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        m, k = a2.shape[-2:]
        n = b2.shape[-1]
        batch = int(np.prod(np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]), dtype=np.int64))
        item = rdt.itemsize
        la = (_layout_char(m, k, a2.strides[-2], a2.strides[-1], item) or "n") if a2.dtype == rdt else "n"
        lb = (_layout_char(k, n, b2.strides[-2], b2.strides[-1], item) or "n") if b2.dtype == rdt else "n"
        layout = la + lb
    return _resolve(name, m, n, k, batch, layout, threads)[0][1]
