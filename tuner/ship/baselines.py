"""Honest baselines: which BLAS core numpy runs, which core fits this CPU, and numpy timed with the
fitting core (a sampler for the shared timer of ``timing.py``).

    info = blas_info()          # threadpoolctl's view of numpy's BLAS, judged against detect_cpu()
    info.core, info.fit, info.below   # "Haswell", "SkylakeX", True on an AVX-512 CPU
    with NumpyChild(info.fit, threads=1) as child:  # numpy in a child process, OPENBLAS_CORETYPE=fit
        child.load(problem)
        seconds = time_interleaved({"numpy@" + child.core: child, "ours": lambda: ...})

OpenBLAS picks its kernels by CPU when it loads and can pick kernels below the CPU's ISA (0.3.31
runs its Haswell AVX2 kernels on AMD Zen 5, an AVX-512 CPU).  *Below* means its float32/float64
kernels use a narrower vector ISA than the CPU has (SkylakeX, Cooperlake and SapphireRapids share
the AVX-512 sgemm/dgemm kernels, so SkylakeX on an AMX CPU is not below).  ``OPENBLAS_CORETYPE``
forces a core but is read only when OpenBLAS loads, hence the child process.  A speed claim is a
claim against the best of numpy as installed, numpy on the fitting core and torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np     # also loads its BLAS, so threadpoolctl (blas_info) sees it

from looptune.runtime.compiler.machine import CpuInfo, detect_cpu
from looptune.runtime.compiler.workload import MatmulProblem, parse_shape_line
from looptune.tuner.ship.timing import LocalSampler, pinned_threads, time_interleaved

ISA_CLASSES = ("sse", "avx", "avx2", "avx512")      # the vector ISA of OpenBLAS's float kernels, narrowest first
CORE_ISA = {                                          # OpenBLAS x86 core names (lower case) -> ISA_CLASSES
    **dict.fromkeys(("katmai", "coppermine", "northwood", "prescott", "banias", "atom", "core2", "penryn",
                     "dunnington", "nehalem", "opteron", "opteron(sse3)", "barcelona", "nano", "bobcat"), "sse"),
    **dict.fromkeys(("sandybridge", "bulldozer", "piledriver", "steamroller", "excavator"), "avx"),
    **dict.fromkeys(("haswell", "zen"), "avx2"),
    **dict.fromkeys(("skylakex", "cooperlake", "sapphirerapids"), "avx512"),
}
BLAS_DTYPES = ("float32", "float64")    # numpy hands these to its BLAS; bfloat16 and float16 run numpy's own loops
CHILD_MODULE = "looptune.tuner.ship.baselines"


def cpu_isa(cpu: CpuInfo) -> Optional[str]:
    """The widest of ``ISA_CLASSES`` the CPU has (its own features, whatever LOOPTUNE_ISA caps);
    None off x86."""
    if cpu.arch not in ("x86_64", "AMD64", "i686", "i386"):
        return None
    f = set(cpu.features)
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= f:
        return "avx512"
    if {"avx2", "fma"} <= f:
        return "avx2"
    return "avx" if "avx" in f else "sse"


def fitting_core(cpu: CpuInfo) -> Optional[str]:
    """The OpenBLAS core that fits the CPU: SapphireRapids where AMX, Cooperlake for AVX512-BF16,
    SkylakeX for AVX-512, Haswell (Zen on AMD) for AVX2; None where not judged (off x86)."""
    isa = cpu_isa(cpu)
    amd = "amd" in cpu.model_name.lower()
    ext = set(cpu.extensions)
    if isa == "avx512":
        if {"amx_bf16", "amx_tile", "avx512_bf16"} <= ext:
            return "SapphireRapids"
        return "Cooperlake" if "avx512_bf16" in ext else "SkylakeX"
    if isa == "avx2":
        return "Zen" if amd else "Haswell"
    if isa == "avx":
        return "Bulldozer" if amd else "Sandybridge"
    if isa == "sse":
        return "Nehalem" if "sse4_2" in cpu.features else "Prescott"
    return None


@dataclass(frozen=True)
class BlasInfo:
    """numpy's BLAS as threadpoolctl reports it, judged against the CPU."""
    library: str            # threadpoolctl's internal_api: "openblas", "mkl", "blis", ... ("" unknown)
    prefix: str             # "libscipy_openblas", "libopenblas", ...
    version: str
    core: str               # the kernels OpenBLAS runs (threadpoolctl's ``architecture``; "" unknown)
    forced: str             # OPENBLAS_CORETYPE as the user set it ("" not set)
    cpu_isa: str            # the CPU's class in ISA_CLASSES ("" off x86)
    fit: str                # the core that fits the CPU ("" not judged)

    @property
    def core_isa(self) -> str:
        return CORE_ISA.get(self.core.lower(), "")

    @property
    def below(self) -> bool:
        """OpenBLAS runs float kernels of a narrower ISA than the CPU has."""
        if self.library != "openblas" or not self.core_isa or not self.cpu_isa:
            return False
        return ISA_CLASSES.index(self.core_isa) < ISA_CLASSES.index(self.cpu_isa)

    def describe(self) -> str:
        """One line: the library, the core it runs, who chose it, and how it fits this CPU."""
        if not self.library:
            return "numpy's BLAS: unknown (threadpoolctl does not see it)"
        name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(self.library, self.library)
        version = ".".join(self.version.split(".")[:3]) if self.library == "openblas" else self.version
        text = f"numpy's BLAS: {name} {version} ({self.prefix})".replace("  ", " ")
        if not self.core:
            return text
        text += f", {self.core} kernels"
        if self.forced:
            text += (f", forced by OPENBLAS_CORETYPE={self.forced} (numpy runs that core)"
                     if self.forced.lower() == self.core.lower() else
                     f" (OPENBLAS_CORETYPE={self.forced} is set; OpenBLAS runs {self.core})")
        isa = _ISA_NAMES.get(self.cpu_isa, "")
        if self.below:
            text += f": {_ISA_NAMES[self.core_isa]}, below this CPU's {isa} (fitting core: {self.fit})"
        elif isa and self.fit and self.core_isa:
            text += f": {_ISA_NAMES[self.core_isa]}, this CPU's ISA (fitting core: {self.fit})"
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "core_isa": self.core_isa, "below": self.below}


