"""Proxy problems: search a large problem on a smaller one of its family, confirm on the real size.

A schedule replays on any size of its family and its kernel takes the sizes as arguments, so a
candidate for 2048 x 2048 x 2048 can be timed on 536 x 2048 x 512 (7 ms a call instead of 90)
and only the best few timed on the real problem (each compiled again as the real size's
exact-size kernel, ``codegen_sizes``: one compile round per finalist, counted in the
budget).  ``proxy_problem`` picks the proxy:

* a problem whose one timing is cheap (``prior_timing_s`` at most ``PROXY_ABOVE_S``) is its own;
* otherwise whole cache blocks of the analytic default (MC for m, NC for n, KC for k) are taken
  off the dimension that has the most of them, half at a time, until a call is a few ms of
  work (``PROXY_FLOPS_PER_THREAD``) and the operands are small (``PROXY_ELEMENTS``).  Removing
  whole blocks keeps each dimension's remainder, so the default's partial blocks and partial
  register tiles are those of the real problem; every dimension keeps at least one block, and
  the loop the default runs on threads keeps one block per thread (the threads keep their
  share of work).  Small dimensions (below one block) are kept as they are; the batch is
  cut to the thread count first.

The real-size confirmation is timed with ``CONFIRM_MEASURE``: no warm-up call beyond the one
``time_calls`` makes, no accumulate check, two samples or 0.1 s of them (a 2048^3 call is
0.1 s: the tuning protocol's seven calls, numpy's seven and the checks would be 2 s alone).
``confirm_cost_s`` is its cost model: operands, the float64 reference product the worker
verifies against, numpy's timing (once per problem) and the kernel's calls, at rates learnt
from the proxy's measurements (``Rates``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from looptune.runtime.compiler.defaults import default_params
from looptune.runtime.compiler.machine import CpuInfo
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.evaluator import Evaluator, gflops_of
from looptune.tuner.measure.protocol import MeasureConfig, RunResult

NUMPY_FLOAT16_GFLOPS = 1.0      # numpy's float16 matmul: a scalar loop (no BLAS)
PROXY_ABOVE_S = 0.15            # problems whose one timing the prior puts above this get a proxy
PROXY_FLOPS_PER_THREAD = 4e8    # a proxy call: ~4 ms per thread at 100 GFLOPS
PROXY_ELEMENTS = 1 << 22        # A + B + C of a proxy: its operands and reference are cheap
SETUP_S_PER_ELEMENT = 2e-8      # random operands in the worker (measured: 0.25 s at 3 x 2048^2)
PRIOR_GFLOPS_PER_THREAD = 40.0  # float32 rate before anything is measured (pessimistic)
SAFETY = 0.85                   # measured rates are discounted by this much in cost estimates

# The real-size timing: the first call of time_calls warms up, then two samples or 0.1 s of them.
CONFIRM_MEASURE = MeasureConfig(warmup=0, min_repeats=2, max_repeats=20, min_total_seconds=0.1,
                                min_sample_seconds=5e-4, timeout_seconds=20.0, verify_accumulate=False,
                                slow_cutoff=4.0)


def prior_timing_s(problem: MatmulProblem) -> float:
    """A pessimistic guess of the time to time one candidate with the tuning protocol, before
    anything is measured: the operands' set-up in the worker plus about nine calls (verification,
    warm-up, samples) at 40 float32 GFLOPS per thread (20 in float64; bfloat16 as float32, the
    rate of its portable kernels, which widen to float32)."""
    p = problem
    setup_s = SETUP_S_PER_ELEMENT * _elements(p)
    return setup_s + 9 * p.flops / (Rates.prior(p).kernel_gflops * 1e9)


def _elements(p: MatmulProblem) -> int:
    return p.batch * (p.m * p.k + p.k * p.n + p.m * p.n)


def proxy_problem(problem: MatmulProblem, cpu: Optional[CpuInfo] = None) -> MatmulProblem:
    """The problem to measure ``problem``'s candidates on (``problem`` itself when it is cheap).

    On a 2 MB-L2 AVX-512 core: 2048^3 at 2 threads -> 536 x 2048 x 512 (n keeps its two NC
    blocks, one per thread); 1024^3 -> 520 x 1024 x 512; 600 x 500 x 400 -> itself.
    """
    if prior_timing_s(problem) <= PROXY_ABOVE_S:
        return problem
    params = default_params(problem, cpu)
    block = {"m": params.mc, "n": params.nc, "k": params.kc}
    keep = {"m": 1, "n": 1, "k": 1}
    if params.parallel in ("m.o", "n.o"):
        keep[params.parallel[0]] = problem.threads
    sizes = {"m": problem.m, "n": problem.n, "k": problem.k}
    batch = problem.batch
    if batch > problem.threads:
        batch = max(problem.threads, 1)

    def too_big() -> bool:
        s = sizes
        flops = 2 * batch * s["m"] * s["n"] * s["k"]
        elements = batch * (s["m"] * s["k"] + s["k"] * s["n"] + s["m"] * s["n"])
        return flops > PROXY_FLOPS_PER_THREAD * problem.threads or elements > PROXY_ELEMENTS

    while too_big():
        spare = {d: sizes[d] // block[d] - keep[d] for d in sizes}
        dim = max(sizes, key=lambda d: (spare[d], sizes[d]))
        if spare[dim] <= 0:
            break
        sizes[dim] -= (spare[dim] + 1) // 2 * block[dim]
    return replace(problem, batch=batch, **sizes)


@dataclass(frozen=True)
class Rates:
    """What one kernel call and one numpy call achieve on a problem (GFLOPS), for cost estimates."""

    kernel_gflops: float
    numpy_gflops: float

    @classmethod
    def prior(cls, problem: MatmulProblem) -> "Rates":
        """Before anything is measured: 40 GFLOPS per thread in float32, half that in float64;
        numpy's float16 is a scalar loop on one thread (about 0.8 GFLOPS on a Sapphire Rapids core,
        BENCHMARKS.md), so its timings are priced at 1."""
        g = PRIOR_GFLOPS_PER_THREAD * problem.threads * (0.5 if problem.dtype == "float64" else 1.0)
        return cls(g, NUMPY_FLOAT16_GFLOPS if problem.dtype == "float16" else g)

    @classmethod
    def measured(cls, kernel_gflops: Optional[float], numpy_gflops: Optional[float],
                 fallback: "Rates") -> "Rates":
        """Measured rates (discounted by ``SAFETY``), ``fallback``'s where one is missing."""
        k = SAFETY * kernel_gflops if kernel_gflops else fallback.kernel_gflops
        n = SAFETY * numpy_gflops if numpy_gflops else fallback.numpy_gflops
        return cls(k, n)


def _calls(call_s: float) -> int:
    """Calls of one ``CONFIRM_MEASURE`` timing of a call that takes ``call_s``: the warm-up call,
    then samples until both the minimum count and the minimum total are reached."""
    c = CONFIRM_MEASURE
    samples = min(c.max_repeats, max(c.min_repeats, math.ceil(c.min_total_seconds / max(call_s, 1e-9))))
    number = max(1, math.ceil(c.min_sample_seconds / max(call_s, 1e-9)))
    return 1 + samples * number


def confirm_cost_s(problem: MatmulProblem, rates: Rates, *, first: bool, numpy_timed: bool = False) -> float:
    """Seconds to time one candidate on ``problem`` with ``CONFIRM_MEASURE``.

    ``first``: the worker has no reference data for this problem yet (random operands and their
    float64 product: for float32, at half numpy's rate); ``numpy_timed``: numpy's time is known (else
    its operands and calls are paid too).  The kernel adds its verification call."""
    kernel_s = problem.flops / (rates.kernel_gflops * 1e9)
    numpy_s = problem.flops / (rates.numpy_gflops * 1e9)
    operands_s = SETUP_S_PER_ELEMENT * _elements(problem)
    cost = (1 + _calls(kernel_s)) * kernel_s + 1e-8 * problem.batch * problem.m * problem.n
    if first:
        cost += operands_s + numpy_s * (2 if problem.dtype == "float32" else 1)
    if not numpy_timed:
        cost += operands_s + _calls(numpy_s) * numpy_s
    return cost


def finalists(problem: MatmulProblem, measured: dict[str, RunResult], by_key: dict[str, Any], top: int) -> list[str]:
    """The keys of the ``top`` fastest proxy results, fastest first.  With threads > 1 the fastest
    parallel one is among them (last, if it did not make the cut): a schedule without
    ``parallel`` is kept for such a problem only when it was faster at the real size too."""
    ranked = [k for _, k in sorted(((gflops_of(r), k) for k, r in measured.items() if gflops_of(r)), reverse=True)]
    out = ranked[:top]
    if problem.threads > 1 and not any(by_key[k].nest.parallel for k in out):
        par = next((k for k in ranked if by_key[k].nest.parallel), None)
        if par is not None:
            out = out[:max(0, top - 1)] + [par] if top > 1 else out + [par]
    return out


def confirm_on_real_size(problem: MatmulProblem, evaluator: Evaluator, measured: dict[str, RunResult],
                         by_key: dict[str, Any], budget: Any, top: int, rates: Rates, real: dict[str, RunResult],
                         notify: Callable[[list, list], Any]) -> Optional[tuple[float, Any, RunResult]]:
    """Time the proxy's finalists on ``problem`` itself, fastest first: the first always (a record
    must carry its real size's measurement, even when that overruns the budget: a problem whose
    operands alone take a second to set up, such as 1 x 11008 x 4096, would otherwise get no
    record at all), the others only when ``confirm_cost_s`` says they fit before ``budget``'s
    deadline (a ``budget.Budget``).  Fills ``real`` (key -> result) and returns the fastest
    real-size result as (GFLOPS, candidate, result), None if none verified."""
    first, numpy_timed = True, False
    for k in finalists(problem, measured, by_key, top):
        # every real-size timing compiles its exact-size kernel first
        if not first and budget.elapsed_s() + budget.cost.compile_round_s + confirm_cost_s(
                problem, rates, first=False, numpy_timed=numpy_timed) > budget.deadline_s:
            break
        with evaluator.protocol(CONFIRM_MEASURE):
            (r,) = evaluator.evaluate([(problem, by_key[k].nest)])
        real[k] = r
        notify([by_key[k]], [r])
        first = False
        numpy_timed = numpy_timed or r.numpy_gflops is not None
        rates = Rates.measured(gflops_of(r), r.numpy_gflops, rates)
    ok = [(gflops_of(r), k) for k, r in real.items() if gflops_of(r)]
    if not ok:
        return None
    g, k = max(ok)
    return g, by_key[k], real[k]
