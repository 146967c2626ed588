"""The float16 parts of the code generator: IEEE half inputs and result, float32 arithmetic.

A float16 kernel reads ``uint16_t`` bit patterns (numpy's ``float16``), widens them to float32
while packing (both operands are always packed, as in a bfloat16 ``convert`` kernel, whose pack
and tile code it shares), accumulates in float32 over the whole of K into a float32 scratch C,
and rounds each result once to float16 when it stores C: what ``np.matmul`` computes on float16
arrays (its loop accumulates in float), at float32 kernel speed.

The schedule's kernel is rendered as a static function with a float32 ``C``; the exported
symbol has the float16 ABI (``abi.abi_args("float16")``) and wraps it::

    int SYMBOL(... const uint16_t *A ... const uint16_t *B ... uint16_t *C ...)
        scratch (batch x M x N float32, this thread's, reused)  <- C widened, when accumulating
        SYMBOL_f32(..., scratch, M*N, N, 1, accumulate, nthreads, C, sCb, sCm, sCn)
            each register tile, after its last k block: rounded to nearest even into C
            (a nest without a register tile: the wrapper rounds all of C after the call)

Conversions use F16C where the kernel is compiled for it (``__F16C__``), else exact bit
arithmetic, so the same text is right for every target.
"""
from __future__ import annotations

from looptune.runtime.compiler.abi import ABI_ARGS, abi_args

WIDEN = "lt_f16_to_f32"

# the inner kernel's parameter list: float16 inputs, float32 C (the scratch), and the float16 C
# (H) a tiled kernel rounds each finished tile into
INNER_ABI = ABI_ARGS.format(T="uint16_t", TC="float") + ", uint16_t *H, int64_t sHb, int64_t sHm, int64_t sHn"


def inner_symbol(symbol: str) -> str:
    return f"{symbol}_f32"


def prelude() -> list[str]:
    """The conversions (guarded, so that an export's kernels share one translation unit)."""
    return r"""#ifndef LT_F16_CONVERSIONS_DEFINED
#define LT_F16_CONVERSIONS_DEFINED
#if defined(__F16C__)
#include <immintrin.h>
#endif
/* IEEE half bit patterns <-> float32: widening is exact; narrowing rounds to nearest even */
static inline float lt_f16_to_f32(uint16_t h)
{
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (e == 0) {           /* zero or subnormal: man * 2^-24, exact in float32 */
        v.f = (float)man * (1.0f / 16777216.0f);
        v.u |= sign;
        return v.f;
    }
    v.u = sign | (e == 0x1fu ? 0x7f800000u | (man << 13) : ((e + 112u) << 23) | (man << 13));
    return v.f;
#endif
}
static inline uint16_t lt_f32_to_f16(float f)
{
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0);     /* 0: round to nearest even */
#else
    union { float f; uint32_t u; } v = { f };
    const uint32_t sign = (v.u >> 16) & 0x8000u;
    v.u &= 0x7fffffffu;
    if (v.u >= 0x47800000u)                 /* 2^16 and up: inf, or NaN (kept quiet) */
        return (uint16_t)(sign | (v.u > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (v.u < 0x38800000u) {                /* below 2^-14: a subnormal; adding 0.5 rounds at 2^-24 */
        v.f += 0.5f;
        return (uint16_t)(sign | (v.u - 0x3f000000u));
    }
    const uint32_t odd = (v.u >> 13) & 1u;  /* normal: rebias, round to nearest even (may carry to inf) */
    v.u += 0xc8000fffu + odd;               /* (15 - 127) << 23, plus the rounding bias */
    return (uint16_t)(sign | (v.u >> 13));
#endif
}
/* a finished rows x cols float32 tile (c, strides cm, cn) rounded into the float16 C (h, hm, hn) */
static void lt_f16_store(const float *c, int64_t rows, int64_t cols, int64_t cm, int64_t cn,
                         uint16_t *h, int64_t hm, int64_t hn)
{
    for (int64_t i = 0; i < rows; i++, c += cm, h += hm) {
        int64_t j = 0;
#if defined(__F16C__)
        if (cn == 1 && hn == 1)
            for (; j + 8 <= cols; j += 8)
                _mm_storeu_si128((__m128i *)(h + j), _mm256_cvtps_ph(_mm256_loadu_ps(c + j), 0));
#endif
        for (; j < cols; j++) h[j * hn] = lt_f32_to_f16(c[j * cn]);
    }
}
/* n consecutive halves widened into d: eight per vcvtph2ps where F16C is there */
static inline void lt_f16_widen(const uint16_t *restrict s, float *restrict d, int64_t n)
{
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(d + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j))));
#endif
    for (; j < n; j++) d[j] = lt_f16_to_f32(s[j]);
}
#endif""".splitlines()


