"""Peak FMA throughput of this machine, measured, so benchmarks can quote "% of peak".

Peak is not computed from a spec sheet (clock, FMA pipes and vector width are all guesses
on a VM, and Zen 4 runs 512-bit FMAs as two 256-bit halves).  Instead we compile a kernel
with many independent FMA chains per thread,

    for i in 0..iters:                      # no loads, no stores, no dependences between
        acc[0] = fma(acc[0], x, y)          # chains: only FMA latency x pipes limits it
        ...
        acc[A-1] = fma(acc[A-1], x, y)

for every vector width the ISA offers (512- and 256-bit on AVX-512, 256 on AVX2, 128 on
NEON and GCC's portable vector extension) and 2-3 accumulator counts (A must cover
latency x pipes, e.g. 4 x 2 = 8 on Zen, and fit in the register file).  The peak is the
best of all variants, best of several runs: interference can only make a run slower.
"""
from __future__ import annotations

import ctypes
import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from looptune.runtime.compiler.build import BuildError, build
from looptune.runtime.compiler.codegen import KernelSource
from looptune.runtime.compiler.kernel import load_library
from looptune.runtime.compiler.machine import detect_cpu

# bfloat16 and float16: float32 accumulator lanes; vdpbf16ps: two products per lane, float16
# kernels (inputs widened to float32 while packing, codegen_f16) one: float32's FMA
_LANE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 4, "float16": 4}
_PRODUCTS_PER_LANE = {"float32": 1, "float64": 1, "bfloat16": 2, "float16": 1}
_SAME_PEAK = {"float16": "float32"}     # dtypes whose kernels run another dtype's FMA chains


@dataclass(frozen=True)
class PeakVariant:
    isa: str            # avx512 | avx2 | neon | portable: which C vocabulary renders it
    bits: int           # vector width
    dtype: str
    accumulators: int

    @property
    def lanes(self) -> int:
        return self.bits // 8 // _LANE_BYTES[self.dtype]

    @property
    def name(self) -> str:
        return f"peak_{self.isa}_v{self.bits}_{self.dtype}_a{self.accumulators}"

    @property
    def flops_per_iter(self) -> int:
        return 2 * _PRODUCTS_PER_LANE[self.dtype] * self.lanes * self.accumulators


def variants(isa: str, dtype: str) -> list[PeakVariant]:
    """The variants worth trying for an ISA (register file: 32 zmm/ymm with AVX-512, 16 ymm
    with AVX2, 32 q with NEON); two registers stay free for x and y.  ``bfloat16`` is AVX512-BF16's
    ``vdpbf16ps`` (two bf16 products summed into each float32 lane), on CPUs that have it only;
    ``float16``'s are float32's (its kernels compute in float32)."""
    if dtype in _SAME_PEAK:
        return variants(isa, _SAME_PEAK[dtype])
    if dtype == "bfloat16":
        if isa != "avx512" or detect_cpu().bf16_isa == "convert":      # the code generator's own test
            return []
        return [PeakVariant("avx512", 512, dtype, acc) for acc in (12, 16, 24)]
    shapes = {
        "avx512": [("avx512", 512, 16), ("avx512", 512, 24), ("avx2", 256, 12), ("avx2", 256, 24)],
        "avx2": [("avx2", 256, 10), ("avx2", 256, 12)],
        "neon": [("neon", 128, 16), ("neon", 128, 24)],
        "portable": [("portable", 128, 8), ("portable", 128, 12)],
    }[isa]
    return [PeakVariant(i, bits, dtype, acc) for i, bits, acc in shapes]


# (vector type, set1, fma(acc, x, y) = acc * x + y) per (isa, bits, dtype)
_VOCAB = {
    ("avx512", 512, "float32"): ("__m512", "_mm512_set1_ps({})", "_mm512_fmadd_ps({a}, {x}, {y})"),
    ("avx512", 512, "float64"): ("__m512d", "_mm512_set1_pd({})", "_mm512_fmadd_pd({a}, {x}, {y})"),
    ("avx512", 512, "bfloat16"): ("__m512", "_mm512_set1_ps({})",
                                  "_mm512_dpbf16_ps({a}, (__m512bh)_mm512_castps_si512({x}), (__m512bh)_mm512_castps_si512({y}))"),
    ("avx2", 256, "float32"): ("__m256", "_mm256_set1_ps({})", "_mm256_fmadd_ps({a}, {x}, {y})"),
    ("avx2", 256, "float64"): ("__m256d", "_mm256_set1_pd({})", "_mm256_fmadd_pd({a}, {x}, {y})"),
    ("neon", 128, "float32"): ("float32x4_t", "vdupq_n_f32({})", "vfmaq_f32({y}, {a}, {x})"),
    ("neon", 128, "float64"): ("float64x2_t", "vdupq_n_f64({})", "vfmaq_f64({y}, {a}, {x})"),
    ("portable", 128, "float32"): ("v4f", "(v4f){{0}} + (float)({})", "{a} * {x} + {y}"),
    ("portable", 128, "float64"): ("v2d", "(v2d){{0}} + (double)({})", "{a} * {x} + {y}"),
}

