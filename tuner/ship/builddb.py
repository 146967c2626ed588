"""``looptune build-db``: tune every problem of a family into the schedule database, resumably.

    from looptune.tuner.ship.builddb import build_db, SerialExecutor
    report = build_db(problems, "schedules.h5", budget_s=2.0)

The driver is the database's only writer.  Executors (in this process, a local process
pool, Dask workers on other machines) tune problems and hand back *records* as JSON; the
driver commits them through the database's atomic ``commit`` (lock, merge, write a
temporary, fsync, rename), at most ``commit_interval_s`` apart.  So:

* a rerun skips every problem that already has a record for the target machine;
* Ctrl-C or SIGTERM stops submitting, commits what finished, and returns a report with
  ``interrupted=True``;
* kill -9 loses at most the records of the last ``commit_interval_s``, never the database.

A *tuner* is any callable ``tuner(problem, budget_s) -> outcome`` whose outcome carries the
best ``schedule`` and its measurement (``looptune.tuner.search.tune.TuneResult``, or anything
with ``schedule``, ``gflops``, ``numpy_gflops``); ``make_tuner`` names the built-in ones.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule


# ----------------------------------------------------------------------------- tuners

@dataclass(frozen=True)
class Outcome:
    """A tuner's answer, normalized: what a database record needs."""

    schedule: Optional[Schedule]
    gflops: float = 0.0
    gflops_spread: float = 0.0         # absolute (GFLOPS), as the database stores it
    numpy_gflops: float = 0.0
    found_by: str = ""
    policy: str = ""
    candidates: int = 0
    ok: bool = False
    error: str = ""


def normalize(outcome: Any) -> Outcome:
    """``TuneResult`` (or any object with ``schedule``, ``gflops``, ``numpy_gflops``) -> ``Outcome``."""
    if isinstance(outcome, Outcome):
        return outcome
    result = getattr(outcome, "result", None)
    gflops = getattr(outcome, "gflops", None)
    if gflops is None and result is not None:
        gflops = getattr(result, "gflops", None)
    gflops = float(gflops or 0.0)
    numpy_gflops = getattr(outcome, "numpy_gflops", None)
    if numpy_gflops is None and result is not None:
        numpy_gflops = getattr(result, "numpy_gflops", None)
    spread = getattr(outcome, "gflops_spread", None)
    if spread is None:
        rel = getattr(result, "rel_spread", None) if result is not None else None
        spread = (rel or 0.0) * gflops
    ok = getattr(outcome, "ok", None)
    ok = bool(gflops > 0) if ok is None else bool(ok) and gflops > 0
    error = getattr(outcome, "error", "") or (getattr(result, "error", "") if result is not None else "")
    return Outcome(
        schedule=getattr(outcome, "schedule", None),
        gflops=gflops, gflops_spread=float(spread or 0.0), numpy_gflops=float(numpy_gflops or 0.0),
        found_by=str(getattr(outcome, "found_by", None) or getattr(outcome, "search", "") or ""),
        policy=str(getattr(outcome, "policy", "") or ""),
        candidates=int(getattr(outcome, "candidates", 0) or 0),
        ok=ok and getattr(outcome, "schedule", None) is not None,
        error=str(error or ""))


class Tuner(Protocol):
    def __call__(self, problem: MatmulProblem, budget_s: float) -> Any: ...


class AgentTuner:
    """The shipped policy (``looptune.tuner.search.tune``), with one measurement runner shared by
    every problem of the build (a fresh runner per problem costs a process start)."""

    name = "agent"

    def __init__(self) -> None:
        module = importlib.import_module("looptune.tuner.search.tune")
        self._tune = getattr(module, "tune", None)
        self._tune_problem = getattr(module, "tune_problem", None)
        if self._tune is None and self._tune_problem is None:
            raise ImportError("looptune.tuner.search.tune has neither tune nor tune_problem")
        self._shares_runner = self._tune is not None and "evaluator" in inspect.signature(self._tune).parameters
        self._evaluator = None

    def __call__(self, problem: MatmulProblem, budget_s: float) -> Any:
        if self._shares_runner:
            if self._evaluator is None:
                from looptune.tuner.measure.evaluator import Evaluator
                self._evaluator = Evaluator.local()
            # the Evaluator's memo grows with every problem: results never repeat across problems
            self._evaluator.store = type(self._evaluator.store)()
            return self._tune(problem, budget=budget_s, evaluator=self._evaluator)
        if self._tune is not None:
            return self._tune(problem, budget=budget_s)
        return self._tune_problem(problem, budget_s=budget_s, db_path=None)   # never let it write: one writer

    def close(self) -> None:
        if self._evaluator is not None:
            self._evaluator.close()
            self._evaluator = None


