"""Answering "which schedule should this problem use on this machine?" in microseconds.

An exact hit is a dict lookup.  Otherwise we look for the nearest tuned problem of the
same family (op, dtype, layout, threads), because a trace replays on any size of its
family and a schedule tuned for 1000x1000x1000 is a good guess for 1024x1000x960.
Distance is Euclidean in (log2 m, log2 n, log2 k, log2 batch): doubling any size is one
unit wherever you start.

Records from other machines are still useful (the runtime recompiles the trace for this
machine) but rank below local ones: their distance carries ``foreign_penalty``.  So each
family has two partitions, this machine's records and everybody else's, and the foreign
one is only searched when the local answer is farther than the penalty.

Speed (median per query must stay far below 50 us): scikit-learn's ``KDTree.query``
spends ~50 us per single query validating its input, so it is the last resort, not
the first.  Partitions up to ``scan_max`` points are scanned by brute force over one
contiguous array per feature (~15-25 us).  Larger ones keep a cell list (points sorted
by grid cell, the cells around the query found by one binary search, ~20-25 us at any
size); only when the cells near the query cannot prove the answer, i.e. the nearest
record is far away, does the query go to a ``KDTree`` built on first use.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from looptune.database.records import MachineKey, Record, better, gc_paused, problem_from_key
from looptune.runtime.compiler.workload import MatmulProblem


@dataclass(frozen=True)
class LookupSettings:
    foreign_penalty: float = 2.0     # log2 units added to other machines' records (2.0 = 4x off in one size)
    verified_only: bool = True       # never serve a schedule whose output was not checked
    scan_max: int = 4096             # partitions up to this size are scanned; larger ones use a cell list


@dataclass(frozen=True)
class Match:
    record: Record
    distance: float   # Euclidean in log2 sizes, plus the foreign penalty if the record is from another machine
    local: bool       # measured on the machine the index was built for
    exact: bool       # tuned for exactly the asked problem


def _features(problems: list[MatmulProblem]) -> np.ndarray:
    """(4, n) array: one contiguous row per feature, which numpy scans several times faster
    than n rows of 4."""
    sizes = np.array([(p.m, p.n, p.k, p.batch) for p in problems], dtype=np.float64).reshape(-1, 4)
    return np.ascontiguousarray(np.log2(sizes).T)


def _scan(points: np.ndarray, q: tuple[float, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: (distances, columns) of the k points of ``points`` (4, n) nearest to q."""
    d2 = points[0] - q[0]
    d2 *= d2
    for axis in (1, 2, 3):
        t = points[axis] - q[axis]
        t *= t
        d2 += t
    if k == 1 and len(d2):
        best = d2.argmin(keepdims=True)
    else:
        best = np.argpartition(d2, k - 1)[:k] if len(d2) > k else np.arange(len(d2))
        best = best[np.argsort(d2[best], kind="stable")]
    return np.sqrt(d2[best]), best


