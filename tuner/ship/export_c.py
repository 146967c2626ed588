"""The C text of the library ``looptune export`` writes: kernels, dispatch tables, ``looptune.h``.

``export.make_plan`` decides what goes in (a ``Plan``: kernels and tuned shapes); this module
only writes it out.  One entry point per dtype the plan holds::

    looptune_sgemm   float A, B -> float C
    looptune_dgemm   double A, B -> double C
    looptune_bgemm   bfloat16 A, B (uint16_t bit patterns) -> float C, accumulated in float32
                     (only when the plan has bfloat16 shapes)
    looptune_hgemm   float16 A, B -> float16 C (IEEE half, uint16_t bit patterns), accumulated
                     in float32 and rounded once (only when the plan has float16 shapes)
and one per fused epilogue the plan has shapes of, e.g. ``looptune_sgemm_bias_relu`` (``export_fused``).

The kernels come in sets, one per level of the plan (``export_levels``), each between its own
target pragmas; the helpers they share (workspace, thread pool, bf16 and f16 conversions) come first,
compiled for the baseline.  Each dtype's dispatcher has a list of kernel sets, highest rung
first, and runs the first one at or below the CPU's rung (``lt_rung``, found once); a shape's
table entry holds its kernel's index in each level's set (``lt_entry.kernel[slot]``).

bfloat16 kernels under AVX-512 are rendered in every form such a CPU may have: the fastest the
schedule allows (AMX tiles or vdpbf16ps, ``codegen_bf16.choose_mode`` for an AMX target), a
vdpbf16ps twin of an AMX kernel where its tile allows one, and a twin that widens to float32
while packing (``convert``).  They are the sets of the rungs amx, avx512bf16 and avx512 over one
slot: AMX-BF16 and AMX-TILE run the AMX kernel (the next set when the OS refuses the tile
registers, -5), AVX512_BF16 alone (Zen 4, Cooper Lake) the vdpbf16ps form, other AVX-512 CPUs
the convert twin, and lower CPUs the bfloat16 kernels of their own level.
"""
from __future__ import annotations

from looptune.runtime.compiler.abi import function_type
from looptune.runtime.compiler.codegen import CODEGEN_VERSION, Target, render
from looptune.runtime.compiler import codegen_f16, dispatch
from looptune.runtime.compiler.codegen_bf16 import choose_mode, prelude
from looptune.runtime.compiler.codegen_threads import POOL_DECLARATION_C, WORKSPACE_C
from looptune.runtime.compiler.epilogue import PLAIN
from looptune.runtime.compiler.pool import POOL_C
from looptune.runtime.configuration import RuntimeSettings
from looptune.tuner.ship import export_fused as fused_
from looptune.tuner.ship import export_levels as levels_

# The exported dispatcher behaves as runtime.matmul with default settings:
NEAREST_MAX_DISTANCE = RuntimeSettings.max_distance   # log2 size units: nearer records serve a shape
SMALL_FLOPS = dispatch.SMALL_FLOPS                    # below this a call runs on one thread (dispatch.call_threads)
DTYPE_ORDER = ("float32", "float64", "bfloat16", "float16")   # of the kernels and dispatchers in looptune.c
OPTIONAL_DTYPES = ("bfloat16", "float16")             # in the library only where the plan has their shapes
AMX_REFUSED = -5                                      # abi.ERRORS: the OS refused AMX
PORTABLE_SUFFIX = "_convert"                          # of a bfloat16 kernel's portable twin
VDP_SUFFIX = "_vdp"                                   # of an AMX kernel's vdpbf16ps twin


