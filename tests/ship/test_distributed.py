"""Scale-out: a pinned local process pool, and Dask workers over loopback (LocalCluster)."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from looptune.database import MachineKey, load
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.ship.builddb import build_db
from looptune.tuner.ship.distributed import DaskExecutor, PoolExecutor, claim_cores

HERE = Path(__file__).parent
FAKE = "ship_fakes:fake_tune"
TWO_CORES = len(os.sched_getaffinity(0)) >= 2


def problems(count, start=16):
    return [MatmulProblem(start + i, 16, 16) for i in range(count)]


def other_machine() -> MachineKey:
    return MachineKey(**{**MachineKey.current().to_dict(), "cpu_model": "Some Other CPU 9000"})


def test_core_claims_are_exclusive_per_host(tmp_path):
    cores, files = claim_cores(1, lock_dir=str(tmp_path))
    assert len(cores) == 1
    child = subprocess.run([sys.executable, "-c", "import os, sys; from looptune.tuner.ship.distributed import claim_cores; "
                            f"c, _ = claim_cores(1, lock_dir={str(tmp_path)!r}); print(c)"],
                           capture_output=True, text=True, check=True)
    others = json.loads(child.stdout)
    assert cores[0] not in others                          # someone else's claim is respected
    assert claim_cores(len(os.sched_getaffinity(0)) + 1, lock_dir=str(tmp_path)) == ([], [])
    for f in files:
        f.close()


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_process_pool_pins_each_worker_to_its_own_core(tmp_path):
    db = tmp_path / "s.h5"
    replies = []
    os.environ["LOOPTUNE_FAKE_SLEEP"] = "0.05"
    try:
        report = build_db(problems(8), db, executor=PoolExecutor(2, budget_s=0.1, machine=MachineKey.current(), tuner=FAKE),
                          on_reply=lambda p, r: replies.append(r))
    finally:
        del os.environ["LOOPTUNE_FAKE_SLEEP"]
    assert (report.done, report.failed, report.refused) == (8, 0, 0)
    assert len(load(db)) == 8
    cores = {r["pid"]: tuple(r["cores"]) for r in replies}
    assert all(len(c) == 1 for c in cores.values())
    assert len(set(cores.values())) == len(cores)         # no two workers share a core


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_ctrl_c_with_a_pool_keeps_the_problems_that_were_running(tmp_path):
    db = tmp_path / "s.h5"
    replies = []

    def on_reply(problem, reply):
        replies.append(reply)
        if len(replies) == 1:
            raise KeyboardInterrupt          # as if Ctrl-C arrived right after the first result

    os.environ["LOOPTUNE_FAKE_SLEEP"] = "0.3"
    try:
        report = build_db(problems(12), db, executor=PoolExecutor(2, budget_s=0.1, machine=MachineKey.current(), tuner=FAKE),
                          on_reply=on_reply, commit_interval_s=3600)
    finally:
        del os.environ["LOOPTUNE_FAKE_SLEEP"]
    assert report.interrupted
    assert 2 <= report.done < 12 and len(load(db)) == report.done == len(replies)


def test_process_pool_refuses_more_workers_than_cores():
    with pytest.raises(ValueError, match="share cores"):
        PoolExecutor(len(os.sched_getaffinity(0)) + 1, budget_s=1.0, machine=MachineKey.current())


try:
    import distributed  # noqa: F401
    HAS_DASK = True
except ImportError:
    HAS_DASK = False
needs_dask = pytest.mark.skipif(not HAS_DASK, reason='Dask is optional: pip install ".[dask]"')


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes behind a scheduler on 127.0.0.1."""
    from distributed import LocalCluster     # optional dependency: only when the Dask tests run

    workers = 2 if TWO_CORES else 1
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as c:
        assert c.scheduler_address.startswith("tcp://127.0.0.1:")
        yield c