_PRELUDE = """#include <stdint.h>
#include <string.h>
#include <time.h>
#include <omp.h>
{include}
static double thread_cpu_seconds(void) {{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}}
typedef float v4f __attribute__((vector_size(16)));
typedef double v2d __attribute__((vector_size(16)));
"""


def render_variant(v: PeakVariant) -> str:
    """C for one variant: a chain function and an OpenMP driver timed between barriers.

    The driver also reports the team size it really got and, as ``cpu_share``, the CPU time
    the chains got over team size x wall time between the barriers: below ~0.9 another
    process took a core (while a chain ran, or before it started: a late thread whose chain
    does not overlap the others' doubles the wall time without slowing its own chain).
    """
    vec, set1, fma = _VOCAB[(v.isa, v.bits, v.dtype)]
    scalar = "double" if v.dtype == "float64" else "float"
    target = '__attribute__((target("avx512f,avx512bf16"))) ' if v.dtype == "bfloat16" else ""
    accs = [f"a{i}" for i in range(v.accumulators)]
    lines = [f"static {target}double chain_{v.name}(int64_t iters) {{",
             # volatile: x and y are opaque, so the compiler cannot fold or merge the chains
             f"    volatile {scalar} xs = ({scalar})0.9999999, ys = ({scalar})1e-7;",
             f"    {vec} x = {set1.format('xs')}, y = {set1.format('ys')};"]
    lines += [f"    {vec} {a} = {set1.format(f'({scalar})({i} * 0.001)')};" for i, a in enumerate(accs)]
    lines += ["    for (int64_t i = 0; i < iters; ++i) {"]
    lines += [f"        {a} = {fma.format(a=a, x='x', y='y')};" for a in accs]
    lines += ["    }", f"    {scalar} lanes[{v.lanes}], sum = 0;"]
    for a in accs:
        lines += [f"    memcpy(lanes, &{a}, sizeof lanes);",
                  f"    for (int j = 0; j < {v.lanes}; ++j) sum += lanes[j];"]
    lines += ["    return (double)sum;", "}", "",
              f"double {v.name}(int64_t iters, int32_t nthreads, double *seconds, double *cpu_share, int32_t *team) {{",
              "    double t0 = 0, t1 = 0, sink = 0, cpu = 0;",
              "    int32_t got = 0;",
              "    #pragma omp parallel num_threads(nthreads) reduction(+:sink, cpu)",
              "    {",
              "        #pragma omp barrier",
              "        #pragma omp single",
              "        { t0 = omp_get_wtime(); got = omp_get_num_threads(); }",
              "        double c0 = thread_cpu_seconds();",
              f"        sink += chain_{v.name}(iters);",
              "        cpu += thread_cpu_seconds() - c0;",
              "        #pragma omp barrier",
              "        #pragma omp single",
              "        t1 = omp_get_wtime();",
              "    }",
              "    *seconds = t1 - t0;",
              "    *cpu_share = t1 > t0 && got > 0 ? cpu / (got * (t1 - t0)) : 1.0;",
              "    *team = got;",
              "    return sink;",
              "}", ""]
    return "\n".join(lines)


def render_source(vs: list[PeakVariant]) -> str:
    isas = {v.isa for v in vs}
    include = "#include <immintrin.h>" if isas & {"avx512", "avx2"} else ""
    include += "\n#include <arm_neon.h>" if "neon" in isas else ""
    return _PRELUDE.format(include=include) + "\n".join(render_variant(v) for v in vs)


