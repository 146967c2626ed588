"""Shapes and views shared by the differential tests of the 16-bit dtypes (test_bf16_matmul.py,
test_f16_matmul.py): each file brings its own array factory and comparison."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


def with_broadcast_ones(batch: tuple, ones: int) -> tuple:
    """``batch`` with the dimensions whose bit is set in ``ones`` made 1, so that they broadcast
    against the other operand's (and some batches do not fold into one kernel call)."""
    return tuple(1 if ones >> i & 1 else d for i, d in enumerate(batch))


# 1-D operands, an empty product and mismatched core dimensions: numpy's results and exceptions
VECTOR_AND_EDGE_SHAPES = [((7,), (7, 5)), ((6, 7), (7,)), ((7,), (7,)), ((3, 7), (2, 7, 4)),
                          ((9,), (2, 9, 3)), ((2, 0, 3), (3, 4)), ((5, 3), (4, 2))]

VIEWS = {
    "transposed": lambda x: x.T,
    "strided": lambda x: x[::2, ::3],
    "negative strides": lambda x: x[::-1, ::-2],
    "column slice": lambda x: x[:, 5:70],
    "fortran copy": lambda x: np.asfortranarray(x),
}
