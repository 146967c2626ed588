"""Shapes no exact record of this machine covers: a trial against numpy decides, the verdict
persists beside the user database, and other machines' records are never served."""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import pytest

from looptune import runtime
from looptune.database import MachineKey, Record, save
from looptune.runtime import api, resolve
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.numpy_kernel import NumpyKernel
from looptune.runtime.resolve import Resolver
from looptune.runtime.verdicts import Trial, TrialProtocol, Verdict, VerdictStore, verdict_path

TRACE = Trace((Step.make("split", loop="n", factor=16),))


@pytest.fixture
def user_db(tmp_path):
    path = tmp_path / "user.h5"
    runtime.configure(user_db=path, embedded_db=None, fallback="nearest", numpy_handoff=True)
    yield path
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def operands(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def slowed(monkeypatch, side: str, delay_s: float = 2e-3):
    """Make one side of every trial slower: ``kernel`` (the built kernels) or ``numpy``."""
    if side == "kernel":
        real = Resolver.kernel

        class Slow:
            def __init__(self, k):
                self.k, self.dtype, self.symbol, self.address = k, k.dtype, k.symbol, k.address

            def invoke(self, *args):
                time.sleep(delay_s)
                return self.k.invoke(*args)

        monkeypatch.setattr(Resolver, "kernel", lambda self, *a, **kw: Slow(real(self, *a, **kw)))
    else:
        real_invoke = NumpyKernel.invoke

        def invoke(self, *args):
            time.sleep(delay_s)
            return real_invoke(self, *args)

        monkeypatch.setattr(NumpyKernel, "invoke", invoke)


def run_calls(a, b, calls=150):
    for _ in range(calls):
        np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slow_side, winner", [("kernel", "numpy"), ("numpy", "kernel")])
def test_the_faster_side_serves_after_the_trial(user_db, monkeypatch, slow_side, winner):
    slowed(monkeypatch, slow_side)
    a, b = operands(37, 29, 41)
    first = runtime.explain(a, b, threads=1)
    assert first.source == "default" and first.verdict.startswith("trial")
    run_calls(a, b)            # every call of the trial computes the right answer
    decided = runtime.explain(a, b, threads=1)
    hit = api.current_resolver().dispatch[("float32", 37, 29, 41, 1, "nn", 1)]
    if winner == "numpy":
        assert decided.source == "numpy" and "numpy was faster" in decided.reason
        assert isinstance(hit[0], NumpyKernel)
    else:
        assert decided.source == "default" and "the kernel was faster" in decided.verdict
        assert not isinstance(hit[0], (Trial, NumpyKernel))


def test_a_shape_called_once_builds_nothing(user_db):
    resolver = api.current_resolver()
    for m in range(40, 52):
        a, b = operands(m, 24, 16)
        np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a @ b, rtol=1e-4, atol=1e-4)
    assert resolver.trial_builds == 0
    assert all(isinstance(hit[0], Trial) for hit in resolver.dispatch.values())


def test_verdicts_persist_and_the_next_process_starts_decided(user_db, monkeypatch):
    slowed(monkeypatch, "kernel")
    a, b = operands(33, 31, 35)
    run_calls(a, b)
    assert runtime.explain(a, b, threads=1).source == "numpy"
    api.current_resolver().verdicts.flush()
    stored = json.loads(verdict_path(user_db).read_text())
    assert stored["format"] == "looptune-verdicts" and len(stored["verdicts"]) == 1
    runtime.configure()        # a fresh resolver: reads the file
    resolver = api.current_resolver()
    np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a @ b, rtol=1e-4, atol=1e-4)
    hit = resolver.dispatch[("float32", 33, 31, 35, 1, "nn", 1)]
    assert isinstance(hit[0], NumpyKernel) and resolver.trial_builds == 0


def test_a_new_record_near_the_shape_reopens_its_verdict(user_db, monkeypatch):
    slowed(monkeypatch, "kernel")
    a, b = operands(33, 31, 35)
    run_calls(a, b)
    assert runtime.explain(a, b, threads=1).source == "numpy"
    save(user_db, [Record(MatmulProblem(32, 32, 32), MachineKey.current(), TRACE, 50.0, 1.0, 40.0, True, "t", "t", 1, 1.7e9)])
    runtime.configure()
    again = runtime.explain(a, b, threads=1)
    assert again.source == "nearest" and again.verdict.startswith("trial")


def test_other_machines_records_are_never_served(user_db):
    other = dataclasses.replace(MachineKey.current(), cpu_model="Some Other CPU")
    problem = MatmulProblem(48, 40, 56)
    save(user_db, [Record(problem, other, TRACE, 500.0, 1.0, 40.0, True, "t", "t", 1, 1.7e9)])
    runtime.configure()
    a, b = operands(48, 40, 56)
    served = runtime.explain(a, b, threads=1)
    assert served.source == "default" and served.record_problem is None


@pytest.mark.parametrize("damage", ["corrupt", "deeply nested", "unwritable"])
def test_an_unusable_verdict_store_hands_undecided_shapes_to_numpy(user_db, caplog, damage):
    store = verdict_path(user_db)
    if damage == "corrupt":
        store.write_text("{ not json")
    elif damage == "deeply nested":
        store.write_text("[" * 100000)      # json raises RecursionError, not ValueError
    else:
        store.mkdir()          # a directory where the file should be: reading fails, writing fails
    runtime.configure()
    a, b = operands(21, 19, 23)
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        run_calls(a, b, calls=3)
        run_calls(*operands(22, 19, 23), calls=3)
    served = runtime.explain(a, b, threads=1)
    assert served.source == "numpy" and "verdict store is unusable" in served.reason
    assert sum("verdict store unusable" in r.message for r in caplog.records) == 1


