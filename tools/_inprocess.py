"""In-process timing for maintainer sweeps (trusted, generated kernels only; the tuner uses the isolated runner)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from looptune.runtime.build import build_many
from looptune.runtime.codegen import render
from looptune.runtime.kernel import Kernel


@dataclass
class Timing:
    seconds: float
    schedule_json: str
    error: str | None = None


def _median_time(fn, min_time: float, min_reps: int = 5) -> float:
    fn()
    samples, total = [], 0.0
    while len(samples) < min_reps or total < min_time:
        t = time.perf_counter(); fn(); dt = time.perf_counter() - t
        samples.append(dt); total += dt
        if len(samples) > 10000:
            break
    return float(np.median(samples))


def numpy_seconds(problem, min_time=0.2) -> float:
    a, b, c = problem.make_operands(1)
    return _median_time(lambda: np.matmul(a, b, out=c), min_time)


def measure_schedules(problem, schedules, min_time=0.2) -> list[Timing]:
    a, b, c = problem.make_operands(1)
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    tol = (1e-4 if problem.dtype == "float32" else 1e-12) * max(1, problem.k) ** 0.5 * 4
    results = build_many([render(s, problem.dtype) for s in schedules])
    out = []
    for s, r in zip(schedules, results):
        if not r.ok:
            out.append(Timing(float("inf"), s.to_json(), r.error)); continue
        k = Kernel(r.so_path, r.symbol, problem.dtype)
        c[...] = np.nan
        k(a, b, c, nthreads=problem.threads)
        if not np.allclose(c, ref, rtol=tol, atol=tol):
            out.append(Timing(float("inf"), s.to_json(), "wrong answer")); continue
        out.append(Timing(_median_time(lambda: k(a, b, c, nthreads=problem.threads), min_time), s.to_json()))
    return out
