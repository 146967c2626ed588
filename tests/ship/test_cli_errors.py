"""User errors on the ``looptune`` command line: one clean line on stderr, exit 1 or 2, never a
traceback, and nothing tuned or hung on the way."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from looptune.database import load, save
from looptune.tuner.cli import main

HERE = Path(__file__).parent
LOOPTUNE = [sys.executable, "-c", "from looptune.tuner.cli import main; main()"]   # the console script's entry
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
