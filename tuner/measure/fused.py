"""Fused problems in the measurement worker: their operands, the float64 reference with a
tolerance derived for the activation, and numpy's unfused composition (numpy's time).

A problem whose ``op`` is not ``"matmul"`` (``looptune.runtime.compiler.epilogue``) is measured as
the runtime serves it: its kernel rendered with the op (``codegen.render(..., op=)``, the
evaluator), loaded with ``fused=True``, verified through ``Kernel.invoke_fused`` and timed through
``runtime.matmul(a, b, out=c, bias=, activation=, residual=)`` (``worker.Operands``).  Only
``accumulate=0`` is verified: neither the runtime nor the exported library ever accumulates into
a fused kernel's C.

Operands (``fused_operands``): A and B of ``make_operands``, A scaled by a power of two
(``operand_scale``, exact) so that the products are O(1) where the activations differ
(unit-normal operands give sums of size sqrt(K), far in the tails where relu, gelu and silu
agree, and a kernel of the wrong activation would pass); the bias (length N) and the residual
(the whole (batch, M, N) result) unit-normal in C's dtype, from a seed of their own.

Tolerance (``FusedReference.bound``), element by element, from the plain product's (``protocol.
default_tolerance``: rtol, atol for unit-normal operands, so atol scaled with A by c)::

    sum + bias   e = c atol + rtol |A@B| + eps |A@B + bias|      (the bias is added in C's dtype)
    activation   L e + r |f(A@B + bias)| + t                    L = max |f'| (SLOPE); r, t: ACCURACY
    residual     + eps |expected|                               (the last add rounds once)

r and t are the kernels' activations against float64 math, as tests/runtime/test_fused.py
(``test_activation_accuracy``) measures them.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from looptune.runtime import api as runtime_api
from looptune.runtime.compiler.abi import OUTPUT_DTYPE
from looptune.runtime.compiler.epilogue import PLAIN, activate, of_op
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.placement import copy_keeping_layout

# max |f'(x)| over all x: relu 1; gelu and gelu_tanh 1.1289 (at x = 1.414); silu 1.0998 (at x = 2.40)
SLOPE = {None: 1.0, "relu": 1.0, "gelu": 1.13, "gelu_tanh": 1.13, "silu": 1.1}
# (relative, absolute) accuracy of the kernels' activations in C's dtype: float32 within 2e-6
# relative where |f| >= 1e-6, and 3e-5 of it below (so under 3e-11 absolute); float64 within 1e-12
ACCURACY = {"float32": (2e-6, 3e-11), "float64": (1e-12, 0.0)}
EPILOGUE_SEED = 1          # the bias and residual come from (seed, EPILOGUE_SEED): not A's or B's numbers


def is_fused(problem: MatmulProblem) -> bool:
    return problem.op != PLAIN


def operand_scale(k: int) -> float:
    """The power of two A is scaled by: sums of K products of unit-normal numbers then have a
    standard deviation between 1 and 2."""
    return 2.0 ** -math.floor(math.log2(k) / 2)


def fused_operands(problem: MatmulProblem, seed: int = 0):
    """(A, B, bias or None, residual or None) of a fused problem, deterministic in ``seed``; A and
    B in the problem's layout (``make_operands``), A scaled by ``operand_scale``."""
    a, b, _ = problem.make_operands(seed)
    a *= a.dtype.type(operand_scale(problem.k))
    epilogue = of_op(problem.op)
    rng = np.random.default_rng((seed, EPILOGUE_SEED))
    dtype = np.dtype(OUTPUT_DTYPE[problem.dtype])
    bias = rng.standard_normal(problem.n).astype(dtype) if epilogue.bias else None
    residual = (rng.standard_normal((problem.batch, problem.m, problem.n)).astype(dtype)
                if epilogue.residual else None)
    return a, b, bias, residual


