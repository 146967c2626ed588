"""The evaluator: measure (problem, nest) pairs through a runner, memoized by canonical trace.

Search (``search.loop``), build-db and the RL environment all measure through this one broker:

    evaluator = Evaluator.local(record_path="tools/out/recordings.jsonl")
    results = evaluator.evaluate([(problem, nest), ...])      # one RunResult per pair

A nest reached by different action sequences has one canonical trace
(``looptune.runtime.compiler.schedule.canonical_key``), so it is compiled once and measured
once per problem.  The memo is a ``replay.ResultStore``: with a record path every measurement
is appended to a JSON-lines file, and ``Evaluator.replay`` answers from such a file through a
``ReplayRunner`` (same state, same number): the tuner's one record/replay mechanism.

Inside ``recording_live_measurements(recordings)`` every live measurement of every evaluator in
the process (first timings of kernels, not replays or synthetic runners) is also appended to
this machine's recordings (``recordings.MachineRecordings``): ``build-db`` and ``tune`` keep what
they timed for ``looptune train``, without the tuners they run knowing about it.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Protocol, Sequence

from looptune.runtime.compiler import environment
from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import FixedSizes, render
from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.schedule import Schedule, canonical_key
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.replay import ReplayRunner, ResultStore
from looptune.tuner.measure.protocol import Candidate, MeasureConfig, RunResult
from looptune.tuner.measure.runner import LocalRunner, Runner

# How far the second placement of ``remeasure_elsewhere`` puts operands: 64 pages and three cache
# lines on, so pages, TLB entries and L1/L2 sets all differ (at 32x4096x1024 a shift of five
# pages changed a placement-sensitive kernel's speed less often than one of 256 KB).
SECOND_PLACEMENT_SHIFT_BYTES = 64 * 4096 + 3 * 64

# The timing protocol for tuning and training: short (kernels here take 0.05-5 ms) but with
# enough repeats that the median is stable to a few percent on a quiet core.  A kernel more than
# 4x slower than numpy on its first timed call is timed once (it cannot win; see MeasureConfig).
TUNE_MEASURE = MeasureConfig(warmup=1, min_repeats=5, max_repeats=100, min_total_seconds=0.02,
                             min_sample_seconds=5e-4, timeout_seconds=20.0, slow_cutoff=4.0)


class ResultSink(Protocol):
    """Where ``recording_live_measurements`` sends results (``recordings.MachineRecordings``)."""

    def append(self, results: Sequence[RunResult]) -> None: ...


_live_sinks: list[ResultSink] = []
_live_sinks_lock = threading.Lock()


@contextlib.contextmanager
def recording_live_measurements(sink: Optional[ResultSink]) -> Iterator[None]:
    """While in this block, every live measurement an ``Evaluator`` of this process takes (a
    kernel built and timed, not a replay) is appended to ``sink`` too (None: nowhere).  A sink
    that cannot be written is named in one warning; tuning goes on."""
    if sink is None:
        yield
        return
    with _live_sinks_lock:
        _live_sinks.append(sink)
    try:
        yield
    finally:
        with _live_sinks_lock:
            _live_sinks.remove(sink)


def _publish_live(results: Sequence[RunResult]) -> None:
    with _live_sinks_lock:
        sinks = list(_live_sinks)
    for sink in sinks:
        try:
            sink.append(results)
        except OSError as e:
            environment.warn_once(f"cannot record measurements in {getattr(sink, 'path', sink)}: {e.strerror or e}")


@dataclass
class EvalStats:
    hits: int = 0
    measured: int = 0
    built: int = 0
    build_seconds: float = 0.0
    run_seconds: float = 0.0


class Evaluator:
    """Measure (problem, nest) pairs through a runner, memoized by canonical trace in ``store``.

    ``record_path``: the memo is that JSON-lines recording (``ResultStore.open``: what it holds
    is not measured again, what is measured is appended).  A runner with ``needs_build = False``
    (a ``ReplayRunner``, a synthetic test runner) is asked directly, without compiling anything;
    otherwise the misses of one call are built in one ``build_many`` batch (parallel gcc,
    kernel cache), then timed serially by the runner.
    """

    def __init__(self, runner: Runner, store: Optional[ResultStore] = None, *, record_path: Optional[str] = None):
        if store is not None and record_path is not None:
            raise ValueError("give a store or a record path, not both (a store records to its own path)")
        self.runner = runner
        self.store = ResultStore.open(record_path) if record_path else store if store is not None else ResultStore()
        self.stats = EvalStats()
        self._warm = None

    @classmethod
    def local(cls, record_path: Optional[str] = None, config: MeasureConfig = TUNE_MEASURE) -> "Evaluator":
        return cls(LocalRunner(config), record_path=record_path)

    @classmethod
    def replay(cls, path_or_store, on_missing: Optional[RunResult] = None) -> "Evaluator":
        """Answer from a recording only; a miss raises ``ReplayMissError`` unless ``on_missing`` is given."""
        store = path_or_store if isinstance(path_or_store, ResultStore) else ResultStore.load(path_or_store)
        return cls(ReplayRunner(store, on_missing=on_missing), store)

    def close(self) -> None:
        self.wait()
        self.runner.close()

    def forget(self) -> None:
        """Drop the memo (a long-lived evaluator tuning one problem after another never meets a
        result again); a recording file keeps everything and goes on being appended to."""
        self.store = ResultStore(path=self.store.path)

    @contextlib.contextmanager
    def time_limit(self, seconds: float):
        """While in this block, no single measurement call may take longer than ``seconds`` (the
        runner kills and restarts a worker that overruns: a TIMEOUT result).  Applies to runners
        with a ``MeasureConfig`` (``config``); others are not timed."""
        config = getattr(self.runner, "config", None)
        if not isinstance(config, MeasureConfig) or config.timeout_seconds <= seconds:
            yield
            return
        self.runner.config = replace(config, timeout_seconds=seconds)
        try:
            yield
        finally:
            self.runner.config = config

    @contextlib.contextmanager
    def protocol(self, config: MeasureConfig):
        """While in this block, measure with ``config`` (e.g. the lighter real-size confirmation
        of ``search.proxy``), keeping the current per-call time limit if it is lower.  Applies
        to runners with a ``MeasureConfig``; numpy's time for a problem met first in the block
        is taken with it too.  Results already in the memo are not measured again."""
        current = getattr(self.runner, "config", None)
        if not isinstance(current, MeasureConfig):
            yield
            return
        self.wait()          # a background numpy timing goes on with the protocol it began with
        self.runner.config = replace(config, timeout_seconds=min(config.timeout_seconds, current.timeout_seconds))
        try:
            yield
        finally:
            self.runner.config = current

    def prefetch(self, problem: MatmulProblem) -> None:
        """Start the measurement worker and time numpy for ``problem`` in the background, so both
        overlap with compiling the first candidates (worker start-up is ~0.3 s of Python + numpy)."""
        fn = getattr(self.runner, "numpy_seconds", None)     # a LocalRunner; replays have no reference to time
        if fn is not None and self._warm is None:
            self._warm = threading.Thread(target=lambda: _quietly(fn, problem), daemon=True)
            self._warm.start()

    def wait(self) -> None:
        if self._warm is not None:
            self._warm.join()
            self._warm = None

    def lookup(self, problem: MatmulProblem, nest: LoopNest) -> Optional[RunResult]:
        return self.store.get(problem.key(), canonical_key(nest))

    def evaluate(self, pairs: Sequence[tuple[MatmulProblem, LoopNest]]) -> list[RunResult]:
        keys = [(p, canonical_key(n)) for p, n in pairs]
        out: list[Optional[RunResult]] = [self.store.get(p.key(), k) for p, k in keys]
        self.stats.hits += sum(r is not None for r in out)
        todo: dict[tuple[str, str], tuple[MatmulProblem, str]] = {}
        for (p, k), r in zip(keys, out):
            if r is None:
                todo.setdefault((p.key(), k), (p, k))
        if todo:
            fresh = self._measure(list(todo.values()))
            self.store.extend(fresh)
            if getattr(self.runner, "needs_build", True):
                _publish_live(fresh)
            out = [self.store.get(p.key(), k) for p, k in keys]
        return out  # type: ignore[return-value]

    def renew_numpy(self, problem: MatmulProblem) -> None:
        """Time numpy's reference for ``problem`` once more, keeping the faster (results measured
        from now on carry it); runners without a reference (replays) ignore this."""
        fn = getattr(self.runner, "numpy_second_opinion", None)
        if fn is not None:
            self.wait()
            fn(problem)

    def remeasure(self, pairs: Sequence[tuple[MatmulProblem, LoopNest]]) -> list[RunResult]:
        """Measure again, ignoring (and not changing) what is stored: a second opinion on
        finalists.  A replay answers what it recorded."""
        return self._measure([(p, canonical_key(n)) for p, n in pairs])

    def remeasure_elsewhere(self, pairs: Sequence[tuple[MatmulProblem, LoopNest]],
                            shift_bytes: int = SECOND_PLACEMENT_SHIFT_BYTES) -> list[RunResult]:
        """``remeasure`` on operands placed ``shift_bytes`` further into fresh memory (other pages
        and cache sets, the same offset into a cache line): an application's arrays land
        anywhere, and a kernel whose speed hangs on where (a B panel read down its columns, rows
        16 KB apart: 82 to 145 GFLOPS by placement at 32x4096x1024) should not win on one lucky
        placement.  Runners without a ``MeasureConfig`` (replays) answer ``remeasure``'s."""
        config = getattr(self.runner, "config", None)
        if not isinstance(config, MeasureConfig):
            return self.remeasure(pairs)
        with self.protocol(replace(config, operand_shift_bytes=shift_bytes)):
            return self.remeasure(pairs)

    def _measure(self, todo: list[tuple[MatmulProblem, str]]) -> list[RunResult]:
        if not getattr(self.runner, "needs_build", True):
            self.wait()
            results = self.runner.run([Candidate(p, None, tag=k) for p, k in todo])
            self.stats.measured += len(results)
            return results
        t0 = time.perf_counter()
        scheds = {k: Schedule.from_json(k) for _, k in todo}
        # each problem's exact-size kernels, with its op's epilogue: what the runtime serves from the record
        # (protocol.Candidate)
        builds = build_many([render(scheds[k], p.dtype, sizes=FixedSizes.of(p), op=p.op) for p, k in todo])
        self.stats.built += sum(1 for b in builds if not b.cached)
        self.wait()
        t1 = time.perf_counter()
        cands = [Candidate.from_build(p, b, tag=k) for (p, k), b in zip(todo, builds)]
        results = self.runner.run(cands)
        self.stats.build_seconds += t1 - t0
        self.stats.run_seconds += time.perf_counter() - t1
        self.stats.measured += len(results)
        return results


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:       # a failed warm-up is retried (and reported) by the real request
        pass


def gflops_of(r: Optional[RunResult]) -> Optional[float]:
    return r.gflops if r is not None and r.ok and r.gflops else None


