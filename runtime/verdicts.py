"""Verdicts: whether a kernel or numpy serves a shape, decided on this machine's own calls.

A shape is served by this machine's exact record, its nearest record or the analytic default, and
whether that beats numpy here only this machine can say: a guess may not, and a record's speed was
measured in a tuning process, not in the application.  So its first calls are a ``Trial``
on the caller's own operands: the first call runs numpy (a shape called once never compiles
anything), the second builds the kernel, then the kernel and numpy each serve a block of timed
calls (``TrialProtocol``) and the faster serves from then on.  A kernel must beat numpy by
``TrialProtocol.margin`` to win; a tie goes to numpy.  Every call of a trial computes the right
answer; only its speed is at stake.  The kernel's block comes right after numpy's: after each of
numpy's multi-threaded calls OpenBLAS's idle threads spin for about 0.1 s, and a multi-threaded
kernel then runs on about one core (README, "Threads next to numpy").  Applications call numpy
too, so a kernel serves only if it wins in numpy's wake; measured with the cores settled, kernels
that then lost to numpy in an application that alternates the two won their trials.

Verdicts persist in ``VerdictStore``, a small JSON file beside the user database, so the next
process starts decided.  A verdict holds which side won and a fingerprint of what was tried (the
machine, the problem, the served schedule and where it came from): when the records or the code
generator change what serves it, the fingerprint changes and the shape is tried again.  The file holds
no schedule, only which side won, so an untrusted file can make numpy serve but cannot make us run
anything the databases and the default do not already give.  It keeps the ``MAX_VERDICTS`` newest.
If the file is corrupt or cannot be written, numpy serves every shape without a verdict, and one
warning names the cause (the databases and the kernels are untouched).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from looptune.database.errors import LockTimeoutError
from looptune.runtime.compiler import environment
from looptune.runtime.compiler.abi import error_message

log = logging.getLogger("looptune.runtime")

FORMAT = "looptune-verdicts"
VERSION = 1
MAX_VERDICTS = 4096          # newest kept; about 200 bytes each on disk
WRITE_DELAY_S = 0.5          # verdicts reached within this delay are written together
LOCK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class TrialProtocol:
    """How a trial times its two sides (BENCHMARKS.md, "Current", measures what it picks)."""

    margin: float = 0.02          # the kernel must be this much faster than numpy to win
    samples: int = 5              # timed calls per side, at least ...
    side_s: float = 5e-3          # ... and as many as take this long (a 4 us call is noisy alone) ...
    max_samples: int = 64         # ... up to this many
    long_s: float = 0.25          # a call this long is timed once per side

    def sample_count(self, warm_s: float) -> int:
        """Timed calls per side, from the kernel's warm-up call."""
        if warm_s >= self.long_s:
            return 1
        return max(self.samples, min(self.max_samples, math.ceil(self.side_s / max(warm_s, 1e-9))))


def fingerprint(machine_key: str, problem_key: str, source: str, origin: Optional[str], schedule_json: str) -> str:
    """What a verdict was reached on: the machine, the problem and what served it (its schedule and where it came from)."""
    text = "\n".join((machine_key, problem_key, source, origin or "", schedule_json))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Verdict:
    kernel_wins: bool
    kernel_s: float          # median seconds per call, each side (inf: the kernel was not timed)
    numpy_s: float
    why: str = ""            # why the kernel was not timed

    def describe(self) -> str:
        if self.why:
            return self.why
        side = "the kernel" if self.kernel_wins else "numpy"
        return (f"{side} was faster on this machine's calls ({self.kernel_s * 1e6:.1f} us for the kernel, "
                f"{self.numpy_s * 1e6:.1f} us for numpy)")


# No verdict to keep (the kernel could not be built, or refused the operands): numpy serves in this
# process, and the next one tries again.
UNDECIDED = Verdict(False, float("inf"), 0.0, "no kernel could be tried")


