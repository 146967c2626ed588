"""The runtime against real databases: which record a call is served from, what is never
served, databases that change or appear while the process runs, live tuning that lands its
record, and the shipped database itself."""
from __future__ import annotations

import logging
import random
import threading
import time

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime import api
from looptune.database import MachineKey, Record, commit, load, save, verify
from looptune.runtime.compiler.build import build
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.hooks import LiveTuneResult, register_live_tuner
from looptune.runtime.configuration import RuntimeSettings, embedded_db_path

# A legal schedule that differs from every analytic default: serving it is visible in explain().
MARK = Trace((Step.make("split", loop="m", factor=8), Step.make("split", loop="n", factor=32)))
# Valid grammar, but it does not replay (m.i does not exist before m is split).
NOT_REPLAYABLE = Trace((Step.make("split", loop="m.i", factor=4),))
FOREIGN = MachineKey("aarch64", "Other CPU", "neon", ("asimd",), 4, "clang 17.0.6", "0")


def record(problem: MatmulProblem, *, trace: Trace = MARK, machine: MachineKey | None = None,
           verified: bool = True, gflops: float = 50.0) -> Record:
    return Record(problem, machine or MachineKey.current(), trace, gflops, 1.0, 40.0, verified, "test", "test", 1,
                  1.7e9)


def operands(m, n, k, dtype=np.float32):
    rng = np.random.default_rng(m * 7 + n * 3 + k)
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)


@pytest.fixture
def user_db(tmp_path):
    """A user database of this test's own, no embedded database; settings restored after."""
    path = tmp_path / "user.h5"
    runtime.configure(user_db=path, embedded_db=None, fallback="nearest", max_distance=1.0, db_recheck_s=0.2)
    yield path
    register_live_tuner(None)
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def served(m, n, k, **kw):
    a, b = operands(m, n, k)
    np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a @ b, rtol=1e-4, atol=1e-3)
    return runtime.explain(a, b, threads=1, **kw)


def test_exact_nearest_and_far_records(user_db):
    save(user_db, [record(MatmulProblem(64, 64, 64)), record(MatmulProblem(256, 256, 256))])
    runtime.configure(user_db=user_db)
    exact = served(64, 64, 64)
    assert exact.source == "exact" and exact.schedule.trace == MARK and exact.distance == 0.0
    near = served(80, 64, 64)                       # log2(80/64) = 0.32 <= max_distance
    assert near.source == "nearest" and near.record_problem == MatmulProblem(64, 64, 64).key()
    runtime.configure(fallback="off")
    far = served(900, 900, 3)                       # far from both records
    assert far.source == "default"
    runtime.configure(fallback="nearest")
    assert served(900, 900, 3).source == "nearest"  # nearest at any distance
    assert served(7, 900, 3).source == "default"    # a GEMV-like product: not a blocked record's form


def test_a_narrow_product_takes_its_own_form_not_a_wide_records(user_db):
    """N within two vector registers (``defaults.narrow_params``): the nearest record of a wide
    product is not served (its tile would be mostly empty columns), a narrow one is."""
    save(user_db, [record(MatmulProblem(64, 64, 64)), record(MatmulProblem(2048, 8, 8))])
    runtime.configure(user_db=user_db)
    narrow = served(3000, 16, 16)
    assert narrow.source == "nearest" and narrow.record_problem == MatmulProblem(2048, 8, 8).key()
    save(user_db, [record(MatmulProblem(64, 64, 64))])
    runtime.configure(user_db=user_db)
    own = served(16, 16, 3000)
    assert own.source == "default" and own.schedule == default_schedule(MatmulProblem(16, 16, 3000))
    assert served(64, 80, 64).source == "nearest"          # a wide one still takes the wide record


def test_unverified_foreign_and_non_replayable_records(user_db, caplog):
    p = MatmulProblem(96, 96, 96)
    save(user_db, [record(p, verified=False), record(MatmulProblem(96, 96, 48), trace=NOT_REPLAYABLE),
                   record(MatmulProblem(96, 48, 96), machine=FOREIGN)])
    runtime.configure(user_db=user_db, fallback="off")
    assert served(96, 96, 96).source == "default"            # an unverified record is never served
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        assert served(96, 96, 48).source == "default"        # the trace does not replay: skipped, logged
    assert "does not replay" in caplog.text
    # another machine's record of this very shape (distance 2.0 with the foreign penalty, beyond
    # max_distance 1.0): with fallback off the call gets the analytic default, not that record
    foreign = served(96, 48, 96)
    assert foreign.source == "default" and foreign.record_problem is None and foreign.database is None
    assert foreign.schedule.trace == default_schedule(MatmulProblem(96, 48, 96)).trace != MARK


def test_local_record_wins_over_foreign(user_db):
    p = MatmulProblem(40, 40, 40)
    save(user_db, [record(p, machine=FOREIGN, gflops=500.0), record(p, trace=Trace((Step.make("split", loop="k", factor=8),)))])
    runtime.configure(user_db=user_db)
    r = served(40, 40, 40)
    assert r.source == "exact" and r.schedule.trace == Trace((Step.make("split", loop="k", factor=8),))


