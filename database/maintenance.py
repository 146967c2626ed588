"""Pure operations on collections of records: merge, prune, and the JSON-lines form.

``merge`` is what makes databases shareable: it keeps the best record per slot
``(problem, machine)`` under a total order and returns them in a canonical order, so
``merge(a, b) == merge(b, a)`` and merging the same file twice changes nothing.  The
store uses it for every commit (re-read, merge, write).

JSON lines are the interchange and review format: one ``Record.to_dict()`` object per
line, sorted keys.  Reading them is validation, line by line; a rejected line is
reported with its number and reason and never stops the good lines from being read.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO, Iterable

from looptune.database.atomic import is_hdf5_file, replace_atomically
from looptune.database.errors import DatabaseError, RecordError
from looptune.database.records import MachineKey, Record, better
from looptune.runtime.compiler.workload import MatmulProblem


@dataclass(frozen=True)
class Rejection:
    """Something refused while reading: where (``"line 12"``, ``"record 7"``) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _canonical_order(record: Record) -> tuple:
    p = record.problem
    return (p.op, p.dtype, p.layout, p.threads, p.batch, p.m, p.n, p.k, record.machine.key())


def merge(*sources: Iterable[Record]) -> tuple[Record, ...]:
    """Best record per slot across all sources, in canonical order.

    Commutative, associative and idempotent because ``better`` is a total order.
    """
    best: dict[tuple[MatmulProblem, MachineKey], Record] = {}
    for source in sources:
        for record in source:
            slot = record.slot
            current = best.get(slot)
            best[slot] = record if current is None else better(current, record)
    return tuple(sorted(best.values(), key=_canonical_order))


@dataclass(frozen=True)
class PruneRules:
    """Which records to drop.  The defaults drop nothing; each rule only ever removes."""

    unverified: bool = False               # results whose output was not checked against a reference
    slower_than_numpy: bool = False        # schedules numpy beat in the same run: the runtime would not use them
    older_than: float | None = None        # measured before this Unix time (hardware or compiler changed since)
    codegen_version: str | None = None     # made by any other code-generator version than this one

    def drops(self, record: Record) -> bool:
        return ((self.unverified and not record.verified)
                or (self.slower_than_numpy and record.gflops_median < record.numpy_gflops)
                or (self.older_than is not None and record.timestamp < self.older_than)
                or (self.codegen_version is not None and record.machine.codegen_version != self.codegen_version))


def prune(records: Iterable[Record], rules: PruneRules) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
    """Split ``records`` into (kept, dropped)."""
    kept: list[Record] = []
    dropped: list[Record] = []
    for record in records:
        (dropped if rules.drops(record) else kept).append(record)
    return tuple(kept), tuple(dropped)


def write_jsonl(records: Iterable[Record], out: IO[str]) -> int:
    count = 0
    for record in records:
        out.write(record.to_json())
        out.write("\n")
        count += 1
    return count


def export_jsonl(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records to ``path`` as JSON lines, atomically (no half-written export).

    Refuses (``DatabaseError``) to replace an HDF5 file: ``--out`` naming a database, often
    the very one being exported, would otherwise turn it into a JSON-lines file."""
    if is_hdf5_file(path):
        raise DatabaseError(f"{os.fspath(path)} is an HDF5 file (a schedule database?); "
                            f"refusing to overwrite it with a JSON-lines export")
    buffer = io.StringIO()
    count = write_jsonl(records, buffer)

    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(buffer.getvalue())

    replace_atomically(os.fspath(path), write)
    return count


MAX_LINE_BYTES = 1 << 20


def read_jsonl(lines: Iterable[str | bytes]) -> tuple[list[Record], list[Rejection]]:
    """Parse and validate every line; blank lines are skipped.  Returns (records, rejections)."""
    records: list[Record] = []
    rejections: list[Rejection] = []
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                rejections.append(Rejection(f"line {number}", f"not UTF-8: {e}"))
                continue
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            rejections.append(Rejection(f"line {number}", f"longer than {MAX_LINE_BYTES} bytes"))
            continue
        try:
            records.append(Record.from_json(line))
        except RecordError as e:
            rejections.append(Rejection(f"line {number}", str(e)))
    return records, rejections


def import_jsonl(path: str | os.PathLike) -> tuple[list[Record], list[Rejection]]:
    with open(path, "rb") as f:
        return read_jsonl(f)
