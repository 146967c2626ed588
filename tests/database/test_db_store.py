"""The HDF5 store: round trips, damage detection, hostile files, crash safety, concurrent writers."""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from looptune.database import (SCHEMA_VERSION, CorruptDatabaseError, DatabaseError, LockTimeoutError,
                               MissingDatabaseError, RecordError, SchemaVersionError, StoreSettings, commit, load,
                               merge, save, verify)
from looptune.database import atomic

from db_testlib import FOREIGN, make_record, record_strategy, replace_dataset, reseal

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path):
    path = tmp_path / "schedules.h5"
    save(path, [make_record(m) for m in (1, 8, 64, 512)] + [make_record(64, machine=FOREIGN, gflops=7.0)])
    return path


def test_round_trip(db_path):
    db = load(db_path)
    assert len(db) == 5
    assert set(db.records) == {make_record(m) for m in (1, 8, 64, 512)} | {make_record(64, machine=FOREIGN,
                                                                                     gflops=7.0)}


@settings(max_examples=40, deadline=None)
@given(st.lists(record_strategy(), max_size=12))
def test_round_trip_any_records(records):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "db.h5")
        written = save(path, records)
        assert load(path).records == written.records == merge(records)


def test_commit_keeps_the_best_record_per_slot(tmp_path):
    path = tmp_path / "db.h5"
    commit(path, [make_record(gflops=10.0)])
    commit(path, [make_record(gflops=30.0), make_record(128)])
    commit(path, [make_record(gflops=20.0)])                   # worse: changes nothing
    db = load(path)
    assert sorted((r.problem.m, r.gflops_median) for r in db) == [(64, 30.0), (128, 100.0)]


def test_missing_file(tmp_path):
    with pytest.raises(MissingDatabaseError):
        load(tmp_path / "nope.h5")


def test_layout_is_plain_hdf5_with_checksums(db_path):
    with h5py.File(db_path, "r") as f:
        assert f.attrs["format"] == b"looptune-schedule-db"
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert f.attrs["record_count"] == 5
        assert list(f["records/m"][()]) == [1, 8, 64, 64, 512]
        assert b'"op":"split"' in f["steps/json"][0]
        for table in ("steps", "traces", "machines", "records"):
            for name, ds in f[table].items():
                assert ds.attrs["sha256"].decode() == hashlib.sha256(ds[()].tobytes()).hexdigest(), name


# ------------------------------------------------------------------------------ damage

def _data_offset(path, where):
    with h5py.File(path, "r") as f:
        return f[where].id.get_offset()


@pytest.mark.parametrize("where", ["/records/m", "/records/gflops_median", "/steps/json", "/traces/step_index",
                                   "/machines/cpu_model"])
def test_bit_flip_in_data_is_a_checksum_error(db_path, where):
    data = bytearray(db_path.read_bytes())
    data[_data_offset(db_path, where)] ^= 0x10
    db_path.write_bytes(bytes(data))
    with pytest.raises(CorruptDatabaseError, match="file checksum mismatch"):
        load(db_path)
    reseal(db_path)          # even with the file checksum redone, the dataset's own checksum catches it
    with pytest.raises(CorruptDatabaseError, match=f"checksum mismatch in {where}"):
        load(db_path)


def test_random_bit_flips_are_all_caught(db_path):
    """Anywhere in the file, header included: the file checksum catches every single flip
    before HDF5 parses anything (fuzzing found flips that send HDF5 into an endless loop)."""
    good = db_path.read_bytes()
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(good)
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
        db_path.write_bytes(bytes(data))
        with pytest.raises(CorruptDatabaseError):
            load(db_path)


def test_random_bit_flips_with_a_valid_file_checksum_never_pass_silently(db_path):
    """The same flips resealed, as a careless or hostile editor would: now HDF5 parses them.
    Either a DatabaseError, or (flip in unused bytes) exactly the same records."""
    good = db_path.read_bytes()
    expected = load(db_path).records
    rng = random.Random(1)
    errors = 0
    for _ in range(150):
        data = bytearray(good)
        position = rng.randrange(512, len(data))
        data[position] ^= 1 << rng.randrange(8)
        db_path.write_bytes(bytes(data))
        reseal(db_path)
        try:
            records = load(db_path).records
        except DatabaseError:
            errors += 1
        else:
            assert records == expected, f"flip at byte {position} changed the records silently"
    assert errors > 0


@pytest.mark.parametrize("keep", [0, 1, 8, 100, 0.5, -1])
def test_truncated_file(db_path, keep):
    data = db_path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    db_path.write_bytes(data[:cut])
    with pytest.raises(CorruptDatabaseError, match="schedules.h5"):
        load(db_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 4096, os.urandom(10_000), b"#!/bin/sh\nrm -rf /\n",
                                     b"\x89HDF\r\n\x1a\n" + os.urandom(5000)])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.h5"
    path.write_bytes(content)
    with pytest.raises(CorruptDatabaseError, match="garbage.h5"):
        load(path)


def test_some_other_hdf5_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(CorruptDatabaseError, match="not a LoopTune schedule database"):
        load(path)


