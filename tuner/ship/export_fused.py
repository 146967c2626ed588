"""Fused epilogues in the library ``looptune export`` writes: one entry point per dtype and op.

An op (``MatmulProblem.op``, ``looptune.runtime.compiler.epilogue``) is in the library when the
plan has shapes of it (its records, or ``--shapes`` lines with ``epilogue=``); each such op gets
its own entry point, named after its parts, taking exactly the operands the op reads::

    int looptune_sgemm_bias_gelu_tanh(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                                      const float *B, int64_t ldb, float *C, int64_t ldc,
                                      const float *bias);
    int looptune_sgemm_bias_relu_residual(..., float *C, int64_t ldc, const float *bias,
                                          const float *R, int64_t ldr);
    const char *looptune_sgemm_bias_gelu_tanh_kernel(int64_t M, int64_t N, int64_t K);

``C = activation(A B + bias) + R``, the epilogue applied in the kernel's store stage as
``runtime.matmul(a, b, bias=, activation=, residual=)`` computes it.  Dispatch is the plain
entry points' (``export_c.dispatch_text``) over the op's own kernels: a tuned fused shape runs
its kernel, any other shape the nearest tuned shape's of the op or the op's general kernel (the
analytic default rendered with the epilogue), at the highest level the CPU runs.

Why one entry point per op, not ``looptune_sgemm_fused(const char *op, ...)`` or an activation
code with NULL-able operands: the signature says what an op reads, so a missing bias or residual
is a compile error rather than a run-time one; the library holds kernels for the ops it was
exported with only, and a program links against exactly those (an op it lacks is a link error,
not a surprise at run time); and no call pays for parsing or comparing the op.
"""
from __future__ import annotations

from looptune.runtime.compiler.abi import C_TYPE, OUTPUT_DTYPE
from looptune.runtime.compiler.codegen import SYMBOL_LETTER
from looptune.runtime.compiler.epilogue import PLAIN, Epilogue, c_prelude, of_op

FUSED_DTYPES = ("float32", "float64", "bfloat16")     # float16 kernels have no fused epilogue (codegen.render)

# 1 when two byte ranges share memory: a bias or residual overlapping C would be read after the
# kernel wrote partial sums there
OVERLAP_C = r"""
/* ---- fused entry points: operands that must not overlap C ---- */
static int lt_overlap(const void *p, int64_t p_bytes, const void *q, int64_t q_bytes)
{
    const uintptr_t a = (uintptr_t)p, b = (uintptr_t)q;
    return a < b + (uintptr_t)q_bytes && b < a + (uintptr_t)p_bytes;
}
"""


def suffix(op: str) -> str:
    """``"matmul+bias+gelu_tanh"`` -> ``"bias_gelu_tanh"`` ("" for the plain product)."""
    return "_".join(op.split("+")[1:])


def family(dtype: str, op: str) -> str:
    """The infix of a (dtype, op)'s C identifiers and kernel symbols: ``s``, ``s_bias_relu``."""
    return SYMBOL_LETTER[dtype] if op == PLAIN else f"{SYMBOL_LETTER[dtype]}_{suffix(op)}"


def entry_name(dtype: str, op: str) -> str:
    """``looptune_sgemm``, ``looptune_sgemm_bias_relu``."""
    return f"looptune_{SYMBOL_LETTER[dtype]}gemm" + (f"_{suffix(op)}" if op != PLAIN else "")


def parameters(dtype: str, op: str) -> str:
    """The entry point's C parameters: the plain product's, then the op's bias and residual."""
    T, TC = C_TYPE[dtype], C_TYPE[OUTPUT_DTYPE[dtype]]
    epilogue = of_op(op)
    extra = f", const {TC} *bias" if epilogue.bias else ""
    extra += f", const {TC} *R, int64_t ldr" if epilogue.residual else ""
    return (f"int64_t M, int64_t N, int64_t K, const {T} *A, int64_t lda, const {T} *B, int64_t ldb,\n"
            f"    {TC} *C, int64_t ldc{extra}")


def checks(op: str) -> list[str]:
    """C refusing an op's missing or overlapping operands (after ``lt_check``: M, N > 0)."""
    epilogue = of_op(op)
    c_bytes = "((M - 1) * ldc + N) * (int64_t)sizeof *C"
    out = []
    if epilogue.bias:
        out.append(f"    if (!bias || lt_overlap(bias, N * (int64_t)sizeof *bias, C, {c_bytes})) return LOOPTUNE_EINVAL;")
    if epilogue.residual:
        out.append(f"    if (!R || ldr < N || lt_overlap(R, ((M - 1) * ldr + N) * (int64_t)sizeof *R, C, {c_bytes}))"
                   " return LOOPTUNE_EINVAL;")
    return out


def call_arguments(dtype: str, op: str) -> str:
    """The kernel call's epilogue arguments (``abi.EPILOGUE_ARGS``; "" for the plain product)."""
    if op == PLAIN:
        return ""
    epilogue, TC = of_op(op), C_TYPE[OUTPUT_DTYPE[dtype]]
    bias = "bias, 1" if epilogue.bias else f"(const {TC} *)0, 0"
    residual = "R, M * ldr, ldr, 1" if epilogue.residual else f"(const {TC} *)0, 0, 0, 0"
    return f", {bias}, {residual}"


def shared_math(plan) -> list[str]:
    """The activations' math the plan's fused kernels use, guarded, for the shared helpers: defined
    there, at baseline, not first inside one level's target pragmas (``export_c.shared_text``)."""
    wanted = {C_TYPE[OUTPUT_DTYPE[k.dtype]] for k in plan.kernels
              if k.op != PLAIN and of_op(k.op).activation not in (None, "relu")}
    return [line for ctype in ("float", "double") if ctype in wanted
            for line in c_prelude(Epilogue(activation="silu"), ctype)]


def declarations(plan) -> str:
    """The header's fused entry points (the module docstring), "" when the plan has none."""
    if not plan.fused:
        return ""
    counts = {f: sum(1 for e in plan.entries if (e.dtype, e.op) == f) for f in plan.fused}
    lines = ["",
             "/* Fused epilogues: C = activation(A B + bias) + R in one call, each finished tile by tile in",
             "   the kernel's store stage (runtime.matmul(a, b, bias=, activation=, residual=) computes the",
             "   same).  One entry point per dtype and epilogue this library was exported with, taking the",
             "   operands its epilogue reads: bias, N elements; R, M x N row-major with row stride ldr >= N.",
             "   Neither may overlap C (LOOPTUNE_EINVAL; copy it first).  Activations: relu max(x, 0); gelu",
             "   x (1 + erf(x / sqrt 2)) / 2; gelu_tanh x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2;",
             "   silu x / (1 + exp(-x)); their accuracy is LoopTune's (runtime/compiler/epilogue.py).",
             "   Returns as the plain entry points; bfloat16's bias and R are float, as C. */"]
    for dtype, op in plan.fused:
        name = entry_name(dtype, op)
        count = counts[(dtype, op)]
        lines += [f"/* {op} on {dtype}: {count} tuned shape{'' if count == 1 else 's'} */",
                  f"int {name}({parameters(dtype, op)});",
                  f"const char *{name}_kernel(int64_t M, int64_t N, int64_t K);"]
    return "\n".join(lines) + "\n"