class SearchTuner:
    """Random search over the BLIS-shaped blocking space, best measured of N under the budget.

    The stand-in when the agent's ``looptune.tuner.search.tune`` is not importable: the analytic
    default first, then batches of random blocking points (compiled in parallel, timed
    serially), never starting a batch the remaining budget cannot pay for.
    """

    name = "search"

    def __init__(self, batch: int = 4, seed: int = 0) -> None:
        self.batch = batch
        self.seed = seed
        self._runner = None

    def __call__(self, problem: MatmulProblem, budget_s: float) -> Outcome:
        from looptune.runtime.compiler.build import build_many
        from looptune.runtime.compiler.codegen import render

        from looptune.tuner.measure.evaluator import TUNE_MEASURE
        from looptune.tuner.measure.runner import Candidate, LocalRunner
        from looptune.tuner.search.spaces import blocking_candidates

        t0 = time.perf_counter()
        if self._runner is None:
            self._runner = LocalRunner(TUNE_MEASURE)
        points = blocking_candidates(problem, 64, seed=self.seed)
        schedules = [p.schedule() for p in points]
        best: Optional[tuple[Any, Schedule]] = None
        measured, per_candidate, errors = 0, None, []
        for start in range(0, len(schedules), self.batch):
            chunk = schedules[start:start + self.batch]
            left = budget_s - (time.perf_counter() - t0)
            if per_candidate is not None:
                if left < per_candidate:
                    break
                chunk = chunk[:max(1, int(left / per_candidate))]
            t1 = time.perf_counter()
            builds = build_many([render(s, problem.dtype) for s in chunk])
            results = self._runner.run([Candidate.from_build(problem, b, s.to_json()) for s, b in zip(chunk, builds)])
            per_candidate = (time.perf_counter() - t1) / len(chunk)
            measured += len(chunk)
            for s, r in zip(chunk, results):
                if r.ok and r.gflops and (best is None or r.gflops > best[0].gflops):
                    best = (r, s)
                elif not r.ok:
                    errors.append(f"{r.status.value}: {r.error}")
        if best is None:
            return Outcome(schedules[0], candidates=measured, found_by="search",
                           error=errors[0] if errors else "nothing was measured")
        r, s = best
        return Outcome(s, float(r.gflops), float((r.rel_spread or 0.0) * r.gflops), float(r.numpy_gflops or 0.0),
                       found_by="random-search" if s is not schedules[0] else "default", policy="none",
                       candidates=measured, ok=True)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def make_tuner(spec: str | None = None) -> Tuner:
    """``None``/``"auto"``: the agent if ``looptune.tuner.search.tune`` imports, else random search;
    ``"agent"``, ``"search"``; or ``"package.module:name"``: a callable ``f(problem, budget_s)``
    (a class is instantiated first, so it can keep state such as a runner)."""
    spec = spec or "auto"
    if spec in ("auto", "agent"):
        try:
            return AgentTuner()
        except ImportError:
            if spec == "agent":
                raise
            return SearchTuner()
    if spec == "search":
        return SearchTuner()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"tuner must be auto, agent, search or 'module:callable', got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if inspect.isclass(obj) else obj


def close_tuner(tuner: Any) -> None:
    close = getattr(tuner, "close", None)
    if callable(close):
        close()


# ----------------------------------------------------------------------------- records

def target_machine():
    """The machine key of this process (what the runtime here will look records up under)."""
    from looptune.runtime.resolve import current_machine

    return current_machine()


