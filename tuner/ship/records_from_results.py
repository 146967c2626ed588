"""Tune results as database records: what ``tune --db``, live tuning and build-db store.

    record = store_result(result, "schedules.h5")     # commit a successful TuneResult for this machine

A successful result is a verified record (the runner checks every kernel against numpy before
timing it).  A problem too large to time within the budget gets ``over_budget_record``: the
analytic default, *unverified* and 0 GFLOPS.  The runtime never serves unverified records, so it
keeps using the analytic default there, and a build-db rerun skips the problem instead of failing
on it again (``looptune db prune --unverified`` drops such records, to retry with a larger budget).
"""
from __future__ import annotations

from typing import Optional

from looptune.database import MachineKey, Record, commit
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.search.loop import TuneResult

OVER_BUDGET = "over-budget"      # the ``search`` of the unverified record of a problem too large for the budget


def _token(text: str) -> str:
    """Record tokens are [A-Za-z0-9_.:/@+=-], at most 128 characters."""
    return "".join(c if c.isalnum() or c in "_.:/@+=-" else "-" for c in text)[:128]


def to_record(problem: MatmulProblem, result: TuneResult, machine) -> Record:
    """A database ``Record`` for a successful result (measured means verified: the runner
    checks every kernel against numpy before timing it)."""
    return Record(problem, machine, result.schedule.trace, float(result.gflops),
                  float(result.gflops_spread), float(result.numpy_gflops or 0.0), True,
                  policy=_token(result.policy or "none"), search=_token(result.found_by or "tune"),
                  candidates=int(result.candidates))


def over_budget_record(problem: MatmulProblem, machine) -> Record:
    """The record of a problem that cannot be timed within the budget: the analytic default,
    unverified (so never served) and 0 GFLOPS; it marks the problem done for reruns."""
    return Record(problem, machine, default_schedule(problem).trace, 0.0, 0.0, 0.0, False,
                  policy="none", search=OVER_BUDGET, candidates=0)


def store_result(result: TuneResult, db_path: str) -> Optional[Record]:
    """Commit a successful tune result for this machine; returns the record, or None when
    nothing verified was found."""
    if not result.ok:
        return None
    record = to_record(result.problem, result, MachineKey.current())
    commit(db_path, [record])
    return record
