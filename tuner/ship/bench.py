"""``looptune bench``: runtime.matmul against numpy (and torch when installed), side by side.

    rows = run_bench(problems, threads=1)
    print(table(rows)); plot(rows, "bench.png")

Timing protocol, the same for every library: operands made once per problem; two warm-up
calls; each *sample* is the mean of ``number`` back-to-back calls, ``number`` chosen so a
sample lasts at least ``min_sample_s``; the libraries take turns sample by sample (so a
noisy moment hits all of them) until each has ``min_repeats`` samples and
``min_time_s`` of them; the median sample is the time.  Thread counts are pinned on every
side: ``threads=`` for LoopTune, threadpoolctl for numpy's BLAS, ``torch.set_num_threads``.
Each LoopTune result is checked against numpy before it is timed.

Served against stored: for a problem with an exact record, ``stored_gflops`` is what the tuner
measured and stored for what the runtime serves (the record's kernel; numpy's figure from the
same run when the runtime hands the problem to numpy), and the row compares it with what
``runtime.matmul`` delivers now, with a fresh output and with ``out=``; rows below
``SERVED_FLAG_RATIO`` are flagged.

With more than one thread the libraries are timed in phases instead (``time_phased``): each
library's thread pool spins for a while after a call, and on a machine with as many cores as
threads, taking turns sample by sample would time one library's kernel against the other
library's still-spinning workers rather than the kernels themselves.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.protocol import default_tolerance

if TYPE_CHECKING:       # the runtime loads when a bench runs, not when this module is imported
    from looptune.runtime.resolve import Resolution

SERVED_FLAG_RATIO = 0.9     # served/stored below this is flagged


@dataclass(frozen=True)
class BenchRow:
    problem: str                      # "M N K [options]" as in a shape file
    key: str
    source: str                       # what serves runtime.matmul: exact | nearest | default | tuned | numpy
    looptune_gflops: float
    numpy_gflops: float
    torch_gflops: Optional[float]
    correct: bool
    max_rel_error: float              # max |error| over max |C|
    looptune_out_gflops: Optional[float] = None   # runtime.matmul(a, b, out=c)
    stored_gflops: Optional[float] = None         # the exact record's figure for what is served (None: no exact record)

    @property
    def served_vs_stored(self) -> Optional[float]:
        """runtime.matmul (fresh output) over the stored GFLOPS; None without an exact record."""
        return self.looptune_gflops / self.stored_gflops if self.stored_gflops else None

    @property
    def served_out_vs_stored(self) -> Optional[float]:
        """runtime.matmul with ``out=`` over the stored GFLOPS; None without an exact record."""
        return self.looptune_out_gflops / self.stored_gflops if self.stored_gflops and self.looptune_out_gflops else None

    @property
    def below_stored(self) -> bool:
        """Served (fresh or ``out=``) under ``SERVED_FLAG_RATIO`` of the stored GFLOPS."""
        ratios = [r for r in (self.served_vs_stored, self.served_out_vs_stored) if r is not None]
        return any(r < SERVED_FLAG_RATIO for r in ratios)

    @property
    def vs_numpy(self) -> float:
        return self.looptune_gflops / self.numpy_gflops if self.numpy_gflops else math.nan

    @property
    def vs_torch(self) -> Optional[float]:
        return self.looptune_gflops / self.torch_gflops if self.torch_gflops else None

    @property
    def torch_vs_numpy(self) -> Optional[float]:
        return self.torch_gflops / self.numpy_gflops if self.torch_gflops and self.numpy_gflops else None


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


@contextlib.contextmanager
def pinned_threads(threads: int, with_torch: bool) -> Iterator[None]:
    """numpy's BLAS (and OpenMP) and torch limited to ``threads`` for the duration."""
    stack = contextlib.ExitStack()
    try:
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(limits=threads))
    except ImportError:     # without threadpoolctl, OPENBLAS_NUM_THREADS decides numpy's side
        pass
    if with_torch:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        stack.callback(torch.set_num_threads, before)
    with stack:
        yield


def _calibrate(fn: Callable[[], object], min_sample_s: float) -> int:
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_sample_s or number >= 1 << 20:
            return number
        number = max(number * 2, int(number * min_sample_s / max(elapsed, 1e-9) * 1.2))


