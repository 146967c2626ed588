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
