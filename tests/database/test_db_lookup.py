"""Lookup: exact hits, nearest neighbours (every search path against brute force), machine ranking."""
from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from looptune.database import LookupSettings, MatmulProblem, RecordError, ScheduleIndex

from db_testlib import FOREIGN, LOCAL, make_record


def test_exact_hit_is_the_local_best():
    index = ScheduleIndex([make_record(gflops=10.0), make_record(128), make_record(machine=FOREIGN, gflops=999.0)],
                          LOCAL)
    match = index.best(MatmulProblem(64, 64, 64))
    assert match.exact and match.local and match.distance == 0.0 and match.record.gflops_median == 10.0
    assert index.exact("matmul:float32:nn:t1:b1:64x64x64") is match.record
    assert index.exact(MatmulProblem(65, 64, 64)) is None


def test_nearest_is_within_the_family():
    index = ScheduleIndex([make_record(64, dtype="float64"), make_record(64, layout="tn"), make_record(64, threads=4),
                           make_record(4096)], LOCAL)
    match = index.best(MatmulProblem(100, 64, 64))
    assert match.record.problem == MatmulProblem(4096, 64, 64) and not match.exact
    assert index.best(MatmulProblem(64, 64, 64, dtype="float64", layout="tt")) is None


def test_local_records_rank_above_foreign_ones():
    local_far = make_record(256)                       # 2 log2-units from the query
    foreign_same = make_record(64, machine=FOREIGN)    # 0 units, plus the penalty
    settings = LookupSettings(foreign_penalty=3.0)
    match = ScheduleIndex([local_far, foreign_same], LOCAL, settings).best(MatmulProblem(64, 64, 64))
    assert match.record is local_far and match.local and match.distance == pytest.approx(2.0)
    # With the same feature distance, local always wins; farther than the penalty, foreign is used.
    assert ScheduleIndex([make_record(128), make_record(128, machine=FOREIGN)], LOCAL).best(
        MatmulProblem(64, 64, 64)).local
    match = ScheduleIndex([make_record(2 ** 20), foreign_same], LOCAL, settings).best(MatmulProblem(64, 64, 64))
    assert match.record is foreign_same and not match.local and match.exact and match.distance == 3.0
    # Seen from the other machine, the roles swap.
    seen_from_there = ScheduleIndex([local_far, foreign_same], FOREIGN, settings)
    assert seen_from_there.best(MatmulProblem(64, 64, 64)).record is foreign_same


def test_unverified_records_are_not_served_unless_asked():
    records = [make_record(64, verified=False), make_record(512)]
    assert ScheduleIndex(records, LOCAL).best(MatmulProblem(64, 64, 64)).record.problem.m == 512
    assert ScheduleIndex(records, LOCAL, LookupSettings(verified_only=False)).best(MatmulProblem(64, 64, 64)).exact


def test_key_strings_are_parsed_and_checked():
    index = ScheduleIndex([make_record(64)], LOCAL)
    assert index.best("matmul:float32:nn:t1:b1:100x64x64").record.problem.m == 64
    with pytest.raises(RecordError):
        index.nearest("matmul:float32:nn:t1:b1:0x64x64")


def _reference(points, query, k):
    q = query.features()
    return sorted(math.dist(p, q) + extra for p, extra in points)[:k]


@pytest.mark.parametrize("count, scan_max", [(300, 10_000), (300, 0), (5000, 10_000), (5000, 0), (40, 0)])
def test_nearest_matches_brute_force(count, scan_max):
    """Scan, cell list (both block sizes) and the KD-tree fallback all give the true k nearest."""
    rng = random.Random(count + scan_max)
    size = lambda: max(1, int(2 ** rng.uniform(0, 14)))  # noqa: E731
    problems = {MatmulProblem(size(), size(), size(), batch=rng.choice([1, 1, 2, 16])) for _ in range(count)}
    records = [make_record(p.m, p.n, p.k, batch=p.batch, machine=LOCAL if rng.random() < 0.7 else FOREIGN)
               for p in problems]
    index = ScheduleIndex(records, LOCAL, LookupSettings(scan_max=scan_max))
    points = [(r.problem.features(), 0.0 if r.machine == LOCAL else 2.0) for r in records]
    for _ in range(300):
        query = MatmulProblem(size(), size(), max(1, int(2 ** rng.uniform(0, 24))), batch=rng.choice([1, 3, 64]))
        k = rng.choice([1, 1, 3])
        got = [m.distance for m in index.nearest(query, k)]
        assert got == pytest.approx(_reference(points, query, k), abs=1e-9)
    if count == 40:     # sparse: the cell blocks cannot prove an answer, so the KD-tree was used
        assert any(p._tree is not None for p in index._local.values())


def test_importing_the_package_does_not_import_sklearn():
    code = "import sys, looptune.database; assert 'sklearn' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
