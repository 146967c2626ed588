"""Fused epilogues: ``activation(A @ B + bias) + residual``, one home for the concept.

An epilogue is part of the problem: ``MatmulProblem.op`` names it (``"matmul"``, or e.g.
``"matmul+bias+gelu_tanh+residual"``), so a family with an epilogue is not the family without
(its own records, nearest lookups and kernels), while a schedule's trace (the loop structure)
replays on both.  The code generator renders it in the store stage: when a register tile has
its last k block, ``SYMBOL_epilogue`` finishes that tile while it is in L1, so the result is
never read back from memory.  Kernels with an epilogue take six more ABI arguments
(``abi.EPILOGUE_ARGS``): the bias vector with its stride along n, and the residual with its
(batch, row, column) strides, 0 where it broadcasts.

Activations (float32: our own vectorizable exp; float64: libm):

``relu``       max(x, 0)
``gelu``       x * (1 + erf(x / sqrt 2)) / 2, erf through an erfc with fractional error below
               1.2e-7 (Numerical Recipes' ``erfcc``), so the tails keep their relative accuracy
``gelu_tanh``  x * (1 + tanh(u)) / 2 with u = sqrt(2/pi) (x + 0.044715 x^3), computed as
               x / (1 + exp(-2u)), the same value without 1 + tanh's cancellation
``silu``       x / (1 + exp(-x))

float32 results are within about 1e-6 relative of the exact function (README, "Fused layers").
"""
from __future__ import annotations

import math
from itertools import product
from typing import NamedTuple, Optional

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
PLAIN = "matmul"


class Epilogue(NamedTuple):
    bias: bool = False
    activation: Optional[str] = None
    residual: bool = False

    @property
    def op(self) -> str:
        """The problem's ``op`` for this epilogue (its parts in the order they apply)."""
        parts = (["bias"] if self.bias else []) + ([self.activation] if self.activation else []) + \
                (["residual"] if self.residual else [])
        return "+".join([PLAIN, *parts])

    @property
    def empty(self) -> bool:
        return not (self.bias or self.activation or self.residual)

    @classmethod
    def parse(cls, text: str) -> "Epilogue":
        """``"bias,gelu_tanh"`` (a CLI option or a shape file's ``epilogue=``) or an op name
        (``"matmul+bias+gelu_tanh"``); ValueError names what is wrong."""
        parts = [p.strip() for p in text.replace("+", ",").split(",") if p.strip()]
        if parts and parts[0] == PLAIN:
            parts = parts[1:]
        activations = [p for p in parts if p in ACTIVATIONS]
        unknown = [p for p in parts if p not in ACTIVATIONS and p not in ("bias", "residual")]
        if unknown:
            raise ValueError(f"unknown epilogue part {unknown[0]!r}; use bias, residual and one of {', '.join(ACTIVATIONS)}")
        if len(activations) > 1 or len(set(parts)) != len(parts):
            raise ValueError(f"an epilogue has each part at most once and one activation, not {text!r}")
        return cls("bias" in parts, activations[0] if activations else None, "residual" in parts)


# every op a problem may name: the plain product first
OPS = tuple(Epilogue(b, a, r).op for b, a, r in product((False, True), (None, *ACTIVATIONS), (False, True)))


def of_op(op: str) -> Epilogue:
    """The epilogue an op names (``OPS``)."""
    return Epilogue.parse(op)


# ---- C text ----------------------------------------------------------------------------------
_F32_MATH = r"""#ifndef LT_EPILOGUE_F32_DEFINED
#define LT_EPILOGUE_F32_DEFINED
/* exp for the activations: 2^n * p(r), |r| <= ln2/2, a degree-7 polynomial (under 2 ulp);
   arguments clamped to [-87, 88] (below: about 1e-38, which every activation here turns into
   its limit), branch-free so that the epilogue's loop vectorizes */
static inline float lt_expf(float x)
{
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;     /* round to nearest */
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.9875691500e-4f;           /* Cephes' expf coefficients */
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } s = { ((int32_t)n + 127) << 23 };
    return p * s.f;
}
/* erfc(z) = t exp(-z^2 + q(t)); -z^2 = -x^2/2 is split exactly (x*x = h + l) and its large part
   goes through an exp of its own, so a tail value keeps float32's relative accuracy */
static inline float lt_gelu_f32(float x)
{
    const float z = (x < 0 ? -x : x) * 0.70710678118654752f, t = 1.0f / (1.0f + 0.5f * z);
    const float q = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f + t * (-0.18628806f
                    + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
    const float h = x * x, l = __builtin_fmaf(x, x, -h);
    const float half_erfc = 0.5f * t * lt_expf(-0.5f * h) * lt_expf(q - 0.5f * l);      /* erfc(z) / 2 */
    return x * (x >= 0 ? 1.0f - half_erfc : half_erfc);
}
#endif"""

