"""The live-tuning queue (``runtime/live.py``): its default bound holds however many cold shapes
arrive while a tuning runs, one problem is tuned at a time, and a shape is tuned once however
often it is submitted (also when the runtime resolves it again after its choices were dropped).

The tuner is a fake registered through ``runtime/hooks.py``: it blocks until released, so the
queue's content at each submission is known exactly.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime import api
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.hooks import LiveTuneResult, register_live_tuner
from looptune.runtime.live import LiveTuningQueue

DEFAULT_BOUND = 64      # LiveTuningQueue's max_queued, which the runtime's resolver uses


class SlowTuner:
    """A live tuner that holds each problem until released; counts calls and concurrency."""

    def __init__(self, gflops: float = 10.0, numpy_gflops: float = 5.0) -> None:
        self.calls: list[MatmulProblem] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.active = self.peak = 0
        self.lock = threading.Lock()
        self.gflops, self.numpy_gflops = gflops, numpy_gflops

    def __call__(self, problem, budget_s, user_db):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls.append(problem)
        self.started.set()
        try:
            assert self.release.wait(30), "never released"
            return LiveTuneResult(default_schedule(problem), self.gflops, self.numpy_gflops, stored=False)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def tuner():
    fake = SlowTuner()
    register_live_tuner(fake)
    yield fake
    fake.release.set()
    register_live_tuner(None)


def problem(i: int) -> MatmulProblem:
    return MatmulProblem(i + 1, 8, 8)


def test_the_default_bound_holds_however_many_shapes_arrive(tuner):
    tuned: list = []
    queue = LiveTuningQueue(0.5, None, lambda key, p, outcome: tuned.append(key))
    assert queue.max_queued == DEFAULT_BOUND
    assert queue.submit(0, problem(0))
    assert tuner.started.wait(30)            # the worker holds problem 0: the queue is empty again
    accepted = []
    for i in range(1, 3 * DEFAULT_BOUND):
        if queue.submit(i, problem(i)):
            accepted.append(i)
        assert len(queue._queue) <= DEFAULT_BOUND
    assert accepted == list(range(1, DEFAULT_BOUND + 1))    # the first 64 waiting; the rest served untuned
    assert queue.dropped == 3 * DEFAULT_BOUND - 1 - DEFAULT_BOUND
    tuner.release.set()
    assert queue.wait(60)
    assert tuned == [0] + accepted and queue.tuned == DEFAULT_BOUND + 1 and queue.failed == 0
    assert tuner.peak == 1                                  # one problem measured at a time
    assert queue._worker is None                            # an idle queue has no tuning thread


def test_the_runtime_uses_the_default_bound(tmp_path):
    runtime.configure(user_db=None, embedded_db=None, fallback="tune")
    try:
        assert api.current_resolver().live.max_queued == DEFAULT_BOUND
    finally:
        fresh = RuntimeSettings.from_env()
        runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def test_a_shape_submitted_twice_is_tuned_once(tuner):
    tuned: list = []
    queue = LiveTuningQueue(0.5, None, lambda key, p, outcome: tuned.append(key))
    assert queue.submit("a", problem(1))
    assert tuner.started.wait(30)
    assert queue.submit("b", problem(2))
    assert not queue.submit("a", problem(1))        # being tuned
    assert not queue.submit("b", problem(2))        # queued
    tuner.release.set()
    assert queue.wait(60)
    assert not queue.submit("a", problem(1))        # tuned already
    assert queue.wait(5)
    assert tuned == ["a", "b"] and tuner.calls == [problem(1), problem(2)]
    assert queue.dropped == 0                       # a repeat is not a drop


@pytest.fixture
def tune_runtime(tuner):
    runtime.configure(user_db=None, embedded_db=None, fallback="tune")
    yield tuner
    tuner.release.set()
    api.current_resolver().live.wait(30)
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def test_the_runtime_tunes_a_cold_shape_once_however_often_it_resolves_it(tune_runtime):
    """A database change drops every cached choice (``Resolver._forget_choices``): the shape
    resolves again, still cold, and is submitted again; the queue tunes it once."""
    tuner = tune_runtime
    rng = np.random.default_rng(0)
    a = rng.standard_normal((23, 29)).astype(np.float32)
    b = rng.standard_normal((29, 31)).astype(np.float32)
    resolver = api.current_resolver()
    for _ in range(4):
        np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
        resolver.dispatch.clear()                  # what the database watcher's on_change does
    assert tuner.started.wait(30)
    tuner.release.set()
    assert resolver.live.wait(60)
    assert [p.key() for p in tuner.calls] == [MatmulProblem(23, 31, 29).key()]
    assert resolver.live.tuned == 1 and resolver.live.dropped == 0