class Trial:
    """The dispatch-table entry of an undecided shape: each call runs one side and times it.

    It has no ``address``, so the compiled call path passes its calls to the Python paths, which
    call ``invoke`` as they call any kernel's.  ``build()`` returns the kernel (or raises: numpy
    then serves); ``decide(verdict)`` is called once, by the call that completes the trial.
    """

    __slots__ = ("numpy", "build", "decide", "protocol", "kernel", "building", "phase", "times", "wanted", "lock",
                 "symbol", "dtype")

    # phases: first (numpy, untimed: a shape called once builds nothing) -> warm (the kernel is built and
    # warmed up; its time sets how many calls each side times; callers meanwhile get numpy, untimed) ->
    # numpy's timed block -> the kernel's -> done

    def __init__(self, numpy_side, build: Callable[[], object], decide: Callable[[Verdict], None],
                 protocol: TrialProtocol = TrialProtocol()) -> None:
        self.numpy, self.build, self.decide, self.protocol = numpy_side, build, decide, protocol
        self.kernel = None
        self.building = False         # a thread is building the kernel (outside the lock: it may compile)
        self.phase = "first"
        self.times: tuple[list[float], list[float]] = ([], [])     # kernel's, numpy's
        self.wanted = protocol.samples
        self.lock = threading.Lock()
        self.symbol = "trial"
        self.dtype = numpy_side.dtype

    def invoke(self, a, b, c, accumulate: int, nthreads: int) -> int:
        with self.lock:
            phase = self.phase
            builder = phase == "warm" and self.kernel is None and not self.building
            if builder:
                self.building = True
        if builder:
            self._build()
        with self.lock:
            phase = self.phase
            if phase == "warm" and self.kernel is None:
                phase = "waiting"        # another thread is building it: numpy computes this call, untimed
        side = self.kernel if phase in ("warm", "kernel") else self.numpy
        start = time.perf_counter()
        rc = side.invoke(a, b, c, accumulate, nthreads)
        elapsed = time.perf_counter() - start
        if rc != 0:
            if side is self.kernel:      # it refused these operands: every call would pay for copies
                why = f"the kernel returned {rc} ({error_message(rc)}) during its trial"
                with self.lock:
                    if self.phase != "done":
                        log.warning("looptune: numpy.matmul serves a %s shape from now on (%s)", self.dtype, why)
                    self._finish(Verdict(False, float("inf"), 0.0, why))
            return rc       # the caller copies the operands or hands the shape to numpy, as for any kernel
        with self.lock:
            if self.phase != phase or phase in ("done", "waiting"):
                return 0
            if phase == "first":
                self.phase = "warm"
            elif phase == "warm":
                self.wanted, self.phase = self.protocol.sample_count(elapsed), "numpy"
            else:
                times = self.times[0 if phase == "kernel" else 1]
                times.append(elapsed)
                if len(times) < self.wanted:
                    return 0
                if phase == "numpy":
                    self.phase = "kernel"
                else:
                    kernel_s, numpy_s = statistics.median(self.times[0]), statistics.median(self.times[1])
                    self._finish(Verdict(kernel_s < numpy_s * (1 - self.protocol.margin), kernel_s, numpy_s))
        return 0

    def _build(self) -> None:
        """Build the kernel without holding the lock (a compile takes a while, and a fork meanwhile
        must not leave the lock held in the child); a kernel that cannot be had loses the trial."""
        try:
            kernel = self.build()
        except Exception as e:  # noqa: BLE001
            log.info("looptune: no kernel for the trial, numpy serves: %s", e)
            with self.lock:
                self._finish(UNDECIDED)
            return
        with self.lock:
            self.kernel = kernel

    def _finish(self, verdict: Verdict) -> None:
        """Under ``lock``: decide once."""
        if self.phase != "done":
            self.phase = "done"
            self.decide(verdict)


