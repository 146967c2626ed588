"""The schedule databases a process serves from, and noticing when they change.

``Databases`` holds the user's database and the one shipped in the package, each loaded on
first use into a ``ScheduleIndex``.  A running process must see records that ``build-db``,
``db merge``/``import``, live tuning or another process add later, and a database that
appears after its first call: a watcher thread looks at each file's identity (``os.stat``:
device, inode, size, modification time; about a microsecond a file) every ``recheck_s``
seconds and, on a change, drops the loaded indexes and calls ``on_change`` (the resolver
forgets its cached choices, so the next call of every shape resolves again; compiled kernels
stay cached).  Database commits replace the file atomically (write, fsync, rename), so a
change is one new inode and a reader never sees half a file.

Nothing is watched on the call path: a cached call costs the same with or without watching.
The watcher is a daemon thread named ``looptune-db-watch``, started with the first load and
stopped by ``close()``; a process forked from a watching one starts its own on first use.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

# The package's names load on first use (PEP 562): h5py and scikit-learn come in with the first
# database actually opened, not with ``import looptune.runtime``.
import looptune.database as db

if TYPE_CHECKING:  # pragma: no cover
    from looptune.database import MachineKey, ScheduleIndex

log = logging.getLogger("looptune.runtime")

FileIdentity = Optional[tuple[int, int, int, int]]


def file_identity(path: Path) -> FileIdentity:
    """(device, inode, size, mtime_ns) of a regular file; None when absent or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Databases:
    """The user's and the embedded database, loaded on first use; a broken file is logged and skipped."""

    def __init__(self, paths: list[Path], machine: Callable[[], "MachineKey"], *, recheck_s: float = 1.0,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.paths = [Path(p) for p in paths]
        self.recheck_s = recheck_s
        self._machine = machine
        self._on_change = on_change
        self._indexes: Optional[list[tuple[str, "ScheduleIndex"]]] = None
        self._identities: dict[Path, FileIdentity] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self.generation = 0          # bumped on every change seen; lets callers drop stale work

    def indexes(self) -> list[tuple[str, "ScheduleIndex"]]:
        found = self._indexes
        if found is None:
            with self._lock:
                if self._indexes is None:
                    self._indexes = self._load()
                    self._start_watching()
                found = self._indexes
        return found

    def _load(self) -> list[tuple[str, "ScheduleIndex"]]:
        out: list[tuple[str, "ScheduleIndex"]] = []
        self._identities = {p: file_identity(p) for p in self.paths}
        if not self.paths:
            return out
        machine = self._machine()
        for path in self.paths:
            if self._identities[path] is None:
                if path.exists():
                    log.warning("looptune: ignoring schedule database %s: not a regular file", path)
                continue
            try:
                out.append((str(path), db.ScheduleIndex(db.load(path), machine)))
            except (db.DatabaseError, OSError) as e:
                log.warning("looptune: ignoring schedule database %s: %s", path, e)
        return out

    def invalidate(self) -> None:
        """Forget the loaded indexes (they are read again on next use)."""
        with self._lock:
            self._indexes = None
            self.generation += 1

    def changed(self) -> bool:
        """Whether any database file is not the one loaded (appeared, vanished, replaced, grew)."""
        return any(file_identity(p) != self._identities.get(p) for p in self.paths)

    def check(self) -> bool:
        """Look once; on a change, invalidate and notify.  Returns whether something changed."""
        if self._indexes is None or not self.changed():
            return False
        self.invalidate()
        log.info("looptune: a schedule database changed; reloading")
        self._on_change()
        return True

    # ---- the watcher ------------------------------------------------------------------------
    def _start_watching(self) -> None:
        if not self.paths or self.recheck_s <= 0 or (self._watcher is not None and self._watcher.is_alive()):
            return
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(self._stop,), name="looptune-db-watch",
                                         daemon=True)
        self._watcher.start()

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.recheck_s):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - watching must never end the process
                log.debug("looptune: database watch failed: %s", e)

    def close(self) -> None:
        """Stop watching (the indexes stay usable)."""
        self._stop.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)
        self._watcher = None

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks, no watcher (the parent's thread does not exist here),
        and the indexes reloaded on next use, which starts the child's own watcher."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = None
        self._indexes = None
