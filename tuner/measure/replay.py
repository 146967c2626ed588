"""Record and replay measurements: the tuner's one mechanism for both.

A ``ResultStore`` holds ``RunResult``s keyed by (problem key, tag; the tag is the schedule's
canonical trace JSON).  Opened on a path, it is an append-only JSON-lines file, one
``RunResult.to_json()`` per line (no pickle), the last line for a key winning:

    store = ResultStore.open("tools/out/recordings.jsonl")   # loads what is there, appends what is added
    ReplayRunner(store)                                      # same candidate, same result, no kernel runs
    RecordingRunner(LocalRunner(), store)                    # measure, and record every result

The ``Evaluator`` memoizes through a store (``Evaluator.local(record_path=...)`` records,
``Evaluator.replay(path)`` answers from a ``ReplayRunner``), so RL training and agent tests
replay exactly; files recorded by earlier versions (same line format) load unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Iterable, Iterator, Optional, Sequence

from looptune.runtime.compiler.errors import LoopTuneError
from looptune.tuner.measure.protocol import Candidate, RunResult
from looptune.tuner.measure.runner import Runner


class ReplayMissError(LoopTuneError, LookupError):
    """A replay was asked about a candidate it has no record of."""


class ResultStore:
    """Recorded results keyed by (problem key, tag).

    ``path``: every result added is also appended to this JSON-lines file (so a long session
    that dies keeps what it measured); ``ResultStore.open`` loads the file first.
    """

    def __init__(self, results: Iterable[RunResult] = (), *, path: str | os.PathLike | None = None):
        self._by_key: dict[tuple[str, str], RunResult] = {}
        self.path = path
        for r in results:
            self._by_key[(r.problem_key, r.tag)] = r

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ResultStore":
        """The recording at ``path`` (loaded if the file exists), appended to from now on."""
        return cls(cls.load(path) if os.path.exists(path) else (), path=path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ResultStore":
        """A read-only copy of the recording at ``path``."""
        store = cls()
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        r = RunResult.from_json(json.loads(line))
                    except (ValueError, TypeError, KeyError) as e:
                        raise ValueError(f"{path}:{number}: not a RunResult record: {e}") from None
                    store._by_key[(r.problem_key, r.tag)] = r
        return store

    def add(self, result: RunResult) -> None:
        self.extend([result])

    def extend(self, results: Sequence[RunResult]) -> None:
        for r in results:
            self._by_key[(r.problem_key, r.tag)] = r
        if self.path is not None and results:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in results)

    def get(self, problem_key: str, tag: str) -> RunResult | None:
        return self._by_key.get((problem_key, tag))

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self._by_key.values())

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def save(self, path: str | os.PathLike) -> None:
        """Write the store (one line per key) to ``path`` atomically."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in self)
        os.replace(tmp, path)


class ReplayRunner(Runner):
    """Answer from a ResultStore: same candidate, same result, no kernel runs.

    An unknown candidate raises ``ReplayMissError`` (a test or training setup error, not a
    kernel failure) unless ``on_missing`` gives the result to return instead.
    """

    needs_build = False        # candidates are looked up by tag: nothing is compiled

    def __init__(self, store: ResultStore | Iterable[RunResult], *, on_missing: Optional[RunResult] = None):
        self.store = store if isinstance(store, ResultStore) else ResultStore(store)
        self.on_missing = on_missing
        self.misses = 0

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "ReplayRunner":
        return cls(ResultStore.load(path), **kwargs)

    def run(self, candidates: Sequence[Candidate]) -> list[RunResult]:
        out = []
        for c in candidates:
            key = c.problem.key()
            r = self.store.get(key, c.tag)
            if r is None:
                self.misses += 1
                if self.on_missing is None:
                    raise ReplayMissError(f"no recorded result for problem {key} with tag {c.tag[:200]!r}")
                r = replace(self.on_missing, problem_key=key, tag=c.tag)
            out.append(r)
        return out


class RecordingRunner(Runner):
    """Run an inner runner and record every result (failures too) into a store.

    ``path`` is short for ``store=ResultStore(path=path)``: each result is appended to that
    file as it arrives.  Builds are needed exactly when the inner runner needs them.
    """

    def __init__(self, inner: Runner, store: Optional[ResultStore] = None, *,
                 path: str | os.PathLike | None = None):
        if store is not None and path is not None:
            raise ValueError("give a store or a path, not both (a store records to its own path)")
        self.inner = inner
        self.store = store if store is not None else ResultStore(path=path)
        self.needs_build = getattr(inner, "needs_build", True)

    def run(self, candidates: Sequence[Candidate]) -> list[RunResult]:
        results = self.inner.run(candidates)
        self.store.extend(results)
        return results

    def close(self) -> None:
        self.inner.close()
