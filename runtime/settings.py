"""Runtime settings: a typed value, read from ``LOOPTUNE_*`` variables once, changed with ``configure``."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

FALLBACKS = ("nearest", "tune", "off")
DEFAULT_DB_NAME = "schedules.h5"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(env: dict[str, str] | None = None) -> int:
    """As numpy's OpenBLAS would: LOOPTUNE_NUM_THREADS, else OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS,
    else every core this process may run on."""
    env = os.environ if env is None else env
    for name in ("LOOPTUNE_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return _cpu_count()


def user_db_path(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("LOOPTUNE_DB"):
        return Path(env["LOOPTUNE_DB"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("looptune")) / DEFAULT_DB_NAME


def embedded_db_path() -> Path:
    return Path(__file__).parent / "data" / "default.h5"


@dataclass(frozen=True)
class RuntimeSettings:
    fallback: str = "nearest"             # what to do without an exact or close record
    max_distance: float = 1.0             # nearest records farther than this (log2 size units) count as unknown
    tune_budget_s: float = 2.0            # wall-clock budget of one live tuning
    threads: int = 1                      # default thread count (threads= overrides per call)
    user_db: Path | None = None           # None: no user database
    embedded_db: Path | None = None       # None: no embedded database
    small_flops: float = 1.5e6            # problems below this run single-threaded whatever is asked

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not self.tune_budget_s > 0:
            raise ValueError("tune_budget_s must be positive")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "RuntimeSettings":
        env = os.environ if env is None else env
        fallback = env.get("LOOPTUNE_FALLBACK", "nearest").strip().lower() or "nearest"
        budget = env.get("LOOPTUNE_TUNE_BUDGET", "")
        embedded = embedded_db_path()
        return cls(
            fallback=fallback,
            tune_budget_s=float(budget) if budget else cls.tune_budget_s,
            threads=default_threads(env),
            user_db=None if env.get("LOOPTUNE_DB", None) == "" else user_db_path(env),
            embedded_db=embedded if embedded.exists() and env.get("LOOPTUNE_NO_EMBEDDED_DB") != "1" else None,
        )

    def updated(self, **changes) -> "RuntimeSettings":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown runtime settings {unknown}; known: {sorted(known)}")
        if "user_db" in changes and changes["user_db"] is not None:
            changes["user_db"] = Path(changes["user_db"]).expanduser()
        return replace(self, **changes)
