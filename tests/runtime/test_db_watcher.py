"""The database watcher (``runtime/databases.py``): it sees a record another process commits, a
database file that vanishes (no crash; the indexes reload without it), a corrupt file renamed
over the database (logged and skipped, the process keeps serving and picks up the next good
file), and, in a forked child, it starts afresh on first use and sees changes there too.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from looptune import runtime
from looptune.database import MachineKey, Record, commit, save
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.databases import Databases

RECHECK_S = 0.05
WAIT_S = 20.0
MACHINE = MachineKey("x86_64", "Test CPU 9000", "avx2", ("avx", "avx2", "fma"), 8, "gcc 12.2.0", "1")
TRACE = Trace((Step.make("split", loop="m", factor=8), Step.make("split", loop="n", factor=32)))


def record(m: int, n: int = 64, k: int = 64, machine: MachineKey = MACHINE) -> Record:
    return Record(MatmulProblem(m, n, k), machine, TRACE, 50.0, 1.0, 40.0, True, "test", "test", 1, 1.7e9)


class Watched:
    """A ``Databases`` over one file, watching every RECHECK_S, counting ``on_change`` calls."""

    def __init__(self, path: Path) -> None:
        self.changes = 0
        self.changed = threading.Event()
        self.dbs = Databases([path], lambda: MACHINE, recheck_s=RECHECK_S, on_change=self._on_change)

    def _on_change(self) -> None:
        self.changes += 1
        self.changed.set()

    def wait_for_change(self) -> None:
        assert self.changed.wait(WAIT_S), "the watcher did not call on_change"
        self.changed.clear()

    def problems(self) -> set[str]:
        """Problem keys of every record the loaded indexes serve exactly."""
        keys = set()
        for _, index in self.dbs.indexes():
            keys |= {k for k in (record(m).problem.key() for m in range(1, 200)) if index.exact(k) is not None}
        return keys


@pytest.fixture
def watched(tmp_path):
    path = tmp_path / "user.h5"
    save(path, [record(8)])
    w = Watched(path)
    assert w.problems() == {record(8).problem.key()}       # first use: loads and starts watching
    yield path, w
    w.dbs.close()
    assert w.dbs._watcher is None


def test_another_process_commits_a_record(watched):
    path, w = watched
    script = textwrap.dedent(f"""
        from looptune.database import Record, commit
        commit({str(path)!r}, [Record.from_json({record(24).to_json()!r})])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    w.wait_for_change()
    assert w.problems() == {record(8).problem.key(), record(24).problem.key()}


def test_a_vanishing_database_is_dropped_without_a_crash(watched, caplog):
    path, w = watched
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        os.unlink(path)
        w.wait_for_change()
        assert w.dbs.indexes() == []                       # reloaded, without it
        assert w.dbs._watcher.is_alive()
    assert not caplog.records                              # a missing file is no error
    commit(path, [record(40)])                             # and when it comes back, it is seen
    w.wait_for_change()
    assert w.problems() == {record(40).problem.key()}


def test_a_corrupt_file_renamed_over_the_database_is_logged_and_skipped(watched, caplog):
    path, w = watched
    garbage = path.with_name("garbage.tmp")
    garbage.write_bytes(b"looptune-schedule-db\n" + bytes(range(256)) * 16)
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        os.replace(garbage, path)                          # atomically, as a commit would
        w.wait_for_change()
        assert w.dbs.indexes() == []                       # skipped
    assert "ignoring schedule database" in caplog.text and str(path) in caplog.text
    assert w.dbs._watcher.is_alive()                       # still watching
    good = path.with_name("good.tmp")
    save(good, [record(56)])
    os.replace(good, path)
    w.wait_for_change()
    assert w.problems() == {record(56).problem.key()}


@pytest.fixture
def user_db(tmp_path):
    path = tmp_path / "user.h5"
    # no hand-off: a problem without an exact record would be tried against numpy (timing-dependent)
    runtime.configure(user_db=path, embedded_db=None, fallback="off", db_recheck_s=RECHECK_S, numpy_handoff=False)
    yield path
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def wait_for_source(a, b, source: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        np.testing.assert_allclose(runtime.matmul(a, b, threads=1), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
        if runtime.explain(a, b, threads=1).source == source:
            return
        assert time.monotonic() < deadline, f"not served from {source!r} within {WAIT_S} s"
        time.sleep(RECHECK_S)


def test_the_runtime_keeps_serving_through_a_corrupt_replacement(user_db, caplog):
    save(user_db, [record(48, machine=MachineKey.current())])
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((48, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32)
    wait_for_source(a, b, "exact")
    garbage = user_db.with_name("garbage.tmp")
    garbage.write_bytes(os.urandom(4096))
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        os.replace(garbage, user_db)
        wait_for_source(a, b, "default")                   # right answers throughout, from the default
    assert "ignoring schedule database" in caplog.text
    good = user_db.with_name("good.tmp")
    save(good, [record(48, machine=MachineKey.current())])
    os.replace(good, user_db)
    wait_for_source(a, b, "exact")


FORK_SCRIPT = r"""
import os, sys, threading, time, traceback
import numpy as np
from looptune import runtime
from looptune.runtime import api
from looptune.database import MachineKey, Record, commit
from looptune.runtime.compiler.trace import Trace
from looptune.runtime.compiler.workload import MatmulProblem

path, trace = sys.argv[1], Trace.from_json(sys.argv[2])
def record(m):
    return Record(MatmulProblem(m, 64, 64), MachineKey.current(), trace, 50.0, 1.0, 40.0, True, "test", "test", 1, 1.7e9)
commit(path, [record(64)])
runtime.configure(user_db=path, embedded_db=None, fallback="off", db_recheck_s=0.05, numpy_handoff=False)
assert runtime.explain((64, 64, 64), threads=1).source == "exact"    # loaded: the parent watches
assert any(t.name == "looptune-db-watch" for t in threading.enumerate())
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    code = 9
    try:
        dbs = api.current_resolver().databases
        fresh = dbs._watcher is None and dbs._indexes is None
        first = runtime.explain((96, 64, 64), threads=1).source       # first use: loads, starts its own watcher
        watching = any(t.name == "looptune-db-watch" and t.is_alive() for t in threading.enumerate())
        os.write(ready_w, b"r")
        deadline = time.monotonic() + 20
        while runtime.explain((96, 64, 64), threads=1).source != "exact":
            if time.monotonic() > deadline:
                print("child: the record committed after the fork was never seen", flush=True)
                code = 3
                break
            time.sleep(0.02)
        else:
            a = np.ones((96, 64), np.float32)
            right = np.allclose(runtime.matmul(a, np.ones((64, 64), np.float32), threads=1), 64.0)
            print("child", fresh, first, watching, right, flush=True)
            code = 0 if (fresh and first != "exact" and watching and right) else 4
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
os.read(ready_r, 1)
commit(path, [record(96)])        # the child's watcher must see this
print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_a_forked_child_starts_its_own_watcher_and_sees_changes(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(tmp_path / "user.h5"), TRACE.to_json()],
                          capture_output=True, text=True, timeout=120, env=env, start_new_session=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exit 0" in done.stdout, done.stdout + done.stderr
    [child] = [line.split() for line in done.stdout.splitlines() if line.startswith("child ")]
    fresh, first, watching, right = child[1:]
    assert fresh == "True"                      # no watcher, no indexes after the fork
    assert first != "exact"                     # loaded on first use, before the record came
    assert watching == "True" and right == "True"
