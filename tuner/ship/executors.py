"""Where build-db's problems are tuned: the executor protocol, its unit of work, the in-process executor.

    for problem, reply in SerialExecutor(budget_s=2.0, machine=MachineKey.current()).run(problems): ...

An *executor* tunes problems somewhere (this process; ``distributed``'s pinned process pool or
Dask workers) and yields ``(problem, reply)`` as they finish.  Every one runs ``run_one`` per
problem: a JSON-able *reply* carrying the record, never an exception, so a bad problem or kernel
never ends a build.  The driver (``builddb.build_db``) alone commits the records.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Iterable, Iterator, Protocol

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.ship.records_from_results import over_budget_record, to_record
from looptune.tuner.ship.tuners import Tuner, close_tuner, make_tuner


def run_one(problem: MatmulProblem, budget_s: float, tuner: Tuner, machine) -> dict:
    """Tune one problem: a JSON-able reply ``{"status": "ok", "record": ...}`` or ``"failed"``
    (with the unverified ``record`` of a problem too large for the budget).  Never raises for a
    bad problem or kernel: that is a failed reply, the build goes on."""
    t0 = time.perf_counter()
    base = {"problem": problem.key(), "host": socket.gethostname(), "pid": os.getpid()}
    try:
        result = tuner(problem, budget_s)
        if not result.ok:
            reply = {**base, "status": "failed", "seconds": time.perf_counter() - t0,
                     "error": result.error or "no candidate could be measured"}
            if result.over_budget:
                reply["record"] = over_budget_record(problem, machine).to_json()
                reply["error"] += ("; recorded unverified, so a rerun skips it "
                                   "(`looptune db prune --unverified` to retry with a larger --budget)")
            return reply
        record = to_record(problem, result, machine)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a tuner bug must not end a thousand-problem build
        return {**base, "status": "failed", "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
    return {**base, "status": "ok", "seconds": time.perf_counter() - t0, "record": record.to_json(),
            "gflops": result.gflops, "numpy_gflops": result.numpy_gflops}


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
