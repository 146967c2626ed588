"""The evaluator: measure (problem, nest) pairs through a runner, memoized by canonical trace.

Search, ``tune()``, build-db and the RL environment all measure through this one broker:

    evaluator = Evaluator.local(record_path="tools/out/recordings.jsonl")
    results = evaluator.evaluate([(problem, nest), ...])      # one RunResult per pair

A nest reached by different action sequences has one canonical trace
(``looptune.runtime.compiler.schedule.canonical_key``), so it is compiled once and measured
once per problem.  With a record path every measurement is appended to a JSONL file, and a
later run over the same file replays it (``ReplayRunner`` semantics: same state, same
number): the one record/replay mechanism of the tuner.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.schedule import Schedule, canonical_key
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.runner import (Candidate, LocalRunner, MeasureConfig, ReplayMissError, ReplayRunner,
                                           ResultStore, Runner, RunResult)

# The timing protocol for tuning and training: short (kernels here take 0.05-5 ms) but with
# enough repeats that the median is stable to a few percent on a quiet core.  A kernel more than
# 4x slower than numpy on its first timed call is timed once (it cannot win; see MeasureConfig).
TUNE_MEASURE = MeasureConfig(warmup=1, min_repeats=5, max_repeats=100, min_total_seconds=0.02,
                             min_sample_seconds=5e-4, timeout_seconds=20.0, slow_cutoff=4.0)


@dataclass
class EvalStats:
    hits: int = 0
    measured: int = 0
    built: int = 0
    build_seconds: float = 0.0
    run_seconds: float = 0.0


class Evaluator:
    """Measure (problem, nest) pairs through a runner, recording by canonical trace.

    ``runner=None`` is replay-only: a miss raises ``ReplayMissError`` unless ``on_missing`` is
    given.  A ``ReplayRunner`` (or any runner with ``needs_build = False``) is asked directly,
    without compiling anything.  Misses of one call are built in one ``build_many`` batch (parallel gcc, kernel
    cache), then timed serially by the runner.
    """

    def __init__(self, runner: Optional[Runner] = None, store: Optional[ResultStore] = None, *,
                 record_path: Optional[str] = None, on_missing: Optional[RunResult] = None):
        self.runner = runner
        self.store = store if store is not None else ResultStore()
        self.record_path = record_path
        self.on_missing = on_missing
        self.stats = EvalStats()
        self._warm = None
        if record_path and os.path.exists(record_path) and store is None:
            self.store = ResultStore.load(record_path)

    @classmethod
    def local(cls, record_path: Optional[str] = None, config: MeasureConfig = TUNE_MEASURE) -> "Evaluator":
        return cls(LocalRunner(config), record_path=record_path)

    @classmethod
    def replay(cls, path_or_store, on_missing: Optional[RunResult] = None) -> "Evaluator":
        store = path_or_store if isinstance(path_or_store, ResultStore) else ResultStore.load(path_or_store)
        return cls(None, store, on_missing=on_missing)

    def close(self) -> None:
        self.wait()
        if self.runner is not None:
            self.runner.close()

    def prefetch(self, problem: MatmulProblem) -> None:
        """Start the measurement worker and time numpy for ``problem`` in the background, so both
        overlap with compiling the first candidates (worker start-up is ~0.3 s of Python + numpy)."""
        fn = getattr(self.runner, "_numpy_seconds", None)
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
            if self.runner is None:
                if self.on_missing is None:
                    p, k = next(iter(todo.values()))
                    raise ReplayMissError(f"no recorded result for {p.key()} {k[:200]}")
                fresh = [replace(self.on_missing, problem_key=p.key(), tag=k) for p, k in todo.values()]
            else:
                fresh = self._measure(list(todo.values()))
            for r in fresh:
                self.store.add(r)
            if self.record_path:
                with open(self.record_path, "a") as f:
                    for r in fresh:
                        f.write(json.dumps(r.to_json(), sort_keys=True) + "\n")
            out = [self.store.get(p.key(), k) for p, k in keys]
        return out  # type: ignore[return-value]

    def remeasure(self, pairs: Sequence[tuple[MatmulProblem, LoopNest]]) -> list[RunResult]:
        """Measure again, ignoring (and not changing) what is stored: a second opinion on
        finalists.  Replay-only evaluators answer from the store."""
        if self.runner is None:
            return self.evaluate(pairs)
        return self._measure([(p, canonical_key(n)) for p, n in pairs])

    def _measure(self, todo: list[tuple[MatmulProblem, str]]) -> list[RunResult]:
        if not getattr(self.runner, "needs_build", True) or isinstance(self.runner, ReplayRunner):
            self.wait()
            results = self.runner.run([Candidate(p, None, tag=k) for p, k in todo])  # type: ignore[union-attr]
            self.stats.measured += len(results)
            return results
        t0 = time.perf_counter()
        scheds = {k: Schedule.from_json(k) for _, k in todo}
        by_dtype = sorted({(p.dtype, k) for p, k in todo})
        builds = build_many([render(scheds[k], dt) for dt, k in by_dtype])
        built = dict(zip(by_dtype, builds))
        self.stats.built += sum(1 for b in builds if not b.cached)
        self.wait()
        t1 = time.perf_counter()
        cands = [Candidate.from_build(p, built[(p.dtype, k)], tag=k) for p, k in todo]
        results = self.runner.run(cands)  # type: ignore[union-attr]
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


