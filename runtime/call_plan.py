"""How ``runtime.matmul`` runs a call, all of it decided before anything runs.

A plain call's decision depends on its signature: both operands' shapes, strides and dtypes, and
the thread count asked for with the small-problem rule's threshold.  ``plan_for`` works a
signature out once and caches it in ``PLANS``: either a ``NumpyPlan`` (numpy.matmul serves the
call, and says why), or a ``Plan``: the dtype numpy computes in and the result's shape, how each
operand becomes what a kernel reads (a cast, a C-order copy, a reshaping view that adds the 1 of
a 1-D operand or folds the batch dimensions into one), the dispatch key of the kernel call
(``dispatch.dispatch_key``) and whether one call serves the whole batch or one call per index.
A bfloat16 kernel reads bfloat16 operands and writes float32 (``looptune.runtime.bf16`` decides
which kernel serves a call with a bfloat16 operand).  Working a signature out costs several
microseconds (``np.result_type``, broadcasting, trial reshapes); looking it up a few hundred
nanoseconds.  ``plan_fused`` plans a call with an epilogue (bias, activation, residual) from its
product's plan.

``looptune.runtime.execute`` runs a plan, ``looptune.runtime.fused`` a fused one; neither decides
anything a plan could.  Addresses are not part of a signature: misaligned operands and an ``out``
that overlaps an input are caught by the kernel call (codes -3 and -4) and handled there.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import numpy as np

from looptune.runtime import bf16
from looptune.runtime.compiler.dispatch import dispatch_key
from looptune.runtime.compiler.epilogue import ACTIVATIONS, Epilogue

# numpy result dtypes a kernel computes in (float16: float32 arithmetic, rounded once; codegen_f16)
KERNEL_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}
# kernel dtypes with fused epilogues
FUSED_DTYPES = ("float32", "float64", "bfloat16")

# operand preparation codes (bits): cast to the dtype the kernel reads, copy to C order
CAST, COPY = 1, 2
_MAX_PLANS = 1024


class Plan(NamedTuple):
    """The kernel calls that serve one signature (see the module docstring)."""

    dtype: np.dtype                 # numpy's result dtype: what the kernel writes
    shape: tuple                    # numpy's result shape
    operands: np.dtype              # what the operands are cast to: ``dtype``, or bfloat16 for a
                                    # bfloat16 kernel (whose result ``dtype`` is float32)
    prep_a: int                     # CAST | COPY bits for a
    view_a: Optional[tuple]         # shape a (once prepared) is viewed as, or None for a itself
    prep_b: int
    view_b: Optional[tuple]
    view_c: Optional[tuple]         # the same for the result array
    out_casting: Optional[str]      # the rule under which the result is cast into an ``out`` of
                                    # another dtype ("same_kind": a bfloat16 kernel's float32, as
                                    # numpy casts it); None: numpy.matmul handles such an ``out``
    key: tuple                      # the dispatch key of each kernel call
    threads: int                    # threads each kernel call runs on (the key's, after the rule)
    looped_batch: Optional[tuple]   # None: one kernel call; else the batch, which does not fold:
                                    # one call per index of all but its last dimension (count: that one)
    name: str                       # the kernel problem the key stands for: kernel dtype name,
    m: int                          # sizes,
    n: int
    k: int
    count: int                      # batch entries in one kernel call,
    layout: str                     # "nn", "nt", "tn" or "tt"


class NumpyPlan(NamedTuple):
    """numpy.matmul serves the call (its values, and its exceptions for an invalid one)."""

    reason: str


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


def make_plan(a: np.ndarray, b: np.ndarray, threads: int, small_flops: float) -> Union[Plan, NumpyPlan]:
    """The plan for ``a @ b`` on ``threads`` threads (``small_flops``: the thread rule's threshold)."""
    if not a.ndim or not b.ndim:
        return NumpyPlan("scalar operand")
    rdt = odt = promoted(a.dtype, b.dtype)
    if rdt is not None:
        name = KERNEL_DTYPES[rdt]
    else:
        typed = bf16.kernel_dtypes(a.dtype, b.dtype)
        if typed is None:
            return NumpyPlan(f"dtypes {a.dtype} and {b.dtype}")
        odt, rdt, name = typed
    sa = (1,) + a.shape if a.ndim == 1 else a.shape
    sb = b.shape + (1,) if b.ndim == 1 else b.shape
    m, k = sa[-2:]
    k2, n = sb[-2:]
    if k != k2:
        return NumpyPlan("core dimensions differ")
    ba, bb = sa[:-2], sb[:-2]
    batch = ba if ba == bb or not bb else bb if not ba else broadcast_batch(ba, bb)
    if batch is None:
        return NumpyPlan("batch dimensions do not broadcast")
    shape = batch if a.ndim == 1 else batch + (m,)
    if b.ndim > 1:
        shape += (n,)
    count = 1
    for d in batch:
        count *= d
    if not (count and m and n and k):
        return NumpyPlan("zero-size operand")
    preps, views, chars = [], [], ""
    for x, core in ((a, (m, k)), (b, (k, n))):
        prep = 0 if x.dtype == odt else CAST
        # a stand-in with the layout the cast will have (numpy keeps x's memory order), without its data
        y = np.empty_like(x, dtype=odt) if prep else x
        st = y.strides * 2 if y.ndim == 1 else y.strides[-2:]   # a 1-D operand: its stride for both
        char = layout_char(core[0], core[1], st[0], st[1], odt.itemsize)
        if char is None:        # no unit core stride: a C-order copy has one
            prep |= COPY
            y, char = np.empty(x.shape, odt), "n"
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
    key = dispatch_key(name, m, n, k, count, chars, threads, small_flops)
    return Plan(rdt, shape, odt, pa, va, pb, vb, view_c, "same_kind" if name == bf16.BFLOAT16 else None,
                key, key[6], None if folds else batch, name, m, n, k, count, chars)   # key[6]: its threads


# signature (a.shape, b.shape, a.strides, b.strides, a.dtype, b.dtype, threads, small_flops) ->
# Plan or NumpyPlan; read directly by runtime.matmul, which builds the signature inline to save a call
PLANS: dict = {}


def plan_for(a: np.ndarray, b: np.ndarray, threads: int, small_flops: float) -> Union[Plan, NumpyPlan]:
    """``make_plan(a, b, threads, small_flops)``, cached in ``PLANS`` (emptied when it grows large)."""
    sig = (a.shape, b.shape, a.strides, b.strides, a.dtype, b.dtype, threads, small_flops)
    plan = PLANS.get(sig)
    if plan is None:
        plan = make_plan(a, b, threads, small_flops)
        if len(PLANS) >= _MAX_PLANS:
            PLANS.clear()
        PLANS[sig] = plan
    return plan


def plain_operand(x) -> Optional[np.ndarray]:
    """``x`` as a base-class ndarray for planning, or None when numpy.matmul must see it as it is
    (an ndarray subclass, or a foreign array with its own ``__array_function__``)."""
    if type(x) is np.ndarray:
        return x
    if isinstance(x, np.ndarray) or hasattr(x, "__array_function__") and not isinstance(x, (list, tuple)):
        return None
    return np.asarray(x)


# ---- calls with an epilogue ------------------------------------------------------------------

class FusedPlan(NamedTuple):
    """How ``matmul(a, b, bias=, activation=, residual=)`` runs: one fused kernel call on the
    product's plan under ``key``, or (``product`` None) composed from ``runtime.matmul`` and numpy's
    element-wise operations, which give numpy's values, dtypes, broadcasting and exceptions."""

    epilogue: Epilogue
    product: Optional[Plan]         # the product's plan; None: composed
    key: Optional[tuple]            # the fused kernel's dispatch key (the epilogue's op in it)
    threads: int                    # threads asked for (the composed product's)
    a: object                       # the call's operands as the plan reads them (plain arrays where
    b: object                       # the product has a plan; numpy's own conversions otherwise)
    bias: object
    residual: object


def checked_epilogue(bias, activation, residual) -> tuple[Epilogue, str]:
    """The epilogue a call asks for and its op (the fused kernel's dispatch key holds it)."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)} or None")
    return _epilogue(bias is not None, activation, residual is not None)


@functools.lru_cache(maxsize=None)      # 20 kinds at most: made once, not on every call
def _epilogue(bias: bool, activation: Optional[str], residual: bool) -> tuple[Epilogue, str]:
    epilogue = Epilogue(bias, activation, residual)
    return epilogue, epilogue.op


def plan_fused(a, b, out, bias, activation, residual, threads: int, small_flops: float) -> FusedPlan:
    """The plan for ``activation(a @ b + bias) + residual`` into ``out``: fused where a kernel
    computes exactly what numpy would (a product a kernel serves whose batch folds into one call,
    a bias vector of length N and a residual that broadcasts to the product's shape, neither
    changing numpy's result dtype, an ``out`` the kernel writes as it is).  Bad arguments raise
    ValueError naming the argument."""
    epilogue, op = checked_epilogue(bias, activation, residual)
    pa, pb = plain_operand(a), plain_operand(b)
    product = plan_for(pa, pb, threads, small_flops) if pa is not None and pb is not None else None
    if type(product) is not Plan:       # numpy serves the product (or an array subclass does)
        return FusedPlan(epilogue, None, None, threads, a, b, bias, residual)
    bias = None if bias is None else np.asarray(bias)
    residual = None if residual is None else np.asarray(residual)
    _check_shapes(product, pb, bias, residual)
    if not _fusable(product, pb, out, bias, residual):
        return FusedPlan(epilogue, None, None, threads, pa, pb, bias, residual)
    key = dispatch_key(product.name, product.m, product.n, product.k, product.count, product.layout,
                       threads, small_flops, op)
    return FusedPlan(epilogue, product, key, threads, pa, pb, bias, residual)


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
    if plan.name not in FUSED_DTYPES or plan.looped_batch is not None or b.ndim < 2:
        return False
    for extra in (bias, residual):
        if extra is not None and (extra.dtype.kind not in "biuf" or np.result_type(plan.dtype, extra.dtype) != plan.dtype):
            return False
    if residual is not None and np.broadcast_shapes(residual.shape, plan.shape) != plan.shape:
        return False            # a residual that enlarges the result: numpy's broadcasting, composed
    return out is None or (type(out) is np.ndarray and out.shape == plan.shape and out.dtype == plan.dtype
                           and out.flags.writeable)
