"""Where the measurement worker puts operands in memory (``looptune.tuner.measure.worker``).

Timed operands start ``TIMING_OFFSET_BYTES`` into a cache line.  numpy's allocations are 16-byte
aligned (glibc's malloc; a large array is mmapped 16 bytes past a page), so an application's A,
B and C mostly straddle cache lines, and some kernels run a quarter slower so (measured on
1x1024x1024: 59 GFLOPS 64-byte aligned, 40 at 16 past).  Kernels and numpy are timed on operands
placed where applications' usually are, not wherever the worker's allocator put them this time.
"""
from __future__ import annotations

import numpy as np

CACHE_LINE_BYTES = 64
TIMING_OFFSET_BYTES = 16


def copy_keeping_layout(x, shift: int = 0):
    """A fresh copy with the same strides pattern (a transposed view stays transposed), placed
    ``TIMING_OFFSET_BYTES`` into a cache line (``shift`` bytes further into its memory)."""
    y = placed(x.shape, x.dtype, np.empty_like(x, order="K").strides, shift=shift)
    np.copyto(y, x)
    return y


def placed(shape, dtype, strides, first: int = 0, shift: int = 0):
    """An uninitialized array of non-negative ``strides`` whose element number ``first`` (in
    memory order) starts ``TIMING_OFFSET_BYTES`` past a cache-line boundary, at least ``shift``
    bytes into freshly allocated memory (``MeasureConfig.operand_shift_bytes``: other pages and
    cache sets for the same data)."""
    dtype = np.dtype(dtype)
    nbytes = sum((n - 1) * st for n, st in zip(shape, strides)) + dtype.itemsize if all(shape) else 0
    raw = np.empty(nbytes + CACHE_LINE_BYTES + shift, np.uint8)
    start = shift + (TIMING_OFFSET_BYTES - first * dtype.itemsize - raw.ctypes.data - shift) % CACHE_LINE_BYTES
    return np.ndarray(shape, dtype, buffer=raw, offset=start, strides=strides)
