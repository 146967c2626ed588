"""Runtime settings: a typed value, taken from the environment once, changed with ``configure``.

The variables themselves are read and checked in ``looptune.runtime.compiler.environment``
(the one place LoopTune reads its environment); this module turns them into
``RuntimeSettings`` and decides which database paths are usable.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Optional

from looptune.runtime.compiler import environment
from looptune.runtime.compiler.dispatch import SMALL_FLOPS
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.workload import MAX_THREADS

FALLBACKS = ("nearest", "tune", "off")

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def default_threads(env: Optional[Mapping[str, str]] = None) -> int:
    """As numpy's OpenBLAS would: the thread variables (``environment.num_threads``), else
    every core this process may run on, as detected."""
    return environment.num_threads(env) or detect_cpu().cores


def not_a_database_file(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` cannot be a database file (it exists and is a FIFO, device, directory ...),
    or None when it is a regular file or does not exist.  Looks with ``stat``, never opens it:
    opening a FIFO blocks until someone writes to it."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return f"{path}: cannot be examined: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return f"{path} is {kind}, not a schedule database file"


def usable_user_db(path: str | os.PathLike | None, source: str = "user_db") -> Optional[Path]:
    """``path`` as the user database; None (no user database) when it is None, or, with a
    warning naming ``source``, when it exists but is not a regular file."""
    if path is None:
        return None
    path = Path(path).expanduser()
    reason = not_a_database_file(path)
    if reason is not None:
        environment.warn_once(f"{source}: {reason}; serving without a user database")
        return None
    return path


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
    small_flops: float = SMALL_FLOPS      # problems below this run single-threaded whatever is asked
    db_recheck_s: float = 1.0             # how often a running process looks for changed databases (0: never)
    numpy_handoff: bool = True            # serve numpy where the exact record says no kernel beat it
    # opt-in: float32 problems compute in bfloat16 (inputs rounded to bf16, float32 accumulation;
    # about 3 significant digits, faster where the CPU has AMX or AVX512-BF16); results stay float32
    float32_via_bfloat16: bool = False

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if isinstance(self.threads, bool) or not (isinstance(self.threads, int) and 1 <= self.threads <= MAX_THREADS):
            raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {self.threads!r}")
        if not isinstance(self.float32_via_bfloat16, bool):
            raise ValueError(f"float32_via_bfloat16 must be True or False, got {self.float32_via_bfloat16!r}")
        if not 0 < self.tune_budget_s < float("inf"):
            raise ValueError(f"tune_budget_s must be a positive number of seconds, got {self.tune_budget_s!r}")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "RuntimeSettings":
        """The settings the environment asks for (``looptune.runtime.compiler.environment``);
        an unusable value is named in a warning and its default applies."""
        embedded = embedded_db_path()
        return cls(
            fallback=environment.choice("LOOPTUNE_FALLBACK", FALLBACKS, cls.fallback, env),
            tune_budget_s=environment.positive_seconds("LOOPTUNE_TUNE_BUDGET", cls.tune_budget_s, env),
            threads=default_threads(env),
            user_db=usable_user_db(environment.user_db_path(env), "LOOPTUNE_DB"),
            embedded_db=embedded if embedded.exists() and not environment.flag("LOOPTUNE_NO_EMBEDDED_DB", env) else None,
            numpy_handoff=not environment.flag("LOOPTUNE_NO_NUMPY_HANDOFF", env),
        )

    def updated(self, **changes) -> "RuntimeSettings":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown runtime settings {unknown}; known: {sorted(known)}")
        if "user_db" in changes:
            changes["user_db"] = usable_user_db(changes["user_db"])
        return replace(self, **changes)
