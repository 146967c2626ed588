"""Running a planned ``runtime.matmul`` call (``looptune.runtime.call_plan`` plans it).

``execute`` does what a ``Plan`` says: it takes ``out`` (written in place when the result fits
it) or a fresh array, casts, copies and views the operands, and makes the kernel call under the
plan's dispatch key, or one per batch index; ``numpy_matmul`` serves a ``NumpyPlan``.  The only
things left to a call are those a signature cannot tell: ``out`` (the plan says what fits),
the operands' addresses (a kernel answers -3 for a misaligned operand and -4 for an ``out``
that overlaps an input: computed from copies), and the kernel a key resolves to (a kernel that
refuses its operands or fails is retried on contiguous copies, then its key goes to numpy).
"""
from __future__ import annotations

import logging

import numpy as np

from looptune.runtime.call_plan import CAST, Plan
from looptune.runtime.compiler.abi import error_message
from looptune.runtime.compiler.dispatch import key_problem

log = logging.getLogger("looptune.runtime")

_ndarray = np.ndarray
_empty = np.empty


def numpy_matmul(a, b, out, why: str):
    """numpy.matmul serves the call: its values, its exceptions."""
    log.debug("looptune: numpy.matmul handles this call (%s)", why)
    if out is None:
        return np.matmul(a, b)
    return np.matmul(a, b, out=out)


def prepare(x: np.ndarray, prep: int, dtype: np.dtype) -> np.ndarray:
    """``x`` cast to ``dtype`` (in x's memory order, as numpy's loop casts) and/or copied to C
    order, as a plan's CAST | COPY bits say."""
    if prep == CAST:
        return x.astype(dtype)
    return x.astype(dtype, order="C") if prep & CAST else x.copy(order="C")


def execute(plan: Plan, a: np.ndarray, b: np.ndarray, out, resolver):
    """``a @ b`` as ``plan`` says, into ``out`` (written in place when it is a suitable array, or
    the result cast into it under ``plan.out_casting``) or a fresh array; any other ``out`` goes
    to numpy.  ``resolver``: the process's (``looptune.runtime.resolve``)."""
    (dtype, shape, operands, prep_a, view_a, prep_b, view_b, view_c, out_casting, key, threads, looped_batch,
     _, _, _, _, _, _) = plan         # the rest: the kernel problem, which the key holds
    if out is None:
        c = _empty(shape, dtype)
    elif (type(out) is _ndarray and out.shape == shape and (out.dtype is dtype or out.dtype == dtype)
          and out.flags.writeable):
        c = out
    elif (out_casting is not None and type(out) is _ndarray and out.shape == shape and out.flags.writeable
          and np.can_cast(dtype, out.dtype, out_casting)):
        np.copyto(out, execute(plan, a, b, None, resolver), casting=out_casting)
        return out
    else:
        return numpy_matmul(a, b, out, "out= needs numpy's handling")
    x = prepare(a, prep_a, operands) if prep_a else a
    y = prepare(b, prep_b, operands) if prep_b else b
    if view_a is not None:
        x = x.reshape(view_a)           # a view: the plan checked the strides allow one
    if view_b is not None:
        y = y.reshape(view_b)
    c3 = c
    if view_c is not None:
        c3 = c.view()
        try:
            c3.shape = view_c
        except AttributeError:          # out's strides do not fold: compute into a fresh array
            np.copyto(out, execute(plan, a, b, None, resolver))
            return out
    if looped_batch is None:
        _call_kernel(resolver, key, threads, x, y, c3)
    elif out is not None and (np.may_share_memory(c3, x) or np.may_share_memory(c3, y)):
        # one call per index checks only its own slices for overlap, and call i may overwrite what
        # call i + 1 reads: the whole product into a fresh array first, as numpy does
        fresh = _empty(c3.shape, c3.dtype)
        _call_looped(resolver, plan, x, y, fresh)
        c3[...] = fresh
    else:
        _call_looped(resolver, plan, x, y, c3)
    if out is None and not shape:
        return c[()]                    # vector @ vector: numpy returns a scalar
    return c


def _call_kernel(resolver, key: tuple, threads: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """One kernel call under ``key``: c (count, m, n) = a @ b (2-D a or b broadcast over the batch)."""
    hit = resolver.dispatch.get(key)
    if hit is None:
        hit = resolver.lookup(key, lambda: key_problem(key))
    rc = hit[0].invoke(a, b, c, 0, threads)
    if rc != 0:
        _refused(resolver, key, threads, hit[0], rc, a, b, c)


def _call_looped(resolver, plan: Plan, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """c = a @ b over a batch that does not fold into one call: one call per index of all but
    the last batch dimension (broadcasting is a view; the call path reads 0 strides)."""
    batch = plan.looped_batch
    a = np.broadcast_to(a, batch + a.shape[-2:])
    b = np.broadcast_to(b, batch + b.shape[-2:])
    for index in np.ndindex(*batch[:-1]):
        x, y, z = a[index], b[index], c[index]
        if plan.count == 1:
            x, y, z = x[0], y[0], z[0]
        _call_kernel(resolver, plan.key, plan.threads, x, y, z)


def _refused(resolver, key: tuple, threads: int, kernel, rc: int, a: np.ndarray, b: np.ndarray,
             c: np.ndarray) -> None:
    """The kernel call answered ``rc``: -3 (a misaligned operand) or -4 (``c`` overlapping an
    input) is computed from aligned copies into a fresh output; -2 (the kernel's layout
    precondition) is retried on contiguous copies; a failure hands the key to numpy for good
    (one warning naming the cause)."""
    if rc == -3 or rc == -4:
        fresh = _empty(c.shape, c.dtype)
        rc = kernel.invoke(a.copy(order="K"), b.copy(order="K"), fresh, 0, threads)
        if rc == 0:
            c[...] = fresh
            return
    if rc == -2:
        # aligned, contiguous copies (an unaligned ``c`` gets the product through a temporary), so
        # that only the kernel itself can refuse again: a one-off odd operand never demotes the key
        target = c if c.flags.aligned else np.empty_like(c, order="C")
        rc = kernel.invoke(np.ascontiguousarray(a), np.ascontiguousarray(b), target, 0, threads)
        if rc == 0:
            if target is not c:
                np.copyto(c, target)
            return
    fallback = resolver.demote(key, f"{kernel.symbol} returned {rc}: {error_message(rc)}")
    fallback.invoke(a, b, c, 0, threads)