class VerdictStore:
    """Verdicts by fingerprint, in memory and (with a path) in a JSON file written atomically in the background."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.broken: Optional[str] = None       # why the file cannot be used; numpy serves undecided shapes
        self._verdicts: Optional[dict[str, dict]] = None
        self._pending: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._writer: Optional[threading.Thread] = None

    def get(self, fp: str) -> Optional[Verdict]:
        entry = self._loaded().get(fp)
        if entry is None:
            return None
        return Verdict(bool(entry["kernel"]), float(entry["kernel_s"]), float(entry["numpy_s"]))

    def put(self, fp: str, verdict: Verdict) -> None:
        if verdict.kernel_s == float("inf"):
            return          # nothing was timed: the next process tries again
        entry = {"kernel": verdict.kernel_wins, "kernel_s": verdict.kernel_s, "numpy_s": verdict.numpy_s,
                 "at": time.time()}
        verdicts = self._loaded()
        with self._lock:
            verdicts[fp] = entry
            if self.path is None or self.broken:
                return
            self._pending[fp] = entry
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_later, name="looptune-verdicts", daemon=True)
                self._writer.start()

    def __len__(self) -> int:
        return len(self._loaded())

    # ---- the file ---------------------------------------------------------------------------
    def _loaded(self) -> dict[str, dict]:
        found = self._verdicts
        if found is None:
            with self._lock:
                if self._verdicts is None:
                    loaded: dict[str, dict] = {}
                    if self.path is not None:
                        try:
                            loaded = read_verdicts(self.path)
                        except Exception as e:  # noqa: BLE001 - any file at all: numpy serves, one warning
                            self._fail(f"cannot read {self.path}: {type(e).__name__}: {e}"[:400])
                    self._verdicts = loaded
                found = self._verdicts
        return found

    def _fail(self, reason: str) -> None:
        self.broken = reason
        environment.warn_once(f"verdict store unusable, numpy serves every shape without a verdict "
                              f"({reason}); remove the file to start afresh")

    def _write_later(self) -> None:
        time.sleep(WRITE_DELAY_S)
        try:
            self.flush()
        finally:
            with self._lock:
                self._writer = None

    def close(self) -> None:
        """Write what is pending, after a write under way (at exit: no verdict is cut off)."""
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=2.0)
        self.flush()

    def flush(self) -> None:
        """Write pending verdicts now (merged with what other processes wrote meanwhile)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending or self.path is None or self.broken:
            return
        from looptune.database.atomic import replace_atomically, write_lock   # lazy: only when a verdict is written
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with write_lock(str(self.path), LOCK_TIMEOUT_S):
                merged = read_verdicts(self.path)
                merged.update(pending)
                newest = sorted(merged.items(), key=lambda kv: kv[1]["at"])[-MAX_VERDICTS:]
                text = json.dumps({"format": FORMAT, "version": VERSION, "verdicts": dict(newest)}, separators=(",", ":"))
                replace_atomically(str(self.path), lambda tmp: Path(tmp).write_text(text), fsync=False)
        except LockTimeoutError:     # another process is writing: keep ours for the next write (or exit)
            with self._lock:
                self._pending = {**pending, **self._pending}
        except Exception as e:  # noqa: BLE001 - a full disk or a read-only directory: numpy serves, one warning
            self._fail(f"cannot write {self.path}: {e}")

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._writer = None
        self._pending = {}


def read_verdicts(path: Path) -> dict[str, dict]:
    """The verdicts in ``path`` ({} when it does not exist); ValueError when it is not a verdict file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * MAX_VERDICTS * 8)
    except FileNotFoundError:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError("not a LoopTune verdict file of this version")
    verdicts = data.get("verdicts")
    if not isinstance(verdicts, dict):
        raise ValueError("no verdicts table")
    out = {}
    for fp, e in verdicts.items():
        if not (isinstance(fp, str) and len(fp) == 32 and isinstance(e, dict) and isinstance(e.get("kernel"), bool)
                and all(isinstance(e.get(f), (int, float)) and e[f] >= 0 for f in ("kernel_s", "numpy_s", "at"))):
            raise ValueError(f"malformed verdict {fp!r}")
        out[fp] = e
    return out


def verdict_path(user_db: Optional[Path]) -> Optional[Path]:
    """Where verdicts persist: beside the user database (none without one)."""
    return None if user_db is None else user_db.with_name(user_db.name + ".verdicts.json")


_stores: "list[VerdictStore]" = []


def register_for_exit(store: VerdictStore) -> None:
    """Pending verdicts are written when the process exits normally."""
    _stores.append(store)
    if len(_stores) > 8:
        del _stores[0]


@atexit.register
def _flush_at_exit() -> None:
    for store in list(_stores):
        try:
            store.close()
        except Exception:  # noqa: BLE001
            pass

