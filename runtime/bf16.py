"""bfloat16 operands in ``runtime.matmul``: which kernel computes a call numpy would compute
with a bfloat16 operand, and the opt-in that runs float32 problems through bf16 arithmetic.

numpy has no bfloat16 of its own; ml_dtypes adds one and numpy.matmul casts it (numpy 2.x
with ml_dtypes 0.4+ runs its float32 loop, so ``bf16 @ bf16`` is float32).  We ask numpy
which loop it runs (``np.matmul.resolve_dtypes``), so results follow numpy whatever the
versions installed:

* a float32 loop whose operands are all bfloat16, int8, uint8 or bool runs the **bfloat16
  kernel** (bf16 inputs, float32 accumulation and result): those integers are exact in
  bfloat16, so casting them there loses nothing;
* any other float32 or float64 loop (bf16 with float32, float64, int16, ...) runs that float
  kernel on operands cast as numpy casts them;
* anything else (complex, a bfloat16 result in some other ml_dtypes version, a pair numpy
  refuses) is left to numpy.matmul, which then raises its own exceptions.

Subnormals: the AMX and AVX512-BF16 instructions treat subnormal bf16 inputs as zero (and
flush subnormal products), as every bf16 BLAS on these CPUs does; a product of a subnormal
and a huge value then differs from numpy's.  The portable form (``LOOPTUNE_BF16=convert``)
widens exactly and matches numpy there too.  The float32 opt-in rounds subnormal float32
inputs to zero in every form.

This module never imports ml_dtypes: it recognizes the dtype by its name and its scalar
type's module, so a process that never meets a bfloat16 array never loads it.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from looptune.runtime.compiler.workload import MatmulProblem

BFLOAT16 = "bfloat16"
# dtypes a bfloat16 kernel reads exactly once cast to bfloat16 (at most 8 significant bits)
_EXACT_IN_BF16 = frozenset("?bB")
_FLOAT_KERNELS = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16 (told without importing ml_dtypes)."""
    return dtype.name == BFLOAT16 and dtype.type.__module__.split(".")[0] == "ml_dtypes"


@functools.lru_cache(maxsize=64)
def kernel_dtypes(da: np.dtype, db: np.dtype) -> Optional[tuple[np.dtype, np.dtype, str]]:
    """(dtype the operands are cast to, result dtype, kernel dtype name) for ``da @ db`` when one
    operand is bfloat16 and a kernel computes what numpy.matmul would, else None (numpy serves)."""
    a_bf16, b_bf16 = is_bfloat16(da), is_bfloat16(db)
    if not (a_bf16 or b_bf16):
        return None
    try:
        loop_a, loop_b, result = np.matmul.resolve_dtypes((da, db, None))
    except (TypeError, ValueError):     # no loop: numpy raises its own error when it is called
        return None
    name = _FLOAT_KERNELS.get(result)
    if name is None or loop_a != result or loop_b != result:
        return None
    if name == "float32" and (a_bf16 or da.char in _EXACT_IN_BF16) and (b_bf16 or db.char in _EXACT_IN_BF16):
        bf16 = da if a_bf16 else db
        return bf16, result, BFLOAT16
    return result, result, name


def arithmetic_problem(problem: MatmulProblem, float32_via_bfloat16: bool) -> MatmulProblem:
    """The problem whose records and kernel serve ``problem``: with the opt-in
    (``RuntimeSettings.float32_via_bfloat16``) a float32 problem is served as its bfloat16 twin
    (same sizes, layout and threads) by a kernel that reads float32 and rounds it to bf16."""
    if float32_via_bfloat16 and problem.dtype == "float32":
        return MatmulProblem(problem.m, problem.n, problem.k, problem.batch, BFLOAT16, problem.layout,
                             problem.threads, problem.op)
    return problem
