"""``looptune bench``: runtime.matmul against numpy (and torch when installed), side by side.

    rows = run_bench(problems, threads=1)
    print(table(rows)); plot(rows, "bench.png")

Timing protocol, the same for every library: operands made once per problem; two warm-up
calls; each *sample* is the mean of ``number`` back-to-back calls, ``number`` chosen so a
sample lasts at least ``min_sample_s``; the libraries take turns sample by sample (so a
noisy moment hits all of them) until each has ``min_repeats`` samples and
``min_time_s`` of them; the median sample is the time.  Thread counts are pinned on every
side: ``threads=`` for LoopTune, threadpoolctl for numpy's BLAS, ``torch.set_num_threads``
(timer and pinning: ``timing.py``, shared with ``tools/``).  Each LoopTune result is checked
against numpy before it is timed.

Served against stored: for a problem with an exact record, ``stored_gflops`` is what the tuner
measured and stored for what the runtime serves (the record's kernel; numpy's figure from the
same run when the runtime hands the problem to numpy), and the row compares it with what
``runtime.matmul`` delivers now, with a fresh output and with ``out=``; rows below
``SERVED_FLAG_RATIO`` are flagged.

With more than one thread the libraries are timed in phases instead (``time_phased``): each
library's thread pool spins for a while after a call, and on a machine with as many cores as
threads, taking turns sample by sample would time one library's kernel against the other
library's still-spinning workers rather than the kernels themselves.

Baselines (``baselines.py``): numpy as installed, torch when importable, and with ``numpy_core``
numpy once more in a child process started with ``OPENBLAS_CORETYPE=numpy_core`` (the core that
fits the CPU, where numpy's OpenBLAS runs one below it), taking turns with the others like a
library of this process.  ``vs_best`` is LoopTune against the fastest of them per problem.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np

from looptune import runtime     # the package only: the runtime itself loads on first use (PEP 562)
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.protocol import default_tolerance
from looptune.tuner.ship import timing
from looptune.tuner.ship.baselines import BLAS_DTYPES, BlasInfo, NumpyChild
from looptune.tuner.ship.timing import time_interleaved, time_phased

__all__ = ["BenchRow", "geomean", "pinned_threads", "plot", "run_bench", "served_summary", "table", "to_json"]

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
    numpy_core: Optional[str] = None              # the OpenBLAS core of the child-process numpy (None: not run)
    numpy_core_gflops: Optional[float] = None     # numpy with OPENBLAS_CORETYPE=numpy_core, in a child process

    @property
    def baselines(self) -> dict[str, float]:
        """Library -> GFLOPS of every baseline measured on this problem."""
        out = {"numpy": self.numpy_gflops}
        if self.numpy_core_gflops:
            out[f"numpy@{self.numpy_core}"] = self.numpy_core_gflops
        if self.torch_gflops:
            out["torch"] = self.torch_gflops
        return {name: gf for name, gf in out.items() if gf and gf > 0}

    @property
    def best_library(self) -> str:
        """The fastest baseline here (a speed claim is a claim against it)."""
        libs = self.baselines
        return max(libs, key=libs.__getitem__) if libs else "numpy"

    @property
    def best_gflops(self) -> float:
        return self.baselines.get(self.best_library, 0.0)

    @property
    def vs_best(self) -> float:
        return self.looptune_gflops / self.best_gflops if self.best_gflops else math.nan

    @property
    def vs_numpy_core(self) -> Optional[float]:
        return self.looptune_gflops / self.numpy_core_gflops if self.numpy_core_gflops else None

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
    torch = None
    if with_torch:
        import torch     # optional dependency (the [train] extra), heavy: only when torch is benched
    with timing.pinned_threads(threads, torch):
        yield


def _torch():
    try:
        import torch     # optional dependency (the [train] extra): None without it
    except ImportError:
        return None
    return torch


def _torch_operand(torch, x: np.ndarray):
    """``x`` as a torch tensor sharing its memory; torch cannot take ml_dtypes' bfloat16 arrays, so
    those go over as their uint16 bit patterns, reinterpreted as torch.bfloat16 (numpy's float16
    is torch.float16 as it is)."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def run_bench(problems: Sequence[MatmulProblem], *, threads: int = 1, with_torch: bool = True,
              min_time_s: float = 0.1, on_row: Optional[Callable[[BenchRow], None]] = None,
              numpy_core: Optional[str] = None) -> list[BenchRow]:
    """One row per problem.  ``problem.threads`` is ignored: everything runs on ``threads``.
    ``numpy_core``: also numpy with ``OPENBLAS_CORETYPE=numpy_core`` in a child process (float32
    and float64 problems; bfloat16 and float16 do not reach the BLAS); its failure raises ``ChildError``."""
    torch = _torch() if with_torch else None
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(pinned_threads(threads, torch is not None))
        child = stack.enter_context(NumpyChild(numpy_core, threads)) if numpy_core else None
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
            if child is not None and p.dtype in BLAS_DTYPES:
                child.load(p)
                fns["numpy_core"] = child
            timer = time_phased if threads > 1 else time_interleaved
            seconds = timer(fns, min_time_s=min_time_s)
            resolution = runtime.explain(a, b, threads=threads)
            gf = {name: p.flops / s / 1e9 for name, s in seconds.items()}
            row = BenchRow(str(p.with_threads(1)), p.with_threads(threads).key(), resolution.source, gf["looptune"],
                           gf["numpy"], gf.get("torch"), correct, rel, gf["looptune_out"], stored_gflops(resolution),
                           child.core if "numpy_core" in gf else None, gf.get("numpy_core"))
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


