"""numpy.matmul behind the kernel interface: what a problem is served by when LoopTune should
not serve it itself.

It stands in the dispatch table in place of a compiled kernel when the numpy hand-off says so
(``looptune.runtime.handoff``: the problem's own record), when a trial found numpy faster
(``looptune.runtime.verdicts``), or when a kernel could not be built or loaded (no compiler, an
unusable cache directory, a full disk ...): numpy would just compute, so we do, after one
warning that names the cause.

For a bfloat16 problem numpy.matmul reads the bf16 operands and writes the float32 ``C`` (its
float32 loop), as the bf16 kernel would.  It has ``Kernel``'s call interface (``invoke``
returning 0, ``__call__``, ``error``), so the call path needs no special case.
"""
from __future__ import annotations

import numpy as np

from looptune.runtime.compiler.abi import KernelError


class NumpyKernel:
    """``C = (accumulate ? C : 0) + A @ B`` by ``numpy.matmul`` (2-D or (batch, r, c) operands)."""

    __slots__ = ("dtype", "reason")
    symbol = "numpy.matmul"
    so_path = None
    address = 0        # no kernel function: the compiled call path calls numpy.matmul for this key itself

    def __init__(self, dtype: str, reason: str) -> None:
        self.dtype = dtype
        self.reason = reason

    def invoke(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, accumulate: int, nthreads: int) -> int:
        if accumulate:
            c += np.matmul(a, b)
        else:
            np.matmul(a, b, out=c)
        return 0

    def __call__(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, *, accumulate: bool = False,
                 nthreads: int = 1) -> np.ndarray:
        self.invoke(a, b, c, int(accumulate), nthreads)
        return c

    def error(self, code: int) -> KernelError:
        return KernelError.from_code(self.symbol, code)

    def __repr__(self) -> str:
        return f"NumpyKernel({self.dtype!r}, {self.reason!r})"