def library_dtypes(plan) -> list[str]:
    """The dtypes the library has a plain entry point for: float32 and float64 always, bfloat16 and
    float16 when the plan has kernels of theirs."""
    present = {k.dtype for k in plan.kernels}
    return [d for d in DTYPE_ORDER if d in present or d not in OPTIONAL_DTYPES]


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
    text = render(kernel.schedule, kernel.dtype, target, symbol=symbol, op=kernel.op).text
    head = f"int {symbol}("
    if text.count("\n" + head) != 1:
        raise AssertionError(f"unexpected kernel text for {symbol}")
    return text.replace("\n" + head, "\nstatic int " + symbol + "(")


def shared_text(plan) -> list[str]:
    """What every kernel's text would define the first time (guarded), defined once at the top,
    outside every level's target pragmas: a helper first defined inside the AVX-512 set would be
    compiled for AVX-512 and called by the AVX2 kernels."""
    out = ["/* ---- helpers the kernels share: baseline code, run at every level ---- */",
           "#include <stdint.h>", "#include <stdlib.h>", "#include <string.h>",
           "#ifdef _OPENMP", "#include <omp.h>", "#else", "#define omp_get_thread_num() 0", "#endif",
           "#define LT_MIN(a, b) ((a) < (b) ? (a) : (b))"]
    if any(levels_.features(level) for level in plan.levels):     # headers included once, outside the pragmas
        out += ["#if defined(__x86_64__) || defined(__i386__)", "#include <immintrin.h>", "#include <unistd.h>",
                "#include <sys/syscall.h>", "#endif"]
    out += WORKSPACE_C + POOL_DECLARATION_C
    if "bfloat16" in library_dtypes(plan):
        out += prelude("convert")
    if "float16" in library_dtypes(plan):
        # Compiled here, at baseline, __F16C__ is not defined (no level's features name f16c, and
        # neither avx2 nor avx512f imply it), so the conversions are the portable bit arithmetic,
        # which is exact and right on every CPU; each float16 kernel's store loop tests __F16C__
        # again inside its level's target pragma, and takes the same portable path there.
        out += codegen_f16.prelude()
    return out + fused_.shared_math(plan)


def kernels_text(plan) -> list[str]:
    """Every kernel of the plan, level by level, each level between its target pragmas (float
    kernels first), with the twins of fast bf16 kernels for lesser AVX-512 CPUs."""
    out = []
    for level in plan.levels:
        target = levels_.target(level)
        out.append("\n".join(levels_.region_open(level)))
        for dtype in DTYPE_ORDER:
            for kernel in (k for k in plan.kernels if k.dtype == dtype and k.level == level):
                out.append(kernel_text(kernel, target))
                if dtype == "bfloat16":
                    fast, vdp, portable = bf16_versions(kernel, target)
                    if vdp != fast and vdp != portable:
                        out.append(kernel_text(kernel, Target(target.isa, target.vector_bytes, "avx512bf16"), vdp))
                    if portable != fast:
                        out.append(kernel_text(kernel, Target(target.isa, target.vector_bytes, "convert"), portable))
        out.append("\n".join(levels_.region_close(level)))
    return out


def kernel_sets(plan, dtype: str, op: str = PLAIN) -> list[tuple[str, int, list[str]]]:
    """(rung, slot, symbols) of each kernel set of ``dtype``, highest rung first: the slot is the
    level's index in ``plan.levels`` (of ``lt_entry.kernel``), the symbols are the level's kernels
    of the dtype in plan order (their local index).  A level's bfloat16 kernels under AVX-512
    make up to three sets (amx, avx512bf16, avx512), where their forms differ (``op``: a fused one's)."""
    sets = []
    for slot, level in enumerate(plan.levels):
        kernels = [k for k in plan.kernels if k.dtype == dtype and k.op == op and k.level == level]
        symbols = [k.symbol for k in kernels]
        if dtype == "bfloat16":
            versions = [bf16_versions(k, levels_.target(level)) for k in kernels]
            fast, vdp, symbols = ([v[i] for v in versions] for i in range(3))
            if fast != vdp:
                sets.append(("amx", slot, fast))
            if vdp != symbols:
                sets.append(("avx512bf16", slot, vdp))
        sets.append((level, slot, symbols))
    assert [levels_.rung(r) for r, *_ in sets] == sorted((levels_.rung(r) for r, *_ in sets), reverse=True)
    return sets


