"""Exact-size 4x4x4 products in whole vector registers: stacks of 4x4 matrices (transforms, small
blocks), where a tile of 128-bit rows spends more on its scalar broadcasts than on its FMAs.

With rows of A and C packed into one register (lane ``4u + v`` of the product's rows holds
``C(u, v)``), the product is four steps: splat column k of A inside each row's lane group (an
in-lane permute) and multiply by row k of B broadcast to every lane group (a load).  A 512-bit
register holds four float32 rows or two float64 rows, a 256-bit one two float32 rows.  The FMA
order is the tile loop's (k ascending from a product), so the rounding is the same.  A stack of
4096 float32 products ran 1.7x faster than the 128-bit tile on a Sapphire Rapids core
(BENCHMARKS.md, "Stacks of small matrices").  It needs unit strides along k of A and along n of B
and C (rows may lie anywhere); otherwise the tile loop that follows it runs.

A stack whose matrices are dense (rows 4 apart; any batch strides, 0 for a broadcast operand)
skips the loop nest: ``stack_scope`` and ``stack_call`` run the product in a loop of its own,
with every stride a constant, over chunks of the batch on the pool's threads
(``codegen_threads.outline_parallel``'s chunking).  4096 float32 products: 7.5 us instead of
10.8 on a Sapphire Rapids core (BENCHMARKS.md, "Stacks of small matrices").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class QuadForm:
    guard: str          # the preprocessor test for the instructions below
    reg: str            # the register type
    row: str            # the type of one row of four
    rows: int           # rows per register
    load: str           # whole registers (rows contiguous)
    store: str
    row_load: str
    row_store: str
    widen: str          # a row into the low part of a register
    insert: str         # insert(register, row, index)
    extract: str        # extract(register, index)
    splat: str          # splat(register, k): element k of each row's lanes across them
    row_broadcast: str  # a row of B (pointer) in every row's lanes
    mul: str
    fma: str
    add: str
    row_add: str


_FORMS = {
    ("float", 64): QuadForm(
        "defined(__AVX512F__)", "__m512", "__m128", 4, "_mm512_loadu_ps", "_mm512_storeu_ps", "_mm_loadu_ps",
        "_mm_storeu_ps", "_mm512_castps128_ps512", "_mm512_insertf32x4", "_mm512_extractf32x4_ps",
        "_mm512_permute_ps({}, 0x{:02X})", "_mm512_broadcast_f32x4(_mm_loadu_ps({}))",
        "_mm512_mul_ps", "_mm512_fmadd_ps", "_mm512_add_ps", "_mm_add_ps"),
    ("double", 64): QuadForm(
        "defined(__AVX512F__)", "__m512d", "__m256d", 2, "_mm512_loadu_pd", "_mm512_storeu_pd", "_mm256_loadu_pd",
        "_mm256_storeu_pd", "_mm512_castpd256_pd512", "_mm512_insertf64x4", "_mm512_extractf64x4_pd",
        "_mm512_permutex_pd({}, 0x{:02X})", "_mm512_broadcast_f64x4(_mm256_loadu_pd({}))",
        "_mm512_mul_pd", "_mm512_fmadd_pd", "_mm512_add_pd", "_mm256_add_pd"),
    ("float", 32): QuadForm(
        "defined(__AVX2__) && defined(__FMA__)", "__m256", "__m128", 2, "_mm256_loadu_ps", "_mm256_storeu_ps",
        "_mm_loadu_ps", "_mm_storeu_ps", "_mm256_castps128_ps256", "_mm256_insertf128_ps", "_mm256_extractf128_ps",
        "_mm256_permute_ps({}, 0x{:02X})", "_mm256_set_m128(_mm_loadu_ps({0}), _mm_loadu_ps({0}))",
        "_mm256_mul_ps", "_mm256_fmadd_ps", "_mm256_add_ps", "_mm_add_ps"),
}


def form(ctype: str, vector_bytes: int) -> Optional[QuadForm]:
    """The whole-register form for C type ``ctype`` on vectors of ``vector_bytes``, if any."""
    return _FORMS.get((ctype, min(vector_bytes, 64)))


def product_lines(ctype: str, vector_bytes: int) -> list[str]:
    """C lines opening a tile function ``(kc, x, xk, xv, y, yu, yk, c, cu, cv, overwrite)``: X is B
    (rows at ``xk``), Y is A (rows at ``yu``); the product returns early when it applies."""
    f = form(ctype, vector_bytes)
    assert f is not None, (ctype, vector_bytes)
    R, regs = f.rows, 4 // f.rows
    L = ["#if " + f.guard,
         "    if (kc == 4 && xv == 1 && yk == 1 && cv == 1) {      /* the whole product in registers */"]
    L += [f"        const {f.reg} b{k} = {f.row_broadcast.format(f'x + {k} * xk')};" for k in range(4)]
    for r in range(regs):
        rows = " ".join(f"a{r} = {f.insert}(a{r}, {f.row_load}(y + {r * R + j} * yu), {j});" for j in range(1, R))
        L.append(f"        {f.reg} a{r};")
        L.append(f"        if (yu == 4) a{r} = {f.load}(y + {r * R * 4}); "
                 f"else {{ a{r} = {f.widen}({f.row_load}(y + {r * R} * yu)); {rows} }}")
        L.append(f"        {f.reg} acc{r} = {f.mul}({f.splat.format(f'a{r}', 0)}, b0);")
        L += [f"        acc{r} = {f.fma}({f.splat.format(f'a{r}', 0x55 * k)}, b{k}, acc{r});" for k in (1, 2, 3)]
    L.append("        if (cu == 4) {")
    for r in range(regs):
        L.append(f"            if (!overwrite) acc{r} = {f.add}(acc{r}, {f.load}(c + {r * R * 4}));")
        L.append(f"            {f.store}(c + {r * R * 4}, acc{r});")
    L.append("        } else {")
    for r in range(regs):
        for j in range(R):
            u = r * R + j
            L.append(f"            {{ {f.row} t = {f.extract}(acc{r}, {j}); "
                     f"if (!overwrite) t = {f.row_add}(t, {f.row_load}(c + {u} * cu)); {f.row_store}(c + {u} * cu, t); }}")
    L += ["        }", "        return;", "    }", "#endif"]
    return L


# the kernel's arguments a dense stack's loop reads (``codegen_threads.abi_variables`` names them)
_STACK_ARGS = ("A", "sAb", "B", "sBb", "C", "sCb")


def stack_scope(prefix: str, ctype: str, parallel: bool) -> list[str]:
    """File-scope C of a dense stack's loop: ``PREFIX_quads(lo, hi, ...)`` runs products [lo, hi)
    with ``PREFIX_tile`` (the whole-register product, inlined with constant strides); with
    ``parallel``, the pool's task over one run of the batch."""
    T = ctype
    L = ["",
         "/* products [lo, hi) of a stack of dense 4x4 matrices (rows 4 apart, any batch strides) */",
         f"static __attribute__((noinline)) void {prefix}_quads(int64_t lo, int64_t hi, const {T} *A, int64_t sAb,",
         f"    const {T} *B, int64_t sBb, {T} *C, int64_t sCb, int overwrite)",
         "{",
         "    for (int64_t i = lo; i < hi; i++)",
         f"        {prefix}_tile(4, B + i * sBb, 4, 1, A + i * sAb, 4, 1, C + i * sCb, 4, 1, overwrite);",
         "}"]
    if parallel:
        L += ["",
              f"typedef struct {{ const {T} *A; int64_t sAb; const {T} *B; int64_t sBb; {T} *C; int64_t sCb; "
              f"int overwrite; int64_t count, chunks; }} {prefix}_quads_ctx;",
              "",
              "/* run `it` of the stack, as the thread pool calls it */",
              f"static void {prefix}_quads_task(const void *context, int64_t it, int tid)",
              "{",
              "    (void)tid;",
              f"    const {prefix}_quads_ctx *q = (const {prefix}_quads_ctx *)context;",
              f"    {prefix}_quads(it * q->count / q->chunks, (it + 1) * q->count / q->chunks, q->A, q->sAb, q->B, q->sBb,",
              "        q->C, q->sCb, q->overwrite);",
              "}"]
    return L