def test_corrupt_embedded_database_is_skipped(user_db, tmp_path, caplog):
    bad = tmp_path / "embedded.h5"
    bad.write_bytes(b"looptune-schedule-db\n" + bytes(range(256)) * 8)
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        runtime.configure(embedded_db=bad, fallback="off")
        assert served(33, 35, 37).source == "default"
    assert "ignoring schedule database" in caplog.text


def test_database_written_while_running_is_seen(user_db):
    assert not user_db.exists()
    assert served(72, 72, 72).source in ("default", "nearest")       # no database yet
    commit(user_db, [record(MatmulProblem(72, 72, 72))])              # it appears, as build-db would make it
    deadline = time.monotonic() + 10
    while served(72, 72, 72).source != "exact":
        assert time.monotonic() < deadline, "the new database was not picked up"
        time.sleep(0.1)
    commit(user_db, [record(MatmulProblem(144, 72, 72))])             # and a record added to it later
    deadline = time.monotonic() + 10
    while served(144, 72, 72).source != "exact":
        assert time.monotonic() < deadline, "the new record was not picked up"
        time.sleep(0.1)


def _fake_tuner(calls, active, peak, release: threading.Event):
    lock = threading.Lock()

    def tuner(problem, budget_s, user_db):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            release.wait(30)
            time.sleep(0.01)
            calls.append(problem)
            rec = record(problem)
            commit(user_db, [rec])
            return LiveTuneResult(Schedule.from_trace(MARK), rec.gflops_median, rec.numpy_gflops, True)
        finally:
            with lock:
                active[0] -= 1
    return tuner


# far apart (> max_distance in log2 sizes), so a tuned record never makes another shape "close"
SPREAD = [(2 ** i + 1, 2 ** (10 - i) + 3, 5 + 3 * i) for i in range(10)]


def test_live_tuning_lands_its_record_and_runs_one_at_a_time(user_db):
    calls, active, peak, release = [], [0], [0], threading.Event()
    register_live_tuner(_fake_tuner(calls, active, peak, release))
    runtime.configure(fallback="tune")
    for m, n, k in SPREAD:
        served(m, n, k)
    release.set()
    resolver = api.current_resolver()
    assert resolver.live.wait(60)
    assert len(calls) == len(SPREAD) and peak[0] == 1          # one tuning at a time, each shape once
    assert all(served(m, n, k).source in ("tuned", "exact") for m, n, k in SPREAD)
    keys = {r.problem.key() for r in load(user_db)}
    assert {MatmulProblem(m, n, k).key() for m, n, k in SPREAD} <= keys


def test_live_tuning_queue_is_bounded(user_db):
    calls, active, peak, release = [], [0], [0], threading.Event()
    register_live_tuner(_fake_tuner(calls, active, peak, release))
    runtime.configure(fallback="tune")
    resolver = api.current_resolver()
    resolver.live.max_queued = 3
    for m, n, k in SPREAD:
        served(m, n, k)
    release.set()
    assert resolver.live.wait(60)
    assert len(calls) == 4 and resolver.live.dropped == len(SPREAD) - 4    # one running + three queued


@pytest.mark.slow
def test_real_live_tuner_through_the_entry_point(user_db):
    runtime.configure(fallback="tune", tune_budget_s=1.0)
    served(48, 40, 56)
    assert api.current_resolver().live.wait(120)
    r = served(48, 40, 56)
    assert r.source in ("tuned", "exact", "numpy")       # numpy: the hand-off, when no candidate beat it
    assert MatmulProblem(48, 40, 56).key() in {rec.problem.key() for rec in load(user_db)}


def test_shipped_database_verifies_and_its_records_build_and_run():
    path = embedded_db_path()
    report = verify(path)
    assert report.ok and report.valid_records > 100
    records = load(path)
    sample = random.Random(0).sample(list(records), 6)
    for rec in sample:
        sched = Schedule.from_trace(rec.trace)              # every record replays
        p = rec.problem
        small = MatmulProblem(min(p.m, 97), min(p.n, 113), min(p.k, 89), batch=min(p.batch, 2), dtype=p.dtype,
                              layout=p.layout, threads=p.threads)
        result = build(render(sched, p.dtype))
        assert result.ok, result.error
        kernel = Kernel(result.so_path, result.symbol, p.dtype)
        a, b, c = small.make_operands(1)
        kernel(a, b, c, nthreads=p.threads)
        ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
        np.testing.assert_allclose(c, ref, rtol=1e-3 if p.dtype == "float32" else 1e-9, atol=1e-3)
    # every record, not only the sample, is one the runtime would serve: verified, and its trace
    # replays (the runtime skips a record whose trace does not); verify() rejected none
    assert report.rejections == () and report.valid_records == len(records)
    for rec in records:
        assert rec.verified and Schedule.from_trace(rec.trace).trace == rec.trace, rec.problem