def dispatch_text(plan, dtype: str, op: str = PLAIN) -> str:
    """The entry point of ``dtype`` (and ``op``: a fused epilogue's), its tables and kernel sets."""
    p = fused_.family(dtype, op)
    P = p.upper()
    local = {}                  # plan kernel index -> index in its level's set
    for level in plan.levels:
        mine = [i for i, k in enumerate(plan.kernels) if k.dtype == dtype and k.op == op and k.level == level]
        local.update({i: j for j, i in enumerate(mine)})
    general = [next(local[i] for i, k in enumerate(plan.kernels)
                    if k.dtype == dtype and k.op == op and k.level == level and k.general) for level in plan.levels]
    entries = [e for e in plan.entries if e.dtype == dtype and e.op == op]
    sets = kernel_sets(plan, dtype, op)
    fn = fused_.entry_name(dtype, op)
    out = [f"/* ---- {dtype}{'' if op == PLAIN else ' ' + op}: {len(entries)} shapes; "
           f"kernel sets {', '.join(r for r, *_ in sets)} ---- */",
           function_type(f"lt_{p}fn", dtype, fused=op != PLAIN),
           f"typedef struct {{ int32_t rung, slot; const lt_{p}fn *fn; const char *const *name; }} lt_{p}_set;"]
    for j, (rung, slot, symbols) in enumerate(sets):
        out += [f"static const lt_{p}fn lt_{p}_fn{j}[{len(symbols)}] = {{ {', '.join(symbols)} }};",
                f"static const char *const lt_{p}_name{j}[{len(symbols)}] = {{ "
                + ", ".join(f'"{s}"' for s in symbols) + " };"]
    out += [f"#define LT_{P}_SETS {len(sets)}",
            f"static const lt_{p}_set lt_{p}_sets[LT_{P}_SETS] = {{",
            *(f"    {{{levels_.rung(rung)}, {slot}, lt_{p}_fn{j}, lt_{p}_name{j}}},   /* {rung} */"
              for j, (rung, slot, _) in enumerate(sets)),
            "};",
            f"static const int32_t lt_{p}_general[LT_SLOTS] = {{ {', '.join(map(str, general))} }};",
            f"#define LT_{P}_COUNT {len(entries)}"]
    if entries:
        out.append(f"static const lt_entry lt_{p}_table[{len(entries)}] = {{")
        for e in entries:
            out.append(f"    {{{e.m}, {e.n}, {e.k}, {{{', '.join(str(local[i]) for i in e.kernels)}}}}},"
                       f"{'' if e.exact else '  /* nearest record */'}")
        out.append("};")
    else:
        out.append(f"static const lt_entry lt_{p}_table[1] = {{{{0, 0, 0, {{0}}}}}};")
    args = (f"(1, M, N, K, A, M * lda, lda, 1, B, K * ldb, ldb, 1,\n            C, M * ldc, ldc, 1, 0, t"
            f"{fused_.call_arguments(dtype, op)})")
    out += [
        "/* the table's entry for a shape: exact, else the nearest within LT_NEAREST_MAX; -1: the general kernels */",
        f"static int64_t lt_{p}_entry(int64_t M, int64_t N, int64_t K)",
        "{",
        f"    const int64_t i = lt_find(lt_{p}_table, LT_{P}_COUNT, M, N, K);",
        f"    return i < 0 ? lt_nearest(lt_{p}_table, LT_{P}_COUNT, M, N, K) : i;",
        "}",
        "",
        "/* the highest kernel set this CPU runs (the last is portable's) */",
        f"static int lt_{p}_first(void)",
        "{",
        "    const int rung = lt_rung();",
        "    int s = 0;",
        f"    while (lt_{p}_sets[s].rung > rung) s++;",
        "    return s;",
        "}",
        f"#define LT_{P}_KERNEL(set, e) ((e) < 0 ? lt_{p}_general[(set)->slot] : lt_{p}_table[e].kernel[(set)->slot])",
        "",
        f"int {fn}({fused_.parameters(dtype, op)})",
        "{",
        "    int rc = lt_check(M, N, K, A, lda, B, ldb, C, ldc);",
        "    if (rc <= 0) return rc;",
        *fused_.checks(op),
        "    const int32_t t = lt_call_threads(M, N, K);",
        f"    const int64_t e = lt_{p}_entry(M, N, K);",
        f"    for (int s = lt_{p}_first(); ; s++) {{",
        f"        const lt_{p}_set *set = &lt_{p}_sets[s];",
        f"        rc = set->fn[LT_{P}_KERNEL(set, e)]{args};",
        f"        if (rc != {AMX_REFUSED} || s + 1 == LT_{P}_SETS) return rc;   /* {AMX_REFUSED}: the OS refused AMX, the next set computes */",
        "    }",
        "}",
        "",
        f"const char *{fn}_kernel(int64_t M, int64_t N, int64_t K)",
        "{",
        f"    const lt_{p}_set *set = &lt_{p}_sets[lt_{p}_first()];",
        f"    const int64_t e = lt_{p}_entry(M, N, K);",
        f"    return set->name[LT_{P}_KERNEL(set, e)];",
        "}",
    ]
    return "\n".join(out) + "\n"


