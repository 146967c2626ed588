"""This machine's recorded measurements: what ``build-db`` and ``tune`` timed, for ``looptune train``.

    recordings = MachineRecordings.current()           # <data dir>/recordings-<machine>-<codegen>.jsonl
    recordings.append(results)                          # RunResults, one JSON line each
    recordings.results()                                # what is there (a damaged line is skipped)

The file sits next to the user's schedule database (``data_dir``: the folder of ``$LOOPTUNE_DB``,
else the platform user data directory), one per machine (``MachineKey``) and code-generator
version (timings of other kernels are not this machine's), in the line format of
``replay.ResultStore`` (no pickle).  It is bounded: once it grows past ``max_bytes`` it is cut to
its newest half, rewritten through a temporary file and ``os.replace``, so a crash never leaves a
half-written file.  The first write of a process removes this machine's files of other
code-generator versions (``recordings-<machine>-*.jsonl``; never another machine's, which a shared
data directory may hold), so a version bump leaves no stale file behind.  It is a cache of
measurements, not a database: two processes appending at once may lose a few lines to a
concurrent cut, and nothing depends on any one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Mapping, Optional

from looptune.database import MachineKey
from looptune.database.atomic import replace_atomically
from looptune.runtime.compiler import environment
from looptune.runtime.compiler.errors import LoopTuneError
from looptune.tuner.measure.protocol import RunResult

MAX_RECORDING_BYTES = 32 << 20       # about 40,000 measurements; cut to the newest half beyond


def data_dir() -> Path:
    """Where LoopTune keeps what it learns about this machine: the folder of the user's schedule
    database (``$LOOPTUNE_DB``), else the platform user data directory (also when ``LOOPTUNE_DB``
    is set but empty: no database, but still a place for recordings and the machine's policy)."""
    db = environment.user_db_path()
    return (db if db is not None else environment.default_user_db_path()).parent


def identity_slug(identity: Mapping) -> str:
    """A short, stable file-name part for a machine identity (a ``MachineKey.to_dict()``, or a part of one)."""
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:16]


class MachineRecordings:
    """One machine's bounded JSON-lines file of ``RunResult``s."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = MAX_RECORDING_BYTES,
                 stale: str | None = None) -> None:
        """``stale``: a glob, in ``path``'s folder, of files this one supersedes (removed on the
        first write; ``path`` itself never)."""
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.stale = stale

    @classmethod
    def current(cls, machine: Optional[MachineKey] = None) -> "MachineRecordings":
        """This machine's file (``machine``: its key, if already known) in ``data_dir()``."""
        machine = machine or MachineKey.current()
        identity = machine.to_dict()
        codegen = identity.pop("codegen_version", None)
        prefix = f"recordings-{identity_slug(identity)}-"
        return cls(data_dir() / f"{prefix}{identity_slug({'codegen_version': codegen})[:8]}.jsonl",
                   stale=f"{prefix}*.jsonl")

    @classmethod
    def of_this_machine(cls) -> Optional["MachineRecordings"]:
        """This machine's file, or None when the machine cannot be named (no C compiler to identify)."""
        try:
            return cls.current()
        except LoopTuneError:
            return None

    def append(self, results: Iterable[RunResult]) -> None:
        lines = [json.dumps(r.to_json(), sort_keys=True) + "\n" for r in results]
        if not lines:
            return
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.writelines(lines)
                size = f.tell()
            if size > self.max_bytes:
                self._cut()
            if self.stale is not None:
                self._remove_stale()

    def append_json(self, rows: Iterable) -> None:
        """``append`` for results sent as JSON (``ResultList.rows`` of a worker process); a row that
        is not a result is skipped, and a file that cannot be written is named in one warning."""
        results = []
        for row in rows:
            try:
                results.append(RunResult.from_json(row))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
        try:
            self.append(results)
        except OSError as e:
            environment.warn_once(f"cannot record measurements in {self.path}: {e.strerror or e}")

    def _remove_stale(self) -> None:
        """Remove the files ``stale`` names other than this one (once: errors are ignored, a file
        another process still appends to simply comes back and goes at a later first write)."""
        pattern, self.stale = self.stale, None
        for other in self.path.parent.glob(pattern):
            if other.name == self.path.name or not other.is_file() or other.is_symlink():
                continue
            try:
                other.unlink()
            except OSError:
                pass

    def _cut(self) -> None:
        """Keep the newest lines that fit half of ``max_bytes``, written atomically."""
        with open(self.path, "rb") as f:
            lines = f.readlines()
        kept, size = [], 0
        for line in reversed(lines):
            if size + len(line) > self.max_bytes // 2:
                break
            kept.append(line)
            size += len(line)

        def write(temp: str) -> None:
            with open(temp, "wb") as f:
                f.writelines(reversed(kept))

        replace_atomically(str(self.path), write)

    def results(self) -> list[RunResult]:
        """Every readable result, the last line for a (problem, schedule) winning; a line that
        cannot be read (a write cut short by a kill) is skipped."""
        by_key: dict[tuple[str, str], RunResult] = {}
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        r = RunResult.from_json(json.loads(line))
                    except (ValueError, TypeError, KeyError, AttributeError):
                        continue
                    by_key[(r.problem_key, r.tag)] = r
        except FileNotFoundError:
            return []
        return list(by_key.values())


class ResultList:
    """A sink for ``evaluator.recording_live_measurements`` that keeps the results as JSON rows: what
    a build-db worker process timed, sent back to the driver with its reply (``append_json``)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def append(self, results: Iterable[RunResult]) -> None:
        self.rows.extend(r.to_json() for r in results)
