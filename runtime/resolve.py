"""Problem -> schedule -> kernel, with the databases, the fallback policy and the kernel caches.

Resolution for a problem the process has not seen yet:

1. an exact record (the user's database wins over the embedded default),
2. else the nearest record of the family within ``max_distance`` (log2 size units),
3. else the fallback: ``nearest`` takes the nearest record at any distance (or the analytic
   default when the family is empty), ``tune`` serves that too while a background thread
   tunes the problem and swaps in the result, ``off`` uses the analytic default.

Records are traces: they are replayed and checked against the schedule grammar, then
compiled here (kernels are never loaded from a database).  A record whose trace does
not replay is skipped.  Kernels are cached by schedule (every shape of a family shares
one), in memory and on disk.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from looptune.runtime.compiler.machine import detect_cpu

from looptune.runtime.compiler.build import BuildError, BuildSettings, build, compiler_identity
from looptune.runtime.compiler.codegen import CODEGEN_VERSION, render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.ir import ScheduleError
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.hooks import live_tuner
from looptune.runtime.settings import RuntimeSettings

log = logging.getLogger("looptune.runtime")


@dataclass(frozen=True)
class Resolution:
    """Where a problem's schedule came from."""

    problem: MatmulProblem
    source: str                        # exact | nearest | tuned | default
    schedule: Schedule
    distance: Optional[float] = None   # log2 size units to the record's problem (0 for exact)
    record_problem: Optional[str] = None
    database: Optional[str] = None     # path of the database the record came from
    expected_gflops: Optional[float] = None
    numpy_gflops: Optional[float] = None
    tuning: bool = False               # a live tuning of this problem is under way

    def describe(self) -> str:
        lines = [f"problem:   {self.problem}", f"source:    {self.source}"]
        if self.record_problem:
            lines.append(f"record:    {self.record_problem} from {self.database} (distance {self.distance:.3f})")
        if self.expected_gflops:
            ratio = f" ({self.expected_gflops / self.numpy_gflops:.2f}x numpy)" if self.numpy_gflops else ""
            lines.append(f"expected:  {self.expected_gflops:.1f} GFLOPS{ratio}")
        if self.tuning:
            lines.append("tuning:    in progress (calls use the schedule above meanwhile)")
        lines.append(f"trace:     {self.schedule.trace}")
        p = self.problem
        lines.append(self.schedule.nest.pretty(dict(b=p.batch, m=p.m, n=p.n, k=p.k)))
        return "\n".join(lines)


def current_machine():
    from looptune.database import MachineKey

    return MachineKey.current(compiler_identity(BuildSettings.from_env().compiler), CODEGEN_VERSION)