class _CellList:
    """Points bucketed into cubic cells of feature space, sorted by cell.

    A cell's key is its integer coordinates as base-``base`` digits, so cells that differ
    only in the last coordinate have consecutive keys and the (2h+1)^4 block of cells
    around a query is (2h+1)^3 key ranges, found with one binary search.  ``base`` leaves
    room above the largest coordinate, so neighbour digits that step outside the occupied
    range land on keys no point has.  The cell width adapts to density, so a block holds
    a few dozen candidates whether the partition has 5,000 points or 500,000.
    """

    WIDTHS = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125)   # log2 units; chosen per partition
    TARGET_OCCUPANCY = 3.0                         # points per occupied cell: a block then holds a few dozen
    HALF_WIDTHS = (1, 2)                           # blocks tried before giving up

    def __init__(self, points: np.ndarray) -> None:
        for width in self.WIDTHS:
            cells = np.floor(points / width).astype(np.int64)
            base = int(cells.max()) + 2 * max(self.HALF_WIDTHS) + 2
            keys = ((cells[0] * base + cells[1]) * base + cells[2]) * base + cells[3]
            if len(keys) <= self.TARGET_OCCUPANCY * len(np.unique(keys)):
                break
        self.width, self.base = width, base
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]
        self.rows = np.ascontiguousarray(points[:, self.order].T)   # (n, 4), in key order
        self.blocks = {h: self._block_bounds(h) for h in self.HALF_WIDTHS}

    def _block_bounds(self, h: int) -> np.ndarray:
        b = self.base
        rows = np.array([((x * b + y) * b + z) * b for x, y, z in itertools.product(range(-h, h + 1), repeat=3)],
                        dtype=np.int64)
        return np.concatenate([rows - h, rows + h + 1])   # first key and one past the last key of every range

    def query(self, q: tuple[float, ...], k: int, h: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The k nearest points if they lie within the (2h+1)^4 block around q, else None."""
        w = self.width
        cell = [int(x / w) for x in q]   # features are >= 0, so int() is floor()
        b = self.base
        bounds = self.keys.searchsorted(self.blocks[h] + (((cell[0] * b + cell[1]) * b + cell[2]) * b + cell[3]))
        half = len(bounds) // 2
        lo, counts = bounds[:half], bounds[half:] - bounds[:half]
        total = int(counts.sum())
        if total < k:
            return None
        # Positions lo[i] .. lo[i]+counts[i]-1 of every range, as one flat index array.
        positions = np.arange(total) + np.repeat(lo - (counts.cumsum() - counts), counts)
        diff = self.rows[positions] - q
        d2 = np.einsum("ij,ij->i", diff, diff)
        best = d2.argmin(keepdims=True) if k == 1 else np.argsort(d2, kind="stable")[:k]
        distances = np.sqrt(d2[best])
        # Every point outside the block is at least this far from q.
        covered = w * min(min(x / w - c + h, c + h + 1 - x / w) for x, c in zip(q, cell))
        if distances[-1] > covered:
            return None
        return distances, self.order[positions[best]]


class _Partition:
    """The records of one family from one side (local or foreign), searchable by features."""

    def __init__(self, records: list[Record], settings: LookupSettings) -> None:
        self.records = records
        self.points = _features([r.problem for r in records])
        self._cells = _CellList(self.points) if len(records) > settings.scan_max else None
        self._tree = None

    def query(self, q: tuple[float, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, row numbers) of the ``k`` nearest records, nearest first."""
        if self._cells is None:
            return _scan(self.points, q, k)
        for h in _CellList.HALF_WIDTHS:
            found = self._cells.query(q, k, h)
            if found is not None:
                return found
        return self._query_tree(q, k)

    def _query_tree(self, q: tuple[float, ...], k: int):
        if self._tree is None:
            from sklearn.neighbors import KDTree   # heavy import, only when a query needs it
            self._tree = KDTree(self.points.T)
        distances, rows = self._tree.query(np.array([q]), k=min(k, len(self.records)))
        return distances[0], rows[0]


class ScheduleIndex:
    """Lookup structure over a database's records, built for one local machine.

    >>> index = ScheduleIndex(load(path), MachineKey.current("gcc 12.2.0", "1"))
    >>> index.best("matmul:float32:nn:t1:b1:1000x1000x1000")   # -> Match or None
    """

    def __init__(self, records: Iterable[Record], machine: MachineKey,
                 settings: LookupSettings = LookupSettings()) -> None:
        self.machine = machine
        self.settings = settings
        local: dict[str, Record] = {}
        foreign: dict[str, Record] = {}
        # Records share MachineKey objects: compare each object once.  The dict keeps
        # the objects alive so their ids cannot be reused.
        is_local: dict[int, tuple[MachineKey, bool]] = {}
        with gc_paused():
            for record in records:
                if settings.verified_only and not record.verified:
                    continue
                seen = is_local.get(id(record.machine))
                if seen is None:
                    seen = is_local[id(record.machine)] = (record.machine, machine.owns(record.machine))
                side = local if seen[1] else foreign
                key = record.problem.key()
                current = side.get(key)
                side[key] = record if current is None else better(current, record)
            self._exact = local
            self._local = self._partitions(local.values())
            self._foreign = self._partitions(foreign.values())

    def _partitions(self, records: Iterable[Record]) -> dict[tuple, _Partition]:
        by_family: dict[tuple, list[Record]] = {}
        for record in records:
            by_family.setdefault(record.problem.family, []).append(record)
        return {family: _Partition(rs, self.settings) for family, rs in by_family.items()}

    def __len__(self) -> int:
        return sum(len(p.records) for side in (self._local, self._foreign) for p in side.values())

    def exact(self, problem: MatmulProblem | str) -> Record | None:
        """This machine's best record for exactly this problem; O(1)."""
        return self._exact.get(problem if isinstance(problem, str) else problem.key())

    def best(self, problem: MatmulProblem | str) -> Match | None:
        """The schedule to use: a local exact hit, else the nearest record (None if the family is empty)."""
        hit = self.exact(problem)
        if hit is not None:
            return Match(hit, 0.0, local=True, exact=True)
        found = self.nearest(problem, 1)
        return found[0] if found else None

    def nearest(self, problem: MatmulProblem | str, k: int = 1) -> list[Match]:
        """Up to ``k`` records of the problem's family, nearest first (foreign ones penalized)."""
        if isinstance(problem, str):
            problem = problem_from_key(problem)
        if k < 1:
            return []
        q = problem.features()
        matches: list[Match] = []
        local = self._local.get(problem.family)
        if local is not None:
            distances, rows = local.query(q, k)
            matches = [self._match(local.records[r], d, True, problem)
                       for d, r in zip(distances.tolist(), rows.tolist())]
        penalty = self.settings.foreign_penalty
        if len(matches) < k or matches[-1].distance > penalty:
            foreign = self._foreign.get(problem.family)
            if foreign is not None:
                distances, rows = foreign.query(q, k)
                matches += [self._match(foreign.records[r], d + penalty, False, problem)
                            for d, r in zip(distances.tolist(), rows.tolist())]
                matches.sort(key=lambda m: (m.distance, not m.local))
        return matches[:k]

    @staticmethod
    def _match(record: Record, distance: float, local: bool, problem: MatmulProblem) -> Match:
        return Match(record, distance, local, exact=record.problem == problem)