class FusedReference(NamedTuple):
    """A fused problem's operands for one seed, and what a kernel must write (float64)."""

    problem: MatmulProblem
    a: np.ndarray
    b: np.ndarray
    bias: Optional[np.ndarray]
    residual: Optional[np.ndarray]
    product: np.ndarray         # A @ B
    expect: np.ndarray          # activation(A @ B + bias) + residual

    def bound(self, rtol: float, atol: float) -> np.ndarray:
        """How far each element of a correct kernel's C may be from ``expect`` (module docstring)."""
        epilogue = of_op(self.problem.op)
        out = np.dtype(OUTPUT_DTYPE[self.problem.dtype])
        eps = float(np.finfo(out).eps)
        e = operand_scale(self.problem.k) * atol + rtol * np.abs(self.product)
        if self.bias is not None:
            e += eps * np.abs(self.product + self.bias)
        bound = SLOPE[epilogue.activation] * e
        if epilogue.activation is not None:
            r, t = ACCURACY[out.name]
            activated = self.expect if self.residual is None else self.expect - self.residual
            bound += r * np.abs(activated) + t
        if self.residual is not None:
            bound += eps * np.abs(self.expect)
        return bound


def fused_reference(problem: MatmulProblem, seed: int) -> FusedReference:
    """The operands of ``seed`` and the float64 result numpy computes unfused: ``A @ B + bias``,
    ``epilogue.activate`` (float64 math), ``+ residual``."""
    a, b, bias, residual = fused_operands(problem, seed)
    product = np.matmul(a.astype(np.float64), b.astype(np.float64))
    expect = product if bias is None else product + bias
    expect = activate(expect.copy(), of_op(problem.op).activation)
    if residual is not None:
        expect += residual
    for x in (a, b, bias, residual):
        if x is not None:
            x.flags.writeable = False
    return FusedReference(problem, a, b, bias, residual, product, expect)


# ---- numpy's time: the composition a numpy user writes ---------------------------------------
def _gelu_tanh(y):
    return 0.5 * y * (1 + np.tanh(0.7978845608 * (y + 0.044715 * y ** 3)))


def _silu(y):
    with np.errstate(over="ignore"):
        return y / (1 + np.exp(-y))


# gelu: numpy has no erf, so the runtime's own numpy form (``epilogue.activate``, in place)
NUMPY_ACTIVATIONS = {"relu": lambda y: np.maximum(y, 0), "gelu_tanh": _gelu_tanh, "silu": _silu,
                     "gelu": lambda y: activate(y, "gelu")}


def numpy_unfused(a, b, c, bias, activation: Optional[str], residual):
    """``y = a @ b`` (into ``c``), ``y += bias``, the activation as numpy code, ``y += residual``."""
    y = np.matmul(a, b, out=c)
    if bias is not None:
        y += bias
    if activation is not None:
        y = NUMPY_ACTIVATIONS[activation](y)
    if residual is not None:
        y += residual
    return y


def numpy_unfused_call(data: FusedReference, c):
    """``numpy_unfused`` on copies of ``data``'s operands (placed as the kernel's), into ``c``:
    numpy's time for a fused problem."""
    a, b, bias, residual = (None if x is None else copy_keeping_layout(x)
                            for x in (data.a, data.b, data.bias, data.residual))
    return functools.partial(numpy_unfused, a, b, c, bias, of_op(data.problem.op).activation, residual)


# ---- the call the runtime makes, and the check that it reaches the fused kernel --------------
class CountingKernel(Kernel):
    """A fused kernel that keeps the return code of each call: put in the dispatch table for one
    call, it shows that ``runtime.matmul(..., bias=, ...)`` ran the kernel (and not numpy's
    composition, which returns the same array)."""

    __slots__ = ("codes",)

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel.so_path, kernel.symbol, kernel.dtype, fused=True)
        self.codes: list[int] = []

    def invoke_fused(self, *args) -> int:
        self.codes.append(super().invoke_fused(*args))
        return self.codes[-1]


def fused_runtime_call(ops, serve) -> tuple[Callable[[], Any], Optional[int]]:
    """(``runtime.matmul(a, b, out=c, bias=, activation=, residual=)`` on the arrays of ``ops`` (a
    ``worker.Operands``), the kernel's code on that call once, or None when the call did not run
    the kernel just once); ``serve(kernel)`` puts a kernel in the runtime's dispatch table."""
    call = functools.partial(runtime_api.matmul, ops.a, ops.b, out=ops.c, bias=ops.bias,
                             activation=of_op(ops.problem.op).activation, residual=ops.residual)
    twin = CountingKernel(ops.kernel)
    serve(twin)
    try:
        result = call()
    finally:
        serve(ops.kernel)
    if twin.codes[:1] == [0] and (len(twin.codes) > 1 or result is not ops.c):
        return call, None
    return call, (twin.codes[0] if twin.codes else None)