def pack_function(prefix: str, operand: str, R: int) -> list[str]:
    """The pack of one float16 operand block into float32 panels of R (float32's layout,
    ``dst[p*klen*R + k*R + r]``), widened eight at a time along whichever of t and k is contiguous."""
    return f"""
/* {operand} block (tlen x klen, element (t, k) at src[t*st + k*sk], float16) -> float32 panels of {R} */
static void {prefix}_pack{operand}(const uint16_t *restrict src, int64_t st, int64_t sk, int64_t tlen, int64_t klen, float *restrict dst)
{{
    for (int64_t p = 0; p < tlen; p += {R}) {{
        const int64_t r = LT_MIN({R}, tlen - p);
        const uint16_t *s = src + p * st;
        float *d = dst + p * klen;
        if (r == {R} && st == 1) {{
            for (int64_t k = 0; k < klen; k++) lt_f16_widen(s + k * sk, d + k * {R}, {R});
        }} else if (r == {R} && sk == 1) {{
            float w[16];
            for (int64_t i = 0; i < {R}; i++) {{
                int64_t k = 0;
                for (; k + 16 <= klen; k += 16) {{
                    lt_f16_widen(s + i * st + k, w, 16);
                    for (int64_t j = 0; j < 16; j++) d[(k + j) * {R} + i] = w[j];
                }}
                for (; k < klen; k++) d[k * {R} + i] = lt_f16_to_f32(s[i * st + k]);
            }}
        }} else {{
            for (int64_t k = 0; k < klen; k++) {{
                for (int64_t i = 0; i < r; i++) d[k * {R} + i] = lt_f16_to_f32(s[i * st + k * sk]);
                for (int64_t i = r; i < {R}; i++) d[k * {R} + i] = 0;
            }}
        }}
    }}
}}""".splitlines()


def store_call(c_ptr: str, rows: str, cols: str, b_lo: str, m_lo: str, n_lo: str) -> str:
    """The store stage of a float16 kernel's tile: its final float32 sums rounded into H."""
    return f"lt_f16_store({c_ptr}, {rows}, {cols}, sCm, sCn, H + {b_lo} * sHb + {m_lo} * sHm + {n_lo} * sHn, sHm, sHn);"


def wrapper(symbol: str, sizes_check: str | None, tiled: bool) -> list[str]:
    """The exported float16-ABI function around the float32-C kernel ``inner_symbol(symbol)``;
    ``sizes_check``: an exact-size kernel's C condition for sizes it was not compiled for;
    ``tiled``: the inner kernel rounds its tiles into C itself (else the wrapper does, after it)."""
    inner = inner_symbol(symbol)
    check = [f"    if ({sizes_check}) return -2;  /* not the sizes compiled for */"] if sizes_check else []
    return [
        f"int {symbol}({abi_args('float16')})",
        "{",
        *check,
        "    if (batch <= 0 || M <= 0 || N <= 0) return 0;",
        "    static _Thread_local lt_ws *f16_slot = 0;",
        "    float *const t = (float *)lt_ws_get(&f16_slot, batch * M * N * (int64_t)sizeof(float));",
        "    if (!t) return -1;",
        "    if (accumulate)",
        "        for (int64_t b = 0; b < batch; b++) for (int64_t m = 0; m < M; m++) for (int64_t n = 0; n < N; n++)",
        "            t[(b * M + m) * N + n] = lt_f16_to_f32(C[b * sCb + m * sCm + n * sCn]);",
        f"    const int rc = {inner}(batch, M, N, K, A, sAb, sAm, sAk, B, sBb, sBk, sBn, t, M * N, N, 1,",
        "                            accumulate, nthreads, C, sCb, sCm, sCn);",
        "    if (rc) return rc;",
        f"    if ({'K <= 0' if tiled else '1'})      /* else every tile was rounded into C as it was finished */",
        "        for (int64_t b = 0; b < batch; b++)",
        "            lt_f16_store(t + b * M * N, M, N, N, 1, C + b * sCb, sCm, sCn);",
        "    return 0;",
        "}",
    ]
