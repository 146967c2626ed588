"""The numpy hand-off: when a problem's own measurements say numpy serves it better than its kernel.

One home for the rule: the resolver applies ``handoff_reason`` to an exact record and to a live
tuning's result alike.  Shapes without a record of their own are decided by a trial instead
(``looptune.runtime.verdicts``); a matrix-vector product goes to numpy unless its own record says
otherwise (``dot_products``).
"""
from __future__ import annotations

from typing import Optional

from looptune.runtime.compiler.workload import MatmulProblem

# What serving a call through numpy costs on top of numpy's own call: runtime.matmul's entry and
# dispatch before it hands the operands to np.matmul (bench_overhead: about 1 us at 64^3).
HANDOFF_OVERHEAD_S = 1e-6


def numpy_serves_faster(gflops: float, numpy_gflops: Optional[float], flops: float) -> bool:
    """Whether handing a problem to numpy beats our kernel, as the runtime serves either: a
    record's GFLOPS are timed through runtime.matmul, numpy's as a bare np.matmul call, and the
    hand-off adds our entry (``HANDOFF_OVERHEAD_S``) to numpy's time.  On a 64^3 problem (4 us)
    numpy must win by a quarter; on large ones the overhead vanishes."""
    if not numpy_gflops:
        return False        # numpy was not timed
    if not gflops:
        return True         # no candidate ran
    return flops / (numpy_gflops * 1e9) + HANDOFF_OVERHEAD_S < flops / (gflops * 1e9)


# how much numpy on T threads must beat our T-thread kernel's speed per thread to take the problem
SHARED_CORES_MARGIN = 1.2


def numpy_beats_one_core(gflops: float, numpy_gflops: Optional[float], threads: int) -> bool:
    """Whether numpy on ``threads`` threads beats our kernel's speed per thread by over
    ``SHARED_CORES_MARGIN``: then, in a program that also calls numpy, numpy is the better bet.
    After each of numpy's parallel calls OpenBLAS's threads spin on the other cores for about
    0.1 s, and our pool's loops run on the caller alone meanwhile (``pool``), so our kernel gets
    one core where numpy's gets all.  A compute-bound kernel loses little so (its one-core speed
    is about numpy's two-thread speed on this machine); a memory-bound one loses most:
    1x1024x1024 on 2 threads, ours 77 GFLOPS with the cores free and 52 next to numpy, numpy's
    69 to 71."""
    if threads <= 1 or not gflops or not numpy_gflops:
        return False
    return numpy_gflops > SHARED_CORES_MARGIN * gflops / threads


SHARED_CORES = ("on {threads} threads numpy beat this problem's kernel per thread by over a fifth when tuned "
                "({numpy:.1f} GFLOPS against {one_core:.1f} per thread): in a program that also calls numpy, "
                "OpenBLAS's threads hold the other cores after each of its calls and our kernel would run on one")

DOT_PRODUCTS = ("a matrix times a vector (N = 1, K contiguous in A): its kernel is a dot product along K, "
                "which the schedule grammar cannot vectorize (it vectorizes along M or N); numpy's gemv serves it "
                "unless the problem's own record says a tuned kernel beat numpy")


def dot_products(problem: MatmulProblem) -> bool:
    """Whether ``problem`` is a matrix-vector product whose every output is a dot product along
    K of contiguous A rows (N = 1, A not transposed): a schedule vectorizes along M or N only,
    so its kernel runs one lane in 16 (measured: 64x64 @ 64 3.9 us against numpy's 0.8;
    185x2001 @ 2001 float64 at a quarter of numpy's speed after tuning).  bfloat16 excepted:
    numpy has no BLAS for it."""
    return problem.n == 1 and problem.layout[0] == "n" and problem.dtype in ("float32", "float64")


def handoff_reason(gflops: float, numpy_gflops: Optional[float], flops: float, threads: int) -> Optional[str]:
    """Why numpy should serve a problem whose kernel measured ``gflops`` against numpy's
    ``numpy_gflops`` (same run), or None when the kernel should."""
    if numpy_serves_faster(gflops, numpy_gflops, flops):
        return f"no candidate beat numpy when tuned ({gflops:.1f} vs {numpy_gflops:.1f} GFLOPS)"
    if numpy_beats_one_core(gflops, numpy_gflops, threads):
        return SHARED_CORES.format(threads=threads, numpy=numpy_gflops, one_core=gflops / threads)
    return None