_COMMON = r"""
/* ---- dispatch ---- */
#include <math.h>

/* a tuned shape and its kernel's index in each level's set (LT_SLOTS levels, highest first) */
typedef struct { int64_t m, n, k; int32_t kernel[LT_SLOTS]; } lt_entry;

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
   where the OS grants it) the tuned fast kernels run, elsewhere kernels that widen to float32
   (names ending in _vdp: vdpbf16ps twins of AMX kernels; _convert: the widening twins). */
int looptune_bgemm(int64_t M, int64_t N, int64_t K, const uint16_t *A, int64_t lda,
                   const uint16_t *B, int64_t ldb, float *C, int64_t ldc);
const char *looptune_bgemm_kernel(int64_t M, int64_t N, int64_t K);
"""

_F16_DECLARATIONS = """
/* float16: A, B and C hold IEEE half bit patterns (numpy's float16, C's _Float16); the products
   are summed in float32 over the whole of K and each element of C rounded once to float16
   (nearest even), as np.matmul computes on float16 arrays. */
int looptune_hgemm(int64_t M, int64_t N, int64_t K, const uint16_t *A, int64_t lda,
                   const uint16_t *B, int64_t ldb, uint16_t *C, int64_t ldc);
const char *looptune_hgemm_kernel(int64_t M, int64_t N, int64_t K);
"""


