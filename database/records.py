"""What the database stores: one tuned result = problem + machine key + trace + timings.

A ``Record`` answers "on *this machine*, *this schedule* ran *this problem* at *this speed*,
and numpy managed *that* in the same run".  Every field is validated when a record is
built, whether by the tuner, from an HDF5 file or from a JSON line, so a record that
exists is a record that is safe to hand to the code generator: the trace is in the
closed schedule grammar, every number is finite and in range, every string is short
printable ASCII.  Nothing here is ever evaluated, unpickled or pasted into C except the
trace's grammar tokens.

The database keeps one record per *slot* ``(problem, machine)``: the best one.  "Best" is
a total order (``rank``, then the canonical JSON as a last tie-break) so that merging
databases gives the same result whatever the order.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

from looptune.database.errors import RecordError
from looptune.runtime.compiler.machine import CpuInfo, detect_cpu
from looptune.runtime.compiler.trace import Trace, TraceFormatError
from looptune.runtime.compiler.workload import MatmulProblem, ProblemError, short_repr

RECORD_FORMAT_VERSION = 1    # version of the JSON form (``Record.to_dict``), also used by JSON-lines export

MAX_CORES = 1 << 16
MAX_GFLOPS = 1e7             # 10 PFLOP/s: far beyond any CPU, small enough to catch garbage
MAX_CANDIDATES = 1 << 40
MAX_TIMESTAMP = 32503680000.0  # year 3000, in seconds since the Unix epoch

_TEXT = re.compile(r"[\x20-\x7e]{0,256}")             # free text (CPU model, compiler): printable ASCII
_TOKEN = re.compile(r"[A-Za-z0-9_.:/@+=-]{0,128}")     # names (policy, search, ISA, versions)
_FEATURE = re.compile(r"[a-z0-9_]{1,32}")


# -- field checks: each returns the normalized value or raises RecordError naming the field --

def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        # bool is an int in Python but never a count here; numpy integers are welcome.
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise RecordError(f"{what} must be an integer, got {short_repr(value)}")
        value = value.__index__()
    if not lo <= value <= hi:
        raise RecordError(f"{what} must be in [{lo}, {hi}], got {short_repr(value)}")
    return value


def _float(value: Any, what: str, lo: float, hi: float) -> float:
    if type(value) is not float:
        if isinstance(value, (bool, str, bytes)):
            raise RecordError(f"{what} must be a number, got {short_repr(value)}")
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            raise RecordError(f"{what} must be a number, got {short_repr(value)}") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise RecordError(f"{what} must be a finite number in [{lo}, {hi}], got {short_repr(value)}")
    return value


_seen_valid: dict[re.Pattern[str], set[str]] = {}   # policy names etc. repeat across 100,000s of records
_seen_tokens = _seen_valid.setdefault(_TOKEN, set())


def _text(value: Any, what: str, pattern: re.Pattern[str] = _TEXT) -> str:
    seen = _seen_valid.setdefault(pattern, set())
    if type(value) is str and value in seen:
        return value
    if type(value) is not str or not pattern.fullmatch(value):
        raise RecordError(f"{what} must be a string matching {pattern.pattern}, got {short_repr(value)}")
    if len(seen) < 4096:
        seen.add(value)
    return value


def _bool(value: Any, what: str) -> bool:
    if value is True or value is False:
        return value
    if type(value) is not str and hasattr(value, "__index__") and value.__index__() in (0, 1):
        return bool(value.__index__())      # 0/1 from an HDF5 uint8 column
    raise RecordError(f"{what} must be true or false, got {short_repr(value)}")


def _fields(data: Any, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a JSON object has exactly the expected keys, so typos and smuggled fields fail loudly."""
    if not isinstance(data, Mapping):
        raise RecordError(f"{what} must be a JSON object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    extra = sorted(set(data) - set(required) - set(optional), key=str)
    if missing or extra:
        raise RecordError(f"{what}: missing fields {missing}, unexpected fields {extra}")
    return dict(data)


# -- problems: the one workload type, with its errors turned into RecordError at this boundary --

def problem_from_dict(data: Any) -> MatmulProblem:
    """A record's ``problem`` object; anything malformed is a ``RecordError``."""
    try:
        return MatmulProblem.from_dict(data)
    except ProblemError as e:
        raise RecordError(f"problem: {e}") from None


def problem_from_key(key: str) -> MatmulProblem:
    """A problem key (``matmul:float32:nn:t1:b1:64x64x64``, canonical spelling only); anything
    else is a ``RecordError``."""
    try:
        return MatmulProblem.from_key(key)
    except ProblemError as e:
        raise RecordError(f"problem: {e}") from None


def problem_from_columns(m: Any, n: Any, k: Any, batch: Any, dtype: Any, layout: Any, threads: Any,
                         op: Any) -> MatmulProblem:
    """A problem from the database's columns (the HDF5 store's rows); out of range is a ``RecordError``."""
    try:
        return MatmulProblem(m, n, k, batch, dtype, layout, threads, op)
    except ProblemError as e:
        raise RecordError(f"problem: {e}") from None


@dataclass(frozen=True)
class MachineKey:
    """Everything about the machine and toolchain that changes which schedule is fastest.

    ``isa`` is the vector ISA the code generator actually targeted (it can differ from what
    the CPU supports, e.g. when AVX-512 is switched off), and ``compiler`` holds name and
    version (``"gcc 12.2.0"``): leaving either out of the key serves stale schedules.
    """

    arch: str
    cpu_model: str
    isa: str
    features: tuple[str, ...]
    cores: int
    compiler: str
    codegen_version: str

    def __post_init__(self) -> None:
        _text(self.arch, "machine.arch", _TOKEN)
        _text(self.cpu_model, "machine.cpu_model")
        _text(self.isa, "machine.isa", _TOKEN)
        feats = self.features
        if isinstance(feats, str) or not isinstance(feats, (tuple, list)) or len(feats) > 64:
            raise RecordError(f"machine.features must be a list of at most 64 names, got {feats!r}")
        feats = tuple(sorted(set(_text(f, "machine.features[]", _FEATURE) for f in feats)))
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "cores", _int(self.cores, "machine.cores", 1, MAX_CORES))
        _text(self.compiler, "machine.compiler")
        _text(self.codegen_version, "machine.codegen_version", _TOKEN)

    @classmethod
    def current(cls, compiler: str | None = None, codegen_version: str | None = None,
                cpu: CpuInfo | None = None) -> "MachineKey":
        """This machine: the one home of the key the runtime looks records up under and the
        tuner (``tune --db``, build-db and its workers, live tuning, export) files them under.

        The CPU is ``detect_cpu()``'s (or ``cpu``).  ``compiler`` defaults to the identity of the
        C compiler kernels are built with here (``BuildSettings.from_env()``, named by its
        ``--version``), ``codegen_version`` to the code generator's ``CODEGEN_VERSION``; pass
        them to key another toolchain.  Nothing is cached here beyond what ``detect_cpu`` and
        ``compiler_identity`` cache: the compiler setting is read from the environment on every
        call, and callers on a hot path keep the key (``runtime.resolve.Resolver``).

        Its features carry the L1d and L2 sizes too (``cache_tokens``): virtual machines name
        their CPUs generically ("AMD EPYC" for Zen 4 and Zen 5 alike), and the caches tell them apart."""
        if compiler is None or codegen_version is None:
            # deferred: the build module and the code generator load only when this machine's own
            # toolchain is asked for, not with every reader of a database (``looptune db``, the store)
            from looptune.runtime.compiler.build import BuildSettings, compiler_identity
            from looptune.runtime.compiler.codegen import CODEGEN_VERSION     # (as above)

            if compiler is None:
                compiler = compiler_identity(BuildSettings.from_env().compiler)
            if codegen_version is None:
                codegen_version = CODEGEN_VERSION
        cpu = cpu or detect_cpu()
        model = "".join(c if " " <= c <= "~" else "?" for c in cpu.model_name)[:256]   # /proc/cpuinfo is free text
        return cls(arch=cpu.arch, cpu_model=model, isa=cpu.vector_isa, features=cpu.features + cache_tokens(cpu),
                   cores=cpu.machine_cores or cpu.cores, compiler=compiler, codegen_version=codegen_version)

    def without_caches(self) -> "MachineKey":
        """This key as machines were keyed before their cache sizes joined it (``cache_tokens``)."""
        return replace(self, features=tuple(f for f in self.features if not f.startswith(CACHE_TOKEN_PREFIXES)))

    def owns(self, record_machine: "MachineKey") -> bool:
        """Whether a record made on ``record_machine`` was made on this machine: the same key, or
        this key without its cache sizes (records written before they joined the key; the
        runtime still tries them against numpy before serving them)."""
        return record_machine == self or record_machine == self.without_caches()

    def key(self) -> str:
        """A stable one-line identity, used for ordering and display."""
        return "|".join((self.arch, self.cpu_model, self.isa, ",".join(self.features), str(self.cores),
                         self.compiler, self.codegen_version))

    def short(self) -> str:
        return f"{self.cpu_model} ({self.isa}, {self.cores} cores, {self.compiler}, codegen {self.codegen_version})"

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "cpu_model": self.cpu_model, "isa": self.isa, "features": list(self.features),
                "cores": self.cores, "compiler": self.compiler, "codegen_version": self.codegen_version}

    @classmethod
    def from_dict(cls, data: Any) -> "MachineKey":
        d = _fields(data, "machine", ("arch", "cpu_model", "isa", "features", "cores", "compiler", "codegen_version"))
        return cls(**d)


