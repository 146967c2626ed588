"""Running a call with an epilogue, ``matmul(a, b, bias=, activation=, residual=)``:
``activation(a @ b + bias) + residual`` in one kernel call (``looptune.runtime.compiler.epilogue``
renders the store stage that does it).

``looptune.runtime.call_plan.plan_fused`` plans the call: fused, or composed from
``runtime.matmul`` and numpy's element-wise operations (``activation`` computed as the kernels
compute it, ``epilogue.activate``).  What a plan cannot tell is left to the call: the kernel its
key resolves to, and whether a kernel serves the plain product here
(``_kernel_serves_the_product``); where not, the call is composed too.
"""
from __future__ import annotations

import numpy as np

from looptune.runtime.call_plan import FusedPlan
from looptune.runtime.compiler.epilogue import Epilogue, activate
from looptune.runtime.compiler.dispatch import key_problem
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.execute import prepare
from looptune.runtime.resolve import EXACT_SOURCES


def execute_fused(plan: FusedPlan, out, resolver, matmul):
    """The call ``plan`` plans, into ``out`` or a fresh array; ``resolver`` is the process's,
    ``matmul`` the plain ``runtime.matmul`` (for composed calls)."""
    epilogue, product, key, threads, a, b, bias, residual = plan
    if product is None:
        return _composed(matmul, a, b, out, threads, bias, epilogue, residual)
    hit = resolver.dispatch.get(key)
    if hit is None:
        hit = resolver.lookup(key, lambda: key_problem(key))
    kernel = hit[0]
    if not (isinstance(kernel, Kernel) and kernel.fused) or not _kernel_serves_the_product(resolver, product.key, hit):
        return _composed(matmul, a, b, out, threads, bias, epilogue, residual)
    c = np.empty(product.shape, product.dtype) if out is None else out
    x = prepare(a, product.prep_a, product.operands) if product.prep_a else a
    y = prepare(b, product.prep_b, product.operands) if product.prep_b else b
    x = x.reshape(product.view_a) if product.view_a is not None else x
    y = y.reshape(product.view_b) if product.view_b is not None else y
    c3 = c.reshape(product.view_c) if product.view_c is not None else c
    if not np.may_share_memory(c3, c):       # out's strides do not fold: a fresh result, copied
        return _store(out, execute_fused(plan, None, resolver, matmul))
    fb = None if bias is None else _operand(bias.astype(c.dtype, copy=False), c)
    fr = None
    if residual is not None:
        fr = _operand(np.broadcast_to(residual.astype(c.dtype, copy=False), product.shape).reshape(c3.shape), c)
    t = product.threads
    rc = kernel.invoke_fused(x, y, c3, fb, fr, 0, t)
    if rc == -3 or rc == -4:        # misaligned, or out overlapping an input: aligned copies
        fresh = np.empty(c3.shape, c.dtype)
        rc = kernel.invoke_fused(np.array(x), np.array(y), fresh, None if fb is None else np.array(fb),
                                 None if fr is None else np.array(fr), 0, t)
        if rc == 0:
            c3[...] = fresh
    if rc != 0:
        return _composed(matmul, a, b, out, threads, bias, epilogue, residual)
    return c


def _kernel_serves_the_product(resolver, plain_key: tuple, hit: tuple) -> bool:
    """Whether the fused kernel may serve: always for a record tuned for this very epilogue (its
    timing was against numpy's composition); else only where a kernel serves the plain product
    (``plain_key``), which a trial against numpy decides on this machine (``runtime.verdicts``).
    Until then, and where numpy won, the call is composed, and its plain product runs through
    ``runtime.matmul`` (advancing that trial), so no fused call is slower than numpy's GEMM plus
    the epilogue."""
    resolution = hit[1]     # None: an entry the measurement worker put there to time that kernel
    if resolution is None or resolution.source in EXACT_SOURCES or not resolver.settings.numpy_handoff:
        return True
    plain = resolver.dispatch.get(plain_key) or resolver.lookup(plain_key, lambda: key_problem(plain_key))
    return isinstance(plain[0], Kernel)


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
        owned = type(y) is np.ndarray and y.base is None and y.flags.writeable   # a fresh result of ours
        y = activate(y if owned else np.array(y, copy=True), epilogue.activation)
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
