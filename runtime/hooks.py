"""The runtime's one way up the stack: the live tuner, registered from above.

The runtime sits below the tuner and never imports it.  ``fallback="tune"`` needs *a*
tuner, so the tuner registers one: ``register_live_tuner(fn)`` from code that has imported
``looptune.tuner`` (it does so on import), or, for applications that never import the tuner,
the ``looptune.live_tuner`` entry point that the installed package declares
(``looptune.tuner.ship.live:tune_and_store``).  Entry points are resolved by name through
package metadata, the same mechanism pytest and setuptools plugins use; nothing here
names the tuner's modules.

A live tuner is ``fn(problem, budget_s, user_db) -> LiveTuneResult | None``: it measures,
stores the winning record in ``user_db`` (when given) and returns the schedule to serve.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.workload import MatmulProblem

ENTRY_POINT_GROUP = "looptune.live_tuner"
log = logging.getLogger("looptune.runtime")


@dataclass(frozen=True)
class LiveTuneResult:
    schedule: Schedule
    gflops: float
    numpy_gflops: Optional[float]
    stored: bool              # the record reached the user database
    store_error: Optional[str] = None   # why it did not, when a user database was given


LiveTuner = Callable[[MatmulProblem, float, Optional[str]], Optional[LiveTuneResult]]

_lock = threading.Lock()
_registered: Optional[LiveTuner] = None


def register_live_tuner(fn: Optional[LiveTuner]) -> None:
    """Make ``fn`` the tuner behind ``fallback="tune"`` (None unregisters)."""
    global _registered
    with _lock:
        _registered = fn


def live_tuner() -> Optional[LiveTuner]:
    """The registered live tuner, else the one the installed package declares, else None."""
    global _registered
    with _lock:
        if _registered is not None:
            return _registered
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                _registered = ep.load()
            except Exception as e:      # a broken plugin must not take the caller down
                log.warning("looptune: the live tuner %s (%s) does not load: %s", ep.name, ep.value, e)
                continue
            return _registered
        return None
