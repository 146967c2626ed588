"""The numpy hand-off after live tuning (``Resolver._tuned``): when the live tuner's result says
numpy was faster than every candidate, numpy serves the shape from then on; when a candidate
beat numpy, the tuned kernel does.  Observed through ``runtime.explain`` and the results.
"""
from __future__ import annotations

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime import api
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.hooks import LiveTuneResult, register_live_tuner
from looptune.runtime.numpy_kernel import NumpyKernel


def fake_tuner(gflops: float, numpy_gflops: float, calls: list):
    def tune(problem, budget_s, user_db):
        calls.append(problem)
        return LiveTuneResult(default_schedule(problem), gflops, numpy_gflops, stored=False)
    return tune


@pytest.fixture
def live():
    runtime.configure(user_db=None, embedded_db=None, fallback="tune", numpy_handoff=True)
    yield
    register_live_tuner(None)
    api.current_resolver().live.wait(30)
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def operands(m, n, k):
    rng = np.random.default_rng(m + n + k)
    return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def check(a, b):
    np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


def test_numpy_serves_a_shape_whose_live_tuning_found_numpy_faster(live):
    calls: list = []
    register_live_tuner(fake_tuner(5.0, 50.0, calls))
    a, b = operands(37, 41, 43)
    check(a, b)                                     # cold: served at once, tuned in the background
    resolver = api.current_resolver()
    assert resolver.live.wait(60) and len(calls) == 1
    for _ in range(3):                              # from then on, numpy
        check(a, b)
        served = runtime.explain(a, b, threads=1)
        assert served.source == "numpy"
        assert "no candidate beat numpy" in served.reason and "5.0 vs 50.0" in served.reason
    entries = [hit for hit in resolver.dispatch.values() if hit[1].problem.key() == calls[0].key()]
    assert entries and all(isinstance(kernel, NumpyKernel) for kernel, _ in entries)
    assert len(calls) == 1


def test_a_tuned_kernel_that_beat_numpy_serves_its_shape(live):
    calls: list = []
    register_live_tuner(fake_tuner(50.0, 5.0, calls))
    a, b = operands(37, 41, 45)
    check(a, b)
    assert api.current_resolver().live.wait(60) and len(calls) == 1
    check(a, b)
    served = runtime.explain(a, b, threads=1)
    assert served.source == "tuned" and served.expected_gflops == 50.0 and served.numpy_gflops == 5.0
