"""The C text of the library ``looptune export`` writes: kernels, dispatch tables, ``looptune.h``.

``export.make_plan`` decides what goes in (a ``Plan``: kernels and tuned shapes); this module
only writes it out.  One entry point per dtype the plan holds::

    looptune_sgemm   float A, B -> float C
    looptune_dgemm   double A, B -> double C
    looptune_bgemm   bfloat16 A, B (uint16_t bit patterns) -> float C, accumulated in float32
                     (only when the plan has bfloat16 shapes)

bfloat16 kernels are rendered in every form the library's ISA may have (AVX-512): the fastest
the schedule allows (AMX tiles or vdpbf16ps, ``codegen_bf16.choose_mode`` for an AMX target),
a vdpbf16ps twin of an AMX kernel where its tile allows one, and a portable twin (``convert``).
The dispatcher asks CPUID once: AMX-BF16 and AMX-TILE run the AMX kernel (the vdpbf16ps twin
when the OS refuses the tile registers, -5), AVX512_BF16 alone (Zen 4, Cooper Lake) the
vdpbf16ps form, anything else the portable twin, so the library runs on every CPU of its ISA,
as the float kernels do.
"""
from __future__ import annotations

from looptune.runtime.compiler.abi import C_TYPE, OUTPUT_DTYPE, function_type
from looptune.runtime.compiler.codegen import CODEGEN_VERSION, Target, render
from looptune.runtime.compiler.codegen_bf16 import choose_mode
from looptune.runtime.compiler.pool import POOL_C
from looptune.runtime.configuration import RuntimeSettings

# The exported dispatcher behaves as runtime.matmul with default settings:
NEAREST_MAX_DISTANCE = RuntimeSettings.max_distance   # log2 size units: nearer records serve a shape
SMALL_FLOPS = RuntimeSettings.small_flops             # below this a call runs on one thread
PREFIX = {"float32": "s", "float64": "d", "bfloat16": "b"}
DTYPE_ORDER = ("float32", "float64", "bfloat16")      # of the kernels and dispatchers in looptune.c
AMX_REFUSED = -5                                      # abi.ERRORS: the OS refused AMX
PORTABLE_SUFFIX = "_convert"                          # of a bfloat16 kernel's portable twin
VDP_SUFFIX = "_vdp"                                   # of an AMX kernel's vdpbf16ps twin


def library_dtypes(plan) -> list[str]:
    """The dtypes the library has an entry point for: float32 and float64 always, bfloat16 when
    the plan has bfloat16 kernels."""
    present = {k.dtype for k in plan.kernels}
    return [d for d in DTYPE_ORDER if d in present or d != "bfloat16"]


