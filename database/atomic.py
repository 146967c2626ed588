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

Two guards keep a write from destroying the wrong file: ``same_file`` (two names, one
file: same path, symlink or hard link) and ``is_hdf5_file`` (never replace a database
with something that is not one).
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
from looptune.runtime.compiler.cache import fsync_path


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_SIGNATURE_OFFSETS = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)   # 0, then after a user block


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether both paths name one existing file (compared by device and inode, so through
    symlinks and hard links too)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_hdf5_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists and is an HDF5 file, a schedule database or any other: the
    HDF5 superblock signature sits at byte 0 or, after a user block (ours is 512 bytes),
    at 512, 1024, 2048, ..."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HDF5_SIGNATURE_OFFSETS[-1] + len(_HDF5_SIGNATURE))
    except FileNotFoundError:
        return False
    return any(head.startswith(_HDF5_SIGNATURE, offset) for offset in _HDF5_SIGNATURE_OFFSETS)


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


def replace_atomically(path: str, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """Call ``write(temp_path)`` to produce the complete new content, then make it ``path``."""
    temp = f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}"
    try:
        write(temp)
        with contextlib.suppress(FileNotFoundError):    # a shared database stays as shared as it was
            os.chmod(temp, stat.S_IMODE(os.stat(path).st_mode))
        if fsync:
            fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if fsync:
        fsync_path(os.path.dirname(os.path.abspath(path)))
