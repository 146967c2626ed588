"""This machine's recorded measurements: what ``build-db`` and ``tune`` timed, for ``looptune train``.

    recordings = MachineRecordings.current()           # <data dir>/recordings-<machine>.jsonl
    recordings.append(results)                          # RunResults, one JSON line each
    recordings.results()                                # what is there (a damaged line is skipped)

The file sits next to the user's schedule database (``data_dir``: the folder of ``$LOOPTUNE_DB``,
else the platform user data directory), one per machine (``MachineKey``, code-generator version
included: timings of other kernels are not this machine's), in the line format of
``replay.ResultStore`` (no pickle).  It is bounded: once it grows past ``max_bytes`` it is cut to
its newest half, rewritten through a temporary file and ``os.replace``, so a crash never leaves a
half-written file.  It is a cache of measurements, not a database: two processes appending at
once may lose a few lines to a concurrent cut, and nothing depends on any one line.
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

    def __init__(self, path: str | os.PathLike, max_bytes: int = MAX_RECORDING_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()

    @classmethod
    def current(cls, machine: Optional[MachineKey] = None) -> "MachineRecordings":
        """This machine's file (``machine``: its key, if already known) in ``data_dir()``."""
        machine = machine or MachineKey.current()
        return cls(data_dir() / f"recordings-{identity_slug(machine.to_dict())}.jsonl")

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