_ISA_NAMES = {"sse": "SSE", "avx": "AVX", "avx2": "AVX2", "avx512": "AVX-512"}


def numpy_blas_entry(pool_info: Sequence[dict]) -> Optional[dict]:
    """numpy's BLAS among threadpoolctl's entries: a BLAS loaded from numpy's folder, else the first."""
    blas = [e for e in pool_info if e.get("user_api") == "blas"]
    ours = [e for e in blas if "numpy" in str(e.get("filepath", "")).replace("\\", "/").lower()]
    return (ours or blas or [None])[0]


def blas_info(pool_info: Optional[Sequence[dict]] = None, cpu: Optional[CpuInfo] = None,
              forced: Optional[str] = None) -> BlasInfo:
    """numpy's BLAS judged against the CPU; the arguments default to threadpoolctl's report (numpy
    loaded), ``detect_cpu()`` and ``$OPENBLAS_CORETYPE`` (tests pass fakes)."""
    if pool_info is None:
        try:
            from threadpoolctl import threadpool_info     # tolerated if missing: numpy's BLAS then shows as unknown
            pool_info = threadpool_info()
        except ImportError:
            pool_info = []
    cpu = cpu or detect_cpu()
    forced = os.environ.get("OPENBLAS_CORETYPE", "") if forced is None else forced   # OpenBLAS's variable, not ours
    entry = numpy_blas_entry(pool_info) or {}
    return BlasInfo(library=str(entry.get("internal_api", "")), prefix=str(entry.get("prefix", "")),
                    version=str(entry.get("version") or ""), core=str(entry.get("architecture") or ""),
                    forced=forced.strip(), cpu_isa=cpu_isa(cpu) or "", fit=fitting_core(cpu) or "")


def baseline_core(info: BlasInfo, choice: Optional[str] = "auto") -> Optional[str]:
    """The core to time numpy with in a child process: ``auto`` the fitting one when numpy runs a
    core below it (else None), ``off``/None/"" never, anything else that core name."""
    if not choice or choice.lower() == "off":
        return None
    if choice.lower() == "auto":
        return info.fit if info.below and info.fit else None
    return choice


# ---- numpy with another OpenBLAS core, in a child process ---------------------------------------

class ChildError(RuntimeError):
    pass


