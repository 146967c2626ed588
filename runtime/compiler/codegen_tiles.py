"""The register-tiled micro-kernels, the packing routines and the tile calls of the code generator.

``TileWriter`` is the part of ``codegen``'s kernel writer that renders file-scope functions:
packing an operand block into panels, and the micro-kernel that computes one register tile
(``U x V`` accumulators over a k range) with any edge size; and, in the kernel's body, the call
of the tile (edges, narrow columns, the store stage's epilogue).  The float micro-kernel is
written with GCC/Clang vector extensions; the bfloat16 ones are in ``codegen_bf16``.
"""
from __future__ import annotations

from looptune.runtime.compiler import codegen_bf16 as bf16
from looptune.runtime.compiler import codegen_f16 as f16
from looptune.runtime.compiler import codegen_quads as quads
from looptune.runtime.compiler import epilogue as epi
from looptune.runtime.compiler.codegen_threads import shared_pack, shared_pack_call
from looptune.runtime.compiler.ir import TILE_DIM_FOR_OPERAND

# at most this many accumulator updates (rows x vectors x unroll) in one unrolled body of a tile's k loop
MAX_UNROLLED_UPDATES = 512
INLINE_PRODUCT_MACS = 64   # exact-size products up to this many multiply-adds inline their tiles (_tile_linkage)
CACHE_LINE_BYTES = 64      # the prefetch step's granularity (x86-64 and most Arm cores)


