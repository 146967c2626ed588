"""A full disk (ENOSPC) during a database commit: the previous database stays intact and
readable, no temporary file is left behind, the error says what happened, and the next commit
(once there is room again) works.

The disk is made full by making the calls the commit uses (the temporary's write, its fsync,
the rename, the lock file's creation) fail with ENOSPC; where the sandbox allows a private mount
namespace (``unshare -m``, as root), also on a real, tiny, full tmpfs.
"""
from __future__ import annotations

import builtins
import errno
import os

import pytest

from looptune.database import DatabaseError, StoreSettings, commit, load, save
from looptune.database import atomic, store

from db_testlib import make_record

OLD = [make_record(m) for m in (1, 8, 64)]
NEW = [make_record(m) for m in (3, 5, 700)]


def enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


@pytest.fixture
def db(tmp_path):
    """A database with OLD in it, alone in its directory (with its lock file)."""
    path = tmp_path / "schedules.h5"
    save(path, OLD)
    return path


def is_temporary(path, name: str) -> bool:
    return name.startswith(f".{os.path.basename(path)}.tmp.")


def full_disk_at(stage: str, path, monkeypatch) -> None:
    """Make the next commit to ``path`` run out of space at ``stage``."""
    if stage == "write":
        # the new file's bytes: half of them reach the disk, then ENOSPC, as write(2) does
        real_open = builtins.open

        class HalfWritten:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(bytes(data[: len(data) // 2]))
                self.f.flush()
                raise enospc(self.f.name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if "w" in mode and is_temporary(path, os.path.basename(os.fspath(file))):
                return HalfWritten(f)
            return f

        monkeypatch.setattr(store, "open", fake_open, raising=False)     # the store's own ``open``
    elif stage == "fsync":
        # delayed allocation: the write "succeeded", the blocks are allocated at fsync
        real_fsync_path = atomic.fsync_path

        def fake_fsync_path(p):
            if is_temporary(path, os.path.basename(os.fspath(p))):
                raise enospc(os.fspath(p))
            real_fsync_path(p)

        monkeypatch.setattr(atomic, "fsync_path", fake_fsync_path)
    elif stage == "rename":
        # the directory needs a new block for the entry
        real_replace = os.replace

        def fake_replace(src, dst, *args, **kwargs):
            if os.fspath(dst) == os.fspath(path):
                raise enospc(os.fspath(dst))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", fake_replace)
    else:
        raise AssertionError(stage)


@pytest.mark.parametrize("stage", ["write", "fsync", "rename"])
def test_a_full_disk_during_a_commit_keeps_the_previous_database(db, stage, monkeypatch):
    before = db.read_bytes()
    full_disk_at(stage, db, monkeypatch)
    with pytest.raises(OSError) as caught:
        commit(db, NEW)
    assert caught.value.errno == errno.ENOSPC                   # the error says the disk is full
    assert "No space left on device" in str(caught.value)
    monkeypatch.undo()

    assert db.read_bytes() == before                            # the previous database, byte for byte
    assert set(load(db).records) == set(OLD)                    # and it loads, checksums and all
    assert sorted(os.listdir(db.parent)) == sorted([db.name, db.name + ".lock"])   # no temporary left
    assert set(commit(db, NEW).records) == set(OLD + NEW)       # room again: the next commit works
    assert set(load(db).records) == set(OLD + NEW)


def test_a_full_disk_on_a_first_commit_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "new.h5"
    full_disk_at("write", path, monkeypatch)
    with pytest.raises(OSError) as caught:
        commit(path, NEW)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["new.h5.lock"]     # neither a database nor a temporary


def test_no_room_for_the_lock_file_is_a_clear_database_error(tmp_path, monkeypatch):
    path = tmp_path / "new.h5"
    real_open = os.open

    def fake_open(file, *args, **kwargs):
        if os.fspath(file) == atomic.lock_path(os.fspath(path)):
            raise enospc(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(DatabaseError) as caught:
        commit(path, NEW)
    assert "No space left on device" in str(caught.value) and "new.h5.lock" in str(caught.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# ---- a real full file system -------------------------------------------------------------------

REAL_SCRIPT = r"""
import errno, os, subprocess, sys
from looptune.database import commit, load
sys.path.insert(0, sys.argv[2])
from db_testlib import make_record

mnt = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt], check=True)
path = os.path.join(mnt, "schedules.h5")
old = [make_record(m) for m in (1, 8, 64)]
commit(path, old)
before = open(path, "rb").read()
filler = os.path.join(mnt, "filler")
with open(filler, "wb", buffering=0) as f:          # fill the file system to the last byte
    for size in (4096, 1):
        try:
            while True:
                f.write(b"x" * size)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
new = [make_record(m, k=k) for m in range(1, 40) for k in (3, 5)]
try:
    commit(path, new)
except OSError as e:
    print("error", e.errno, e.strerror)
else:
    print("error none")
print("intact", open(path, "rb").read() == before and set(load(path).records) == set(old))
print("files", sorted(os.listdir(mnt)))
os.unlink(filler)
print("after", len(commit(path, new)), len(load(path)))
"""


def test_a_really_full_file_system(in_private_tmpfs):
    mnt = in_private_tmpfs.mnt
    done = in_private_tmpfs(REAL_SCRIPT, os.path.dirname(os.path.abspath(__file__)), timeout=120)
    if done.returncode != 0 and "mount" in done.stderr and "tmpfs" in done.stderr and "error" not in done.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["error"] == f"{errno.ENOSPC} No space left on device"
    assert lines["intact"] == "True"
    assert lines["files"] == str(["filler", "schedules.h5", "schedules.h5.lock"])    # no temporary
    assert lines["after"] == "81 81"
    assert os.listdir(mnt) == []         # the tmpfs lived in the script's own mount namespace
