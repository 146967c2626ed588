"""The environment variables LoopTune reads, each read and checked here and nowhere else.

The runtime's settings (``looptune.runtime.configuration``), the build settings, CPU detection and
the call trampoline all ask this module; it sits in the bottom layer so that every one of them
may import it.  An unusable value is neither fatal nor silent: a warning names the variable and
its value (once per process, however often settings are read), and the default applies.

Variables (each function below names the one it reads):

    LOOPTUNE_NUM_THREADS     threads of ``runtime.matmul``; else OPENBLAS_NUM_THREADS, else
                             OMP_NUM_THREADS (as numpy's OpenBLAS reads them), else every core
                             this process may run on; capped at MAX_THREADS
    LOOPTUNE_DB              the user's schedule database; set but empty: none
    LOOPTUNE_NO_EMBEDDED_DB  1: ignore the database shipped in the package
    LOOPTUNE_FALLBACK        nearest, tune or off (``looptune.runtime.configuration``)
    LOOPTUNE_TUNE_BUDGET     seconds of one live tuning
    LOOPTUNE_CC              the C compiler; else CC, else cc
    LOOPTUNE_CACHE_DIR       where compiled kernels are cached
    LOOPTUNE_ISA             cap the generated code's vector ISA (portable, neon, avx2, avx512);
                             LOOPTUNE_NO_AVX512=1 is the older spelling of avx2
    LOOPTUNE_BF16            cap how bfloat16 kernels compute (convert, avx512bf16, amx; see
                             ``machine.BF16_LEVELS``): convert forces the portable path
    LOOPTUNE_NO_TRAMPOLINE   1: call kernels through cffi only
    LOOPTUNE_NO_POOL         1: parallel kernels run on OpenMP, not LoopTune's thread pool
    LOOPTUNE_BLAS_POOL       1: numpy's (and scipy's) OpenBLAS runs its parallel calls on LoopTune's
                             pool too, so the process has one pool (off by default: see pool.py)
    LOOPTUNE_POOL_SPIN_US    microseconds the pool's idle workers spin before they sleep
                             (default POOL_WORKER_SPIN_US; 0: sleep at once)
    LOOPTUNE_NO_NUMPY_HANDOFF  1: serve generated kernels even where the record says numpy was
                             faster (benchmarks of the generated code alone)

Variables set, not read (the one exception): ``set_openmp_wait_policy`` gives libgomp, which
runs the kernels' parallel loops, a short spin before its idle threads sleep
(``GOMP_SPINCOUNT``, see ``OPENMP_SPIN_COUNT``), unless the user set ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` themselves.  libgomp reads them once, when it is loaded.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from looptune.runtime.compiler.workload import MAX_THREADS

log = logging.getLogger("looptune.runtime")

THREAD_VARIABLES = ("LOOPTUNE_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
DEFAULT_DB_NAME = "schedules.h5"

# libgomp's idle threads spin this many pause-loop iterations after a parallel region before they
# sleep.  Its default, 300000 ("3 ms" by libgomp's estimate, 10-20 ms where a pause takes ~140
# cycles, as on Skylake-SP and later Xeons), holds a core long after our call returns, and numpy's
# OpenBLAS threads wait for the scheduler to take it back.  1000 (10-50 us) still covers
# back-to-back calls and the barrier at the end of a region, then the core is free again.
OPENMP_SPIN_COUNT = "1000"
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

# The thread pool (``looptune.runtime.compiler.pool``): idle workers spin this long after a
# parallel loop before sleeping.  Back-to-back calls (a layer's matmuls, a batch) find them
# awake; a numpy call that follows ours gets the cores back after at most this long.
POOL_WORKER_SPIN_US = 50.0
# A caller whose last iterations run on other threads spins this long before sleeping.
POOL_CALLER_SPIN_US = 2000.0

Environ = Mapping[str, str]

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _environ(env: Optional[Environ]) -> Environ:
    return os.environ if env is None else env


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time this process meets it (settings are read
    more than once: at the first call, and again on ``configure``)."""
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("looptune: %s", message)


def _unusable(name: str, value: str, problem: str) -> None:
    warn_once(f"{name}={value!r} {problem}")


def flag(name: str, env: Optional[Environ] = None) -> bool:
    """A switch: on for ``1``; unset, empty or ``0`` is off, anything else is off with a warning."""
    value = _environ(env).get(name, "")
    if value.strip() not in ("", "0", "1"):
        _unusable(name, value, "is not 0 or 1; treated as 0")
    return value.strip() == "1"


