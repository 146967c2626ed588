"""The live tuner behind ``runtime.configure(fallback="tune")``.

The runtime cannot import the tuner (layers go one way); it finds this function through the
``looptune.live_tuner`` entry point declared in ``pyproject.toml``, unless a program registers another with
``looptune.runtime.hooks.register_live_tuner``.
"""
from __future__ import annotations

import os
from typing import Optional

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.hooks import LiveTuneResult
from looptune.tuner.search.tune import tune
from looptune.tuner.ship.records_from_results import store_result


def tune_and_store(problem: MatmulProblem, budget_s: float, user_db: Optional[str]) -> Optional[LiveTuneResult]:
    """Tune ``problem`` for about ``budget_s`` seconds and store the record in ``user_db``.

    The schedule is returned even when storing fails (an unwritable database must not throw
    away a good measurement); ``stored`` says whether it landed and ``store_error`` why not.
    """
    outcome = tune(problem, budget_s=budget_s)
    if not outcome.ok:
        return None
    stored, store_error = False, None
    if user_db is not None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(user_db)), exist_ok=True)
            stored = store_result(outcome, user_db) is not None
        except Exception as e:  # noqa: BLE001 - the caller still gets the schedule (the runtime logs why)
            store_error = f"{type(e).__name__}: {e}"
    return LiveTuneResult(outcome.schedule, outcome.gflops, outcome.numpy_gflops, stored, store_error)
