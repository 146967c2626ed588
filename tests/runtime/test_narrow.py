"""Narrow products (N within two vector registers): their own form, sized from the CPU's registers."""
from __future__ import annotations

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime.compiler.defaults import is_narrow, narrow_params
from looptune.runtime.compiler.machine import CpuInfo
from looptune.runtime.compiler.workload import MatmulProblem


def _cpu(*features: str) -> CpuInfo:
    return CpuInfo("x86_64", "test CPU", tuple(sorted(features)), 2, 32 << 10, 1 << 20, 32 << 20)


AVX512 = ("avx", "avx2", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma")


def test_the_form_comes_from_the_registers(monkeypatch):
    monkeypatch.delenv("LOOPTUNE_ISA", raising=False)     # the CI's AVX2 rerun caps every CpuInfo
    avx512, avx2 = _cpu(*AVX512), _cpu("avx", "avx2", "fma")
    tall = MatmulProblem(20000, 16, 16)
    wide = narrow_params(tall, avx512)
    assert (wide.mr, wide.nr, wide.pack_a, wide.pack_b) == (8, 16, False, False)
    two = narrow_params(tall, avx2)                        # 16 columns are two AVX2 vectors
    assert (two.mr, two.nr) == (6, 16) and two.mr * 2 + 2 + 1 <= 16
    assert narrow_params(MatmulProblem(12544, 24, 144), avx512).nr == 24     # exactly N wide
    long_k = narrow_params(MatmulProblem(16, 16, 20000), avx512)
    assert (long_k.mr, long_k.kc) == (16, 4096)            # all of M in one tile: B read once
    assert narrow_params(MatmulProblem(300, 16, 64, layout="nt"), avx512).pack_b     # n strided: packed
    assert narrow_params(MatmulProblem(3, 16, 64), avx512).mr == 3
    for p in (MatmulProblem(64, 64, 64), MatmulProblem(1, 16, 4096), MatmulProblem(64, 16, 64, dtype="bfloat16"),
              MatmulProblem(4096, 1, 512)):
        assert not is_narrow(p, avx512) and narrow_params(p, avx512) is None
    assert is_narrow(MatmulProblem(64, 32, 64), avx512) and not is_narrow(MatmulProblem(64, 32, 64), avx2)
    assert not is_narrow(MatmulProblem(64, 32, 64, dtype="float64"), avx512)


@pytest.fixture
def kernels_only(tmp_path):
    """Kernels serve every call (no trials, no hand-off to numpy), no database but the default."""
    before = runtime.settings()
    runtime.configure(numpy_handoff=False, small_flops=0, user_db=tmp_path / "none.h5", embedded_db=None)
    yield
    runtime.configure(numpy_handoff=before.numpy_handoff, small_flops=before.small_flops, user_db=before.user_db,
                      embedded_db=before.embedded_db)


@pytest.mark.parametrize("m,n,k", [(2000, 16, 16), (16, 16, 9000), (300, 5, 40), (37, 32, 100), (2, 9, 3), (4096, 1, 64),
                                   (50, 2, 7)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("threads", [1, 3])
def test_narrow_products_match_numpy(kernels_only, m, n, k, dtype, threads):
    rng = np.random.default_rng(m + n + k)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    tol = 1e-4 if dtype == "float32" else 1e-10
    for x, y in ((a, b), (np.asfortranarray(a), b), (a, np.asfortranarray(b))):
        np.testing.assert_allclose(runtime.matmul(x, y, threads=threads), a @ b, rtol=tol, atol=tol * np.sqrt(k))
        served = runtime.explain(x, y, threads=threads)
        assert served.source in ("default", "numpy")          # numpy: a matrix-vector product
        if is_narrow(served.problem):          # A read in place
            assert served.schedule.nest.packed("A") is None