def time_interleaved(fns: dict[str, Callable[[], object]], *, min_repeats: int = 7, max_repeats: int = 200,
                     min_time_s: float = 0.1, min_sample_s: float = 1e-3) -> dict[str, float]:
    """Median seconds per call of each function, sampled in turns (see the module docstring)."""
    numbers = {}
    for name, fn in fns.items():
        fn()
        fn()
        numbers[name] = _calibrate(fn, min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    for _ in range(max_repeats):
        for name, fn in fns.items():
            n = numbers[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            samples[name].append(dt / n)
            spent[name] += dt
        if all(len(s) >= min_repeats for s in samples.values()) and min(spent.values()) >= min_time_s:
            break
    return {name: statistics.median(s) for name, s in samples.items()}


def time_phased(fns: dict[str, Callable[[], object]], *, rounds: int = 3, idle_s: float = 0.05,
                **kwargs) -> dict[str, float]:
    """Median seconds per call of each function, each timed in blocks of its own (after ``idle_s``
    of quiet, so the previous library's spinning threads have gone to sleep); ``rounds`` blocks per
    function in alternating order, the best block's median kept."""
    best: dict[str, float] = {}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            time.sleep(idle_s)
            t = time_interleaved({name: fns[name]}, **kwargs)[name]
            best[name] = min(best.get(name, math.inf), t)
    return best


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_operand(torch, x: np.ndarray):
    """``x`` as a torch tensor sharing its memory; torch cannot take ml_dtypes' bfloat16 arrays, so
    those go over as their uint16 bit patterns, reinterpreted as torch.bfloat16."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def run_bench(problems: Sequence[MatmulProblem], *, threads: int = 1, with_torch: bool = True,
              min_time_s: float = 0.1, on_row: Optional[Callable[[BenchRow], None]] = None) -> list[BenchRow]:
    """One row per problem.  ``problem.threads`` is ignored: everything runs on ``threads``."""
    from looptune import runtime

    torch = _torch() if with_torch else None
    rows = []
    with pinned_threads(threads, torch is not None):
        for p in problems:
            a, b, _ = p.make_operands(seed=0)
            if p.batch == 1:
                a, b = a[0], b[0]
            c = runtime.matmul(a, b, threads=threads)
            out = np.empty_like(c)
            ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
            rtol, atol = default_tolerance(p.dtype, p.k)      # unit-normal operands, as the runner checks
            diff = np.abs(c - ref)
            correct = bool(np.all(diff <= atol + rtol * np.abs(ref)))
            rel = float(np.max(diff) / max(float(np.max(np.abs(ref))), 1e-30)) if c.size else 0.0
            fns: dict[str, Callable[[], object]] = {
                "looptune": lambda: runtime.matmul(a, b, threads=threads),
                "looptune_out": lambda: runtime.matmul(a, b, out, threads=threads),
                "numpy": lambda: np.matmul(a, b),
            }
            if torch is not None:
                ta, tb = _torch_operand(torch, a), _torch_operand(torch, b)
                fns["torch"] = lambda: torch.matmul(ta, tb)
            timer = time_phased if threads > 1 else time_interleaved
            seconds = timer(fns, min_time_s=min_time_s)
            resolution = runtime.explain(a, b, threads=threads)
            gf = {name: p.flops / s / 1e9 for name, s in seconds.items()}
            row = BenchRow(str(p.with_threads(1)), p.with_threads(threads).key(), resolution.source, gf["looptune"],
                           gf["numpy"], gf.get("torch"), correct, rel, gf["looptune_out"], stored_gflops(resolution))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def stored_gflops(resolution: Resolution) -> Optional[float]:
    """The GFLOPS the exact record stored for what the runtime serves: the tuned kernel's median,
    or numpy's figure from the same tuning run where the record hands the problem to numpy;
    None when no exact record of this machine serves the problem."""
    if resolution.distance != 0.0 or resolution.record_problem is None:
        return None
    if resolution.source in ("exact", "tuned"):
        return resolution.expected_gflops
    if resolution.source == "numpy":
        return resolution.numpy_gflops
    return None


def _ratio(value: Optional[float], flag: bool = False) -> str:
    return "-" if value is None else f"{value:.2f}" + ("!" if flag and value < SERVED_FLAG_RATIO else "")


def served_summary(rows: Sequence[BenchRow]) -> str:
    """One line: geomean served/stored (fresh output, ``out=``) over the rows with an exact record."""
    fresh = [r.served_vs_stored for r in rows if r.served_vs_stored is not None]
    if not fresh:
        return "served/stored: no problem has an exact record"
    into = [r.served_out_vs_stored for r in rows if r.served_out_vs_stored is not None]
    flagged = sum(r.below_stored for r in rows)
    return (f"served/stored over {len(fresh)} exact records: geomean {geomean(fresh):.2f} (fresh output), "
            f"{geomean(into):.2f} (out=); {flagged} below {SERVED_FLAG_RATIO:g} (marked !)")


def table(rows: Sequence[BenchRow]) -> str:
    """A plain-text table: the stored GFLOPS of the exact record, what runtime.matmul serves now
    (fresh output and ``out=``) and their ratios (``!`` below ``SERVED_FLAG_RATIO``), the other
    libraries' GFLOPS and LoopTune's ratio to each; geomeans last, then ``served_summary``."""
    has_torch = any(r.torch_gflops for r in rows)
    head = ["problem", "source", "stored", "served", "out=", "srv/sto", "out/sto", "numpy",
            *(["torch"] if has_torch else []), "vs numpy", *(["vs torch"] if has_torch else []), "check"]
    body = []
    for r in rows:
        line = [r.problem, r.source, f"{r.stored_gflops:.1f}" if r.stored_gflops else "-", f"{r.looptune_gflops:.1f}",
                f"{r.looptune_out_gflops:.1f}" if r.looptune_out_gflops else "-",
                _ratio(r.served_vs_stored, True), _ratio(r.served_out_vs_stored, True), f"{r.numpy_gflops:.1f}"]
        if has_torch:
            line.append(f"{r.torch_gflops:.1f}" if r.torch_gflops else "-")
        line.append(f"{r.vs_numpy:.2f}x")
        if has_torch:
            line.append(f"{r.vs_torch:.2f}x" if r.vs_torch else "-")
        line.append("ok" if r.correct else "WRONG")
        body.append(line)
    fresh = [r.served_vs_stored for r in rows if r.served_vs_stored is not None]
    into = [r.served_out_vs_stored for r in rows if r.served_out_vs_stored is not None]
    foot = ["geomean", "", "", "", "", _ratio(geomean(fresh) if fresh else None),
            _ratio(geomean(into) if into else None), ""] + ([""] if has_torch else [])
    foot.append(f"{geomean([r.vs_numpy for r in rows]):.2f}x")
    if has_torch:
        foot.append(f"{geomean([r.vs_torch or 0 for r in rows]):.2f}x")
    foot.append("")
    widths = [max(len(line[i]) for line in [head, *body, foot]) for i in range(len(head))]

    def fmt(line):
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *map(fmt, body), rule, fmt(foot), served_summary(rows)])


def to_json(rows: Sequence[BenchRow], *, threads: int, machine: str, numpy_handoff: bool = True) -> dict:
    fresh = [r.served_vs_stored for r in rows if r.served_vs_stored is not None]
    into = [r.served_out_vs_stored for r in rows if r.served_out_vs_stored is not None]
    return {
        "machine": machine, "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "numpy_handoff": numpy_handoff,
        "rows": [{**asdict(r), "vs_numpy": r.vs_numpy, "vs_torch": r.vs_torch, "served_vs_stored": r.served_vs_stored,
                  "served_out_vs_stored": r.served_out_vs_stored, "below_stored": r.below_stored} for r in rows],
        "geomean_vs_numpy": geomean([r.vs_numpy for r in rows]),
        "geomean_vs_torch": geomean([r.vs_torch or 0 for r in rows]) if any(r.torch_gflops for r in rows) else None,
        "geomean_served_vs_stored": geomean(fresh) if fresh else None,
        "geomean_served_out_vs_stored": geomean(into) if into else None,
        "served_flag_ratio": SERVED_FLAG_RATIO,
        "all_correct": all(r.correct for r in rows),
    }


def plot(rows: Sequence[BenchRow], path: str, *, title: str = "") -> None:
    """A grouped bar chart: speedup over numpy per problem (LoopTune, and torch when measured),
    a line at 1.0, the geomean in the title.  Shapes served by a borrowed schedule are marked *."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (LoopTune's [plot] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_torch = any(r.torch_gflops for r in rows)
    labels = [r.problem.replace(" dtype=float64", " f64").replace(" dtype=bfloat16", " bf16").replace(" ", "\u00d7", 2) + ("" if r.stored_gflops else " *")
              for r in rows]
    x = np.arange(len(rows))
    width = 0.4 if has_torch else 0.6
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(rows) + 2.5), 5.0), layout="constrained")
    lt = [r.vs_numpy for r in rows]
    bars = ax.bar(x - (width / 2 if has_torch else 0), lt, width, label="LoopTune", color="#1f77b4")
    if has_torch:
        ax.bar(x + width / 2, [r.torch_vs_numpy or 0 for r in rows], width, label="torch", color="#ff7f0e")
    ax.axhline(1.0, color="black", linewidth=1.2, linestyle="--", label="numpy (1.0)")
    if len(rows) <= 30:
        for bar, value in zip(bars, lt):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8 if len(rows) > 20 else 9)
    ax.set_ylabel("speedup over numpy (higher is better)")
    ax.set_xlabel("problem M\u00d7N\u00d7K   (* = no record for this exact shape)")
    geo = geomean(lt)
    ax.set_title((title + "\n" if title else "") + f"LoopTune vs numpy: geomean {geo:.2f}x"
                 + (f", torch {geomean([r.torch_vs_numpy or 0 for r in rows]):.2f}x" if has_torch else ""))
    ax.set_ylim(0, max(1.2, max(lt + [r.torch_vs_numpy or 0 for r in rows])) * 1.25)   # head room for the legend
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncol=3, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
