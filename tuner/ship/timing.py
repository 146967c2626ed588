"""The timer and thread pinning that ``looptune bench`` and ``tools/`` share.

    with pinned_threads(threads, torch):            # numpy's BLAS, OpenMP and torch on ``threads``
        seconds = time_interleaved({"ours": lambda: ..., "numpy": lambda: ...})    # median s per call

``time_interleaved`` lets the functions take turns sample by sample (a noisy moment hits all of
them); ``time_phased`` times each in blocks of its own after a pause, for more than one thread,
where one library's still-spinning pool would slow the other's turn.  A sample is ``number``
back-to-back calls: calibrated to last ``min_sample_s``, or a fixed count (``LocalSampler``'s
``calls_per_sample``, for call overheads of a microsecond).  ``call_seconds`` times single calls,
each right after another call.

Standard library only (threadpoolctl when installed): a process that times torch alone imports
it without numpy's BLAS or LoopTune's runtime.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union


@contextlib.contextmanager
def pinned_threads(threads: int, torch: Any = None) -> Iterator[None]:
    """numpy's BLAS (and OpenMP) limited to ``threads`` for the duration, through threadpoolctl;
    ``torch`` (the module, when the caller uses it) too, by ``torch.set_num_threads``."""
    stack = contextlib.ExitStack()
    try:
        from threadpoolctl import threadpool_limits     # tolerated if missing (see the except below)

        stack.enter_context(threadpool_limits(limits=threads))
    except ImportError:     # without threadpoolctl, OPENBLAS_NUM_THREADS decides numpy's side
        pass
    if torch is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        stack.callback(torch.set_num_threads, before)
    with stack:
        yield


def turn_order(names: Sequence[str], round_: int) -> list[str]:
    """Who goes first takes turns: ``names`` on even rounds, reversed on odd ones."""
    return list(names) if round_ % 2 == 0 else list(names)[::-1]


def calls_lasting(fn: Callable[[], object], min_sample_s: float) -> int:
    """How many back-to-back calls of ``fn`` last at least ``min_sample_s`` (at most 2**20)."""
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_sample_s or number >= 1 << 20:
            return number
        number = max(number * 2, int(number * min_sample_s / max(elapsed, 1e-9) * 1.2))


class Sampler(Protocol):
    """What ``time_interleaved`` times: ``LocalSampler`` here, ``baselines.NumpyChild`` in a child."""

    def prepare(self, min_sample_s: float) -> None: ...

    def sample(self) -> tuple[float, float]: ...


class LocalSampler:
    """A function timed in this process: ``warmup_calls`` untimed calls, then samples of ``number``
    calls (``calls_per_sample``, else as many as last ``min_sample_s``)."""

    def __init__(self, fn: Callable[[], object], *, warmup_calls: int = 2, calls_per_sample: Optional[int] = None):
        self.fn, self.number = fn, calls_per_sample or 1
        self.warmup_calls, self.calls_per_sample = warmup_calls, calls_per_sample

    def prepare(self, min_sample_s: float) -> None:
        for _ in range(self.warmup_calls):
            self.fn()
        self.number = self.calls_per_sample or calls_lasting(self.fn, min_sample_s)

    def sample(self) -> tuple[float, float]:
        """(seconds per call, seconds spent) of one sample."""
        fn, n = self.fn, self.number
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        return dt / n, dt


Timed = Union[Callable[[], object], Sampler]


def time_interleaved(fns: dict[str, Timed], *, min_repeats: int = 7, max_repeats: int = 200, min_time_s: float = 0.1,
                     min_sample_s: float = 1e-3, alternate: bool = False) -> dict[str, float]:
    """Median seconds per call of each function (or ``Sampler``), sampled in turns until each has
    ``min_repeats`` samples and ``min_time_s`` of them; every sample lasts at least
    ``min_sample_s`` (unless its sampler fixes the calls); ``alternate`` reverses the order on odd
    rounds."""
    samplers = {name: fn if hasattr(fn, "sample") else LocalSampler(fn) for name, fn in fns.items()}
    for s in samplers.values():
        s.prepare(min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    for r in range(max_repeats):
        for name in (turn_order(list(samplers), r) if alternate else samplers):
            per_call, dt = samplers[name].sample()
            samples[name].append(per_call)
            spent[name] += dt
        if all(len(s) >= min_repeats for s in samples.values()) and min(spent.values()) >= min_time_s:
            break
    return {name: statistics.median(s) for name, s in samples.items()}


def time_phased(fns: dict[str, Timed], *, rounds: int = 3, idle_s: float = 0.05, **kwargs) -> dict[str, float]:
    """Median seconds per call of each function, each timed in blocks of its own (after ``idle_s``
    of quiet, so the previous library's spinning threads have gone to sleep); ``rounds`` blocks per
    function in alternating order, the best block's median kept."""
    best: dict[str, float] = {}
    for r in range(rounds):
        for name in turn_order(list(fns), r):
            time.sleep(idle_s)
            t = time_interleaved({name: fns[name]}, **kwargs)[name]
            best[name] = min(best.get(name, float("inf")), t)
    return best


def call_seconds(fn: Callable[[], object], calls: int, before: Optional[Callable[[], object]] = None) -> list[float]:
    """Seconds of each of ``calls`` single calls of ``fn``, each right after an untimed call of
    ``before`` (say another library's parallel call): what a caller meets call by call."""
    seconds = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds
