"""The bfloat16 parts of the code generator: how a schedule's kernel computes on bf16 inputs.

bfloat16 kernels read ``uint16_t`` bit patterns (ml_dtypes' ``bfloat16``; with ``inputs="float32"``
float32 values rounded to bf16 while packing) and write float32 ``C``, accumulated in float32 over
the whole of K, as ``np.matmul`` returns for ml_dtypes arrays.  Both operands are always packed
(where the schedule packs nothing, the panel of one register tile is packed just above it), in a
layout the instruction reads, chosen per schedule from the best the target has:

``amx``        AMX tiles (Sapphire Rapids and later).  The register tile is mr x nr in 16 x 16
               float32 tiles (32 x 32: four C tiles, two of A, two of B); A panels keep 32
               consecutive k of one row together, B panels pairs of k per column::

                   A panel: dst[(k/32)*R*32 + r*32 + k%32]    B panel: dst[(k/2)*R*2 + r*2 + k%2]

               both padded with zeros to a multiple of 32 in k; ``tdpbf16ps`` per 32 k.
``avx512bf16`` ``vdpbf16ps``: each float32 lane sums two bf16 products.  Both panels are in pairs
               of k (``dst[(k/2)*R*2 + r*2 + k%2]``, padded to even k); the micro-kernel loads 16
               pairs of X as one vector and broadcasts one pair of Y as 32 bits.
``convert``    any CPU: bf16 widened to float32 while packing (``dst[k*R + r]``, as for float32),
               then the float32 micro-kernel.

A schedule the faster forms cannot run (a tile that is not whole AMX tiles or 16-lane vectors,
a k block below a pack that would split a k group) gets the next one, so every schedule of the
family renders.  The loop nest itself is the schedule's, e.g. the default on an AMX machine::

    for n.o / for k.o: pack B panels    ->   the same loops; the packs write the layouts above
      for m.o: pack A panels                 and the 32x32 tile is four tdpbf16ps per 32 k
        for n.i.o / m.i.o: 32x32 tile
"""
from __future__ import annotations

from looptune.runtime.compiler.ir import LoopNest

MODES = ("convert", "avx512bf16", "amx")
AMX_TILE_ROWS = 16          # float32 rows and columns of one AMX C tile
AMX_TILE_REGISTERS = 8
AMX_K_STEP = 32             # bf16 elements of k per tdpbf16ps
AMX_PREFETCH_STEPS = 2      # how many k steps ahead the AMX tile prefetches its B panel


def k_group(mode: str, operand: str) -> tuple[int, int]:
    """(G, P) of a packed operand: k kept in groups of G per panel row, k padded to a multiple of P."""
    if mode == "amx":
        return (AMX_K_STEP if operand == "A" else 2), AMX_K_STEP
    if mode == "avx512bf16":
        return 2, 2
    return 1, 1


def amx_tile_fits(mr: int, nr: int) -> bool:
    if mr % AMX_TILE_ROWS or nr % AMX_TILE_ROWS:
        return False
    a, b = mr // AMX_TILE_ROWS, nr // AMX_TILE_ROWS
    return a * b + a + b <= AMX_TILE_REGISTERS


def pack_positions(nest: LoopNest) -> dict[str, str | None]:
    """Where each operand is packed in a bf16 kernel: the schedule's place, else the loop just above
    the register tile (None: before every loop)."""
    start = nest.kernel_start()
    inner = nest.loops[start - 1].name if start > 0 else None
    return {op: dict(nest.pack).get(op, inner) for op in ("A", "B")}


def _k_blocks_fit(nest: LoopNest, mode: str) -> bool:
    """Every k loop between a pack and the tile steps by whole k groups (the larger of the two
    operands' groups: the tile steps through both panels together)."""
    start, g = nest.kernel_start(), max(k_group(mode, "A")[0], k_group(mode, "B")[0])
    for at in pack_positions(nest).values():
        first = nest.index(at) + 1 if at is not None else 0
        if any(l.dim == "k" and l.block % g for l in nest.loops[first:start]):
            return False
    return True