def to_record(problem: MatmulProblem, outcome: Outcome, machine) -> Any:
    """A database ``Record`` for a successful outcome (measured means verified: the runner
    checks every kernel against numpy before timing it)."""
    from looptune.database import ProblemKey, Record

    def clean(text: str) -> str:   # record tokens: [A-Za-z0-9_.:/@+=-]
        return "".join(c if c.isalnum() or c in "_.:/@+=-" else "-" for c in text)[:128]

    key = ProblemKey(problem.m, problem.n, problem.k, batch=problem.batch, dtype=problem.dtype,
                     layout=problem.layout, threads=problem.threads)
    return Record(key, machine, outcome.schedule.trace, float(outcome.gflops), float(outcome.gflops_spread),
                  float(outcome.numpy_gflops), True, policy=clean(outcome.policy or "none"),
                  search=clean(outcome.found_by or "tune"), budget=int(outcome.candidates))


def store_result(result: Any, db_path: str) -> Any:
    """Commit a tune result (``TuneResult`` or ``Outcome``) for this machine; returns the record,
    or None when nothing verified was found."""
    from looptune.database import commit

    outcome = normalize(result)
    if not outcome.ok or outcome.schedule is None:
        return None
    record = to_record(result.problem, outcome, target_machine())
    commit(db_path, [record])
    return record


def run_one(problem: MatmulProblem, budget_s: float, tuner: Tuner, machine) -> dict:
    """Tune one problem: a JSON-able reply ``{"status": "ok", "record": ...}`` or ``"failed"``.
    Never raises for a bad problem or kernel: that is a failed reply, the build goes on."""
    t0 = time.perf_counter()
    base = {"problem": problem.key(), "host": socket.gethostname(), "pid": os.getpid()}
    try:
        outcome = normalize(tuner(problem, budget_s))
        if not outcome.ok:
            return {**base, "status": "failed", "seconds": time.perf_counter() - t0,
                    "error": outcome.error or "no candidate could be measured"}
        record = to_record(problem, outcome, machine)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a tuner bug must not end a thousand-problem build
        return {**base, "status": "failed", "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
    return {**base, "status": "ok", "seconds": time.perf_counter() - t0, "record": record.to_json(),
            "gflops": outcome.gflops, "numpy_gflops": outcome.numpy_gflops}


# ----------------------------------------------------------------------------- executors

class Executor(Protocol):
    """Runs problems somewhere and yields ``(problem, reply)`` as they finish."""

    slots: int

    def run(self, problems: Iterable[MatmulProblem]) -> Iterator[tuple[MatmulProblem, dict]]: ...

    def drain(self) -> Iterator[tuple[MatmulProblem, dict]]:
        """After an interrupt: what was running when it came (may be nothing)."""
        ...

    def close(self) -> None: ...


class SerialExecutor:
    """Tune in this process, one problem at a time."""

    slots = 1

    def __init__(self, budget_s: float, machine, tuner: Tuner | str | None = None) -> None:
        self.budget_s = budget_s
        self.machine = machine
        self._own = not callable(tuner)
        self.tuner = make_tuner(tuner) if self._own else tuner

    def run(self, problems: Iterable[MatmulProblem]) -> Iterator[tuple[MatmulProblem, dict]]:
        for problem in problems:
            yield problem, run_one(problem, self.budget_s, self.tuner, self.machine)

    def drain(self) -> Iterator[tuple[MatmulProblem, dict]]:
        return iter(())        # the interrupt stopped the one running problem itself

    def close(self) -> None:
        if self._own:
            close_tuner(self.tuner)


# ----------------------------------------------------------------------------- the driver

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
        from looptune.database import load

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
        from tqdm import tqdm
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
    from looptune.database import Record, commit

    t0 = time.perf_counter()
    db_path = os.fspath(db_path)
    machine = machine or target_machine()
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
            report.done += len(pending)
            pending.clear()
        last_commit = time.monotonic()

    bar = _progress_bar(len(todo), progress)

    def handle(problem: MatmulProblem, reply: dict) -> None:
        status = reply.get("status")
        if status == "ok":
            record = Record.from_json(reply["record"])
            if record.machine != machine:   # an executor's job, checked again at the one writer
                status, reply = "refused", {**reply, "error": "record's machine differs from the target"}
            else:
                pending.append(record)
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