class _Databases:
    """The user's and the embedded database, loaded on first use; a broken file is logged and skipped."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.paths = [p for p in (settings.user_db, settings.embedded_db) if p is not None]
        self._indexes: Optional[list] = None
        self._lock = threading.Lock()

    def indexes(self) -> list:
        if self._indexes is None:
            with self._lock:
                if self._indexes is None:
                    self._indexes = self._load()
        return self._indexes

    def _load(self) -> list:
        out = []
        if not self.paths:
            return out
        from looptune.database import DatabaseError, ScheduleIndex, load

        machine = current_machine()
        for path in self.paths:
            if not Path(path).exists():
                continue
            try:
                out.append((str(path), ScheduleIndex(load(path), machine)))
            except (DatabaseError, OSError) as e:
                log.warning("looptune: ignoring schedule database %s: %s", path, e)
        return out

    def invalidate(self) -> None:
        with self._lock:
            self._indexes = None


class Resolver:
    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.databases = _Databases(settings)
        self.build_settings = BuildSettings.from_env()
        self._lock = threading.Lock()
        self._dispatch: dict[tuple, tuple[Kernel, Resolution]] = {}
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._kernels: dict[tuple[str, str], Kernel] = {}
        self._tuning: set[tuple] = set()

    # ---- the per-call entry: must stay cheap on a hit -------------------------------------
    def lookup(self, key: tuple, problem_factory) -> tuple[Kernel, Resolution]:
        hit = self._dispatch.get(key)
        if hit is not None:
            return hit
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:                      # one compile per cold key; other keys proceed in parallel
            hit = self._dispatch.get(key)
            if hit is None:
                problem = problem_factory()
                resolution = self.resolve(problem)
                try:
                    kernel = self.kernel(resolution.schedule, problem.dtype)
                except BuildError as e:
                    if resolution.source == "default":
                        raise
                    # never fail the user's call over a stored schedule: use the analytic default
                    log.warning("looptune: schedule for %s failed to build, using the default: %s", problem, e)
                    resolution = Resolution(problem, "default", default_schedule(problem))
                    kernel = self.kernel(resolution.schedule, problem.dtype)
                hit = (kernel, resolution)
                self._dispatch[key] = hit
                if resolution.tuning:
                    self._start_tuning(key, problem)
        return hit

    # ---- resolution --------------------------------------------------------------------------
    def resolve(self, problem: MatmulProblem) -> Resolution:
        best = None          # (distance, not user, path, match, schedule)
        for rank, (path, index) in enumerate(self.databases.indexes()):
            try:
                matches = index.nearest(problem.key(), 3) if index.exact(problem.key()) is None else [index.best(problem.key())]
            except Exception as e:  # a lookup must never take the caller down
                log.warning("looptune: lookup in %s failed: %s", path, e)
                continue
            for match in matches:
                if match is None:
                    continue
                try:
                    sched = Schedule.from_trace(match.record.trace)
                except ScheduleError as e:
                    log.warning("looptune: record for %s in %s does not replay: %s", match.record.problem, path, e)
                    continue
                cand = (0.0 if match.exact else match.distance, rank, path, match, sched)
                if best is None or cand[:2] < best[:2]:
                    best = cand
                break
        mode = self.settings.fallback
        if best is not None:
            distance, _, path, match, sched = best
            rec = match.record
            close = match.exact or distance <= self.settings.max_distance
            if close or mode == "nearest" or mode == "tune":
                return Resolution(problem, "exact" if match.exact else "nearest", sched, distance, rec.problem.key(),
                                  path, rec.gflops_median if match.exact else None, rec.numpy_gflops if match.exact else None,
                                  tuning=(not close and mode == "tune"))
        return Resolution(problem, "default", default_schedule(problem), tuning=(mode == "tune"))

    def kernel(self, schedule: Schedule, dtype: str) -> Kernel:
        key = (schedule.to_json(), dtype)
        k = self._kernels.get(key)
        if k is None:
            result = build(render(schedule, dtype), self.build_settings)
            if not result.ok:
                raise BuildError(f"looptune kernel build failed: {result.error}")
            k = self._kernels[key] = Kernel(result.so_path, result.symbol, dtype)
        return k

    # ---- live tuning ----------------------------------------------------------------------------
    def _start_tuning(self, key: tuple, problem: MatmulProblem) -> None:
        with self._lock:
            if key in self._tuning:
                return
            self._tuning.add(key)
        threading.Thread(target=self._tune, args=(key, problem), name=f"looptune-tune-{problem.key()}",
                         daemon=True).start()

    def _tune(self, key: tuple, problem: MatmulProblem) -> None:
        try:
            tuner = live_tuner()
            if tuner is None:
                raise RuntimeError("no live tuner is registered (is the looptune package installed?)")
            user_db = str(self.settings.user_db) if self.settings.user_db is not None else None
            if user_db is not None:
                Path(user_db).parent.mkdir(parents=True, exist_ok=True)
            outcome = tuner(problem, self.settings.tune_budget_s, user_db)
            if outcome is None:
                raise RuntimeError("no candidate ran")
            kernel = self.kernel(outcome.schedule, problem.dtype)
            resolution = Resolution(problem, "tuned", outcome.schedule, 0.0, problem.key(), user_db,
                                    outcome.gflops, outcome.numpy_gflops)
            self._dispatch[key] = (kernel, resolution)
            self.databases.invalidate()
        except Exception as e:
            log.warning("looptune: live tuning of %s failed: %s", problem, e)
        finally:
            with self._lock:
                self._tuning.discard(key)

    def reset_after_fork(self) -> None:
        """Locks held by threads that do not exist in the child would deadlock it: start afresh
        (compiled kernels stay valid, they are plain code)."""
        self._lock = threading.Lock()
        self._key_locks = {}
        self._tuning = set()
        self.databases._lock = threading.Lock()