def choose_mode(nest: LoopNest, best: str, lanes: int) -> str:
    """The fastest of ``MODES`` up to ``best`` (the target's) that this nest can be rendered in;
    ``lanes``: float32 lanes of the target's vectors."""
    if nest.tile is None:
        return "convert"
    mr, nr = nest.tile_sizes  # type: ignore[misc]
    v = nr if nest.vector_dim == "n" else mr
    order = MODES[: MODES.index(best) + 1][::-1]
    for mode in order:
        if mode == "amx" and not (amx_tile_fits(mr, nr) and _k_blocks_fit(nest, mode)):
            continue
        if mode == "avx512bf16" and not (lanes == 16 and v % 16 == 0 and _k_blocks_fit(nest, mode)):
            continue
        return mode
    return "convert"


def prelude(mode: str) -> list[str]:
    """Headers and conversions every bf16 kernel file needs.  The helpers are guarded, so several
    kernels can share one translation unit (``looptune export``); the conversions come before any
    target pragma, so they are plain C wherever they are called from."""
    out = [
        "#ifndef LT_BF16_CONVERSIONS_DEFINED",
        "#define LT_BF16_CONVERSIONS_DEFINED",
        "/* bf16 bit patterns <-> float32: widening is exact; narrowing rounds to nearest even */",
        "static inline float lt_bf16_to_f32(uint16_t h) { union { uint32_t u; float f; } v = { (uint32_t)h << 16 }; return v.f; }",
        "static inline uint16_t lt_f32_to_bf16(float f)",
        "{",
        "    union { float f; uint32_t u; } v = { f };",
        "    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);   /* quiet NaN */",
        "    if ((v.u & 0x7f800000u) == 0) return (uint16_t)((v.u >> 16) & 0x8000u);   /* subnormal: signed zero, as vcvtne2ps2bf16 */",
        "    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);",
        "}",
        "#endif",
    ]
    if mode != "convert":
        # the instructions are enabled for this kernel's functions only (push here, pop in
        # ``postlude``): kernels after it in one file (an export) are compiled as the flags say
        features = "avx512f,avx512bw,avx512bf16" + (",amx-tile,amx-bf16" if mode == "amx" else "")
        out += ["#include <immintrin.h>",
                "#if defined(__clang__)",
                f'#pragma clang attribute push (__attribute__((target("{features}"))), apply_to = function)',
                "#else",
                "#pragma GCC push_options",
                f'#pragma GCC target("{features}")',
                "#endif"]
    if mode == "amx":
        out += [
            "#ifndef LT_AMX_DEFINED",
            "#define LT_AMX_DEFINED",
            "#include <unistd.h>",
            "#include <sys/syscall.h>",
            "/* AMX: the tile registers (eight of 16 rows x 64 bytes) need the OS's grant once per process */",
            "static int lt_amx_granted(void)",
            "{",
            "    static volatile int granted = 0;     /* 0: not asked, 1: yes, -1: refused */",
            "    if (!granted) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;",
            "    return granted == 1;",
            "}",
            "/* the configuration is a constant object: gcc 12 does not see that ldtilecfg reads its operand, and",
            "   with -march=native it dropped the stores that filled a stack copy (ldtilecfg then faulted) */",
            "static const struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; }",
            "    __attribute__((aligned(64))) lt_amx_config = {",
            "    1, 0, {0},",
            f"    {{{', '.join(['64'] * AMX_TILE_REGISTERS)}}},",
            f"    {{{', '.join([str(AMX_TILE_ROWS)] * AMX_TILE_REGISTERS)}}}}};",
            "static void lt_amx_configure(void)",
            "{",
            "    _tile_loadconfig(&lt_amx_config);",
            "}",
            "#endif",
        ]
    return out


def postlude(mode: str) -> list[str]:
    """Closes what ``prelude`` opened, after the kernel's last function."""
    if mode == "convert":
        return []
    return ["#if defined(__clang__)", "#pragma clang attribute pop", "#else", "#pragma GCC pop_options", "#endif"]


