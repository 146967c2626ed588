"""``looptune build-db``: tune every problem of a family into the schedule database, resumably.

    from looptune.tuner.ship.builddb import build_db
    report = build_db(problems, "schedules.h5", budget_s=2.0)

The driver is the database's only writer.  Executors (``executors.SerialExecutor`` in this
process, ``distributed``'s local process pool or Dask workers on other machines) tune problems
and hand back *records* as JSON; the driver commits them through the database's atomic
``commit`` (lock, merge, write a temporary, fsync, rename), at most ``commit_interval_s`` apart.
So:

* a rerun skips every problem that already has a record for the target machine;
* Ctrl-C or SIGTERM stops submitting, commits what finished, and returns a report with
  ``interrupted=True``;
* kill -9 loses at most the records of the last ``commit_interval_s``, never the database.

Which tuner runs is ``tuners.make_tuner``'s choice; how a result becomes a record (and why a
problem too large for the budget is recorded *unverified*, so a rerun skips it) is
``records_from_results``'.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from looptune.database import MachineKey, Record, commit, load
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.search.budget import MAX_BUDGET_S
from looptune.tuner.ship.executors import Executor, SerialExecutor
from looptune.tuner.ship.tuners import Tuner


@dataclass
class BuildReport:
    total: int = 0              # distinct problems asked for
    skipped: int = 0            # already in the database for the target machine
    done: int = 0               # tuned and committed in this run
    failed: int = 0
    refused: int = 0            # problems no worker would take (machine mismatch, no free core)
    interrupted: bool = False
    seconds: float = 0.0
    tune_seconds: list[float] = field(default_factory=list)     # per finished problem, on its worker
    failures: list[tuple[str, str]] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)        # tuned GFLOPS / numpy GFLOPS
    workers: dict[str, int] = field(default_factory=dict)      # host:pid -> problems tuned there
    problems: list[MatmulProblem] = field(default_factory=list)  # every distinct problem asked for

    @property
    def geomean_speedup(self) -> Optional[float]:
        """Geometric mean of tuned GFLOPS over numpy GFLOPS of the problems tuned in this run."""
        if not self.speedups:
            return None
        return math.exp(sum(math.log(s) for s in self.speedups) / len(self.speedups))

    @property
    def remaining(self) -> int:
        return self.total - self.skipped - self.done

    def summary(self) -> str:
        parts = [f"{self.done} tuned", f"{self.skipped} already in the database", f"{self.failed} failed"]
        if self.refused:
            parts.append(f"{self.refused} refused by every worker")
        text = ", ".join(parts) + f" of {self.total} problems in {self.seconds:.1f} s"
        if self.tune_seconds:
            text += f" ({sum(self.tune_seconds) / len(self.tune_seconds):.2f} s per problem on a worker)"
        if self.speedups:
            text += f"; geomean {self.geomean_speedup:.2f}x numpy"
        if self.interrupted:
            text += f"; interrupted: {self.remaining} left, rerun the same command to resume"
        return text


def plan(problems: Iterable[MatmulProblem], db_path: str | os.PathLike, machine) -> tuple[list[MatmulProblem], list[MatmulProblem]]:
    """(to tune, already done): distinct problems in input order, split by whether the database
    holds a record for ``machine``.  A damaged database raises rather than being rebuilt over."""
    distinct = list(dict.fromkeys(problems))
    done_keys: set[str] = set()
    if os.path.exists(db_path):
        done_keys = {r.problem.key() for r in load(db_path) if r.machine == machine}
    return [p for p in distinct if p.key() not in done_keys], [p for p in distinct if p.key() in done_keys]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt in the main thread) while building."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:          # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm          # loaded only when a bar is drawn; a broken install draws none
    except ImportError:
        return None
    return tqdm(total=total, unit="problem", desc="build-db", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 10.0, smoothing=0.1)


def build_db(problems: Iterable[MatmulProblem], db_path: str | os.PathLike, *, budget_s: float = 2.0,
             executor: Optional[Executor] = None, tuner: Tuner | str | None = None, machine=None,
             commit_interval_s: float = 1.0, progress: bool = False,
             on_reply: Optional[Callable[[MatmulProblem, dict], None]] = None,
             order_seed: Optional[int] = None) -> BuildReport:
    """Tune every problem lacking a record for ``machine`` (default: this machine) and commit
    the records to ``db_path``.  Returns a report; Ctrl-C/SIGTERM end it early with
    ``interrupted=True`` after committing what finished.

    ``executor``: where problems run (default ``SerialExecutor`` with ``tuner``); closed on return.
    ``order_seed``: shuffle the to-do list (a partial build then covers the family evenly).
    """
    t0 = time.perf_counter()
    budget_s = min(budget_s, MAX_BUDGET_S)      # a huge budget means "no limit": keep its arithmetic finite
    db_path = os.fspath(db_path)
    machine = machine or MachineKey.current()
    todo, done = plan(problems, db_path, machine)
    report = BuildReport(total=len(todo) + len(done), skipped=len(done), problems=todo + done)
    if order_seed is not None:
        random.Random(order_seed).shuffle(todo)
    if not todo:
        if executor is not None:
            executor.close()
        report.seconds = time.perf_counter() - t0
        return report
    if executor is None:
        executor = SerialExecutor(budget_s, machine, tuner)
    pending: list[Any] = []
    last_commit = time.monotonic()

    def flush() -> None:
        nonlocal last_commit
        if pending:
            commit(db_path, pending)
            report.done += sum(r.verified for r in pending)     # the others are failures, counted as such
            pending.clear()
        last_commit = time.monotonic()

    bar = _progress_bar(len(todo), progress)

    def handle(problem: MatmulProblem, reply: dict) -> None:
        status = reply.get("status")
        record = Record.from_json(reply["record"]) if status in ("ok", "failed") and "record" in reply else None
        if record is not None and record.machine != machine:   # an executor's job, checked again at the one writer
            status, record, reply = "refused", None, {**reply, "error": "record's machine differs from the target"}
        if record is not None:
            pending.append(record)          # a failure's record too: the problem too large for the budget
        if status == "ok":
            report.tune_seconds.append(float(reply.get("seconds", 0.0)))
            if record.numpy_gflops > 0 and record.gflops_median > 0:
                report.speedups.append(record.gflops_median / record.numpy_gflops)
            where = f"{reply.get('host', '?')}:{reply.get('pid', '?')}"
            report.workers[where] = report.workers.get(where, 0) + 1
        if status == "failed":
            report.failed += 1
            report.failures.append((problem.key(), str(reply.get("error", ""))[:500]))
        elif status == "refused":
            report.refused += 1
            report.failures.append((problem.key(), "refused: " + str(reply.get("error", ""))[:500]))
        if on_reply is not None:
            on_reply(problem, reply)
        if time.monotonic() - last_commit >= commit_interval_s:
            flush()
        if bar is not None:
            bar.update(1)
            if report.speedups:
                bar.set_postfix_str(f"{report.geomean_speedup:.2f}x numpy, {report.failed} failed", refresh=False)

    try:
        with _sigterm_as_interrupt():
            try:
                for problem, reply in executor.run(todo):
                    handle(problem, reply)
            except KeyboardInterrupt:
                report.interrupted = True
                with _ignore_interrupts():
                    flush()
                if bar is not None:
                    bar.set_description_str("build-db: stopping, running problems finish (Ctrl-C again: now)")
                try:
                    for problem, reply in executor.drain():
                        handle(problem, reply)
                except KeyboardInterrupt:
                    abort = getattr(executor, "abort", None)
                    if abort is not None:
                        abort()
    finally:
        try:
            with _ignore_interrupts():
                executor.close()
        finally:
            with _ignore_interrupts():
                flush()                    # what finished is kept, whatever ended the loop
            if bar is not None:
                bar.close()
            report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _ignore_interrupts() -> Iterator[None]:
    """A second Ctrl-C (or a SIGTERM) while the finished records are being committed must not lose them."""
    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