def num_threads(env: Optional[Environ] = None) -> Optional[int]:
    """The thread count the environment asks for: the first of ``THREAD_VARIABLES`` that holds a
    positive integer (``OMP_NUM_THREADS``'s nested form ``4,2`` gives 4), capped at
    ``MAX_THREADS``; None when none does.  A set variable that is not a positive integer is
    skipped with a warning."""
    env = _environ(env)
    for name in THREAD_VARIABLES:
        value = env.get(name, "")
        if not value.strip():
            continue
        try:
            count = int(value.split(",")[0])
        except ValueError:
            count = 0
        if count < 1:
            _unusable(name, value, "is not a positive integer; ignored")
            continue
        if count > MAX_THREADS:
            _unusable(name, value, f"is above the maximum of {MAX_THREADS} threads; using {MAX_THREADS}")
            return MAX_THREADS
        return count
    return None


@dataclass(frozen=True)
class PoolSettings:
    worker_spin_ns: int
    caller_spin_ns: int
    serve_openblas: bool = False     # OpenBLAS's parallel calls run on the pool too (opt-in)


def pool_settings(env: Optional[Environ] = None) -> Optional[PoolSettings]:
    """The thread pool's settings; None when ``LOOPTUNE_NO_POOL=1`` turns it off.
    ``LOOPTUNE_POOL_SPIN_US`` (a number >= 0) is the idle workers' spin; ``LOOPTUNE_BLAS_POOL=1``
    hands OpenBLAS the pool as well."""
    if flag("LOOPTUNE_NO_POOL", env):
        return None
    spin_us = _number("LOOPTUNE_POOL_SPIN_US", POOL_WORKER_SPIN_US, lambda x: 0 <= x <= 1e6,
                      "a number of microseconds from 0 to 1e6", env)
    return PoolSettings(worker_spin_ns=int(spin_us * 1000), caller_spin_ns=int(POOL_CALLER_SPIN_US * 1000),
                        serve_openblas=flag("LOOPTUNE_BLAS_POOL", env))


def positive_seconds(name: str, default_s: float, env: Optional[Environ] = None) -> float:
    """A finite positive number of seconds; ``default_s`` when unset, or (with a warning) unusable."""
    return _number(name, default_s, lambda x: x > 0, "a positive number of seconds", env)


def _number(name: str, default: float, ok: Callable[[float], bool], what: str, env: Optional[Environ]) -> float:
    """A finite number for which ``ok`` holds; ``default`` when unset, or (with a warning) unusable."""
    value = _environ(env).get(name, "")
    if not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        _unusable(name, value, f"is not {what}; using {default:g}")
        return default
    return number


def choice(name: str, choices: tuple[str, ...], default: str, env: Optional[Environ] = None) -> str:
    """One of ``choices`` (case-insensitive); ``default`` when unset, or (with a warning) anything else."""
    value = _environ(env).get(name, "")
    word = value.strip().lower()
    if not word:
        return default
    if word not in choices:
        _unusable(name, value, f"is not one of {', '.join(choices)}; " + (f"using {default}" if default else "ignored"))
        return default
    return word


def default_user_db_path() -> Path:
    """The user's schedule database when ``LOOPTUNE_DB`` does not name one."""
    import platformdirs   # only when no database is named: keeps it off the import path of every process

    return Path(platformdirs.user_data_dir("looptune")) / DEFAULT_DB_NAME


def user_db_path(env: Optional[Environ] = None) -> Optional[Path]:
    """``LOOPTUNE_DB`` (``~`` expanded); None when it is set but empty ("no user database");
    the user data directory's database when it is unset."""
    value = _environ(env).get("LOOPTUNE_DB")
    if value is None:
        return default_user_db_path()
    return Path(value).expanduser() if value else None


def compiler_command(env: Optional[Environ] = None) -> str:
    """The C compiler: ``LOOPTUNE_CC``, else ``CC``, else ``cc``."""
    env = _environ(env)
    return env.get("LOOPTUNE_CC") or env.get("CC") or "cc"


def kernel_cache_dir(env: Optional[Environ] = None) -> Optional[Path]:
    """``LOOPTUNE_CACHE_DIR``; None (the platform cache directory) when unset or empty."""
    value = _environ(env).get("LOOPTUNE_CACHE_DIR")
    return Path(value) if value else None


def set_openmp_wait_policy(env: Optional[dict] = None) -> dict[str, str]:
    """Bound how long libgomp's idle threads spin: set ``GOMP_SPINCOUNT`` to ``OPENMP_SPIN_COUNT``
    in ``env`` (``os.environ``: the process environment, which libgomp reads when the first kernel
    library that links it is loaded) unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is already
    set (the user's choice stands, even an empty one).  Returns what it set ({} if nothing)."""
    env = os.environ if env is None else env
    if any(name in env for name in OPENMP_WAIT_VARIABLES):
        return {}
    env["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}