def _core_label(rows: Sequence[BenchRow]) -> Optional[str]:
    """``numpy@CORE`` of the child-process numpy when it ran on any row, else None."""
    cores = [r.numpy_core for r in rows if r.numpy_core_gflops]
    return f"numpy@{cores[0]}" if cores else None


def _library_ratios(rows: Sequence[BenchRow]) -> dict[str, list[float]]:
    """Library -> LoopTune's ratio to it on every row that measured it."""
    out: dict[str, list[float]] = {"numpy": [r.vs_numpy for r in rows]}
    core = _core_label(rows)
    if core:
        out[core] = [r.vs_numpy_core for r in rows if r.vs_numpy_core]
    if any(r.torch_gflops for r in rows):
        out["torch"] = [r.vs_torch for r in rows if r.vs_torch]
    return out


def table(rows: Sequence[BenchRow]) -> str:
    """A plain-text table: the stored GFLOPS of the exact record, what runtime.matmul serves now
    (fresh output and ``out=``) and their ratios (``!`` below ``SERVED_FLAG_RATIO``), each
    baseline library's GFLOPS, the fastest of them (``best``) and LoopTune's ratio to it; the
    geomean row has LoopTune's ratio to each library under its column, then ``served_summary``."""
    has_torch = any(r.torch_gflops for r in rows)
    core = _core_label(rows)
    libs = ["numpy", *([core] if core else []), *(["torch"] if has_torch else [])]
    head = ["problem", "source", "stored", "served", "out=", "srv/sto", "out/sto", *libs, "best", "vs best", "check"]
    body = []
    for r in rows:
        line = [r.problem, r.source, f"{r.stored_gflops:.1f}" if r.stored_gflops else "-", f"{r.looptune_gflops:.1f}",
                f"{r.looptune_out_gflops:.1f}" if r.looptune_out_gflops else "-",
                _ratio(r.served_vs_stored, True), _ratio(r.served_out_vs_stored, True)]
        figures = {"numpy": r.numpy_gflops, core: r.numpy_core_gflops, "torch": r.torch_gflops}
        line += [f"{figures[lib]:.1f}" if figures[lib] else "-" for lib in libs]
        line += [r.best_library, f"{r.vs_best:.2f}x", "ok" if r.correct else "WRONG"]
        body.append(line)
    fresh = [r.served_vs_stored for r in rows if r.served_vs_stored is not None]
    into = [r.served_out_vs_stored for r in rows if r.served_out_vs_stored is not None]
    ratios = _library_ratios(rows)
    foot = ["geomean", "", "", "", "", _ratio(geomean(fresh) if fresh else None),
            _ratio(geomean(into) if into else None), *(f"{geomean(ratios[lib]):.2f}x" for lib in libs),
            "", f"{geomean([r.vs_best for r in rows]):.2f}x", ""]
    widths = [max(len(line[i]) for line in [head, *body, foot]) for i in range(len(head))]

    def fmt(line):
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *map(fmt, body), rule, fmt(foot), served_summary(rows)])


def baselines_line(info: BlasInfo, rows: Sequence[BenchRow], requested_core: Optional[str] = None) -> str:
    """Two header lines on baselines: numpy's BLAS and its core (``BlasInfo.describe``); what
    ``vs best`` is against, with how the child-process numpy ran when it did."""
    libs = list(_library_ratios(rows))
    core = _core_label(rows)
    if core:
        ran = core.split("@", 1)[1]
        how = f"OPENBLAS_CORETYPE={requested_core}" + (
            f", OpenBLAS ran {ran}" if requested_core and requested_core.lower() != ran.lower() else "")
        libs = [f"{lib} (numpy in a child process, {how})" if lib == core else lib for lib in libs]
    return f"# {info.describe()}\n# vs best: LoopTune against the fastest of {', '.join(libs)}, per problem"


