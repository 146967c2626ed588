"""Everything the database raises, so callers can catch one type.

The runtime's contract is simple: any ``DatabaseError`` while opening a database means
"serve from the fallback"; the subclasses exist so tools can say *why* in words a user
can act on (re-download the file, upgrade LoopTune, remove a bad record ...).
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError


class DatabaseError(LoopTuneError):
    """Base class: the schedule database could not be used as asked."""


class RecordError(DatabaseError, ValueError):
    """A record (or one of its fields) is outside the schema: wrong type, out of range,
    not in the schedule grammar.  Raised before anything derived from it is compiled."""


class CorruptDatabaseError(DatabaseError):
    """The file is not a readable LoopTune database: truncated, garbage, bit-flipped
    (a dataset's checksum does not match) or missing part of the layout."""


class SchemaVersionError(DatabaseError):
    """The file was written with a newer schema than this build can read."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.found, self.supported = found, supported
        super().__init__(
            f"{path}: database schema version {found} is newer than the version this LoopTune "
            f"reads ({supported}); upgrade LoopTune or re-export the database with the newer one")


class MissingDatabaseError(DatabaseError, FileNotFoundError):
    """There is no database file at the given path."""


class LockTimeoutError(DatabaseError):
    """Another process held the database's write lock for longer than we were willing to wait."""