class TileWriter:
    """Mixin of ``codegen._KernelWriter`` (reads its nest, types and tile attributes)."""

    def _vector_types(self) -> list[str]:
        if self.W == 1:
            return [f"typedef {self.TC} {self.prefix}_v;"]
        vb = self.W * self.itemsize
        return [
            f"typedef {self.TC} {self.prefix}_v __attribute__((vector_size({vb})));",
            f"typedef {self.TC} {self.prefix}_vu __attribute__((vector_size({vb}), aligned({self.itemsize}), may_alias));",
        ]

    def _load(self, ptr: str) -> str:
        return f"(*(const {self.prefix}_vu *)({ptr}))" if self.W > 1 else f"(*({ptr}))"

    def _store(self, ptr: str, value: str) -> str:
        return f"*({self.prefix}_vu *)({ptr}) = {value};" if self.W > 1 else f"*({ptr}) = {value};"

    # ---- packing: panels of R along the tile dimension, k-major inside a panel -----------------
    def _pack_functions(self) -> list[str]:
        T, out = self.T, []
        if self.packs and not (self.half or self.bf16):
            out += self._transpose4()
        for operand in sorted(set(self.packs) | ({"A"} if self.amx_direct_a else set())):
            R = self.mr if TILE_DIM_FOR_OPERAND[operand] == "m" else self.nr
            if self.half:
                out += f16.pack_function(self.prefix, operand, R)
                continue
            if self.bf16:
                out += bf16.pack_function(self.prefix, operand, R, self.bf16, self.T, self.TP, self.widen)
                continue
            transposes = "".join(f"\n                {self.prefix}_t4(s + {i} * st + k, st, d + k * {R} + {i}, {R});"
                            for i in range(0, R // 4 * 4, 4))
            if R % 4:
                transposes += (f"\n                for (int64_t i = {R // 4 * 4}; i < {R}; i++)"
                          f"\n                    for (int64_t j = 0; j < 4; j++) d[(k + j) * {R} + i] = s[i * st + k + j];")
            out += f"""
/* {operand} block (tlen x klen, element (t, k) at src[t*st + k*sk]) -> panels of {R}: dst[p*klen*{R} + k*{R} + r];
   with k contiguous (a transpose), four rows by four k at a time through registers */
static void {self.prefix}_pack{operand}(const {T} *restrict src, int64_t st, int64_t sk, int64_t tlen, int64_t klen, {T} *restrict dst)
{{
    for (int64_t p = 0; p < tlen; p += {R}) {{
        const int64_t r = LT_MIN({R}, tlen - p);
        const {T} *s = src + p * st;
        {T} *d = dst + p * klen;
        if (r == {R} && st == 1) {{
            for (int64_t k = 0; k < klen; k++)
                for (int64_t i = 0; i < {R}; i++) d[k * {R} + i] = s[k * sk + i];
        }} else if (r == {R} && sk == 1) {{
            int64_t k = 0;
            for (; k + 4 <= klen; k += 4) {{{transposes}
            }}
            for (; k < klen; k++)
                for (int64_t i = 0; i < {R}; i++) d[k * {R} + i] = s[i * st + k];
        }} else {{
            for (int64_t k = 0; k < klen; k++) {{
                for (int64_t i = 0; i < r; i++) d[k * {R} + i] = s[i * st + k * sk];
                for (int64_t i = r; i < {R}; i++) d[k * {R} + i] = 0;
            }}
        }}
    }}
}}""".splitlines()
        return out

    def _transpose4(self) -> list[str]:
        """A 4x4 block (rows at stride ``st``) stored transposed (rows at stride ``dr``): the inner
        step of packing an operand whose k is contiguous.  Element by element that pack ran at 1.8
        elements/ns on a Sapphire Rapids core (an L2-resident 504x512 block); through these
        shuffles at 6.3, and the same on AVX2 (the compiler lowers the shuffles to the ISA)."""
        T, p = self.T, self.prefix
        mask = "int32_t" if self.itemsize == 4 else "int64_t"
        return f"""
typedef {T} {p}_q __attribute__((vector_size({4 * self.itemsize})));
typedef {T} {p}_qu __attribute__((vector_size({4 * self.itemsize}), aligned({self.itemsize}), may_alias));
typedef {mask} {p}_qi __attribute__((vector_size({4 * self.itemsize})));
#if defined(__clang__)
#define {p}_SHUF(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
#else
#define {p}_SHUF(a, b, i, j, k, l) __builtin_shuffle(a, b, ({p}_qi){{i, j, k, l}})
#endif
static inline void {p}_t4(const {T} *restrict s, int64_t st, {T} *restrict d, int64_t dr)
{{
    const {p}_q r0 = *(const {p}_qu *)s, r1 = *(const {p}_qu *)(s + st);
    const {p}_q r2 = *(const {p}_qu *)(s + 2 * st), r3 = *(const {p}_qu *)(s + 3 * st);
    const {p}_q lo01 = {p}_SHUF(r0, r1, 0, 4, 1, 5), lo23 = {p}_SHUF(r2, r3, 0, 4, 1, 5);
    const {p}_q hi01 = {p}_SHUF(r0, r1, 2, 6, 3, 7), hi23 = {p}_SHUF(r2, r3, 2, 6, 3, 7);
    *({p}_qu *)d = {p}_SHUF(lo01, lo23, 0, 1, 4, 5);
    *({p}_qu *)(d + dr) = {p}_SHUF(lo01, lo23, 2, 3, 6, 7);
    *({p}_qu *)(d + 2 * dr) = {p}_SHUF(hi01, hi23, 0, 1, 4, 5);
    *({p}_qu *)(d + 3 * dr) = {p}_SHUF(hi01, hi23, 2, 3, 6, 7);
}}""".splitlines()

    # ---- the register-tiled micro-kernel ------------------------------------------------------
    def _tile_linkage(self) -> str:
        """Tiles are functions of their own (one copy, however many call sites), except in an
        exact-size kernel whose whole product is at most ``INLINE_PRODUCT_MACS`` multiply-adds: there
        the call costs as much as the work (4x4x4 stacks: 27 to 37 GFLOPS inlined; 8x8x8 went from
        72 down to 58, so only the tiniest are)."""
        sizes = self.sizes
        if sizes is not None and sizes.m * sizes.n * sizes.k <= INLINE_PRODUCT_MACS:
            return "inline __attribute__((always_inline))"
        return "__attribute__((noinline))"

    def _row_variants(self) -> list[int]:
        """Row counts with their own micro-kernel: the full tile and a few smaller ones, so an
        edge of any height is a few vectorized calls instead of scalar code (more variants would
        cost compile time for code that runs once per block edge)."""
        return [self.U] + [r for r in (16, 4, 1) if r < self.U]

    def _micro_kernel(self) -> list[str]:
        T, p = self.TC, self.prefix
        L: list[str] = [
            "/* a finished tile t (rows x cols, row-major) into C with any strides */",
            f"static __attribute__((noinline)) void {p}_scatter(const {T} *t, int64_t rows, int64_t cols, {T} *c, int64_t cu, int64_t cv, int overwrite)",
            "{",
            "    for (int64_t u = 0; u < rows; u++) for (int64_t v = 0; v < cols; v++) {",
            "        if (overwrite) c[u * cu + v * cv] = t[u * cols + v]; else c[u * cu + v * cv] += t[u * cols + v];",
            "    }",
            "}",
        ]
        if self.bf16 == "amx":
            return L + bf16.amx_tile(p, self.mr, self.nr)
        for rows in self._row_variants():
            if self.bf16 == "avx512bf16":
                name = f"{p}_tile" if rows == self.U else f"{p}_tile{rows}"
                L += bf16.avx512bf16_tile(p, name, rows, self.U, self.V, self._kernel_unroll())
            else:
                L += self._tile_function(rows)
        return L

    def _tile_function(self, rows: int) -> list[str]:
        """acc[rows][V] over kc steps: X supplies vectors along V, Y scalars along U.

        Operand addressing (relative to the tile's corner): a packed operand is a panel,
        element (k, t) at [k*R + t] (R is the full tile side even for a partial-row variant);
        an unpacked X has unit stride along V (the caller gathers its tile otherwise) unless read as scalars.
        """
        T, p, U, V, W = self.TC, self.prefix, self.U, self.V, self.W
        TX = self.TP if self.X in self.packs else self.T
        TY = self.TP if self.Y in self.packs else self.T
        nvec = V // W
        x_packed, y_packed = self.X in self.packs, self.Y in self.packs
        x_step = f"{V}" if x_packed else "xk"
        y_at = (lambda u: f"y[{u}]") if y_packed else (lambda u: f"y[{u} * yu]")
        y_step = f"{U}" if y_packed else "yk"
        unroll = self._kernel_unroll()
        name = f"{p}_tile" if rows == U else f"{p}_tile{rows}"
        params = [f"static {{}} void {{}}(int64_t kc,",
                  f"    const {TX} *restrict x, int64_t xk, int64_t xv, const {TY} *restrict y, int64_t yu, int64_t yk,",
                  f"    {T} *restrict c, int64_t cu, int64_t cv, int overwrite)"]
        quad = rows == U and self._one_register_product()
        L = ["", f"/* {rows}x{V} register tile, {nvec} vector(s) of {W} per row; c(u, v) at c[u*cu + v*cv] */",
             params[0].format("__attribute__((noinline))" if quad else self._tile_linkage(),
                              f"{name}_loop" if quad else name),
             *params[1:], "{", "    (void)xk; (void)xv; (void)yu; (void)yk;"]
        U = rows
        L += [f"    {p}_v " + ", ".join(f"c{u}_{j} = {{0}}" for j in range(nvec)) + ";" for u in range(U)]
        prefetch = self._prefetch_lines()
        if prefetch:
            # the same columns kc rows on (the next k block's tile); integer arithmetic, since the
            # address may lie past the operand (a prefetch never faults)
            L.append(f"    const uintptr_t ahead = (uintptr_t)(kc * xk) * sizeof({TX});")
        if unroll > 1 and rows == self.U:      # edge variants stay compact: they run rarely
            L.append(f"    #pragma GCC unroll {unroll}")
        L.append("    for (int64_t kk = 0; kk < kc; kk++) {")
        L += [f"        __builtin_prefetch((const void *)((uintptr_t)x + ahead + {off}), 0, 3);" for off in prefetch]
        for j in range(nvec):
            # an unpacked X read with scalar "vectors" may have any stride along V; wider vectors need 1
            at = f"x + {j} * xv" if (W == 1 and not x_packed) else f"x + {j * W}"
            L.append(f"        const {p}_v x{j} = {self._load(at)};")
        for u in range(U):
            L.append(f"        {{ const {T} yv = {y_at(u)};")
            L += [f"          c{u}_{j} += yv * x{j};" for j in range(nvec)]
            L.append("        }")
        L.append(f"        x += {x_step}; y += {y_step};")
        L.append("    }")
        L.append("    if (cv == 1) {")
        for u in range(U):
            for j in range(nvec):
                ptr = f"c + {u} * cu + {j * W}"
                L.append(f"        if (overwrite) {{ {self._store(ptr, f'c{u}_{j}')} }} "
                         f"else {{ {self._store(ptr, f'{self._load(ptr)} + c{u}_{j}')} }}")
        L.append("    } else {")
        L.append(f"        {T} t[{U} * {V}] __attribute__((aligned(64)));")
        for u in range(U):
            for j in range(nvec):
                L.append(f"        {self._store(f't + {u * V + j * W}', f'c{u}_{j}')}")
        L.append(f"        {p}_scatter(t, {U}, {V}, c, cu, cv, overwrite);")
        L.append("    }")
        L.append("}")
        if quad:    # the product in whole registers inline, the tile loop (other strides) out of line,
            # so the stack's loop keeps its registers (4x4x4 stacks: 44 -> 48 GFLOPS)
            L += ["", params[0].format(self._tile_linkage(), name), *params[1:], "{",
                  *self._one_register_product_lines(),
                  f"    {name}_loop(kc, x, xk, xv, y, yu, yk, c, cu, cv, overwrite);", "}"]
        return L

    def _one_register_product(self) -> bool:
        """An exact-size 4x4x4 product whose matrices fit whole vector registers (``codegen_quads``)."""
        sizes = self.sizes
        return (sizes is not None and (sizes.m, sizes.n, sizes.k) == (4, 4, 4) and not (self.bf16 or self.half)
                and quads.form(self.TC, self.target.vector_bytes) is not None
                and (self.U, self.V) == (4, 4) and not self.packs and not self._prefetch_lines())

    def _dense_stack(self) -> bool:
        """A 4x4x4 product without an epilogue: dense stacks of it run ``codegen_quads``' own loop."""
        return bool(self.nest.tile) and self._one_register_product() and not self.epilogue

    def _one_register_product_lines(self) -> list[str]:
        return quads.product_lines(self.TC, self.target.vector_bytes)

    def _prefetch_lines(self) -> list[int]:
        """Byte offsets of the cache lines of one tile row of X to prefetch a k block ahead (the
        schedule's ``prefetch`` step; none when X is packed)."""
        if self.X not in self.nest.prefetch or self.X in self.packs:
            return []
        row_bytes = self.V * self.itemsize      # float tiles read X in C's type (bfloat16 packs X)
        return list(range(0, row_bytes, CACHE_LINE_BYTES))

    def _kernel_unroll(self) -> int:
        """The schedule's unroll of the tile's k loop, cut so one unrolled body holds at most
        ``MAX_UNROLLED_UPDATES`` accumulator updates: a tile far beyond the register file (a 16x14
        tile of scalars is 224 accumulators) unrolled 8 times took the compiler over two minutes,
        and unrolling code that spills buys nothing."""
        absorbed = self.nest.loops[self.start:-2]
        unroll = max((self.nest.unroll_factor(l.name) for l in absorbed), default=1)
        updates = self.U * (self.V // self.W)
        return max(1, min(unroll, MAX_UNROLLED_UPDATES // updates))

    # ---- the call of the register tile at the innermost level of the nest ---------------------
    def _operand_pointer(self, operand: str, rng: dict[str, tuple[str, str]]) -> str:
        tdim = TILE_DIM_FOR_OPERAND[operand]
        (t_lo, _), (k_lo, _), (b_lo, _) = rng[tdim], rng["k"], rng["b"]
        if operand in self.packs:
            R = self.mr if tdim == "m" else self.nr
            return f"p{operand} + ({t_lo} - p{operand}_t0) * p{operand}_klen + ({k_lo} - p{operand}_k0) * {R}"
        if operand == "A":
            return f"A + {b_lo} * sAb + {t_lo} * sAm + {k_lo} * sAk"
        return f"B + {b_lo} * sBb + {k_lo} * sBk + {t_lo} * sBn"

    def _emit_tile_call(self, rng: dict[str, tuple[str, str]]) -> None:
        e, p = self.emit, self.prefix
        (m_lo, m_len), (n_lo, n_len), (k_lo, k_len), (b_lo, _) = rng["m"], rng["n"], rng["k"], rng["b"]
        X, Y = self.X, self.Y
        # strides of the unpacked operands, as the tile sees them: X along k; Y along u and k
        xk, xv = ("sBk", "sBn") if X == "B" else ("sAk", "sAm")
        yu, yk = ("sAm", "sAk") if Y == "A" else ("sBn", "sBk")
        cu, cv = ("sCm", "sCn") if self.vdim == "n" else ("sCn", "sCm")
        u_len, v_len = (m_len, n_len) if self.vdim == "n" else (n_len, m_len)
        if self.bf16 != "amx":
            e(f"const {self.TP if X in self.packs else self.T} *const tx = {self._operand_pointer(X, rng)};")
            e(f"const {self.TP if Y in self.packs else self.T} *const ty = {self._operand_pointer(Y, rng)};")
        e(f"{self.TC} *const tc = C + {b_lo} * sCb + {m_lo} * sCm + {n_lo} * sCn;")
        e(f"const int ow = ({k_lo} == 0) && !accumulate;")
        if self.bf16 == "amx":
            tid = ("(int64_t)tid" if self.nest.parallel else "0") if self.amx_direct_a else None
            for line in bf16.amx_tile_call(p, self.mr, self.nr, self._operand_pointer("A", rng),
                                           self._operand_pointer("B", rng), m_len, n_len, k_len, tid):
                e(line)
            self._emit_tile_epilogue(rng)
            return
        # An unpacked X read with vector loads needs unit stride along V; where the family's
        # layout does not give it (vectorizing m of a row-major A, n of a column-major B), its
        # tile is gathered into a panel first, like an edge.
        gather = X not in self.packs and self.W > 1
        e(f"if ({u_len} == {self.U} && {v_len} == {self.V}{f' && {xv} == 1' if gather else ''}) {{")
        e(f"    {p}_tile({k_len}, tx, {xk}, {xv}, ty, {yu}, {yk}, tc, {cu}, {cv}, ow);")
        e("} else {")
        # Edges stay vectorized: rows go through smaller tiles, largest first; a column block
        # narrower than the tile is computed into a scratch tile (from zero-padded panels; an
        # unpacked X edge is copied into one first) and only its valid part is stored.
        T, V = self.T, self.V
        e(f"    const {self.TP if X in self.packs else T} *ex = tx; int64_t exk = {xk}, exv = {xv};")
        e(f"    {self.TC} tt[{self.U} * {V}] __attribute__((aligned(64)));")
        e(f"    const int narrow = {v_len} < {V};")
        if X not in self.packs:
            tid = "(int64_t)tid" if self.nest.parallel else "0"
            e(f"    if (narrow{f' || {xv} != 1' if gather else ''}) {{")
            e(f"        {T} *xe = wsE_base + wsE * {tid};")
            e(f"        for (int64_t kk = 0; kk < {k_len}; kk++) {{")
            e(f"            for (int64_t v = 0; v < {v_len}; v++) xe[kk * {V} + v] = tx[kk * {xk} + v * {xv}];")
            e(f"            for (int64_t v = {v_len}; v < {V}; v++) xe[kk * {V} + v] = 0;")
            e("        }")
            e(f"        ex = xe; exk = {V}; exv = 1;")
            e("    }")
        e(f"    {self.TC} *const dst = narrow ? tt : tc;")
        e(f"    const int64_t du = narrow ? {V} : {cu}, dv = narrow ? 1 : {cv};")
        e("    const int dow = narrow ? 1 : ow;")
        e("    int64_t u0 = 0;")
        y_row = (str(bf16.k_group(self.bf16, Y)[0]) if self.bf16 else "1") if Y in self.packs else yu
        for r in self._row_variants():
            name = f"{p}_tile" if r == self.U else f"{p}_tile{r}"
            e(f"    for (; {u_len} - u0 >= {r}; u0 += {r})")
            e(f"        {name}({k_len}, ex, exk, exv, ty + u0 * {y_row}, {yu}, {yk}, dst + u0 * du, du, dv, dow);")
        e("    if (narrow)")
        e(f"        for (int64_t u = 0; u < {u_len}; u++)")
        e(f"            {p}_scatter(tt + u * {V}, 1, {v_len}, tc + u * {cu}, {cu}, {cv}, ow);")
        e("}")
        self._emit_tile_epilogue(rng)

    def _emit_tile_epilogue(self, rng: dict[str, tuple[str, str]]) -> None:
        """The store stage: the tile just written has its final sums after the last k block; a fused
        epilogue finishes it, a float16 kernel rounds it into the float16 C."""
        if self.epilogue or self.half:
            (m_lo, m_len), (n_lo, n_len), (k_lo, k_len), (b_lo, _) = rng["m"], rng["n"], rng["k"], rng["b"]
            finish = (f16.store_call("tc", m_len, n_len, b_lo, m_lo, n_lo) if self.half
                      else epi.c_call(self.prefix, "tc", m_len, n_len, m_lo, n_lo, b_lo))
            self.emit(f"if ({k_lo} + {k_len} == {self.extent['k']}) " + finish)

    def _emit_pack(self, operand: str, rng: dict[str, tuple[str, str]], inside_parallel: bool) -> None:
        e = self.emit
        tdim = TILE_DIM_FOR_OPERAND[operand]
        (t_lo, t_len), (k_lo, k_len), (b_lo, _) = rng[tdim], rng["k"], rng["b"]
        base = f"ws{operand}_base"
        if inside_parallel:
            base += f" + ws{operand} * (int64_t)tid"
        if operand == "A":
            src, st, sk = f"A + {b_lo} * sAb + {t_lo} * sAm + {k_lo} * sAk", "sAm", "sAk"
        else:
            src, st, sk = f"B + {b_lo} * sBb + {t_lo} * sBn + {k_lo} * sBk", "sBn", "sBk"
        e(f"{self.TP} *const p{operand} = {base};")
        if self.nest.parallel and not inside_parallel and not self.bf16:
            # one block every thread reads: every thread packs a share of it (codegen_threads.shared_pack)
            R = self.mr if tdim == "m" else self.nr
            if operand not in self.shared_packs:
                self.shared_packs[operand] = shared_pack(self.prefix, operand, R, self.T)
            for line in shared_pack_call(self.prefix, operand, R, (src, st, sk, t_len, k_len, f"p{operand}")):
                e(line)
        else:
            e(f"{self.prefix}_pack{operand}({src}, {st}, {sk}, {t_len}, {k_len}, p{operand});")
        klen = k_len
        if self.bf16:       # panels hold k padded to whole groups
            P = bf16.k_group(self.bf16, operand)[1]
            klen = f"({k_len} + {P - 1}) / {P} * {P}" if P > 1 else k_len
        e(f"const int64_t p{operand}_t0 = {t_lo}, p{operand}_k0 = {k_lo}, p{operand}_klen = {klen};")
        self.visible += [(f"{self.TP} *", f"p{operand}")] + [("int64_t", f"p{operand}_{x}") for x in ("t0", "k0", "klen")]