class NumpyChild:
    """``numpy.matmul`` in a child process started with ``OPENBLAS_CORETYPE=core`` and its BLAS
    pinned to ``threads``; a sampler for ``time_interleaved`` (one sample per request, so it takes
    turns with the libraries of this process).  ``core`` is what OpenBLAS runs there (it may fall
    back from ``requested``)."""

    def __init__(self, core: str, threads: int = 1):
        env = dict(os.environ, OPENBLAS_CORETYPE=core, OPENBLAS_NUM_THREADS=str(threads))
        self.requested = core
        self.proc = subprocess.Popen([sys.executable, "-m", CHILD_MODULE, str(threads)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.core = self._read().get("core") or "?"

    @property
    def label(self) -> str:
        return f"numpy@{self.core}"

    def _read(self) -> dict:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.close()
            raise ChildError(f"numpy with OPENBLAS_CORETYPE={self.requested} stopped (exit {self.proc.returncode})")
        reply = json.loads(line)
        if "error" in reply:
            raise ChildError(f"numpy with OPENBLAS_CORETYPE={self.requested}: {reply['error']}")
        return reply

    def _ask(self, **message) -> dict:
        if self.proc.poll() is not None or self.proc.stdin is None:
            raise ChildError(f"numpy with OPENBLAS_CORETYPE={self.requested} is not running")
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass            # _read reports it
        return self._read()

    def load(self, problem: Union[MatmulProblem, str], *, out: bool = False) -> None:
        """Operands of ``problem`` (``make_operands(seed=0)``, as the bench makes them); ``out``:
        time ``np.matmul(a, b, out=c)``."""
        self._ask(load=str(problem), out=out)

    def prepare(self, min_sample_s: float) -> None:
        self._ask(prepare=min_sample_s)

    def sample(self) -> tuple[float, float]:
        reply = self._ask(sample=True)
        return reply["seconds"], reply["spent"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "NumpyChild":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _child_main(threads: int) -> None:
    """The child's loop: one JSON request per stdin line, one JSON reply per stdout line."""
    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    with pinned_threads(threads):
        reply({"core": blas_info().core})
        sampler: Optional[LocalSampler] = None
        for line in sys.stdin:
            try:
                msg = json.loads(line)
                if "load" in msg:
                    problem = parse_shape_line(msg["load"])
                    a, b, _ = problem.make_operands(seed=0)
                    if problem.batch == 1:
                        a, b = a[0], b[0]
                    c = np.matmul(a, b)
                    sampler = LocalSampler((lambda: np.matmul(a, b, out=c)) if msg.get("out") else (lambda: np.matmul(a, b)))
                    reply({"ok": True})
                elif sampler is None:
                    reply({"error": "no problem loaded"})
                elif "prepare" in msg:
                    sampler.prepare(float(msg["prepare"]))
                    reply({"number": sampler.number})
                else:
                    seconds, spent = sampler.sample()
                    reply({"seconds": seconds, "spent": spent})
            except Exception as e:      # noqa: BLE001  (reported to the parent, which raises ChildError)
                reply({"error": f"{type(e).__name__}: {e}"})


def numpy_core_gflops(problems: Sequence[MatmulProblem], core: str, threads: int = 1, *, out: bool = False,
                      **timing) -> tuple[str, list[Optional[float]]]:
    """(the core that ran, GFLOPS of numpy.matmul per problem) with ``OPENBLAS_CORETYPE=core`` in a
    child process, for tools whose other figures come from elsewhere; None for non-BLAS dtypes."""
    figures: list[Optional[float]] = []
    with NumpyChild(core, threads) as child:
        for p in problems:
            if p.dtype not in BLAS_DTYPES:
                figures.append(None)
                continue
            child.load(p, out=out)
            figures.append(p.flops / time_interleaved({"numpy": child}, **timing)["numpy"] / 1e9)
        return child.core, figures


if __name__ == "__main__":
    _child_main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)


def per_thread_count(script: str, threads: Sequence[int], args: Sequence[str], env: dict) -> list[dict]:
    """``script --worker T *args`` for each thread count T, each in a fresh process (every pool
    sized once, numpy imported first as in an application): the JSON line each prints last.  A
    worker that fails ends the tool with its error."""
    results = []
    for t in threads:
        done = subprocess.run([sys.executable, os.path.abspath(script), "--worker", str(t), *args],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def per_thread_count_as_user(script: str, threads: Sequence[int], args: Sequence[str], *, db: Optional[str] = None,
                             warm_cache: bool = False) -> list[dict]:
    """``per_thread_count`` with the runtime's defaults (nearest-record fallback), ``db`` as the user
    database if given, and a cold kernel cache unless ``warm_cache``."""
    env = dict(os.environ, LOOPTUNE_FALLBACK="nearest")
    if db:
        env["LOOPTUNE_DB"] = os.path.abspath(db)
    with tempfile.TemporaryDirectory() as cache:
        if not warm_cache:
            env["LOOPTUNE_CACHE_DIR"] = cache
        return per_thread_count(script, threads, args, env)


def ratio_table(results: Sequence[dict], titles: Sequence[str], label: Callable[[dict], str],
                numpy_format: str = ".1f", ratio_format: str = ".2f") -> list[str]:
    """The markdown rows of ``per_thread_count`` results whose rows hold ``ours``, ``numpy``, ``torch``
    (GFLOPS, torch None without it) and ``source``: ``titles`` names the label, ours, numpy and
    torch columns; ratios are within each run."""
    with_torch = any(r["torch"] for r in results)
    name, ours, numpy_title, torch_title = titles
    head = f"| {name} | threads | {ours} | {numpy_title} | ours/numpy |" + (f" {torch_title} | ours/torch |"
                                                                             if with_torch else "")
    lines = [head + " source |", "|" + "---|" * head.count("|")]       # head's columns and source
    for result in results:
        for row in result["rows"]:
            line = (f"| {label(row)} | {result['threads']} | {row['ours']:.1f} | {row['numpy']:{numpy_format}} | "
                    f"{row['ours'] / row['numpy']:{ratio_format}}x |")
            if with_torch:
                line += f" {row['torch']:.1f} | {row['ours'] / row['torch']:.2f}x |"
            lines.append(line + f" {row['source']} |")
    return lines
