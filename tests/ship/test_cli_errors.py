"""User errors on the ``looptune`` command line: one clean line on stderr, exit 1 or 2, never a
traceback, and nothing tuned or hung on the way."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from looptune.database import load, save
from looptune.tuner.cli import main

HERE = Path(__file__).parent
LOOPTUNE = [sys.executable, "-m", "looptune.tuner.cli"]   # the CLI of this interpreter, not the PATH's
FAKE_TUNER = ["--tuner", "ship_fakes:fake_tune"]


@pytest.fixture
def shapes(tmp_path):
    path = tmp_path / "shapes.txt"
    path.write_text("16 16 16\n32 16 48\n")
    return path


def run(*args, code):
    """Invoke the CLI; check the exit code and that stderr is one ``Error:`` line, no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    if code == 0:
        return ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def build(db, shapes, *extra, code):
    return run("build-db", "--shapes", shapes, "--db", db, *FAKE_TUNER, "--quiet", "--no-bench", *extra, code=code)


def newer_schema_db(path):
    save(path, [])
    data = path.read_bytes()
    path.write_bytes(data.replace(b"schema_version=1\n", b"schema_version=9\n", 1))
    return path


def test_corrupt_database_is_one_line(tmp_path, shapes):
    db = tmp_path / "corrupt.h5"
    db.write_bytes(os.urandom(3000))
    assert "not a LoopTune schedule database" in build(db, shapes, code=1)
    assert "not a LoopTune schedule database" in run("export", "--db", db, "--out", tmp_path / "lib", code=1)
    assert "not a LoopTune schedule database" in run("bench", "--db", db, code=1)


def test_newer_schema_database_is_one_line(tmp_path, shapes):
    db = newer_schema_db(tmp_path / "new.h5")
    assert "newer than the version this LoopTune reads" in build(db, shapes, code=1)


def test_unwritable_database_fails_before_tuning(tmp_path, shapes):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "not a directory" in build(blocker / "s.h5", shapes, code=1)     # its folder cannot exist
    if os.geteuid() != 0:                                                     # root writes anywhere
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        assert "Permission denied" in build(folder / "s.h5", shapes, code=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "dev-null", "directory"])
def test_non_regular_database_is_refused_without_opening_it(tmp_path, shapes, kind):
    if kind == "fifo":
        db = tmp_path / "db.fifo"
        os.mkfifo(db)
    elif kind == "dev-null":
        db = os.devnull
    else:
        db = tmp_path
    for command in (["build-db", "--shapes", shapes, *FAKE_TUNER], ["bench", "--shapes", shapes],
                    ["export", "--out", tmp_path / "lib"], ["tune", "16", "16", "16"]):
        assert "--db" in run(*command, "--db", db, code=2)


@pytest.mark.timeout(60)
def test_fifo_named_by_looptune_db_is_refused(tmp_path, shapes):
    fifo = tmp_path / "db.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "LOOPTUNE_DB": str(fifo), "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*LOOPTUNE, "build-db", "--shapes", str(shapes), *FAKE_TUNER, "--quiet"],
                          env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"Error: LOOPTUNE_DB: {fifo} is a FIFO (named pipe), not a schedule database file"


def test_non_utf8_shape_file_is_one_line(tmp_path):
    bad = tmp_path / "shapes.txt"
    bad.write_bytes(b"16 16 \xff\xfe\n")
    assert "not a UTF-8 text file" in build(tmp_path / "s.h5", bad, code=1)
    assert "not a UTF-8 text file" in run("schedule", "16", "16", "16", "--trace", bad, code=1)


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "0", "-1", "two"])
def test_budget_must_be_finite_and_positive(tmp_path, shapes, budget):
    db = tmp_path / "s.h5"
    assert "--budget" in build(db, shapes, "--budget", budget, code=2)
    assert "--budget" in run("tune", "16", "16", "16", "--budget", budget, code=2)
    assert not db.exists()                    # refused before anything was tuned


def test_negative_limit_is_refused(tmp_path, shapes):
    assert "--limit" in build(tmp_path / "s.h5", shapes, "--limit", "-1", code=2)
    assert "--limit" in run("bench", "--shapes", shapes, "--limit", "-1", code=2)
    build(tmp_path / "s.h5", shapes, "--limit", "0", code=0)       # zero is a (trivial) limit