CACHE_TOKEN_PREFIXES = ("l1d_", "l2_")


def cache_tokens(cpu: CpuInfo) -> tuple[str, ...]:
    """The cache sizes a schedule's blocking is tuned to, as feature names: ("l1d_48k", "l2_2048k")."""
    return (f"l1d_{cpu.l1d_bytes >> 10}k", f"l2_{cpu.l2_bytes >> 10}k")


@dataclass(frozen=True)
class Record:
    """One tuned result.  ``numpy_gflops`` was measured in the same run, so the ratio is
    meaningful even when the machine was busy; ``policy``/``search``/``candidates`` say how
    the schedule was found (e.g. ``"dqn-v1"``, ``"beam"``, 200 candidate schedules measured).

    ``candidates`` is a count, not seconds; it is persisted under its old name ``"budget"``
    (HDF5 column and JSON field) so files written before the rename load unchanged."""

    problem: MatmulProblem
    machine: MachineKey
    trace: Trace
    gflops_median: float
    gflops_spread: float
    numpy_gflops: float
    verified: bool
    policy: str = ""
    search: str = ""
    candidates: int = 0
    timestamp: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        g, s, np_g, ts, tokens = self.gflops_median, self.gflops_spread, self.numpy_gflops, self.timestamp, _seen_tokens
        if (type(g) is float and type(s) is float and type(np_g) is float and type(ts) is float
                and 0.0 <= g <= MAX_GFLOPS and 0.0 <= s <= MAX_GFLOPS and 0.0 <= np_g <= MAX_GFLOPS
                and 0.0 <= ts <= MAX_TIMESTAMP and (self.verified is True or self.verified is False)
                and type(self.candidates) is int and 0 <= self.candidates <= MAX_CANDIDATES
                and type(self.policy) is str and self.policy in tokens and type(self.search) is str
                and self.search in tokens and isinstance(self.problem, MatmulProblem)
                and isinstance(self.machine, MachineKey) and isinstance(self.trace, Trace)):
            return     # the common case (NaN fails every comparison); anything else gets the careful path
        if not isinstance(self.problem, MatmulProblem):
            raise RecordError(f"record.problem must be a MatmulProblem, got {type(self.problem).__name__}")
        if not isinstance(self.machine, MachineKey):
            raise RecordError(f"record.machine must be a MachineKey, got {type(self.machine).__name__}")
        if not isinstance(self.trace, Trace):
            raise RecordError(f"record.trace must be a Trace, got {type(self.trace).__name__}")
        set_ = object.__setattr__
        set_(self, "gflops_median", _float(self.gflops_median, "gflops_median", 0.0, MAX_GFLOPS))
        set_(self, "gflops_spread", _float(self.gflops_spread, "gflops_spread", 0.0, MAX_GFLOPS))
        set_(self, "numpy_gflops", _float(self.numpy_gflops, "numpy_gflops", 0.0, MAX_GFLOPS))
        set_(self, "verified", _bool(self.verified, "verified"))
        _text(self.policy, "policy", _TOKEN)
        _text(self.search, "search", _TOKEN)
        set_(self, "candidates", _int(self.candidates, "candidates (stored as 'budget')", 0, MAX_CANDIDATES))
        set_(self, "timestamp", _float(self.timestamp, "timestamp", 0.0, MAX_TIMESTAMP))

    @property
    def slot(self) -> tuple[MatmulProblem, MachineKey]:
        """The database keeps one record per slot: the best."""
        return (self.problem, self.machine)

    @property
    def rank(self) -> tuple[bool, float, float, float]:
        """Bigger is better: verified first, then faster, then steadier, then newer."""
        return (self.verified, self.gflops_median, -self.gflops_spread, self.timestamp)

    @property
    def speedup_vs_numpy(self) -> float:
        return self.gflops_median / self.numpy_gflops if self.numpy_gflops > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECORD_FORMAT_VERSION, "problem": self.problem.to_dict(),
                "machine": self.machine.to_dict(), "trace": self.trace.to_dict(),
                "gflops_median": self.gflops_median, "gflops_spread": self.gflops_spread,
                "numpy_gflops": self.numpy_gflops, "verified": self.verified, "policy": self.policy,
                "search": self.search, "budget": self.candidates,   # persisted name: see the class docstring
                "timestamp": self.timestamp}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal records give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "Record":
        version = data.get("version") if isinstance(data, Mapping) else None
        if version is not None and version != RECORD_FORMAT_VERSION:   # before the fields: they may differ
            raise RecordError(f"record format version {version!r} is not supported "
                              f"(this build reads version {RECORD_FORMAT_VERSION})")
        d = _fields(data, "record", ("version", "problem", "machine", "trace", "gflops_median", "gflops_spread",
                                     "numpy_gflops", "verified", "policy", "search", "budget", "timestamp"))
        del d["version"]
        d["candidates"] = d.pop("budget")    # persisted name: see the class docstring
        try:
            trace = Trace.from_dict(d.pop("trace"))
        except TraceFormatError as e:
            raise RecordError(f"trace: {e}") from None
        return cls(problem=problem_from_dict(d.pop("problem")), machine=MachineKey.from_dict(d.pop("machine")),
                   trace=trace, **d)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        if len(text) > 1 << 20:
            raise RecordError("a record's JSON is larger than 1 MiB")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:    # ValueError: also ints too long to parse
            raise RecordError(f"not valid JSON: {e}") from None
        return cls.from_dict(data)


def better(a: Record, b: Record) -> Record:
    """The better of two records for the same slot.  A total order: ties on ``rank`` fall
    back to comparing canonical JSON, so ``better(a, b) == better(b, a)`` always."""
    if a.rank != b.rank:
        return a if a.rank > b.rank else b
    return a if a.to_json() >= b.to_json() else b


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building records in bulk.

    Loading or indexing 100,000 records creates about a million objects, which triggers
    many full collections, each walking every object in the process: seconds, in a
    process that already holds a database.  Records, keys and traces never form
    reference cycles, so collection can wait until the bulk work is done.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