def to_json(rows: Sequence[BenchRow], *, threads: int, machine: str, numpy_handoff: bool = True,
            blas: Optional[BlasInfo] = None, numpy_core: Optional[str] = None) -> dict:
    """Every number; ``blas``: numpy's BLAS and its core, ``numpy_core``: the OPENBLAS_CORETYPE the
    child-process numpy was started with (None: not run; the rows' ``numpy_core`` is what ran)."""
    fresh = [r.served_vs_stored for r in rows if r.served_vs_stored is not None]
    into = [r.served_out_vs_stored for r in rows if r.served_out_vs_stored is not None]
    ratios = _library_ratios(rows)
    core = _core_label(rows)
    return {
        "machine": machine, "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "numpy_handoff": numpy_handoff, "blas": blas.to_dict() if blas is not None else None,
        "numpy_core_requested": numpy_core, "baselines": list(ratios),
        "rows": [{**asdict(r), "vs_numpy": r.vs_numpy, "vs_torch": r.vs_torch, "vs_numpy_core": r.vs_numpy_core,
                  "best_library": r.best_library, "best_gflops": r.best_gflops, "vs_best": r.vs_best,
                  "served_vs_stored": r.served_vs_stored, "served_out_vs_stored": r.served_out_vs_stored,
                  "below_stored": r.below_stored} for r in rows],
        "geomean_vs_best": geomean([r.vs_best for r in rows]),
        "geomean_vs_numpy": geomean(ratios["numpy"]),
        "geomean_vs_numpy_core": geomean(ratios[core]) if core else None,
        "geomean_vs_torch": geomean(ratios["torch"]) if "torch" in ratios else None,
        "geomean_served_vs_stored": geomean(fresh) if fresh else None,
        "geomean_served_out_vs_stored": geomean(into) if into else None,
        "served_flag_ratio": SERVED_FLAG_RATIO,
        "all_correct": all(r.correct for r in rows),
    }


def plot(rows: Sequence[BenchRow], path: str, *, title: str = "") -> None:
    """A grouped bar chart: speedup over numpy (as installed) per problem of LoopTune and of each
    other baseline measured (numpy on the fitting core, torch), a line at 1.0; the title has the
    geomean against numpy and against the best library.  Shapes without an exact record are marked *."""
    try:
        import matplotlib     # optional dependency (the [plot] extra)
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (LoopTune's [plot] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt     # optional as well, and after choosing the Agg backend (no display)

    core = _core_label(rows)
    series = {"LoopTune": [r.vs_numpy for r in rows]}
    if core:
        series[core] = [(r.numpy_core_gflops or 0) / r.numpy_gflops if r.numpy_gflops else 0 for r in rows]
    if any(r.torch_gflops for r in rows):
        series["torch"] = [r.torch_vs_numpy or 0 for r in rows]
    colors = {"LoopTune": "#1f77b4", "torch": "#ff7f0e"}
    labels = [r.problem.replace(" dtype=float64", " f64").replace(" dtype=bfloat16", " bf16")
              .replace(" dtype=float16", " f16").replace(" ", "\u00d7", 2)
              + ("" if r.stored_gflops else " *") for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(series) if len(series) > 1 else 0.6
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(rows) * len(series) ** 0.5 + 2.5), 5.0), layout="constrained")
    bars = None
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        drawn = ax.bar(x + offset, values, width, label=name, color=colors.get(name, "#2ca02c"))
        bars = drawn if bars is None else bars
    ax.axhline(1.0, color="black", linewidth=1.2, linestyle="--", label="numpy (1.0)")
    lt = series["LoopTune"]
    if len(rows) <= 30:
        for bar, value in zip(bars, lt):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8 if len(rows) > 20 else 9)
    ax.set_ylabel("speedup over numpy as installed (higher is better)")
    ax.set_xlabel("problem M\u00d7N\u00d7K   (* = no record for this exact shape)")
    others = "".join(f", {name} {geomean(values):.2f}x" for name, values in series.items() if name != "LoopTune")
    ax.set_title((title + "\n" if title else "") + f"LoopTune vs the best library: geomean "
                 f"{geomean([r.vs_best for r in rows]):.2f}x\nover numpy: LoopTune {geomean(lt):.2f}x{others}")
    ax.set_ylim(0, max(1.2, max(v for values in series.values() for v in values)) * 1.25)   # head room for the legend
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncol=4, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
