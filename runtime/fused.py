"""``matmul(a, b, bias=, activation=, residual=)``: ``activation(a @ b + bias) + residual`` in one
kernel call (``looptune.runtime.compiler.epilogue`` renders the store stage that does it).

A call the fused kernels serve: operands a kernel computes (float32, float64 or bfloat16 after
numpy's promotion, a batch that folds into one call), a bias vector of length N and a residual
that broadcasts to the product's shape, neither changing numpy's result dtype.  Every other
call is composed from ``runtime.matmul`` and numpy's element-wise operations, which give numpy's
values, dtypes, broadcasting and exceptions (``activation`` computed as the kernels compute it,
``epilogue.activate``); so is a call whose plain product numpy serves faster than our kernel
(``_kernel_serves_the_product``).  Bad arguments raise ValueError naming the argument.
"""
from __future__ import annotations

import numpy as np

from looptune.runtime.call_plan import Plan, plan_for, prepare
from looptune.runtime.compiler.epilogue import ACTIVATIONS, Epilogue, activate
from looptune.runtime.compiler.dispatch import dispatch_key, key_problem
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.resolve import EXACT_SOURCES

FUSED_DTYPES = ("float32", "float64", "bfloat16")


def checked_epilogue(bias, activation, residual) -> Epilogue:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)} or None")
    return Epilogue(bias is not None, activation, residual is not None)


def matmul_fused(matmul, resolver, a, b, out, threads, bias, activation, residual):
    """``runtime.matmul`` with an epilogue; ``matmul`` is the plain one (for composed calls),
    ``resolver`` the process's."""
    epilogue = checked_epilogue(bias, activation, residual)
    pa = a if type(a) is np.ndarray else (None if isinstance(a, np.ndarray) else np.asarray(a))
    pb = b if type(b) is np.ndarray else (None if isinstance(b, np.ndarray) else np.asarray(b))
    plan = plan_for(pa, pb) if pa is not None and pb is not None else "array subclass"
    if type(plan) is not Plan:
        return _composed(matmul, a, b, out, threads, bias, epilogue, residual)
    bias = None if bias is None else np.asarray(bias)
    residual = None if residual is None else np.asarray(residual)
    _check_shapes(plan, pb, bias, residual)
    if not _fusable(plan, pb, out, bias, residual):
        return _composed(matmul, pa, pb, out, threads, bias, epilogue, residual)
    key = dispatch_key(plan.name, plan.m, plan.n, plan.k, plan.count, plan.layout,
                       resolver.settings.threads if threads is None else threads, resolver.settings.small_flops, epilogue.op)
    hit = resolver.dispatch.get(key)
    if hit is None:
        hit = resolver.lookup(key, lambda: key_problem(key))
    t = key[6]
    kernel = hit[0]
    if not (isinstance(kernel, Kernel) and kernel.fused) or not _kernel_serves_the_product(resolver, key, hit):
        return _composed(matmul, pa, pb, out, threads, bias, epilogue, residual)
    c = np.empty(plan.shape, plan.dtype) if out is None else out
    x = prepare(pa, plan.prep_a, plan.operands) if plan.prep_a else pa
    y = prepare(pb, plan.prep_b, plan.operands) if plan.prep_b else pb
    x = x.reshape(plan.view_a) if plan.view_a is not None else x
    y = y.reshape(plan.view_b) if plan.view_b is not None else y
    c3 = c.reshape(plan.view_c) if plan.view_c is not None else c
    if not np.may_share_memory(c3, c):       # out's strides do not fold: a fresh result, copied
        return _store(out, matmul_fused(matmul, resolver, a, b, None, threads, bias, activation, residual))
    fb = None if bias is None else _operand(bias.astype(c.dtype, copy=False), c)
    fr = None
    if residual is not None:
        fr = _operand(np.broadcast_to(residual.astype(c.dtype, copy=False), plan.shape).reshape(c3.shape), c)
    rc = kernel.invoke_fused(x, y, c3, fb, fr, 0, t)
    if rc == -3 or rc == -4:        # misaligned, or out overlapping an input: aligned copies
        fresh = np.empty(c3.shape, c.dtype)
        rc = kernel.invoke_fused(np.array(x), np.array(y), fresh, None if fb is None else np.array(fb),
                                 None if fr is None else np.array(fr), 0, t)
        if rc == 0:
            c3[...] = fresh
    if rc != 0:
        return _composed(matmul, pa, pb, out, threads, bias, epilogue, residual)
    return c


def _kernel_serves_the_product(resolver, key: tuple, hit: tuple) -> bool:
    """Whether the fused kernel may serve: always for a record tuned for this very epilogue (its
    timing was against numpy's composition); else only where a kernel serves the plain product,
    which a trial against numpy decides on this machine (``runtime.verdicts``).  Until then, and
    where numpy won, the call is composed, and its plain product runs through ``runtime.matmul``
    (advancing that trial), so no fused call is slower than numpy's GEMM plus the epilogue."""
    resolution = hit[1]     # None: an entry the measurement worker put there to time that kernel
    if resolution is None or resolution.source in EXACT_SOURCES or not resolver.settings.numpy_handoff:
        return True
    plain_key = key[:7]
    plain = resolver.dispatch.get(plain_key) or resolver.lookup(plain_key, lambda: key_problem(plain_key))
    return isinstance(plain[0], Kernel)


def _check_shapes(plan: Plan, b: np.ndarray, bias, residual) -> None:
    n = plan.shape[-1] if b.ndim > 1 else 1
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must be a vector of length {n} (the product's last dimension), not of shape {bias.shape}")
    if residual is not None:
        try:
            np.broadcast_shapes(residual.shape, plan.shape)
        except ValueError:
            raise ValueError(f"residual of shape {residual.shape} does not broadcast with the product's "
                             f"shape {plan.shape}") from None


def _fusable(plan: Plan, b: np.ndarray, out, bias, residual) -> bool:
    """Whether a fused kernel computes exactly what numpy would (dtype, shape, ``out``)."""
    if plan.name not in FUSED_DTYPES or plan.batch is not None or b.ndim < 2:
        return False
    for extra in (bias, residual):
        if extra is not None and (extra.dtype.kind not in "biuf" or np.result_type(plan.dtype, extra.dtype) != plan.dtype):
            return False
    if residual is not None and np.broadcast_shapes(residual.shape, plan.shape) != plan.shape:
        return False            # a residual that enlarges the result: numpy's broadcasting, composed
    return out is None or (type(out) is np.ndarray and out.shape == plan.shape and out.dtype == plan.dtype
                           and out.flags.writeable)


def _operand(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """An epilogue operand the kernel may read while it writes ``c`` (a copy if they overlap)."""
    return x.copy() if np.may_share_memory(x, c) else x


def _composed(matmul, a, b, out, threads, bias, epilogue: Epilogue, residual):
    """The epilogue from runtime.matmul and numpy's element-wise operations (numpy's semantics)."""
    y = matmul(a, b, threads=threads)
    if bias is not None:
        y = y + bias
    if epilogue.activation is not None:
        y = np.asarray(y)
        if y.dtype.kind != "f":
            raise TypeError(f"activation {epilogue.activation!r} needs a floating-point product, not {y.dtype}")
        y = activate(np.array(y, copy=True), epilogue.activation)
    if residual is not None:
        y = y + residual
    return y if out is None else _store(out, y)


def _store(out, y):
    if not isinstance(out, np.ndarray):
        raise TypeError("out must be a numpy array")
    if out.shape != np.shape(y):
        raise ValueError(f"out has shape {out.shape}, the result {np.shape(y)}")
    np.copyto(out, y, casting="same_kind")
    return out
