"""The transposing pack (an operand whose k is contiguous: A of ``a @ b``, B of ``a @ b.T``) moves
4x4 blocks through registers and finishes rows and k left over one element at a time: every
register-tile height, both float dtypes and k lengths around multiples of four, against numpy."""
import numpy as np
import pytest

from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.defaults import BlockingParams
from looptune.runtime.compiler.kernel import Kernel

TILES = [(4, 16), (6, 16), (7, 16), (12, 16), (14, 16), (8, 32)]
KS = [1, 3, 4, 5, 8, 11, 37]


@pytest.fixture(scope="module")
def kernels():
    cases = [(mr, nr, dtype) for mr, nr in TILES for dtype in ("float32", "float64")]
    schedules = [BlockingParams(mr, nr, mc=2 * mr, kc=16, nc=2 * nr).schedule() for mr, nr, _ in cases]
    sources = [render(s, dtype) for s, (_, _, dtype) in zip(schedules, cases)]
    assert all("_t4(s + 0 * st + k, st, d + k * " in src.text for src in sources)    # the transposing path
    built = build_many(sources)
    assert all(b.ok for b in built), [b.error for b in built if not b.ok][:1]
    return {case: Kernel(b.so_path, b.symbol, case[2]) for case, b in zip(cases, built)}


@pytest.mark.parametrize("mr,nr", TILES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_transposing_pack_matches_numpy(kernels, mr, nr, dtype):
    kernel = kernels[(mr, nr, dtype)]
    rng = np.random.default_rng(mr * 100 + nr)
    for k in KS:
        m, n = 3 * mr + 1, 2 * nr + 3       # whole panels and a short one, several k blocks when k > 16
        a = rng.standard_normal((m, k)).astype(dtype)                  # k contiguous: A's transposing pack
        bt = rng.standard_normal((n, k)).astype(dtype)                 # b = bt.T: B's transposing pack
        for b in (bt.T, np.ascontiguousarray(bt.T)):
            c = np.full((m, n), np.nan, dtype)
            kernel(a, b, c)
            np.testing.assert_allclose(c, a @ b, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-5,
                                       err_msg=f"{mr}x{nr} k={k} b strides {b.strides}")