@contextlib.contextmanager
def workers_env(address: str, name: str, value: str):
    """``name=value`` in every worker process of the scheduler's cluster while the block runs (a
    lambda: cloudpickle sends it by value, where a bound ``os.environ`` method would carry a copy;
    a client of its own, closed before the block, which may close its executor's)."""
    from distributed import Client     # optional dependency: only when the Dask tests run

    with Client(address, timeout=30) as client:
        client.run(lambda: os.environ.__setitem__(name, value))
    try:
        yield
    finally:
        with Client(address, timeout=30) as client:
            client.run(lambda: os.environ.pop(name, None))


@needs_dask
def test_dask_workers_return_records_the_driver_commits(cluster, tmp_path):
    """Every worker of the cluster tunes problems (each task takes 0.05 s, so the scheduler spreads
    them), on a core of its own; the driver commits all their records and its report counts the
    problems of each worker."""
    db = tmp_path / "s.h5"
    replies = []
    ex = DaskExecutor(cluster.scheduler_address, budget_s=0.1, machine=MachineKey.current(), tuner=FAKE)
    with workers_env(cluster.scheduler_address, "LOOPTUNE_FAKE_SLEEP", "0.05"):
        report = build_db(problems(10) + [MatmulProblem(13, 8, 8)], db, executor=ex,
                          on_reply=lambda p, r: replies.append(r))
    assert (report.done, report.failed, report.refused) == (10, 1, 0)
    assert all(r["seconds"] >= 0.05 for r in replies if r["status"] == "ok")     # the workers saw the sleep
    records = load(db)
    assert len(records) == 10 and all(r.machine == MachineKey.current() for r in records)
    cluster_workers = cluster.scheduler_info["workers"]
    assert len(cluster_workers) == (2 if TWO_CORES else 1)
    per_worker = collections.Counter(r["worker"] for r in replies)
    assert set(per_worker) == set(cluster_workers), per_worker            # every worker did work
    assert sum(per_worker.values()) == 11
    pids = {r["worker"]: r["pid"] for r in replies}
    assert len(set(pids.values())) == len(cluster_workers)                # separate processes
    assert sorted(report.workers.values()) == sorted(collections.Counter(
        pids[r["worker"]] for r in replies if r["status"] == "ok").values())    # the report counts them all
    assert len(report.workers) == len(cluster_workers) and sum(report.workers.values()) == 10
    cores = {r["worker"]: tuple(r["cores"]) for r in replies if r["status"] == "ok"}
    assert len(set(cores.values())) == len(cluster_workers)               # one core each


@needs_dask
def test_dask_workers_of_another_machine_are_refused(cluster, tmp_path):
    db = tmp_path / "s.h5"
    ex = DaskExecutor(cluster.scheduler_address, budget_s=0.1, machine=other_machine(), tuner=FAKE)
    report = build_db(problems(4), db, executor=ex, machine=other_machine())
    assert report.done == 0 and report.refused == 4
    assert "cpu_model" in report.failures[0][1]
    assert not db.exists()


@needs_dask
def test_cli_scheduler_runs_real_tuning_on_dask_workers(cluster, tmp_path):
    """The real tuner (compile, verify, measure) on Dask workers, driven through the console script."""
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("32 32 32\n48 32 16\n")
    db = tmp_path / "s.h5"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "from looptune.tuner.cli import main; main()", "build-db",
                           "--shapes", str(shapes), "--db", str(db), "--budget", "0.3",
                           "--scheduler", cluster.scheduler_address, "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["done"], report["failed"]) == (2, 0)
    assert all(r.verified and r.gflops_median > 0 and r.machine == MachineKey.current() for r in load(db))


@needs_dask
def test_a_server_that_is_not_a_dask_scheduler_gets_a_clear_error_in_time():
    """Something accepts the connection and never answers in Dask's protocol (a web server on the
    port, a typo): the executor gives up within its timeout with an OSError naming the address,
    where ``Client`` alone hung."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(OSError, match="did not answer as a Dask scheduler"):
        DaskExecutor(address, budget_s=0.1, machine=MachineKey.current(), connect_timeout_s=1.0)
    assert time.monotonic() - start < 20
    listener.close()