_F64_MATH = r"""#ifndef LT_EPILOGUE_F64_DEFINED
#define LT_EPILOGUE_F64_DEFINED
#include <math.h>
#endif"""

_ACTIVATION_C = {
    ("float", "relu"): "v = v > 0.0f ? v : 0.0f;",
    ("float", "gelu"): "v = lt_gelu_f32(v);",
    ("float", "gelu_tanh"): "v = v / (1.0f + lt_expf(-1.5957691216057308f * (v + 0.044715f * v * v * v)));",
    ("float", "silu"): "v = v / (1.0f + lt_expf(-v));",
    ("double", "relu"): "v = v > 0.0 ? v : 0.0;",
    ("double", "gelu"): "v = 0.5 * v * erfc(-v * 0.70710678118654752440);",
    ("double", "gelu_tanh"): "v = v / (1.0 + exp(-1.5957691216057307602 * (v + 0.044715 * v * v * v)));",
    ("double", "silu"): "v = v / (1.0 + exp(-v));",
}


def c_prelude(epilogue: Epilogue, ctype: str) -> list[str]:
    """The math an epilogue's activation needs (guarded: kernels may share a translation unit)."""
    if epilogue.activation in (None, "relu"):
        return []
    return (_F32_MATH if ctype == "float" else _F64_MATH).splitlines()


def c_function(prefix: str, epilogue: Epilogue, ctype: str) -> list[str]:
    """``PREFIX_epilogue``: finishes a rows x cols block of C in place (its final values)."""
    value = ["v += bias[j * sbias];"] if epilogue.bias else []
    value += [_ACTIVATION_C[(ctype, epilogue.activation)]] if epilogue.activation else []
    value += ["v += r[j * sRn];"] if epilogue.residual else []
    body = " ".join([f"{ctype} v = c[j * sCn];", *value, "c[j * sCn] = v;"])
    return [
        "",
        f"/* the epilogue ({epilogue.op}) on a finished rows x cols block of C */",
        f"static void {prefix}_epilogue({ctype} *c, int64_t rows, int64_t cols, int64_t sCm, int64_t sCn,",
        f"    const {ctype} *bias, int64_t sbias, const {ctype} *R, int64_t sRm, int64_t sRn)",
        "{",
        "    (void)bias; (void)sbias; (void)R; (void)sRm; (void)sRn;",
        "    for (int64_t i = 0; i < rows; i++, c += sCm) {",
        f"        const {ctype} *r = R ? R + i * sRm : 0; (void)r;",
        "        if (sCn == 1 && sbias <= 1 && sRn <= 1) {",
        "            #pragma omp simd",
        f"            for (int64_t j = 0; j < cols; j++) {{ {body} }}",
        "        } else {",
        f"            for (int64_t j = 0; j < cols; j++) {{ {body} }}",
        "        }",
        "    }",
        "}",
    ]


def c_call(prefix: str, c_ptr: str, rows: str, cols: str, m_lo: str, n_lo: str, b_lo: str) -> str:
    """The call finishing C's block at (b_lo, m_lo, n_lo) of rows x cols."""
    return (f"{prefix}_epilogue({c_ptr}, {rows}, {cols}, sCm, sCn, bias ? bias + {n_lo} * sbias : 0, sbias, "
            f"R ? R + {b_lo} * sRb + {m_lo} * sRm + {n_lo} * sRn : 0, sRm, sRn);")


# ---- the same in numpy: the fallback and the reference ---------------------------------------
def activate(x, activation: Optional[str]):
    """``activation`` applied to the float array ``x`` in place (as the kernels compute it, in
    x's dtype; float64 through math.erfc where numpy has no erf); returns ``x``."""
    import numpy as np     # lazily: the workload type imports this module without numpy

    if activation is None:
        return x
    if activation == "relu":
        return np.maximum(x, 0, out=x)
    if activation == "silu":
        with np.errstate(over="ignore"):
            return np.divide(x, 1 + np.exp(-x), out=x)
    if activation == "gelu_tanh":
        u = x * x
        u *= 0.044715
        u += 1
        u *= x
        u *= -1.5957691216057308
        with np.errstate(over="ignore"):
            return np.divide(x, 1 + np.exp(u), out=x)
    if activation == "gelu":
        if x.dtype == np.float64:       # to float64's accuracy, one element at a time
            half = np.frompyfunc(math.erfc, 1, 1)(x * -0.70710678118654752440).astype(np.float64) * 0.5
        else:                           # the kernels' erfc, vectorized (fractional error below 1.2e-7)
            z = np.abs(x.astype(np.float64)) * 0.70710678118654752440
            t = 1 / (1 + 0.5 * z)
            q = np.polyval([0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
                            0.09678418, 0.37409196, 1.00002368, -1.26551223], t) - z * z
            half_erfc = 0.5 * t * np.exp(q)
            half = np.where(x >= 0, 1 - half_erfc, half_erfc)
        x *= half.astype(x.dtype)
        return x
    raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATIONS)}")
