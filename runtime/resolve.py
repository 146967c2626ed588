"""Problem -> schedule -> kernel, with the databases, the fallback policy and the kernel caches.

Resolution for a problem the process has not seen yet:

1. an exact record of this machine (the user's database wins over the embedded default),
2. else the nearest record of this machine in the family within ``max_distance`` (log2 size units),
3. else the fallback: ``nearest`` takes this machine's nearest record at any distance (or the
   analytic default when the family has none), ``tune`` serves that too while a background thread
   tunes the problem and swaps in the result, ``off`` uses the analytic default.

Records of other machines (another CPU model, cache sizes, ISA, core count, compiler or code generator) are
never served: a schedule tuned elsewhere is a start point for tuning here, not an answer.  A
float32 or float64 problem served by any of them (1 to 3) is tried against numpy on its first
calls, and the faster serves from then on (``looptune.runtime.verdicts``; the verdict persists
beside the user database): a record's speed was measured in a tuning process, not in the
application, and a guess was not measured at all.

bfloat16 problems (ml_dtypes inputs, float32 results) resolve like the others, within their own
family.  With ``float32_via_bfloat16`` (off by default) a float32 problem resolves as its bfloat16
twin (``looptune.runtime.bf16.arithmetic_problem``) and is served by that schedule's kernel
reading float32 (``render(..., inputs="float32")``: inputs rounded to bf16 while packing, float32
accumulation); its dispatch key stays float32's, so every call path serves it unchanged.

Records are traces: they are replayed and checked against the schedule grammar, then
compiled here (kernels are never loaded from a database).  A record whose trace does
not replay is skipped.  A problem served by its exact record (or by live tuning) runs the
schedule's exact-size kernel (``render(..., sizes=...)``: the sizes are compile-time constants),
the kernel the tuner timed for that record; every other problem runs the schedule's generic
kernel, which every shape of the family shares.  Kernels are cached in memory by (schedule,
dtype, inputs, sizes) and on disk by their text.

numpy serves a problem (``source="numpy"``, ``looptune.runtime.numpy_kernel``) when its exact
record says no candidate beat numpy (the hand-off; ``numpy_handoff=False`` turns it off) or, on
several threads, that numpy beat our kernel's speed per thread by over a fifth
(``numpy_beats_one_core``: next to numpy's spinning threads our kernel gets one core),
and when no kernel can be built or loaded for it, or its kernel refuses the operands: the
call still computes, and one warning names the cause.

Fork: parallel kernels run on LoopTune's thread pool (``looptune.runtime.compiler.pool``),
which starts afresh in a forked child, so a child keeps its threads.  Only where the pool is
off (``LOOPTUNE_NO_POOL=1``, or it could not be built) do kernels run their parallel loops on
OpenMP, and a child of a process that did so cannot (libgomp's pool threads did not survive the
fork and a parallel region there would wait for them forever).  Such a child, and its own
children, then run every kernel on one thread, whatever ``threads`` asks
(``serial_after_fork``): a kernel called with one thread never enters OpenMP.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, replace
from typing import Optional

from looptune.database.records import MachineKey
from looptune.runtime.bf16 import arithmetic_problem
from looptune.runtime.compiler.build import BuildError, BuildSettings, build
from looptune.runtime.compiler.codegen import FixedSizes, render
from looptune.runtime.compiler.defaults import default_schedule, form, small_stack_schedule
from looptune.runtime.compiler.dispatch import key_problem
from looptune.runtime.compiler.epilogue import PLAIN
from looptune.runtime.compiler.errors import LoopTuneError
from looptune.runtime.compiler.ir import ScheduleError
from looptune.runtime.compiler import pool
from looptune.runtime.compiler.kernel import Kernel, KernelLike
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.databases import Databases
from looptune.runtime.handoff import DOT_PRODUCTS, dot_products, handoff_reason
from looptune.runtime.hooks import LiveTuneResult
from looptune.runtime.live import LiveTuningQueue
from looptune.runtime.numpy_kernel import NumpyKernel
from looptune.runtime.configuration import RuntimeSettings
from looptune.runtime.verdicts import Trial, Verdict, VerdictStore, fingerprint, register_for_exit, verdict_path

log = logging.getLogger("looptune.runtime")

# True once this process resolved a kernel for more than one thread without our thread pool: from
# then on libgomp's thread pool may exist, and a forked child must stay out of OpenMP.  Inherited by children (and theirs).
_parallel_resolved = False


def serial_after_fork(settings: RuntimeSettings) -> RuntimeSettings:
    """The settings a child forked from this process must use: ``settings`` itself, or, once a
    multi-threaded kernel was resolved here, settings under which every call runs on one thread
    (``small_flops`` infinite: every problem counts as too small for threads)."""
    if not _parallel_resolved:
        return settings
    return settings.updated(threads=1, small_flops=math.inf)


# resolution sources whose schedule was tuned for the problem's very sizes: served by exact-size kernels
EXACT_SOURCES = ("exact", "tuned")
# resolution sources a trial against numpy confirms on the application's own calls (``looptune.runtime.verdicts``);
# a live tuning's result ("tuned") was just measured against numpy in this process's conditions
TRIED_SOURCES = ("exact", "nearest", "default")

MAX_DISPATCH = 4096       # dispatch entries kept (oldest dropped first: they resolve again, from cached kernels)
MAX_TRIAL_BUILDS = 256    # kernels a process compiles for trials; past it, shapes that need a new one go to numpy


def kernel_sizes(resolution: "Resolution") -> Optional[FixedSizes]:
    """The sizes a resolution's kernel is compiled for: all of them for a schedule tuned for the
    problem's sizes (its own record, or for a fused epilogue the plain product's exact record), the
    matrices' for a stack of small matrices (``defaults.small_stack_schedule``, the default for
    such stacks), None (the generic kernel) otherwise."""
    p = resolution.problem
    if resolution.source in EXACT_SOURCES or (
            resolution.source == "nearest" and p.op != PLAIN and resolution.distance == 0.0
            and resolution.record_problem == replace(p, op=PLAIN).key()):
        return FixedSizes.of(p)
    if resolution.source == "default" and small_stack_schedule(resolution.problem) is not None:
        return FixedSizes.of_matrices(resolution.problem)
    return None


def _kernel_cache_key(schedule: Schedule, dtype: str, inputs: Optional[str], sizes: Optional[FixedSizes],
                      op: str = PLAIN) -> tuple:
    return (schedule.to_json(), dtype, inputs, sizes, op)


@dataclass(frozen=True)
class Resolution:
    """Where a problem's schedule came from."""

    problem: MatmulProblem
    source: str                        # exact | nearest | tuned | default | numpy
    schedule: Schedule
    distance: Optional[float] = None   # log2 size units to the record's problem (0 for exact)
    record_problem: Optional[str] = None
    database: Optional[str] = None     # path of the database the record came from
    expected_gflops: Optional[float] = None
    numpy_gflops: Optional[float] = None
    tuning: bool = False               # a live tuning of this problem is under way
    reason: Optional[str] = None       # why numpy serves it (source "numpy")
    inputs: Optional[str] = None       # "float32": a bfloat16 problem's kernel reads float32 inputs
                                       # (``float32_via_bfloat16``); None: the problem's own dtype
    verdict: Optional[str] = None      # the trial against numpy: under way, or what it found

    def describe(self) -> str:
        lines = [f"problem:   {self.problem}", f"source:    {self.source}"]
        if self.reason:
            lines.append(f"why:       {self.reason}")
        if self.inputs:
            lines.append(f"computes:  in bfloat16: {self.inputs} inputs rounded to bfloat16, float32 accumulation "
                         f"(float32_via_bfloat16)")
        elif self.problem.dtype == "bfloat16":
            lines.append("computes:  bfloat16 inputs, float32 accumulation and result")
        if self.record_problem:
            lines.append(f"record:    {self.record_problem} from {self.database} (distance {self.distance:.3f})")
        if self.expected_gflops:
            ratio = f" ({self.expected_gflops / self.numpy_gflops:.2f}x numpy)" if self.numpy_gflops else ""
            lines.append(f"expected:  {self.expected_gflops:.1f} GFLOPS{ratio}")
        sizes = kernel_sizes(self)
        if sizes is not None:
            lines.append("kernel:    exact-size (these sizes are compile-time constants in it"
                         + (", for any batch)" if sizes.batch is None else ")"))
        if self.verdict:
            lines.append(f"verdict:   {self.verdict}")
        if self.tuning:
            lines.append("tuning:    in progress (calls use the schedule above meanwhile)")
        lines.append(f"trace:     {self.schedule.trace}")
        p = self.problem
        lines.append(self.schedule.nest.pretty(dict(b=p.batch, m=p.m, n=p.n, k=p.k)))
        return "\n".join(lines)