def stack_call(prefix: str, parallel: bool, chunks_per_thread: int) -> list[str]:
    """C lines at the top of the kernel (sizes checked): a dense stack runs ``stack_scope``'s loop
    and returns; any other strides fall through to the loop nest."""
    args = ", ".join(_STACK_ARGS)
    L = ["if (sAk == 1 && sAm == 4 && sBn == 1 && sBk == 4 && sCn == 1 && sCm == 4) {   /* dense 4x4 matrices */"]
    if parallel:
        L += ["    if (nthreads > 1 && batch > 1) {",
              f"        const int64_t chunks = LT_MIN(batch, {chunks_per_thread} * (int64_t)nthreads);",
              f"        const {prefix}_quads_ctx q = {{{args}, !accumulate, batch, chunks}};",
              "        if (LT_POOL_AVAILABLE) {",
              f"            lt_pool_for(nthreads, chunks, {prefix}_quads_task, &q);",
              "        } else {",
              "            #pragma omp parallel for num_threads(nthreads) schedule(static)",
              f"            for (int64_t it = 0; it < chunks; it++) {prefix}_quads_task(&q, it, omp_get_thread_num());",
              "        }",
              "        return 0;",
              "    }"]
    L += [f"    {prefix}_quads(0, batch, {args}, !accumulate);", "    return 0;", "}"]
    return L
