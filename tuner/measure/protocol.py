"""The measurement protocol: what the tuner asks a runner and what it gets back.

These types are shared by the parent (``looptune.tuner.measure.runner``, search, the agent)
and the worker process (``looptune.tuner.measure.worker``), which only exchange them as
JSON; neither side needs the other's code to use them.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from looptune.runtime.compiler.workload import MatmulProblem

# Environment variables that size the thread pools of BLAS and OpenMP runtimes.  They must be
# set before numpy (OpenBLAS) or the first OpenMP kernel (libgomp) is loaded.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

# float16 rounding: at most half an ulp, 2**-11 relative (10 stored significand bits); below 2**-14
# (subnormal, spaced 2**-24 apart) at most 2**-25 absolute
FLOAT16_UNIT_ROUNDOFF = 2.0 ** -11
FLOAT16_SUBNORMAL_ROUNDOFF = 2.0 ** -25


class RunStatus(str, enum.Enum):
    """How a candidate ended.  Only OK carries a time."""

    OK = "ok"
    WRONG_ANSWER = "wrong_answer"    # verification against numpy failed (or wrote out of bounds)
    CRASH = "crash"                  # the worker died while running the kernel (signal, exit)
    TIMEOUT = "timeout"              # no answer within MeasureConfig.timeout_seconds; worker killed
    KERNEL_ERROR = "kernel_error"    # the kernel returned a non-zero code (-1 OOM, -2 not these operands)
    BUILD_ERROR = "build_error"      # no artifact, or the .so / symbol could not be loaded
    RUNNER_ERROR = "runner_error"    # our fault, not the kernel's (worker failed to start, ...)


def default_tolerance(dtype: str, k: int) -> tuple[float, float]:
    """(rtol, atol) for ``|C - ref| <= atol + rtol * |ref|`` with unit-normal operands.

    A length-K dot product summed in ``dtype`` has worst-element error ~1.2 * eps * K against a
    float64 reference, measured for K = 16 .. 16384 with sequential accumulation (the worst
    order; blocked kernels do better).  8x that leaves room for any summation order, while a
    kernel that drops or repeats a single k term errs by ~1, far above the bound for any
    realistic K.  bfloat16 inputs are accumulated in float32 (their products are exact in
    float32), so they get float32's bound.

    float16 inputs are accumulated in float32 too (products exact: 11 x 11 significand bits), and
    each result is rounded once to float16, which adds at most ``u = 2**-11`` of it (half an ulp;
    below 2**-14, a subnormal, at most 2**-25 absolute).  The check of C += A @ B (expected
    ``2 ref``, atol doubled) sees two roundings: C = fl16(ref) from the first call (error
    ``u |ref|``), widened exactly, plus A @ B, then rounded again (``u |2 ref|``): ``3 u |ref|
    = 1.5 u |2 ref|`` on top of two float32 accumulations.  So float16 gets float32's bound plus
    ``2 u`` relative (1.5 u, and room for the u x float32 cross terms) and 2**-25 absolute.  A
    kernel that drops or repeats a k term still errs by ~1, far above ~1e-3 relative.
    """
    eps = 2.220446049250313e-16 if dtype == "float64" else 1.1920929e-07
    rtol, atol = 16 * eps, 8 * eps * max(k, 16)
    if dtype == "float16":
        rtol, atol = rtol + 2 * FLOAT16_UNIT_ROUNDOFF, atol + FLOAT16_SUBNORMAL_ROUNDOFF
    return rtol, atol


@dataclass(frozen=True)
class MeasureConfig:
    """The timing protocol, as a value (cf. TVM's EvaluatorConfig).

    A *sample* is the mean time of ``number`` back-to-back calls, where ``number`` is chosen
    so one sample lasts at least ``min_sample_seconds`` (timer and call overhead amortized
    for tiny kernels).  Samples are taken until both ``min_repeats`` and
    ``min_total_seconds`` are reached, or ``max_repeats``.  With ``flush_cache`` each call is
    its own sample, preceded (untimed) by a write over a buffer twice the size of L2+L3.

    ``slow_cutoff`` (0 = off): a candidate whose first timed call already takes more than
    ``slow_cutoff`` times numpy's time on the same problem is reported from that one call.  It
    cannot win, and on large problems the remaining repeats of a slow kernel cost seconds of a
    tuning budget (a 1024^3 kernel at 10 GFLOPS takes 0.2 s per call).
    """

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 200
    min_total_seconds: float = 0.05
    min_sample_seconds: float = 1e-3
    timeout_seconds: float = 10.0       # per candidate: load + verify + time
    seeds: int = 1                      # independent operand sets verified before timing
    verify_accumulate: bool = True      # also check accumulate=1 (C += A @ B)
    rtol: float | None = None           # None: default_tolerance(dtype, K)
    atol: float | None = None
    flush_cache: bool = False
    slow_cutoff: float = 0.0
    operand_shift_bytes: int = 0        # operands this much further into fresh memory (a second placement)

    def __post_init__(self) -> None:
        if not (self.warmup >= 0 and 1 <= self.min_repeats <= self.max_repeats and self.seeds >= 1):
            raise ValueError(f"inconsistent MeasureConfig: {self}")
        if not (self.timeout_seconds > 0 and self.min_total_seconds >= 0 and self.min_sample_seconds >= 0):
            raise ValueError(f"inconsistent MeasureConfig: {self}")
        if self.operand_shift_bytes < 0 or self.operand_shift_bytes % 64:
            raise ValueError(f"operand_shift_bytes must be a non-negative multiple of 64: {self}")

    def tolerance(self, dtype: str, k: int) -> tuple[float, float]:
        rtol, atol = default_tolerance(dtype, k)
        return (rtol if self.rtol is None else self.rtol, atol if self.atol is None else self.atol)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


RESULT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    """A built kernel: a shared library and the exported symbol with the kernel ABI."""

    so_path: str
    symbol: str


@dataclass(frozen=True)
class Candidate:
    """What to measure.  ``artifact`` is None when the build failed (``build_error`` says why).

    The artifact is the kernel ``runtime.matmul`` will serve for ``problem`` once its record is
    stored: the schedule's exact-size kernel for the problem's sizes (``codegen.render(...,
    sizes=FixedSizes.of(problem), op=problem.op)``, as the runtime builds for an exact record), so
    the stored GFLOPS is what is served.  The worker calls it with exactly those sizes (and a fused
    problem's epilogue operands: ``looptune.tuner.measure.fused``)."""

    problem: MatmulProblem
    artifact: Artifact | None
    tag: str = ""            # opaque to the runner: schedule trace JSON, a name, ...
    build_error: str = ""

    @classmethod
    def from_build(cls, problem: MatmulProblem, build: Any, tag: str = "") -> "Candidate":
        """From a ``looptune.runtime.compiler.build.BuildResult(ok, so_path, symbol, error, seconds)``."""
        if getattr(build, "ok", False):
            return cls(problem, Artifact(str(build.so_path), build.symbol), tag)
        return cls(problem, None, tag, build_error=getattr(build, "error", "") or "build failed")


@dataclass(frozen=True)
class RunResult:
    """One candidate's outcome.  Times are seconds per kernel call; only OK results carry them.

    ``samples`` are the raw per-call times (each the mean of ``number`` back-to-back calls);
    ``seconds`` is their median and ``q1_seconds``/``q3_seconds`` the quartiles.  The numpy
    fields time ``np.matmul`` on the same problem, in the same worker, with the same threads.
    ``cpu_share`` is the CPU time the worker got over wall time x threads while timing: well
    below 1 means other processes competed for the cores and the time is pessimistic.
    """

    status: RunStatus
    problem_key: str = ""
    tag: str = ""
    seconds: float | None = None
    q1_seconds: float | None = None
    q3_seconds: float | None = None
    samples: tuple[float, ...] = ()
    number: int = 0
    gflops: float | None = None
    numpy_seconds: float | None = None
    numpy_gflops: float | None = None
    cpu_share: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.OK

    @property
    def rel_spread(self) -> float | None:
        """Interquartile range over median: how far to trust ``seconds`` (0.05 = 5 %)."""
        if self.seconds is None or self.q1_seconds is None or self.q3_seconds is None:
            return None
        return (self.q3_seconds - self.q1_seconds) / self.seconds

    @property
    def speedup_vs_numpy(self) -> float | None:
        if self.seconds is None or self.numpy_seconds is None:
            return None
        return self.numpy_seconds / self.seconds

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["status"] = self.status.value
        d["samples"] = list(self.samples)
        return {"v": RESULT_FORMAT_VERSION, **d}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RunResult":
        d = dict(d)
        if d.pop("v", RESULT_FORMAT_VERSION) != RESULT_FORMAT_VERSION:
            raise ValueError(f"unsupported RunResult format: {d}")
        d["status"] = RunStatus(d["status"])
        d["samples"] = tuple(float(s) for s in d.get("samples", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
