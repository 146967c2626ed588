"""How ``runtime.matmul`` serves one call signature, worked out once and cached.

A signature is what the decision depends on: both operands' shapes, strides and dtypes.  Its
``Plan`` says whether numpy serves the call (and why), or which kernel problem runs it: the
dtype numpy computes in, the result shape, how each operand becomes what a kernel reads (a cast,
a copy, a reshaping view that adds the 1 of a 1-D operand or folds the batch dimensions into
one) and the kernel's layout.  A bfloat16 kernel reads bfloat16 operands and writes float32
(``looptune.runtime.bf16`` decides which kernel serves a call with a bfloat16 operand).
Working this out costs several microseconds (``np.result_type``, broadcasting, trial
reshapes); looking a signature up costs a few hundred nanoseconds.
Addresses are not part of a signature: misaligned operands and an ``out`` that overlaps an
input are caught by the call path (codes -3 and -4) on every call.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import numpy as np

from looptune.runtime import bf16

# numpy result dtypes a kernel computes in (float16: float32 arithmetic, rounded once; codegen_f16)
KERNEL_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}

# operand preparation codes (bits): cast to the dtype the kernel reads, copy to C order
CAST, COPY = 1, 2
_MAX_PLANS = 1024


class Plan(NamedTuple):
    """A kernel call for one signature (see the module docstring)."""

    dtype: np.dtype                 # numpy's result dtype: what the kernel computes in
    shape: tuple                    # numpy's result shape
    prep_a: int                     # CAST | COPY bits for a
    view_a: Optional[tuple]         # shape a (once prepared) is reshaped to (a view), or None
    prep_b: int
    view_b: Optional[tuple]
    view_c: Optional[tuple]         # the same for the result array
    name: str                       # kernel dtype name
    m: int
    n: int
    k: int
    count: int                      # batch entries in one kernel call
    layout: str                     # "nn", "nt", "tn" or "tt"
    batch: Optional[tuple]          # set when the batch does not fold into one call: one call per
                                    # index of all but its last dimension (count: that one)
    operands: np.dtype              # what the operands are cast to: ``dtype``, or bfloat16 for a
                                    # bfloat16 kernel (whose result ``dtype`` is float32)


def layout_char(rows: int, cols: int, s_row: int, s_col: int, item: int) -> Optional[str]:
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


@functools.lru_cache(maxsize=256)
def promoted(da: np.dtype, db: np.dtype) -> Optional[np.dtype]:
    """numpy's result dtype for ``da @ db`` when a kernel computes it (native float16/float32/float64
    from bool, integer or float inputs), else None."""
    if da.kind not in "biuf" or db.kind not in "biuf":
        return None
    try:
        rdt = np.result_type(da, db)
    except TypeError:
        return None
    return rdt if rdt in KERNEL_DTYPES else None


@functools.lru_cache(maxsize=256)
def broadcast_batch(x: tuple, y: tuple) -> Optional[tuple]:
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


def prepare(x: np.ndarray, prep: int, dtype: np.dtype) -> np.ndarray:
    """``x`` cast to ``dtype`` (in x's memory order, as numpy's loop casts) and/or copied to C order."""
    if prep == CAST:
        return x.astype(dtype)
    return x.astype(dtype, order="C") if prep & CAST else x.copy(order="C")


def folded_view(x: np.ndarray, shape: tuple) -> Optional[np.ndarray]:
    """``x`` reshaped to ``shape`` as a view, or None when its strides do not allow one."""
    v = x.view()
    try:
        v.shape = shape
    except AttributeError:
        return None
    return v


def _kernel_view(x: np.ndarray, core: tuple, batch: tuple, count: int):
    """(the shape x is viewed as for one kernel call or None for x itself, folds): 2-D when x
    has no batch of its own or all its batch dimensions broadcast (the call path broadcasts
    a 2-D operand), 3-D otherwise; folds is False when its batch does not fold into one."""
    xb = x.shape[:-2] if x.ndim > 1 else ()
    if x.ndim == 1 or count == 1 or all(d == 1 for d in xb):
        return (None if x.shape == core else core), True
    if xb != batch:
        return None, False                      # a partly broadcast batch: one call per index
    if len(batch) == 1:
        return None, True
    view = (count,) + core
    return view, folded_view(x, view) is not None


def make_plan(a: np.ndarray, b: np.ndarray) -> Union[Plan, str]:
    """The plan for ``a @ b``, or the reason numpy.matmul serves it (numpy then also raises
    numpy's own exception for an invalid call)."""
    if not a.ndim or not b.ndim:
        return "scalar operand"
    rdt = odt = promoted(a.dtype, b.dtype)
    if rdt is not None:
        name = KERNEL_DTYPES[rdt]
    else:
        typed = bf16.kernel_dtypes(a.dtype, b.dtype)
        if typed is None:
            return f"dtypes {a.dtype} and {b.dtype}"
        odt, rdt, name = typed
    sa = (1,) + a.shape if a.ndim == 1 else a.shape
    sb = b.shape + (1,) if b.ndim == 1 else b.shape
    m, k = sa[-2:]
    k2, n = sb[-2:]
    if k != k2:
        return "core dimensions differ"
    ba, bb = sa[:-2], sb[:-2]
    batch = ba if ba == bb or not bb else bb if not ba else broadcast_batch(ba, bb)
    if batch is None:
        return "batch dimensions do not broadcast"
    shape = batch if a.ndim == 1 else batch + (m,)
    if b.ndim > 1:
        shape += (n,)
    count = 1
    for d in batch:
        count *= d
    if not (count and m and n and k):
        return "zero-size operand"
    preps, views, chars = [], [], ""
    for x, core in ((a, (m, k)), (b, (k, n))):
        prep = 0 if x.dtype == odt else CAST
        y = prepare(x, prep, odt) if prep else x
        st = y.strides * 2 if y.ndim == 1 else y.strides[-2:]   # a 1-D operand: its stride for both
        char = layout_char(core[0], core[1], st[0], st[1], odt.itemsize)
        if char is None:        # no unit core stride: a C-order copy has one
            prep |= COPY
            y, char = prepare(x, prep, odt), "n"
        preps.append(prep)
        views.append(_kernel_view(y, core, batch, count))
        chars += char
    folds = views[0][1] and views[1][1]
    if not folds:               # one call per batch index: operands keep their batch dimensions
        views = [((1, k) if a.ndim == 1 else None, False), ((k, 1) if b.ndim == 1 else None, False)]
    (pa, pb), ((va, _), (vb, _)) = preps, views
    c_core = (count, m, n) if count > 1 else (m, n)
    if not folds:               # one call per index of all but the last batch dimension
        c_core, count = batch + (m, n), batch[-1]
    view_c = None if shape == c_core else c_core
    return Plan(rdt, shape, pa, va, pb, vb, view_c, name, m, n, k, count, chars,
                None if folds else batch, odt)


# signature (a.shape, b.shape, a.strides, b.strides, a.dtype, b.dtype) -> Plan or reason; read
# directly by runtime.matmul, which builds the signature inline to save a call
PLANS: dict = {}


def plan_for(a: np.ndarray, b: np.ndarray) -> Union[Plan, str]:
    """``make_plan(a, b)``, cached in ``PLANS`` (emptied when it grows large)."""
    sig = (a.shape, b.shape, a.strides, b.strides, a.dtype, b.dtype)
    plan = PLANS.get(sig)
    if plan is None:
        plan = make_plan(a, b)
        if len(PLANS) >= _MAX_PLANS:
            PLANS.clear()
        PLANS[sig] = plan
    return plan