def test_a_full_disk_is_one_warning_and_numpy_serves_undecided_shapes_from_then_on(tmp_path, caplog, monkeypatch):
    import errno
    from looptune.database import atomic

    def full(path, write, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "replace_atomically", full)
    store = VerdictStore(tmp_path / "v.json")
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        store.put("0" * 32, Verdict(True, 1e-3, 2e-3))
        store.flush()
        store.put("1" * 32, Verdict(False, 2e-3, 1e-3))
        store.flush()
    assert store.broken and "No space left" in store.broken
    assert sum("verdict store unusable" in r.message for r in caplog.records) == 1
    assert store.get("0" * 32).kernel_wins and not (tmp_path / "v.json").exists()


def test_the_dispatch_table_and_trial_builds_are_bounded(user_db, monkeypatch):
    monkeypatch.setattr(resolve, "MAX_DISPATCH", 8)
    monkeypatch.setattr(resolve, "MAX_TRIAL_BUILDS", 1)
    resolver = api.current_resolver()
    for m in range(60, 90):
        a, b = operands(m, 8, 8)
        runtime.matmul(a, b, threads=1)
        runtime.matmul(a, b, threads=1)     # a repeat: the trial builds its kernel (the first one only)
        assert len(resolver.dispatch) <= 8
    assert resolver.trial_builds == 1
    a, b = operands(89, 8, 8)
    run_calls(a, b, calls=12)
    assert runtime.explain(a, b, threads=1).source == "numpy"     # past the budget: numpy serves


def test_trial_protocol_times_each_side_and_needs_a_margin():
    protocol = TrialProtocol()
    assert protocol.sample_count(1e-6) == protocol.max_samples        # µs calls: many samples
    assert protocol.sample_count(1e-4) == 50                          # as many as fill side_s (5 ms)
    assert protocol.sample_count(1e-3) == protocol.samples
    assert protocol.sample_count(1.0) == 1

    class Side:
        dtype = "float32"

        def __init__(self, delay):
            self.delay, self.calls = delay, 0

        def invoke(self, *args):
            self.calls += 1
            time.sleep(self.delay)
            return 0

    decided = []
    kernel, numpy_side = Side(1.0e-3), Side(1.01e-3)      # 1 % faster: inside the margin, numpy keeps it
    trial = Trial(numpy_side, lambda: kernel, decided.append)
    calls = 0
    while not decided:
        trial.invoke(None, None, None, 0, 1)
        calls += 1
    assert not decided[0].kernel_wins
    assert kernel.calls == 1 + protocol.samples and numpy_side.calls == 1 + protocol.samples
    assert calls == 2 + 2 * protocol.samples


def test_the_kernel_is_timed_in_numpys_wake():
    """After numpy's multi-threaded calls OpenBLAS's idle threads spin and a multi-threaded kernel
    runs on about one core: the kernel's timed block comes right after numpy's, as it would in an
    application that calls numpy too."""
    order = []

    class Side:
        dtype = "float32"

        def __init__(self, name):
            self.name = name

        def invoke(self, *args):
            order.append(self.name)
            time.sleep(1e-3)
            return 0

    decided = []
    trial = Trial(Side("numpy"), lambda: Side("kernel"), decided.append)
    while not decided:
        trial.invoke(None, None, None, 0, 2)
    n = TrialProtocol().samples
    assert order == ["numpy", "kernel"] + ["numpy"] * n + ["kernel"] * n


def test_shapes_that_share_a_kernel_do_not_spend_the_build_budget(user_db, monkeypatch):
    save(user_db, [Record(MatmulProblem(32, 32, 32), MachineKey.current(), TRACE, 50.0, 1.0, 40.0, True, "t", "t", 1,
                          1.7e9)])
    runtime.configure()
    monkeypatch.setattr(resolve, "MAX_TRIAL_BUILDS", 1)
    for m in range(33, 41):       # all served by the record's generic kernel: one build
        a, b = operands(m, 32, 32)
        for _ in range(3):
            runtime.matmul(a, b, threads=1)
        assert runtime.explain(a, b, threads=1).source in ("nearest", "numpy")
        assert "no kernel could be tried" not in (runtime.explain(a, b, threads=1).reason or "")
    assert api.current_resolver().trial_builds == 1


def test_a_forked_child_drops_trials_under_way(user_db):
    a, b = operands(29, 27, 31)
    runtime.matmul(a, b, threads=1)                  # a trial starts
    resolver = api.current_resolver()
    assert any(isinstance(hit[0], Trial) for hit in resolver.dispatch.values())
    resolver.reset_after_fork()                      # what a forked child runs: its trials start afresh
    assert not any(isinstance(hit[0], Trial) for hit in resolver.dispatch.values())
    np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a @ b, rtol=1e-4, atol=1e-4)


def test_records_keyed_before_cache_sizes_joined_the_key_are_this_machines(user_db):
    legacy = MachineKey.current().without_caches()
    assert legacy != MachineKey.current() and MachineKey.current().owns(legacy)
    save(user_db, [Record(MatmulProblem(40, 40, 40), legacy, TRACE, 50.0, 1.0, 40.0, True, "t", "t", 1, 1.7e9)])
    runtime.configure()
    assert runtime.explain(operands(40, 40, 40)[0], operands(40, 40, 40)[1], threads=1).source == "exact"