@pytest.mark.parametrize("threads", ["0", "-2", "1025"])
def test_threads_are_checked_at_parse_time(tmp_path, shapes, threads):
    line = build(tmp_path / "s.h5", shapes, "--threads", threads, code=2)
    assert "--threads" in line and str(shapes) not in line            # the shape file is not blamed
    for command in (["bench", "--shapes", shapes], ["export", "--out", tmp_path / "lib"],
                    ["schedule", "16", "16", "16"], ["tune", "16", "16", "16"]):
        assert "--threads" in run(*command, "--threads", threads, code=2)


def test_good_build_still_works(tmp_path, shapes):
    db = tmp_path / "new-folder" / "s.h5"
    result = CliRunner().invoke(main, ["build-db", "--shapes", str(shapes), "--db", str(db), *FAKE_TUNER,
                                       "--quiet", "--no-bench", "--budget", "0.5", "--threads", "2", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert len(load(db)) == 1
    assert not [p for p in db.parent.iterdir() if p.name.startswith(".looptune-probe-")]


@pytest.mark.parametrize("tuner", ["foo", "no_such_module_xyz:tune"])
def test_bad_tuner_is_one_line_in_this_process(tmp_path, shapes, tuner):
    out = build(tmp_path / "db.h5", shapes, "--tuner", tuner, code=1)
    assert "tuner" in out or "no_such_module_xyz" in out


def cli(*args, timeout, **env):
    """Run the CLI of this interpreter in a child process."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([*LOOPTUNE, *map(str, args)], env=full, capture_output=True, text=True, timeout=timeout)


def one_error_line(done, code):
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_huge_budget_tunes_until_the_search_ends(tmp_path):
    """Any finite positive budget works: 1e308 s means "no limit", not an OverflowError."""
    done = cli("tune", "1", "16", "8", "--budget", "1e308", "--json", timeout=280)   # a small search space
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["ok"]
    shapes = tmp_path / "one.txt"
    shapes.write_text("1 16 8\n")
    db = tmp_path / "s.h5"
    done = cli("build-db", "--shapes", shapes, "--db", db, "--budget", "1e308", "--tuner", "agent", "--json",
               "--no-bench", timeout=280)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert (report["done"], report["failed"]) == (1, 0), report["failures"]
    assert len(load(db)) == 1


class _Unpickled:
    """Unpickling this creates ``marker``: proof that a policy file was loaded with pickles allowed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_policy_that_is_not_a_policy_is_one_line(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(3000))
    line = one_error_line(cli("tune", "16", "16", "16", "--policy", junk, timeout=120), code=2)
    assert "--policy" in line and str(junk) in line and "not a LoopTune policy file" in line
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, __meta__=np.array([_Unpickled(str(marker))], dtype=object))
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "nometa.npz", w=np.zeros(3))
    for path in (pickled, tmp_path / "one.npy", tmp_path / "nometa.npz", tmp_path, tmp_path / "missing.npz"):
        line = run("tune", "16", "16", "16", "--policy", path, code=2)
        assert "--policy" in line and str(path) in line
    assert not marker.exists()                     # never unpickled


def _interrupt(args, ready, **env):
    """Start the CLI, wait until ``ready()``, send SIGINT to it alone, return (code, stdout, stderr)."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **env}
    # SIGINT back to its default in the child, whatever this process inherited (a background job ignores it)
    proc = subprocess.Popen([*LOOPTUNE, *map(str, args)], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never got going"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, out, err


@pytest.mark.timeout(240)
def test_ctrl_c_exits_130_from_tune_and_build_db(tmp_path):
    cache = tmp_path / "cache"                       # the first kernel built: tuning is under way
    code, out, err = _interrupt(["tune", "64", "64", "64", "--budget", "60"], lambda: cache.is_dir() and any(cache.iterdir()),
                                LOOPTUNE_CACHE_DIR=str(cache))
    assert code == 130, (code, out, err)
    assert err.strip() == "Interrupted." and "Aborted" not in err

    many = tmp_path / "many.txt"
    many.write_text("".join(f"{16 + i} 16 16\n" for i in range(30)))
    db = tmp_path / "s.h5"

    def committed():
        try:
            return len(load(db)) >= 1
        except Exception:                            # not written yet, or mid-commit
            return False

    code, out, err = _interrupt(["build-db", "--shapes", many, "--db", db, *FAKE_TUNER, "--quiet", "--no-bench"],
                                committed, LOOPTUNE_FAKE_SLEEP="0.3")
    assert code == 130, (code, out, err)
    assert "interrupted" in out and "Traceback" not in err and "Aborted" not in err
    assert 1 <= len(load(db)) < 30