def pack_function(prefix: str, operand: str, R: int, mode: str, source_type: str, panel_type: str,
                  widen: str = "lt_bf16_to_f32") -> list[str]:
    """The pack of one operand block into panels of R in the layout of ``mode`` (see the module doc);
    ``widen``: the C function that makes a 16-bit input float32 (``codegen_f16.WIDEN`` for float16)."""
    G, P = k_group(mode, operand)
    conv = {("uint16_t", "uint16_t"): "{}", ("uint16_t", "float"): widen + "({})",
            ("float", "uint16_t"): "lt_f32_to_bf16({})",       # float32 inputs are rounded to bf16 ...
            ("float", "float"): "lt_bf16_to_f32(lt_f32_to_bf16({}))"}[(source_type, panel_type)]   # ... always
    c = conv.format
    TS, TP = source_type, panel_type
    if mode != "convert":
        fast_k, fast_t = _vector_pack_paths(R, G, TS)
    else:
        fast_k = f"""for (; k0 < kg; k0 += {G})
                for (int64_t i = 0; i < {R}; i++)
                    for (int64_t g = 0; g < {G}; g++) d[k0 * {R} + i * {G} + g] = {c("s[i * st + k0 + g]")};"""
        fast_t = f"""for (; k0 < kg; k0 += {G})
                for (int64_t i = 0; i < {R}; i++)
                    for (int64_t g = 0; g < {G}; g++) d[k0 * {R} + i * {G} + g] = {c("s[(k0 + g) * sk + i]")};"""
    return f"""
/* {operand} block (tlen x klen, element (t, k) at src[t*st + k*sk]) -> panels of {R}, k in groups of {G}
   padded to {P}: dst[p*kp*{R} + (k/{G})*{R * G} + r*{G} + k%{G}], kp = klen rounded up to {P} */
static void {prefix}_pack{operand}(const {TS} *restrict src, int64_t st, int64_t sk, int64_t tlen, int64_t klen, {TP} *restrict dst)
{{
    const int64_t kp = (klen + {P - 1}) / {P} * {P}, kg = klen / {G} * {G};
    for (int64_t p = 0; p < tlen; p += {R}) {{
        const int64_t r = LT_MIN({R}, tlen - p);
        const {TS} *s = src + p * st;
        {TP} *d = dst + p * kp;
        int64_t k0 = 0;
        if (r == {R} && sk == 1) {{
            {fast_k}
        }} else if (r == {R} && st == 1) {{
            {fast_t}
        }}
        for (int64_t k = k0; k < kp; k++) {{
            {TP} *dk = d + (k / {G}) * {R * G} + k % {G};
            for (int64_t i = 0; i < {R}; i++) dk[i * {G}] = (i < r && k < klen) ? {c("s[i * st + k * sk]")} : 0;
        }}
    }}
}}""".splitlines()


def _vector_pack_paths(R: int, G: int, TS: str) -> tuple[str, str]:
    """AVX-512 loops for the two common source layouts (k contiguous: rows of A; t contiguous: rows
    of B), 32 bf16 per vector (read as bf16, or float32 rounded to nearest even by vcvtne2ps2bf16)."""
    load = ("_mm512_loadu_si512({})" if TS == "uint16_t" else
            "(__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(({}) + 16), _mm512_loadu_ps({}))")
    ld = lambda p: load.format(*([p] * load.count("{}")))      # noqa: E731
    conv = "{}" if TS == "uint16_t" else "lt_f32_to_bf16({})"
    if G == 32:      # groups of 32 k per row: one vector per row and group, a row at a time (one read stream)
        fast_k = f"""for (int64_t i = 0; i < {R}; i++)
                for (int64_t k = 0; k < kg; k += 32) _mm512_storeu_si512(d + k * {R} + i * 32, {ld("s + i * st + k")});
            k0 = kg;"""
    else:            # pairs of k: each row's pairs as 32-bit words, rows after rows
        fast_k = f"""for (int64_t i = 0; i < {R}; i++)
                for (int64_t k = 0; k < kg; k += 2) {{
                    d[k * {R} + i * 2] = {conv.format("s[i * st + k]")};
                    d[k * {R} + i * 2 + 1] = {conv.format("s[i * st + k + 1]")};
                }}
            k0 = kg;"""
    if G == 2 and R % 32 == 0:    # rows k and k+1 interleaved: two permutes per 32 columns
        fast_t = f"""const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
            const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
            for (; k0 < kg; k0 += 2)
                for (int64_t i = 0; i < {R}; i += 32) {{
                    const __m512i r0 = {ld("s + k0 * sk + i")}, r1 = {ld("s + (k0 + 1) * sk + i")};
                    _mm512_storeu_si512(d + k0 * {R} + 2 * i, _mm512_permutex2var_epi16(r0, lo, r1));
                    _mm512_storeu_si512(d + k0 * {R} + 2 * i + 32, _mm512_permutex2var_epi16(r0, hi, r1));
                }}"""
    else:
        fast_t = f"""for (; k0 < kg; k0 += {G})
                for (int64_t g = 0; g < {G}; g++)
                    for (int64_t i = 0; i < {R}; i++) d[k0 * {R} + i * {G} + g] = {conv.format("s[(k0 + g) * sk + i]")};"""
    return fast_k, fast_t


