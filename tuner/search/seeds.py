"""Seeds from the schedule databases: what the nearest tuned problems of the family ran.

``tune()`` starts from what is already known: the user's database and the one shipped in the
package (the runtime's ``Databases``, the files ``looptune.runtime.matmul`` serves from) are
asked for the records of the problem's family nearest to it (``ScheduleIndex.nearest``: log2
sizes, other machines' records behind this machine's).  Their schedules are candidates (a
schedule replays on any size of its family), and a near record of this machine says how fast
kernels and numpy run at about this size, which the real-size cost model uses
(``proxy.Rates``) before anything is measured.

A fused problem (an op with an epilogue) is seeded by its own family's records first, then by
its plain twin's (``MatmulProblem.op`` "matmul"): the loop structure is the same, only the store
stage differs, as the runtime serves a fused problem without records of its own.  The plain
records' rates are not the fused problem's (``seed_rates`` keeps to the family).

Loading takes ~0.3 s (h5py, the index), so ``DatabaseSeeds`` loads in a background thread
started with the tune, while the measurement worker starts; ``get`` waits for it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Optional

from looptune.runtime.compiler.epilogue import PLAIN
from looptune.runtime.compiler.ir import ScheduleError
from looptune.runtime.compiler.schedule import Schedule, canonical_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.search.proxy import Rates

SEEDS = 3                 # records asked of each database
RATES_DISTANCE = 1.0      # a record this near (log2 units: one size doubled) tells the rates

_open: dict = {}          # database paths -> their ``Databases``, loaded once per process
_open_lock = threading.Lock()


@dataclass(frozen=True)
class Seed:
    schedule: Schedule    # canonical
    problem: MatmulProblem
    distance: float       # as ``Match.distance``: log2 units, plus the penalty of another machine's record
    local: bool
    gflops: float
    numpy_gflops: float


def nearest_seeds(problem: MatmulProblem, count: int = SEEDS) -> list[Seed]:
    """Up to ``count`` records from each of the runtime's databases, nearest first; [] when
    there are none (or none can be read: seeding is an optimization, never an error)."""
    # imported here, not at the top: the databases (and h5py) are loaded in a background thread,
    # and ``looptune tune --help`` or a tune without seeds does not pay for them
    from looptune.database.records import MachineKey
    from looptune.runtime.configuration import RuntimeSettings     # (as above)
    from looptune.runtime.databases import Databases               # (as above)

    settings = RuntimeSettings.from_env()
    paths = tuple(p for p in (settings.user_db, settings.embedded_db) if p is not None)
    with _open_lock:        # one loaded index per database and process: build-db tunes many problems
        dbs = _open.get(paths)
        if dbs is None:
            dbs = _open[paths] = Databases(list(paths), MachineKey.current, recheck_s=0)   # no watcher thread
        dbs.check()         # a database that changed since (a file stat each) is loaded again
        indexes = dbs.indexes()
    out: list[Seed] = []
    families = [problem] if problem.op == PLAIN else [problem, replace(problem, op=PLAIN)]
    for _, index in indexes:
        for member in families:
            for match in index.nearest(member, count):
                try:
                    sched = canonical_schedule(Schedule.from_trace(match.record.trace).nest)
                except ScheduleError:
                    continue
                rec = match.record
                out.append(Seed(sched, rec.problem, match.distance, match.local, rec.gflops_median, rec.numpy_gflops))
    out.sort(key=lambda s: (s.distance, not s.local, s.problem.op != problem.op))
    return out


def seed_rates(problem: MatmulProblem, seeds: list[Seed]) -> Optional[Rates]:
    """Kernel and numpy rates of this machine near ``problem`` (None if no record is that near)."""
    near = [s for s in seeds if s.local and s.distance <= RATES_DISTANCE and s.problem.family == problem.family]
    if not near:
        return None
    s = near[0]
    return Rates.measured(s.gflops, s.numpy_gflops, Rates.prior(problem))


class DatabaseSeeds:
    """``nearest_seeds`` in a background thread, started on construction."""

    def __init__(self, problem: MatmulProblem, count: int = SEEDS) -> None:
        self.problem = problem
        self._seeds: list[Seed] = []
        self._waited = False
        self._thread = threading.Thread(target=self._load, args=(count,), daemon=True, name="looptune-seeds")
        self._thread.start()

    def _load(self, count: int) -> None:
        try:
            self._seeds = nearest_seeds(self.problem, count)
        except Exception:      # an unreadable database, a missing h5py: tune without seeds
            self._seeds = []

    def get(self, timeout_s: float = 2.0) -> list[Seed]:
        """The seeds, waiting up to ``timeout_s`` for the load the first time only ([] if it has
        not finished: later calls do not wait again)."""
        if not self._waited:
            self._thread.join(timeout_s)
            self._waited = True
        return [] if self._thread.is_alive() else list(self._seeds)
