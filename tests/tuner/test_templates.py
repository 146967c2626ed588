"""Template schedules (tune's safety net, build-db's search space) compute the right answer."""
import numpy as np
import pytest

from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.search.spaces import blocking_candidates

PROBLEMS = [MatmulProblem(5, 300, 77), MatmulProblem(12, 200, 90, threads=2), MatmulProblem(1, 129, 50),
            MatmulProblem(40, 70, 33, dtype="float64"), MatmulProblem(100, 90, 40, threads=2)]


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_templates_match_numpy(problem):
    cands = blocking_candidates(problem, 6)
    assert len({c.schedule().to_json() for c in cands}) == len(cands)
    if problem.m <= 16:       # skinny M offers the register-resident form (A packed, all of K in registers)
        assert any(c.pack_a and not c.pack_b and c.kc >= problem.k for c in cands)
    built = build_many([render(c.schedule(), problem.dtype) for c in cands])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((problem.m, problem.k)).astype(problem.dtype)
    b = rng.standard_normal((problem.k, problem.n)).astype(problem.dtype)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-3 if problem.dtype == "float32" else 1e-10
    for c, r in zip(cands, built):
        assert r.ok, r.error
        out = np.zeros((1, problem.m, problem.n), problem.dtype)
        Kernel(r.so_path, r.symbol, problem.dtype)(a[None], b[None], out, nthreads=problem.threads)
        np.testing.assert_allclose(out[0], ref, rtol=0, atol=tol * np.sqrt(problem.k), err_msg=c.schedule().to_json())


def test_templates_come_in_parallel_variants_for_threads():
    p = MatmulProblem(256, 256, 128, threads=2)
    cands = blocking_candidates(p, 8)
    assert all(c.parallel for c in cands) and {"n.o", "m.o"} <= {c.parallel for c in cands}
    sizes = {"b": p.batch, "m": p.m, "n": p.n, "k": p.k}
    for c in cands:
        nest = c.schedule().nest
        trips = nest.trip_counts(sizes)[nest.index(c.parallel)][0]
        assert trips >= 2 and (c is cands[0] or trips % p.threads == 0)    # every thread the same number of blocks
    assert not any(c.parallel for c in blocking_candidates(MatmulProblem(256, 256, 128), 8))
    tiny = MatmulProblem(4, 16, 16, threads=2)          # a template's parallel loop has work for two threads
    tiny_sizes = {"b": tiny.batch, "m": tiny.m, "n": tiny.n, "k": tiny.k}
    for c in blocking_candidates(tiny, 6)[1:]:          # (the analytic default is what it is)
        if c.parallel is not None:
            nest = c.schedule().nest
            assert nest.trip_counts(tiny_sizes)[nest.index(c.parallel)][0] >= 2, c