def avx512bf16_tile(prefix: str, name: str, rows: int, full_rows: int, V: int, unroll: int) -> list[str]:
    """A rows x V tile over packed pair panels: X gives 16 pairs per vector, Y one pair per row."""
    nvec = V // 16
    L = [
        "",
        f"/* {rows}x{V} register tile on vdpbf16ps, {nvec} vector(s) of 16 float32 per row; c(u, v) at c[u*cu + v*cv] */",
        f"static __attribute__((noinline)) void {name}(int64_t kc,",
        "    const uint16_t *restrict x, int64_t xk, int64_t xv, const uint16_t *restrict y, int64_t yu, int64_t yk,",
        "    float *restrict c, int64_t cu, int64_t cv, int overwrite)",
        "{",
        "    (void)xk; (void)xv; (void)yu; (void)yk;",
        "    typedef int32_t pair_t __attribute__((may_alias, aligned(4)));",
    ]
    L += ["    __m512 " + ", ".join(f"c{u}_{j} = _mm512_setzero_ps()" for j in range(nvec)) + ";" for u in range(rows)]
    if unroll > 1 and rows == full_rows:
        L.append(f"    #pragma GCC unroll {max(1, unroll // 2)}")
    L.append("    for (int64_t kk = 0; kk < kc; kk += 2) {")
    for j in range(nvec):
        L.append(f"        const __m512bh x{j} = (__m512bh)_mm512_loadu_si512(x + {32 * j});")
    for u in range(rows):
        L.append(f"        {{ const __m512bh yv = (__m512bh)_mm512_set1_epi32(*(const pair_t *)(y + {2 * u}));")
        L += [f"          c{u}_{j} = _mm512_dpbf16_ps(c{u}_{j}, yv, x{j});" for j in range(nvec)]
        L.append("        }")
    L.append(f"        x += {2 * V}; y += {2 * full_rows};")
    L.append("    }")
    L.append("    if (cv == 1) {")
    for u in range(rows):
        for j in range(nvec):
            ptr = f"c + {u} * cu + {16 * j}"
            L.append(f"        _mm512_storeu_ps({ptr}, overwrite ? c{u}_{j} : _mm512_add_ps(_mm512_loadu_ps({ptr}), c{u}_{j}));")
    L.append("    } else {")
    L.append(f"        float t[{rows} * {V}] __attribute__((aligned(64)));")
    for u in range(rows):
        for j in range(nvec):
            L.append(f"        _mm512_store_ps(t + {u * V + 16 * j}, c{u}_{j});")
    L.append(f"        {prefix}_scatter(t, {rows}, {V}, c, cu, cv, overwrite);")
    L.append("    }")
    L.append("}")
    return L