@pytest.mark.parametrize("in_header", [True, False])
def test_newer_schema_names_both_versions(db_path, in_header):
    with h5py.File(db_path, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    reseal(db_path, schema_version=SCHEMA_VERSION + 1 if in_header else SCHEMA_VERSION)
    with pytest.raises(SchemaVersionError) as e:
        load(db_path)
    assert f"version {SCHEMA_VERSION + 1}" in str(e.value) and f"reads ({SCHEMA_VERSION})" in str(e.value)


def test_file_edited_without_resealing_is_refused(db_path):
    with h5py.File(db_path, "r+") as f:
        f.attrs["note"] = "edited by hand"
    with pytest.raises(CorruptDatabaseError, match="checksum mismatch|header says"):
        load(db_path)


# ------------------------------------------------------------------------------ hostile content

def _steps(path):
    with h5py.File(path, "r") as f:
        return list(f["steps/json"][()])


@pytest.mark.parametrize("evil", [
    b'{"op":"split","loop":"m; system(\\"rm -rf /\\"); //","factor":8}',
    b'{"op":"split","loop":"m","factor":8,"pragma":"$(reboot)"}',
    b'{"op":"__asm__","loop":"m"}',
    b'{"op":"unroll","loop":"m.i","factor":100000}',
    b'not json at all',
])
def test_crafted_step_is_rejected_before_any_compiler_runs(db_path, evil, monkeypatch):
    steps = _steps(db_path)
    steps[0] = evil
    replace_dataset(db_path, "/steps/json", np.array(steps))        # valid checksum: an attack, not damage

    def no_processes(*args, **kwargs):
        raise AssertionError("something tried to run a program while loading")
    monkeypatch.setattr(subprocess, "Popen", no_processes)
    monkeypatch.setattr(os, "system", no_processes)
    with pytest.raises(RecordError, match="record 0 is invalid: trace: step 0"):
        load(db_path)
    report = verify(db_path)             # names every bad record; the others are still fine
    assert not report.ok and report.valid_records < 5
    assert all("step 0" in r.reason for r in report.rejections)


@pytest.mark.parametrize("column, value", [("m", 0), ("m", 2**40), ("threads", -1), ("dtype", b"float8"),
                                           ("op", b"rm -rf"), ("verified", 7), ("gflops_median", np.nan),
                                           ("machine", 99), ("trace", -1)])
def test_crafted_record_fields_are_rejected(db_path, column, value):
    with h5py.File(db_path, "r") as f:
        data = f[f"records/{column}"][()]
    data = data.astype(f"S{max(len(value), data.dtype.itemsize)}") if isinstance(value, bytes) else data
    data[0] = value
    replace_dataset(db_path, f"/records/{column}", data)
    with pytest.raises(DatabaseError, match="record"):
        load(db_path)


def test_external_links_and_filters_are_refused(db_path, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(db_path, other)
    with h5py.File(db_path, "r+") as f:
        del f["machines"]
        f["machines"] = h5py.ExternalLink(str(other), "/machines")
    reseal(db_path)
    with pytest.raises(CorruptDatabaseError, match="/machines"):
        load(db_path)
    with h5py.File(other, "r+") as f:
        data = f["records/m"][()]
        del f["records/m"]
        f.create_dataset("records/m", data=data, compression="gzip").attrs["sha256"] = \
            np.bytes_(hashlib.sha256(data.tobytes()).hexdigest())
    reseal(other)
    with pytest.raises(CorruptDatabaseError, match="filters"):
        load(other)


def test_wrong_checksum_attribute(db_path):
    with h5py.File(db_path, "r") as f:
        data = f["records/k"][()]
    replace_dataset(db_path, "/records/k", data, checksum=False)
    with pytest.raises(CorruptDatabaseError, match="checksum mismatch in /records/k"):
        load(db_path)


# ------------------------------------------------------------------------------ crash safety and concurrency

def test_stale_temporaries_are_cleaned_and_lock_times_out(db_path):
    stale = db_path.parent / f".{db_path.name}.tmp.12345.deadbeef"
    stale.write_bytes(b"half a file")
    commit(db_path, [make_record(3)])
    assert not stale.exists()
    with atomic.write_lock(str(db_path), 1.0):          # another writer holds the lock
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError):
            commit(db_path, [make_record(5)], StoreSettings(lock_timeout_s=0.2))
        assert time.monotonic() - t0 < 2
    assert len(load(db_path)) == 6


def _fork(function, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            function(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def test_two_processes_committing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "db.h5")
    save(path, [make_record(1000 + i, batch=2) for i in range(300)])   # big enough that commits overlap
    go_read, go_write = os.pipe()

    def writer(first: int) -> None:
        os.read(go_read, 1)                    # start together
        for i in range(first, first + 25):
            commit(path, [make_record(i + 1)])

    pids = [_fork(writer, 0), _fork(writer, 25)]
    os.write(go_write, b"xx")
    assert all(os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0 for pid in pids)
    db = load(path)
    assert {r.problem.m for r in db if r.problem.batch == 1} == set(range(1, 51))
    assert len(db) == 350


@pytest.mark.slow
def test_kill_minus_9_during_commits_loses_nothing():
    """20 random SIGKILLs of a committing writer (tools/db_killtest.py runs 200); at least one
    lands mid-write.  The seed is printed (and named in every failure) so a failure replays."""
    seed = random.randrange(1 << 30)
    print(f"db_killtest seed: {seed}")
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "tools" / "db_killtest.py"), "--iterations", "20",
                             "--quiet", "--seed", str(seed)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"seed {seed}: " + result.stdout + result.stderr
    found = re.search(r"OK: 20 kills, .* (\d+) kills landed mid-write", result.stdout)
    assert found, f"seed {seed}: {result.stdout}"
    assert int(found.group(1)) >= 1, f"seed {seed}: no kill landed mid-write: {result.stdout}"
    assert time.monotonic() - t0 < 60


def test_commit_keeps_file_permissions(db_path):
    os.chmod(db_path, 0o640)
    commit(db_path, [make_record(3)])
    assert os.stat(db_path).st_mode & 0o777 == 0o640
