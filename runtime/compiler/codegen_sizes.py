"""Exact-size kernels: a schedule's kernel with the problem's sizes as compile-time constants.

``codegen.render(..., sizes=FixedSizes(batch, m, n, k))`` writes the same kernel as without
``sizes`` (one code generator), with literals where the generic kernel reads its size
arguments, as TVM and libxsmm specialize small problems: loop bounds become constants, a block
that divides its range has no tail (its length is a literal), the tail block of a range of
constant extent has one of two literal lengths, and the micro-kernel's k trip count and the
packing lengths are constants.  The C compiler then drops the edge code no block reaches and
unrolls the short loops that remain.

The ABI does not change.  Called with other sizes, an exact-size kernel computes nothing and
returns the ABI's -2 ("these operands are not this kernel's"), which the runtime answers like
any refusal (contiguous copies, then numpy).  The runtime never does so: its dispatch key
carries the sizes, and only a problem served by its own record (or by live tuning) gets an
exact-size kernel (``looptune.runtime.resolve``).  The tuner times the same kernel
(``looptune.tuner.measure.protocol.Candidate``), so a record's stored speed is the served one.
"""
from __future__ import annotations

from typing import NamedTuple, Optional


class FixedSizes(NamedTuple):
    """The sizes an exact-size kernel is compiled for; ``batch`` None: any batch (the matrices'
    sizes are constants, the batch count stays an argument: one kernel serves a stack of any
    height, as ``defaults.small_stack_schedule``'s kernels do)."""

    batch: Optional[int]
    m: int
    n: int
    k: int

    @classmethod
    def of(cls, problem) -> FixedSizes:
        """The sizes of a ``MatmulProblem`` (anything with batch, m, n and k)."""
        return cls(problem.batch, problem.m, problem.n, problem.k)

    @classmethod
    def of_matrices(cls, problem) -> FixedSizes:
        """The sizes of a problem's matrices, for any batch."""
        return cls(None, problem.m, problem.n, problem.k)

    def key(self) -> str:
        return f"{'any' if self.batch is None else self.batch}x{self.m}x{self.n}x{self.k}"

    def extents(self) -> dict[str, Optional[int]]:
        """Each loop dimension's full range (the IR's dimension names; None: not a constant)."""
        return {"b": self.batch, "m": self.m, "n": self.n, "k": self.k}


def fixed_length(block: int, extent: int | None) -> int | None:
    """A block's length when it is one constant on every iteration of a loop by ``block`` over a
    range of constant ``extent`` (None: the extent is not constant, or the last block is shorter)."""
    if block == 1:
        return 1
    if extent is None or extent % block and extent > block:
        return None
    return min(block, extent)


def block_length(block: int, extent: int | None, lo: str, length: str, var: str) -> str:
    """C for the length of the block at ``var`` of a loop over [lo, lo + length) by ``block``: a
    literal when it is constant, one of two literals when only the range's ``extent`` is (the
    tail block's length is ``extent % block``), else a run-time minimum."""
    fixed = fixed_length(block, extent)
    if fixed is not None:
        return str(fixed)
    if extent is not None:
        return f"({lo} + {length} - {var} >= {block} ? (int64_t){block} : (int64_t){extent % block})"
    return f"LT_MIN((int64_t){block}, {lo} + {length} - {var})"
