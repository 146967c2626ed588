"""Crash-safe file replacement and a cross-process write lock.

A database file is never modified in place.  A writer builds the complete new file under
a temporary name in the same directory, fsyncs it, renames it over the old one with
``os.replace`` (atomic on POSIX) and fsyncs the directory so the rename itself survives a
power cut.  A reader therefore sees either the old complete file or the new complete
file; a writer killed at any moment leaves the old file plus, at worst, a stale
temporary that the next writer deletes.

Writers serialize on ``flock`` of a sidecar ``<db>.lock`` file.  The lock cannot live on
the database file itself because that inode is replaced on every commit.  The kernel
drops the lock when its holder dies, so kill -9 never leaves a database locked.  The
sidecar is never deleted: deleting a lock file races with processes about to lock it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from typing import Callable, Iterator

from looptune.database.errors import DatabaseError, LockTimeoutError


def lock_path(path: str) -> str:
    return os.fspath(path) + ".lock"


def _temp_prefix(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp.")


@contextlib.contextmanager
def write_lock(path: str, timeout_s: float) -> Iterator[None]:
    """Hold the exclusive write lock of ``path`` (waiting at most ``timeout_s`` seconds)."""
    try:
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DatabaseError(f"cannot create lock file {lock_path(path)}: {e.strerror}") from None
    try:
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise DatabaseError(f"cannot lock {lock_path(path)}: {e.strerror}") from None
            if time.monotonic() >= deadline:
                raise LockTimeoutError(f"{path}: another process held the write lock for more than {timeout_s:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)       # closing the descriptor releases the flock


def remove_stale_temporaries(path: str) -> None:
    """Delete temporaries left by writers that died mid-commit.  Only call with the write
    lock held: every live writer creates its temporary under that lock."""
    prefix = _temp_prefix(path)
    directory, start = os.path.split(prefix)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if name.startswith(start):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """Call ``write(temp_path)`` to produce the complete new content, then make it ``path``."""
    temp = f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}"
    try:
        write(temp)
        with contextlib.suppress(FileNotFoundError):    # a shared database stays as shared as it was
            os.chmod(temp, stat.S_IMODE(os.stat(path).st_mode))
        if fsync:
            _fsync_path(temp, os.O_RDONLY)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if fsync:
        _fsync_path(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