class Resolver:
    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.databases = Databases([p for p in (settings.user_db, settings.embedded_db) if p is not None],
                                   MachineKey.current, recheck_s=settings.db_recheck_s, on_change=self._forget_choices)
        self.live = LiveTuningQueue(settings.tune_budget_s, str(settings.user_db) if settings.user_db else None,
                                    self._tuned)
        self.build_settings = BuildSettings.from_env()
        self.verdicts = VerdictStore(verdict_path(settings.user_db))
        register_for_exit(self.verdicts)
        self._machine_key: Optional[str] = None
        self._lock = threading.Lock()
        self.dispatch: dict[tuple, tuple[KernelLike, Resolution]] = {}   # key -> hit; read directly by matmul's fast path
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._kernels: dict[tuple, Kernel] = {}   # (schedule JSON, dtype, inputs, sizes) -> kernel
        self.trial_builds = 0                     # kernels built for trials (``MAX_TRIAL_BUILDS``)

    # ---- the per-call entry: must stay cheap on a hit -------------------------------------
    def lookup(self, key: tuple, problem_factory) -> tuple[Kernel, Resolution]:
        global _parallel_resolved
        hit = self.dispatch.get(key)
        if hit is not None:
            return hit
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:                      # one compile per cold key; other keys proceed in parallel
            hit = self.dispatch.get(key)
            if hit is None:
                generation = self.databases.generation
                asked = problem_factory()
                if asked.threads > 1 and not pool.active():
                    _parallel_resolved = True
                problem = arithmetic_problem(asked, self.settings.float32_via_bfloat16)
                resolution = self.resolve(problem)
                if problem is not asked:
                    resolution = replace(resolution, inputs=asked.dtype)
                hit = self._serve_or_try(key, resolution)
                if self.databases.generation == generation:   # else a database changed meanwhile: resolve again next call
                    self.remember(key, hit)
                if resolution.tuning:
                    self._start_tuning(key, problem)
        with self._lock:
            self._key_locks.pop(key, None)
        return hit

    def remember(self, key: tuple, hit: tuple) -> None:
        """Put ``hit`` in the dispatch table, which holds ``MAX_DISPATCH`` entries: a program whose
        shapes never repeat keeps a flat footprint (dropped keys resolve again, from cached kernels)."""
        dispatch = self.dispatch
        while len(dispatch) >= MAX_DISPATCH and key not in dispatch:
            try:
                del dispatch[next(iter(dispatch))]
            except (StopIteration, KeyError, RuntimeError):     # emptied or changed by another thread
                break
        dispatch[key] = hit

    # ---- trials: what serves a shape against numpy, on the caller's operands (``looptune.runtime.verdicts``) ----
    def _serve_or_try(self, key: tuple, resolution: Resolution) -> tuple:
        """The hit for a resolution: what its verdict says, or a trial (float32 and float64 kernels)."""
        problem = resolution.problem
        if not (resolution.source in TRIED_SOURCES and self.settings.numpy_handoff and resolution.inputs is None
                and problem.dtype in ("float32", "float64") and problem.op == PLAIN):
            return self._serve(resolution)
        if self._machine_key is None:
            try:
                self._machine_key = MachineKey.current().key()
            except (LoopTuneError, OSError):
                return self._serve(resolution)      # no toolchain: no kernel to try (``_serve`` says why)
        fp = fingerprint(self._machine_key, problem.key(), resolution.source, resolution.record_problem,
                         resolution.schedule.to_json())
        verdict = self.verdicts.get(fp)
        if verdict is not None:
            return self._verdict_hit(resolution, verdict, None)
        if self.verdicts.broken:
            reason = f"no verdict for this shape, and the verdict store is unusable ({self.verdicts.broken})"
            return NumpyKernel(problem.dtype, reason), replace(resolution, source="numpy", reason=reason)
        served: list = []

        def build():
            compiled = len(self._kernels)
            if self.trial_builds >= MAX_TRIAL_BUILDS and self._kernel_key(resolution) not in self._kernels:
                raise LoopTuneError(f"this process built {MAX_TRIAL_BUILDS} kernels for trials already")
            kernel, used = self._serve(resolution)
            self.trial_builds += len(self._kernels) - compiled
            if isinstance(kernel, NumpyKernel):
                raise LoopTuneError(used.reason or "no kernel")
            served.append(used)
            return kernel

        def decide(v: Verdict) -> None:
            self.verdicts.put(fp, v)
            if self.dispatch.get(key) is hit:
                self.dispatch[key] = self._verdict_hit(served[0] if served else resolution, v, trial.kernel)

        trial = Trial(NumpyKernel(problem.dtype, "trial"), build, decide)
        hit = (trial, replace(resolution, verdict="trial against numpy under way (the first calls of this shape)"))
        return hit

    def _verdict_hit(self, resolution: Resolution, verdict: Verdict, kernel: Optional[Kernel]) -> tuple:
        """The hit a verdict gives: the resolution's kernel (built now if need be) or numpy."""
        if verdict.kernel_wins:
            resolution = replace(resolution, verdict=verdict.describe())
            if kernel is not None:
                return kernel, resolution
            return self._serve(resolution)
        reason = verdict.describe()
        return (NumpyKernel(resolution.problem.dtype, reason),
                replace(resolution, source="numpy", reason=reason, verdict=reason))

    def _serve(self, resolution: Resolution) -> tuple:
        """The kernel for a resolution; never raises over a kernel that cannot be had: a stored
        schedule that fails to build gives way to the analytic default, and that to numpy."""
        problem, inputs = resolution.problem, resolution.inputs
        if resolution.source == "numpy":
            return NumpyKernel(inputs or problem.dtype, resolution.reason or ""), resolution
        try:
            return self._kernel_for(resolution), resolution
        except (LoopTuneError, OSError) as e:
            first = e
        if resolution.source != "default":
            log.warning("looptune: schedule for %s failed to build, using the default: %s", problem, first)
            resolution = Resolution(problem, "default", default_schedule(problem), tuning=resolution.tuning,
                                    inputs=inputs)
            try:
                return self._kernel_for(resolution), resolution
            except (LoopTuneError, OSError) as e:
                first = e
        reason = f"no kernel could be built or loaded: {first}"
        log.warning("looptune: numpy.matmul serves %s (%s)", problem, reason)
        return NumpyKernel(inputs or problem.dtype, reason), replace(resolution, source="numpy", reason=reason)

    @staticmethod
    def _kernel_key(resolution: Resolution) -> tuple:
        """The key ``kernel`` caches the resolution's kernel under (the arguments ``_kernel_for`` passes)."""
        return _kernel_cache_key(resolution.schedule, resolution.problem.dtype, resolution.inputs,
                                 kernel_sizes(resolution), resolution.problem.op)

    def _kernel_for(self, resolution: Resolution) -> Kernel:
        """``kernel`` for a resolution: the exact-size kernel for a problem its own record (or live
        tuning) serves, the generic one otherwise.  Called with two arguments for a generic kernel
        of the problem's dtype (``kernel(schedule, dtype)`` is the interface stubs replace); the
        others are passed by keyword when they apply."""
        extra = {}
        if resolution.inputs is not None:
            extra["inputs"] = resolution.inputs
        sizes = kernel_sizes(resolution)
        if sizes is not None:
            extra["sizes"] = sizes
        if resolution.problem.op != PLAIN:
            extra["op"] = resolution.problem.op
        return self.kernel(resolution.schedule, resolution.problem.dtype, **extra)

    def demote(self, key: tuple, reason: str) -> NumpyKernel:
        """Hand ``key`` to numpy for good: its kernel refused operands of this shape or failed."""
        hit = self.dispatch.get(key)
        problem = hit[1].problem if hit else key_problem(key)
        schedule = hit[1].schedule if hit else default_schedule(problem)
        inputs = hit[1].inputs if hit else None
        log.warning("looptune: numpy.matmul serves %s from now on (%s)", problem, reason)
        kernel = NumpyKernel(inputs or problem.dtype, reason)
        self.remember(key, (kernel, Resolution(problem, "numpy", schedule, reason=reason, inputs=inputs)))
        return kernel

    # ---- resolution --------------------------------------------------------------------------
    def resolve(self, problem: MatmulProblem) -> Resolution:
        """Where ``problem``'s schedule comes from (the module docstring).  A product with a fused
        epilogue that has no record of its own family takes the plain product's schedule (the
        loop structure is the same; the epilogue only changes the store stage)."""
        resolution = self._resolve(problem)
        if problem.op != PLAIN and resolution.source == "default":
            plain = self._resolve(replace(problem, op=PLAIN))
            if plain.source in ("exact", "nearest"):    # an exact one is served as an exact-size kernel
                return replace(plain, problem=problem, source="nearest", expected_gflops=None, numpy_gflops=None,
                               tuning=resolution.tuning, distance=0.0 if plain.source == "exact" else plain.distance)
        return resolution

    def _resolve(self, problem: MatmulProblem) -> Resolution:
        best = None          # (distance, not user, path, match, schedule)
        for rank, (path, index) in enumerate(self.databases.indexes()):
            try:
                matches = index.nearest(problem.key(), 3) if index.exact(problem.key()) is None else [index.best(problem.key())]
            except Exception as e:  # a lookup must never take the caller down
                log.warning("looptune: lookup in %s failed: %s", path, e)
                continue
            for match in matches:
                if match is None or not match.local:
                    continue      # another machine's schedule is a start point for tuning, never served here
                try:
                    sched = Schedule.from_trace(match.record.trace)
                except ScheduleError as e:
                    log.warning("looptune: record for %s in %s does not replay: %s", match.record.problem, path, e)
                    continue
                cand = (0.0 if match.exact else match.distance, rank, path, match, sched)
                if best is None or cand[:2] < best[:2]:
                    best = cand
                break
        if best is not None and not best[3].exact and (small_stack_schedule(problem) is not None
                                                       or form(problem) != form(best[3].record.problem)):
            best = None     # a stack of small matrices, or a record of another form: the default's own form
        mode = self.settings.fallback
        if best is not None:
            distance, _, path, match, sched = best
            rec = match.record
            exact = match.exact
            close = exact or distance <= self.settings.max_distance
            reason = exact and self.settings.numpy_handoff and handoff_reason(
                rec.gflops_median, rec.numpy_gflops, rec.problem.flops, problem.threads)
            if reason:
                return Resolution(problem, "numpy", sched, 0.0, rec.problem.key(), path, rec.gflops_median,
                                  rec.numpy_gflops, reason=reason)
            if not exact and self.settings.numpy_handoff and dot_products(problem):
                return Resolution(problem, "numpy", sched, reason=DOT_PRODUCTS)
            if close or mode == "nearest" or mode == "tune":
                return Resolution(problem, "exact" if exact else "nearest", sched, distance, rec.problem.key(),
                                  path, rec.gflops_median if exact else None, rec.numpy_gflops if exact else None,
                                  tuning=(not close and mode == "tune"))
        if self.settings.numpy_handoff and dot_products(problem):
            return Resolution(problem, "numpy", default_schedule(problem), reason=DOT_PRODUCTS)
        return Resolution(problem, "default", default_schedule(problem), tuning=(mode == "tune"))

    def kernel(self, schedule: Schedule, dtype: str, inputs: Optional[str] = None,
               sizes: Optional[FixedSizes] = None, op: str = PLAIN) -> Kernel:
        """``schedule``'s kernel computing in ``dtype``, reading ``inputs`` (default: ``dtype``);
        with ``sizes``, the exact-size kernel for them (it refuses other sizes with -2); ``op``:
        the problem's, with its fused epilogue."""
        key = _kernel_cache_key(schedule, dtype, inputs, sizes, op)
        k = self._kernels.get(key)
        if k is None:
            source = render(schedule, dtype, inputs=inputs, sizes=sizes, op=op)
            result = build(source, self.build_settings)
            if not result.ok:
                raise BuildError(f"looptune kernel build failed: {result.error}")
            k = self._kernels[key] = Kernel(result.so_path, result.symbol, source.dtype, fused=op != PLAIN)
        return k

    # ---- live tuning ----------------------------------------------------------------------------
    def _start_tuning(self, key: tuple, problem: MatmulProblem) -> None:
        self.live.submit(key, problem)

    def _tuned(self, key: tuple, problem: MatmulProblem, outcome: LiveTuneResult) -> None:
        """The live tuner's result: serve it from now on (the database watcher reloads the record too)."""
        inputs = key[0] if key[0] != problem.dtype else None     # float32_via_bfloat16's key
        resolution = Resolution(problem, "tuned", outcome.schedule, 0.0, problem.key(), self.live.user_db,
                                outcome.gflops, outcome.numpy_gflops, inputs=inputs)
        reason = self.settings.numpy_handoff and handoff_reason(outcome.gflops, outcome.numpy_gflops, problem.flops,
                                                                problem.threads)
        if reason:
            resolution = replace(resolution, source="numpy", reason=reason)
        self.remember(key, self._serve(resolution))

    def _forget_choices(self) -> None:
        """A database changed: every shape resolves again on its next call (kernels stay compiled)."""
        self.dispatch.clear()

    def close(self) -> None:
        """Stop the database watcher (``configure`` replaces the resolver)."""
        self.databases.close()

    def reset_after_fork(self) -> None:
        """In a forked child: locks held by threads that do not exist in the child would deadlock
        it, so start them afresh (compiled kernels stay valid, they are plain code); and run on one
        thread if the parent started OpenMP's threads (``serial_after_fork``)."""
        self.settings = serial_after_fork(self.settings)
        self._lock = threading.Lock()
        self._key_locks = {}
        for key in [k for k, hit in self.dispatch.items() if isinstance(hit[0], Trial)]:
            del self.dispatch[key]          # a trial's lock may be held by a thread the child does not have
        self.databases.reset_after_fork()
        self.live.reset_after_fork()
        self.verdicts.reset_after_fork()
