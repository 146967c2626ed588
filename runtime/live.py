"""Live tuning (``fallback="tune"``): one bounded queue, one problem measured at a time.

A cold shape is served at once (nearest record or the analytic default) and queued here.  One
worker thread, ``looptune-live-tune``, takes the queue in order and hands each problem to the
registered live tuner (``looptune.runtime.hooks``), which measures candidates in its own
processes and stores the winner in the user database.  One at a time because measurements
taken side by side on the same cores time each other, not the kernels: 20 cold shapes on 2
cores used to start 19 tuning threads and 40 measurement processes, and stored records slower
than numpy.  The queue holds at most ``max_queued`` problems; more are served untuned (and
logged once each), a shape is queued once, and the worker exits when the queue is empty, so
an idle process has no tuning thread.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Hashable, Optional

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.hooks import LiveTuneResult, live_tuner

log = logging.getLogger("looptune.runtime")

Done = Callable[[Hashable, MatmulProblem, LiveTuneResult], None]


class LiveTuningQueue:
    def __init__(self, budget_s: float, user_db: Optional[str], on_tuned: Done, *, max_queued: int = 64) -> None:
        self.budget_s = budget_s
        self.user_db = user_db
        self.max_queued = max_queued
        self._on_tuned = on_tuned
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Hashable, MatmulProblem]] = collections.deque()
        self._seen: set[Hashable] = set()
        self._worker: Optional[threading.Thread] = None
        self._idle = threading.Event()
        self._idle.set()
        self.tuned = 0
        self.failed = 0
        self.dropped = 0

    def submit(self, key: Hashable, problem: MatmulProblem) -> bool:
        """Queue ``problem`` for tuning; False when it was queued before or the queue is full."""
        with self._lock:
            if key in self._seen:
                return False
            if len(self._queue) >= self.max_queued:
                self.dropped += 1
                log.info("looptune: live-tuning queue full (%d); %s is served untuned", self.max_queued, problem)
                return False
            self._seen.add(key)
            self._queue.append((key, problem))
            self._idle.clear()
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="looptune-live-tune", daemon=True)
                self._worker.start()
        return True

    def wait(self, timeout_s: Optional[float] = None) -> bool:
        """Block until the queue is drained (tests, tools); True if it was."""
        return self._idle.wait(timeout_s)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    self._idle.set()
                    return
                key, problem = self._queue.popleft()
            self._tune_one(key, problem)

    def _tune_one(self, key: Hashable, problem: MatmulProblem) -> None:
        try:
            tuner = live_tuner()
            if tuner is None:
                raise RuntimeError("no live tuner is registered (is the looptune package installed?)")
            outcome = tuner(problem, self.budget_s, self.user_db)
            if outcome is None:
                raise RuntimeError("no candidate ran")
            if self.user_db is not None and not outcome.stored:
                log.warning("looptune: %s tuned, but could not store: %s (served in this process only)",
                            problem, outcome.store_error or f"the live tuner did not write {self.user_db}")
            self._on_tuned(key, problem, outcome)
            self.tuned += 1
        except Exception as e:  # noqa: BLE001 - a failed tuning leaves the untuned kernel in place
            self.failed += 1
            log.warning("looptune: live tuning of %s failed: %s", problem, e)

    def reset_after_fork(self) -> None:
        """In a forked child the worker thread does not exist: forget the queue."""
        self._lock = threading.Lock()
        self._seen.difference_update(key for key, _ in self._queue)     # still to tune: the child may queue them
        self._queue.clear()
        self._worker = None
        self._idle = threading.Event()
        self._idle.set()