def bf16_fast_mode(kernel, target: Target) -> str:
    """How the fast version of a bfloat16 kernel computes for ``target`` (``convert``: it has no
    fast version, its one rendering is portable)."""
    return choose_mode(kernel.schedule.nest, target.bf16, target.vector_bytes // 4)


def bf16_versions(kernel, target: Target) -> tuple[str, str, str]:
    """The symbols a bfloat16 kernel runs under, for CPUs with AMX, with AVX512_BF16 only, and
    with neither (a form the schedule or the ISA does not allow falls to the next one)."""
    fast = bf16_fast_mode(kernel, target)
    if fast == "convert":
        return (kernel.symbol,) * 3
    portable = kernel.symbol + PORTABLE_SUFFIX
    if fast == "avx512bf16":
        return kernel.symbol, kernel.symbol, portable
    vdp = choose_mode(kernel.schedule.nest, "avx512bf16", target.vector_bytes // 4)
    return kernel.symbol, (kernel.symbol + VDP_SUFFIX if vdp == "avx512bf16" else portable), portable


def kernel_text(kernel, target: Target, symbol: str | None = None) -> str:
    """The rendered kernel, made file-local: its symbol and helpers stay out of the library's ABI
    (a bfloat16 kernel's target pragma is its own: ``codegen_bf16`` pushes and pops it)."""
    symbol = symbol or kernel.symbol
    text = render(kernel.schedule, kernel.dtype, target, symbol=symbol).text
    head = f"int {symbol}("
    if text.count("\n" + head) != 1:
        raise AssertionError(f"unexpected kernel text for {symbol}")
    return text.replace("\n" + head, "\nstatic int " + symbol + "(")


def kernels_text(plan, target: Target) -> list[str]:
    """Every kernel of the plan (float kernels first: helpers shared by all kernels are then
    defined outside any bfloat16 target pragma), with the portable twins of fast bf16 kernels."""
    out = []
    for dtype in DTYPE_ORDER:
        for kernel in (k for k in plan.kernels if k.dtype == dtype):
            out.append(kernel_text(kernel, target))
            if dtype == "bfloat16":
                fast, vdp, portable = bf16_versions(kernel, target)
                if vdp != fast and vdp != portable:
                    out.append(kernel_text(kernel, Target(target.isa, target.vector_bytes, "avx512bf16"), vdp))
                if portable != fast:
                    out.append(kernel_text(kernel, Target(target.isa, target.vector_bytes, "convert"), portable))
    return out


_BF16_CPU = r"""
#include <cpuid.h>
/* this CPU's bfloat16 level: 2 with AMX-BF16 and AMX-TILE (CPUID.(7,0):EDX bits 22 and 24) and
   AVX512_BF16 (CPUID.(7,1):EAX bit 5), 1 with AVX512_BF16 alone, else 0 */
static int lt_bf16_level(void)
{
    static volatile int level = -1;
    if (level < 0) {
        unsigned a = 0, b = 0, c = 0, d = 0, vdp = 0, amx = 0;
        vdp = __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
        amx = __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1u) && ((d >> 24) & 1u);
        level = vdp ? (amx ? 2 : 1) : 0;
    }
    return level;
}
"""


def dispatch_text(plan, dtype: str, target: Target) -> str:
    p, T, TC = PREFIX[dtype], C_TYPE[dtype], C_TYPE[OUTPUT_DTYPE[dtype]]
    kernels = [(i, k) for i, k in enumerate(plan.kernels) if k.dtype == dtype]
    local = {i: j for j, (i, _) in enumerate(kernels)}
    general = next(local[i] for i, k in kernels if k.general)
    entries = [e for e in plan.entries if e.dtype == dtype]
    fn = "looptune_" + p + "gemm"
    # per CPU level (see lt_bf16_level): the kernels' symbols; float kernels have one version
    versions = [bf16_versions(k, target) if dtype == "bfloat16" else (k.symbol,) * 3 for _, k in kernels]
    fast, vdp, portable = ([v[i] for v in versions] for i in range(3))
    levels = fast != portable
    out = [f"/* ---- {dtype}: {len(entries)} shapes, {len(kernels)} kernels ---- */",
           function_type(f"lt_{p}fn", dtype)]
    for suffix, symbols in ((("", portable),) + ((("_vdp", vdp), ("_fast", fast)) if levels else ())):
        out += [f"static const lt_{p}fn lt_{p}{suffix or '_kernels'}[{len(kernels)}] = {{ {', '.join(symbols)} }};",
                f"static const char *const lt_{p}{suffix}_names[{len(kernels)}] = {{ "
                + ", ".join(f'"{s}"' for s in symbols) + " };"]
    if levels:
        out.append(_BF16_CPU)
    out += [f"#define LT_{p.upper()}_GENERAL {general}",
            f"#define LT_{p.upper()}_COUNT {len(entries)}"]
    if entries:
        out.append(f"static const lt_entry lt_{p}_table[{len(entries)}] = {{")
        for e in entries:
            out.append(f"    {{{e.m}, {e.n}, {e.k}, {local[e.kernel]}}},"
                       f"{'' if e.exact else '  /* nearest record */'}")
        out.append("};")
    else:
        out.append(f"static const lt_entry lt_{p}_table[1] = {{{{0, 0, 0, LT_{p.upper()}_GENERAL}}}};")
    args = "(1, M, N, K, A, M * lda, lda, 1, B, K * ldb, ldb, 1,\n        C, M * ldc, ldc, 1, 0, t)"
    call = [f"    return lt_{p}_kernels[i]{args};"]
    if levels:
        call = ["    const int level = lt_bf16_level();",
                "    if (level == 2) {",
                f"        rc = lt_{p}_fast[i]{args};",
                f"        if (rc != {AMX_REFUSED}) return rc;     /* the OS refused AMX: vdpbf16ps computes */",
                "    }",
                f"    if (level >= 1) return lt_{p}_vdp[i]{args};"] + call
    out += [
        f"static int lt_{p}_choose(int64_t M, int64_t N, int64_t K)",
        "{",
        f"    int64_t i = lt_find(lt_{p}_table, LT_{p.upper()}_COUNT, M, N, K);",
        f"    if (i < 0) i = lt_nearest(lt_{p}_table, LT_{p.upper()}_COUNT, M, N, K);",
        f"    return i < 0 ? LT_{p.upper()}_GENERAL : lt_{p}_table[i].kernel;",
        "}",
        "",
        f"int {fn}(int64_t M, int64_t N, int64_t K, const {T} *A, int64_t lda, const {T} *B, int64_t ldb,",
        f"    {TC} *C, int64_t ldc)",
        "{",
        "    int rc = lt_check(M, N, K, A, lda, B, ldb, C, ldc);",
        "    if (rc <= 0) return rc;",
        "    const int32_t t = lt_call_threads(M, N, K);",
        f"    const int i = lt_{p}_choose(M, N, K);",
        *call,
        "}",
        "",
        f"const char *{fn}_kernel(int64_t M, int64_t N, int64_t K)",
        "{",
        f"    return {f'(lt_bf16_level() == 2 ? lt_{p}_fast_names : lt_bf16_level() == 1 ? lt_{p}_vdp_names : lt_{p}_names)' if levels else f'lt_{p}_names'}"
        f"[lt_{p}_choose(M, N, K)];",
        "}",
    ]
    return "\n".join(out) + "\n"


_COMMON = r"""
/* ---- dispatch ---- */
#include <math.h>

typedef struct { int64_t m, n, k; int32_t kernel; } lt_entry;

static int lt_threads = LT_DEFAULT_THREADS;

void looptune_set_num_threads(int n) { lt_threads = n > 0 ? n : 1; }
int looptune_get_num_threads(void) { return lt_threads; }

/* 1: run a kernel; 0: nothing to compute (done); < 0: bad arguments */
static int lt_check(int64_t M, int64_t N, int64_t K, const void *A, int64_t lda, const void *B, int64_t ldb,
                    const void *C, int64_t ldc)
{
    if (M < 0 || N < 0 || K < 0) return LOOPTUNE_EINVAL;
    if (M == 0 || N == 0) return 0;
    if (!C || ldc < N || (K > 0 && (!A || !B || lda < K || ldb < N))) return LOOPTUNE_EINVAL;
    return 1;
}

static int32_t lt_call_threads(int64_t M, int64_t N, int64_t K)
{
    return 2.0 * (double)M * (double)N * (double)K < LT_SMALL_FLOPS ? 1 : lt_threads;
}

/* index of (M, N, K) in a table sorted by (m, n, k), or -1 */
static int64_t lt_find(const lt_entry *t, int64_t count, int64_t M, int64_t N, int64_t K)
{
    int64_t lo = 0, hi = count;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        const lt_entry *e = &t[mid];
        if (e->m < M || (e->m == M && (e->n < N || (e->n == N && e->k < K)))) lo = mid + 1; else hi = mid;
    }
    return lo < count && t[lo].m == M && t[lo].n == N && t[lo].k == K ? lo : -1;
}

/* the entry nearest to (M, N, K) in log2 size, if within LT_NEAREST_MAX; else -1 */
static int64_t lt_nearest(const lt_entry *t, int64_t count, int64_t M, int64_t N, int64_t K)
{
    const double lm = log2((double)M), ln = log2((double)N), lk = log2((double)K);
    double best = LT_NEAREST_MAX * LT_NEAREST_MAX;
    int64_t found = -1;
    for (int64_t i = 0; i < count; i++) {
        const double dm = log2((double)t[i].m) - lm, dn = log2((double)t[i].n) - ln, dk = log2((double)t[i].k) - lk;
        const double d = dm * dm + dn * dn + dk * dk;
        if (d <= best) { if (d < best || found < 0) found = i; best = d; }
    }
    return found;
}
"""

_BF16_DECLARATIONS = """
/* bfloat16: A and B hold bf16 bit patterns (ml_dtypes' bfloat16, the upper half of a float32),
   C is float32, accumulated in float32 over the whole of K.  On CPUs with AVX512_BF16 (and AMX,
   where the OS grants it) the tuned fast kernels run, elsewhere kernels that widen to float32. */
int looptune_bgemm(int64_t M, int64_t N, int64_t K, const uint16_t *A, int64_t lda,
                   const uint16_t *B, int64_t ldb, float *C, int64_t ldc);
const char *looptune_bgemm_kernel(int64_t M, int64_t N, int64_t K);
"""


def header_text(plan, build_command: str) -> str:
    dtypes = library_dtypes(plan)
    counts = {d: sum(1 for e in plan.entries if e.dtype == d) for d in dtypes}
    shapes = ", ".join(f"{counts[d]} {d}" for d in dtypes[:-1]) + f" and {counts[dtypes[-1]]} {dtypes[-1]}"
    return f"""/* looptune.h: tuned matmul kernels exported by `looptune export` (codegen v{CODEGEN_VERSION}).

   Tuned on: {plan.machine.short()}
   Kernels for vector ISA {plan.machine.isa}; {shapes} shapes
   tuned for {plan.threads} thread(s); any other shape runs the nearest tuned kernel or the general one.

   Build (or run `make`):
       {build_command}
       ar rcs liblooptune.a looptune.o
   Link your program with: -fopenmp -lm
   Parallel kernels run on the library's own thread pool (pthreads): a calling thread never
   waits for a pool thread that has not started, and idle pool threads sleep after 50 us.
   The ISA flags are those of the tuned machine's vector ISA, not -march=native: the library
   runs on any CPU with that ISA.

   C = A B, row-major: A is M x K (row stride lda >= K), B is K x N (ldb >= N), C is M x N
   (ldc >= N); C is overwritten.  Returns 0 on success, LOOPTUNE_EINVAL (-4) for bad
   arguments, -1 if the packing workspace could not be allocated.  Thread-safe: each
   calling thread has its own workspace.
*/
#ifndef LOOPTUNE_H
#define LOOPTUNE_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

#define LOOPTUNE_EINVAL (-4)

int looptune_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float *C, int64_t ldc);
int looptune_dgemm(int64_t M, int64_t N, int64_t K, const double *A, int64_t lda,
                   const double *B, int64_t ldb, double *C, int64_t ldc);

/* Threads for problems of {SMALL_FLOPS / 1e6:g} MFLOP and more (smaller ones run on one); default {plan.threads}.
   Set it once, before calling from several threads. */
void looptune_set_num_threads(int n);
int looptune_get_num_threads(void);

/* The name of the kernel that serves a shape (for logs and tests): looptune_s_kN or looptune_s_general. */
const char *looptune_sgemm_kernel(int64_t M, int64_t N, int64_t K);
const char *looptune_dgemm_kernel(int64_t M, int64_t N, int64_t K);
{_BF16_DECLARATIONS if "bfloat16" in dtypes else ""}
#ifdef __cplusplus
}}
#endif
#endif
"""


def source_text(plan) -> str:
    target = plan.target
    parts = [f"/* looptune.c: generated by `looptune export` from a schedule database; do not edit.\n"
             f"   Tuned on {plan.machine.short()}; see looptune.h for the build line. */",
             '#include "looptune.h"',
             "/* the kernels' parallel loops run on this library's own thread pool */",
             "#define LT_POOL_LINKAGE static __attribute__((unused))",
             POOL_C,
             f"#define LT_DEFAULT_THREADS {plan.threads}",
             f"#define LT_SMALL_FLOPS {SMALL_FLOPS:.1f}",
             f"#define LT_NEAREST_MAX {NEAREST_MAX_DISTANCE:.3f}"]
    parts += kernels_text(plan, target)
    parts.append(_COMMON)
    for dtype in library_dtypes(plan):
        parts.append(dispatch_text(plan, dtype, target))
    return "\n".join(parts)