@functools.lru_cache(maxsize=None)
def _library(isa: str) -> tuple[dict[str, Callable[..., float]], list[PeakVariant]]:
    """Compile every variant for ``isa`` (both dtypes) through the kernel build path (same
    compiler, flags and cache) once per process; returns (variant name -> function, variants)."""
    vs = variants(isa, "float32") + variants(isa, "float64") + variants(isa, "bfloat16")
    result = build(KernelSource(vs[0].name, "float32", render_source(vs)))
    if not result.ok:
        raise BuildError(f"peak benchmark failed to compile:\n{(result.error or '')[-2000:]}")
    lib = load_library(result.so_path)
    functions = {}
    for v in vs:
        fn = getattr(lib, v.name)
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(ctypes.c_double),
                       ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int32)]
        functions[v.name] = fn
    return functions, vs


@dataclass(frozen=True)
class PeakResult:
    variant: PeakVariant
    threads: int
    gflops: float
    cpu_share: float      # of the run reported: chains' CPU time / (threads x wall time)

    @property
    def disturbed(self) -> bool:
        """Another process took a core during the run, so ``gflops`` is too low."""
        return self.cpu_share < 0.9


def measure_variant(v: PeakVariant, threads: int = 1, *, isa: str | None = None, seconds: float = 0.05,
                    repeats: int = 5, rounds: int = 3) -> PeakResult:
    """Best of ``repeats`` runs of about ``seconds`` each, preferring undisturbed runs.

    If every run of a round was disturbed (a busy neighbour on a small machine), wait a
    moment and try another round, up to ``rounds``; then report the best disturbed run.
    """
    functions, _ = _library(isa or detect_cpu().vector_isa)
    fn = functions[v.name]
    out, share, team = ctypes.c_double(), ctypes.c_double(), ctypes.c_int32()
    outputs = (ctypes.byref(out), ctypes.byref(share), ctypes.byref(team))
    iters = 1 << 14
    while True:                      # calibrate: grow until one run lasts a tenth of the target
        fn(iters, threads, *outputs)
        if out.value >= seconds / 10 or iters >= 1 << 40:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / max(out.value, 1e-9)))
    best: PeakResult | None = None
    for round_ in range(rounds):
        if round_:
            time.sleep(0.5)
        for _ in range(repeats):
            fn(iters, threads, *outputs)
            r = PeakResult(v, team.value, v.flops_per_iter * iters * team.value / max(out.value, 1e-12) / 1e9,
                           share.value)
            if best is None or (best.disturbed, -best.gflops) > (r.disturbed, -r.gflops):
                best = r
        if not best.disturbed:
            break
    assert best is not None
    return best


def peak_table(dtype: str, threads: int, isa: str | None = None, **kwargs) -> dict[str, PeakResult]:
    """variant name -> result for every variant of ``isa`` (default: the detected one)."""
    isa = isa or detect_cpu().vector_isa
    return {v.name: measure_variant(v, threads, isa=isa, **kwargs) for v in variants(isa, dtype)}


_PEAK_CACHE: dict[tuple[str, int], float] = {}


def measure_peak_gflops(dtype: str = "float32", threads: int = 1) -> float:
    """Best FMA throughput in GFLOPS over all variants (~1-2 s), cached per process; for
    ``bfloat16``, ``vdpbf16ps``'s (a ValueError where the CPU has no AVX512-BF16); for ``float16``,
    float32's (one float32 FMA per product: its kernels widen the inputs while packing).

    A result disturbed by other processes is returned with a warning but not cached, so
    the next call measures again instead of making every "% of peak" look too good.
    """
    if dtype not in _LANE_BYTES:
        raise ValueError(f"dtype must be float32, float64, bfloat16 or float16, got {dtype!r}")
    dtype = _SAME_PEAK.get(dtype, dtype)
    key = (dtype, threads)
    if key not in _PEAK_CACHE:
        if not variants(detect_cpu().vector_isa, dtype):
            raise ValueError(f"this CPU has no {dtype} instructions to measure a peak of")
        best = max(peak_table(dtype, threads).values(), key=lambda r: r.gflops)
        if best.disturbed or best.threads != threads:
            warnings.warn(f"peak {dtype} x{threads} threads measured as {best.gflops:.1f} GFLOPS while "
                          f"disturbed (cpu share {best.cpu_share:.2f}, team {best.threads}); not cached",
                          RuntimeWarning, stacklevel=2)
            return best.gflops
        _PEAK_CACHE[key] = best.gflops
    return _PEAK_CACHE[key]