def header_text(plan, build_command: str) -> str:
    dtypes = library_dtypes(plan)
    counts = {d: sum(1 for e in plan.entries if e.dtype == d and e.op == PLAIN) for d in dtypes}
    shapes = ", ".join(f"{counts[d]} {d}" for d in dtypes[:-1]) + f" and {counts[dtypes[-1]]} {dtypes[-1]}"
    rungs = sorted(set(library_rungs(plan)), key=levels_.rung, reverse=True)
    served = ", ".join(f'"{r}"' for r in rungs)
    bf16_note = ("\n   (amx, avx512bf16: the bfloat16 kernels of that form serve, the float kernels run at avx512)"
                 if {"amx", "avx512bf16"} & set(rungs) else "")
    return f"""/* looptune.h: tuned matmul kernels exported by `looptune export` (codegen v{CODEGEN_VERSION}).

   Tuned on: {plan.machine.short()}
   {shapes} shapes tuned for {plan.threads} thread(s); any other shape runs the nearest tuned
   shape's kernel or the general one.

   Kernel levels inside, highest first: {plan.describe_levels()}
   (tuned: the database's schedules; defaults: LoopTune's analytic default schedule of each shape
   for that level; general: one general kernel per dtype).  Each level's kernels are compiled for
   that level's instructions only.  When the library loads it asks the CPU (CPUID) which it
   runs, and every call runs the highest level at or below it: a CPU without AVX-512 runs the
   avx2 kernels, a CPU below every level the portable ones.  {levels_.MASK_VARIABLE}=<level>, one of
   {', '.join(levels_.LADDER)}, caps the level (read once, at load; it can only
   lower it), e.g. to run the avx2 kernels on an AVX-512 CPU; looptune_cpu_level() says which serves.

   Build (or run `make`):
       {build_command}
       ar rcs liblooptune.a looptune.o
   Link your program with: -fopenmp -lm
   Parallel kernels run on the library's own thread pool (pthreads): a calling thread never
   waits for a pool thread that has not started, and idle pool threads sleep after 50 us.
   The flags are baseline on purpose: no -march=native and no -m<isa> flags, which would let the
   compiler put those instructions in the dispatcher and the lower levels' kernels.

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

/* The name of the kernel that serves a shape on this CPU (for logs and tests): looptune_s_kN (tuned)
   or looptune_s_general at the tuned level, looptune_s_<level>_dN or looptune_s_<level>_general at others. */
const char *looptune_sgemm_kernel(int64_t M, int64_t N, int64_t K);
const char *looptune_dgemm_kernel(int64_t M, int64_t N, int64_t K);

/* The level whose kernels serve on this CPU: the highest of this library's levels at or below the
   CPU's (capped by {levels_.MASK_VARIABLE}), one of {served}{bf16_note}. */
const char *looptune_cpu_level(void);
{_BF16_DECLARATIONS if "bfloat16" in dtypes else ""}{_F16_DECLARATIONS if "float16" in dtypes else ""}\
{fused_.declarations(plan)}
#ifdef __cplusplus
}}
#endif
#endif
"""


def library_rungs(plan) -> list[str]:
    """The rungs of every kernel set of the library (``looptune_cpu_level``'s answers)."""
    return [rung for dtype, op in entry_points(plan) for rung, *_ in kernel_sets(plan, dtype, op)]


def entry_points(plan) -> list[tuple[str, str]]:
    """(dtype, op) of each entry point: the plain products', then the fused epilogues'."""
    return [(dtype, PLAIN) for dtype in library_dtypes(plan)] + list(plan.fused)


def source_text(plan) -> str:
    parts = [f"/* looptune.c: generated by `looptune export` from a schedule database; do not edit.\n"
             f"   Tuned on {plan.machine.short()}; kernel levels {plan.describe_levels()}.\n"
             f"   See looptune.h for the build line: baseline flags, the levels carry their own targets. */",
             '#include "looptune.h"',
             "/* the kernels' parallel loops run on this library's own thread pool */",
             "#define LT_POOL_LINKAGE static __attribute__((unused))",
             POOL_C,
             f"#define LT_DEFAULT_THREADS {plan.threads}",
             f"#define LT_SMALL_FLOPS {SMALL_FLOPS:.1f}",
             f"#define LT_NEAREST_MAX {NEAREST_MAX_DISTANCE:.3f}",
             f"#define LT_SLOTS {len(plan.levels)}    /* kernel levels: {', '.join(plan.levels)} */",
             "\n".join(shared_text(plan))]
    parts += kernels_text(plan)
    parts.append(levels_.cpu_text(library_rungs(plan)))
    parts.append(_COMMON + (fused_.OVERLAP_C if plan.fused else ""))
    for dtype, op in entry_points(plan):
        parts.append(dispatch_text(plan, dtype, op))
    return "\n".join(parts)