def amx_tile(prefix: str, mr: int, nr: int) -> list[str]:
    """mr x nr of C in 16x16 AMX tiles: C tiles first, then A's, then B's.  A is read with row
    stride ``ars`` and advances ``aks`` per 32 k (a packed panel: 32 and 32*mr; A in memory: its
    row stride and 32); B is a packed panel of pairs."""
    na, nb = mr // AMX_TILE_ROWS, nr // AMX_TILE_ROWS
    c_t = lambda i, j: i * nb + j                  # noqa: E731
    a_t = lambda i: na * nb + i                     # noqa: E731
    b_t = lambda j: na * nb + na + j                # noqa: E731
    R = AMX_TILE_ROWS
    L = [
        "",
        f"/* {mr}x{nr} of C = {na}x{nb} AMX tiles over k (a multiple of {AMX_K_STEP}: zero-padded panels, or whole",
        "   steps of an A read in place); c(m, n) at c[m*cm + n*cn]; the caller has configured the tiles */",
        f"static __attribute__((noinline)) void {prefix}_amx_tile(int64_t kc, const uint16_t *restrict a, int64_t ars,",
        "    int64_t aks, const uint16_t *restrict b, float *restrict c, int64_t cm, int64_t cn, int overwrite)",
        "{",
        "    if (!overwrite && cn == 1) {",
    ]
    L += [f"        _tile_loadd({c_t(i, j)}, c + {i * R} * cm + {j * R}, cm * 4);" for i in range(na) for j in range(nb)]
    L.append("    } else {")
    L += [f"        _tile_zero({c_t(i, j)});" for i in range(na) for j in range(nb)]
    L.append("    }")
    # C's lines are requested for writing while the products run (two per k step), so the stores
    # at the end do not wait for them; the rows of C are far apart, no prefetcher would guess them.
    L.append("    int64_t row = 0;")
    L.append(f"    for (int64_t kk = 0; kk < kc; kk += {AMX_K_STEP}) {{")
    L.append(f"        if (cn == 1 && row < {mr}) {{")
    L += [f"            __builtin_prefetch(c + row * cm + {16 * j}, 1, 3);" for j in range(0, nb, 1)]
    L.append("            row++;")
    L.append("        }")
    # Tile registers are not renamed: a load waits for the products reading its register.  Each
    # operand is loaded right before its first product, so the next step's loads overlap this
    # step's last products.
    for i in range(na):
        L.append(f"        _tile_loadd({a_t(i)}, a + {i * R} * ars, ars * 2);")
        for j in range(nb):
            if i == 0:
                L.append(f"        _tile_loadd({b_t(j)}, b + {j * R * 2}, {nr * 4});")
            L.append(f"        _tile_dpbf16ps({c_t(i, j)}, {a_t(i)}, {b_t(j)});")
    # The B panel, reused by the next tiles down the same columns, is pulled into L1 two steps
    # ahead (the streamer brings it to L2 only); every other line: the pair prefetcher adds its twin.
    step_b = AMX_K_STEP * nr
    L += [f"        _mm_prefetch((const char *)(b + {AMX_PREFETCH_STEPS * step_b + line * 32}), _MM_HINT_T0);"
          for line in range(0, step_b * 2 // 64, 2)]
    L.append(f"        a += aks; b += {step_b};")
    L.append("    }")
    L.append("    if (cn == 1) {")
    L += [f"        _tile_stored({c_t(i, j)}, c + {i * R} * cm + {j * R}, cm * 4);" for i in range(na) for j in range(nb)]
    L.append("    } else {")
    L.append(f"        float t[{mr} * {nr}] __attribute__((aligned(64)));")
    L += [f"        _tile_stored({c_t(i, j)}, t + {i * R * nr + j * R}, {nr * 4});" for i in range(na) for j in range(nb)]
    L.append(f"        {prefix}_scatter(t, {mr}, {nr}, c, cm, cn, overwrite);")
    L.append("    }")
    L.append("}")
    return L


def amx_tile_call(prefix: str, mr: int, nr: int, a_ptr: str, b_ptr: str, m_len: str, n_len: str,
                  k_len: str, direct_tid: str | None) -> list[str]:
    """The call of the AMX tile at one tile position: whole tiles straight into C, edges through a
    scratch tile (the panels are zero-padded, so a whole tile is always computed).  With
    ``direct_tid`` (the thread's scratch copy), ``a_ptr`` is A in memory, read in place when its k
    are consecutive and the tile is whole, else packed into the thread's scratch panel first."""
    if direct_tid is None:
        L = [f"const uint16_t *const ta = {a_ptr};", f"const int64_t ars = {AMX_K_STEP}, aks = {AMX_K_STEP * mr};"]
    else:
        L = [f"const uint16_t *ta = {a_ptr};",
             f"int64_t ars = sAm, aks = {AMX_K_STEP};",
             f"if (!(sAk == 1 && {m_len} == {mr} && {k_len} % {AMX_K_STEP} == 0)) {{",
             f"    uint16_t *const q = wsQ_base + wsQ * {direct_tid};",
             f"    {prefix}_packA(ta, sAm, sAk, {m_len}, {k_len}, q);",
             f"    ta = q; ars = {AMX_K_STEP}; aks = {AMX_K_STEP * mr};",
             "}"]
    return L + [
        f"const uint16_t *const tb = {b_ptr};",
        f"if ({m_len} == {mr} && {n_len} == {nr}) {{",
        f"    {prefix}_amx_tile({k_len}, ta, ars, aks, tb, tc, sCm, sCn, ow);",
        "} else {",
        f"    float tt[{mr} * {nr}] __attribute__((aligned(64)));",
        f"    {prefix}_amx_tile({k_len}, ta, ars, aks, tb, tt, {nr}, 1, 1);",
        f"    for (int64_t u = 0; u < {m_len}; u++)",
        f"        {prefix}_scatter(tt + u * {nr}, 1, {n_len}, tc + u * sCm, sCm, sCn, ow);",
        "}",
    ]
