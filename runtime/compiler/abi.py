"""The kernel ABI, defined once: argument list, element types, return codes.

Every generated kernel, the compiled trampoline, the cffi fallback, the measurement
worker and the exported C library use these definitions::

    int NAME(int64_t batch, int64_t M, int64_t N, int64_t K,
             const T *A, int64_t sAb, int64_t sAm, int64_t sAk,
             const T *B, int64_t sBb, int64_t sBk, int64_t sBn,
             TC *C, int64_t sCb, int64_t sCm, int64_t sCn,
             int32_t accumulate, int32_t nthreads);

``T`` is the inputs' element type and ``TC`` the output's: the same for float32 and float64;
bfloat16 inputs (``uint16_t`` bit patterns) give a float32 ``C``, as ``np.matmul`` does on
ml_dtypes arrays, accumulated in float32 over the whole of K.  float16 inputs give a float16
``C`` (bit patterns too), accumulated in float32 and rounded once (``codegen_f16``).

Strides are in elements, so transposed and sliced views need no copy.  A kernel computes
``C = (accumulate ? C : 0) + A @ B`` per batch entry and returns 0 or one of ``ERRORS``.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

# the parameter list, with ``{T}`` standing for the element type
ABI_ARGS = ("int64_t batch, int64_t M, int64_t N, int64_t K, "
            "const {T} *A, int64_t sAb, int64_t sAm, int64_t sAk, "
            "const {T} *B, int64_t sBb, int64_t sBk, int64_t sBn, "
            "{TC} *C, int64_t sCb, int64_t sCm, int64_t sCn, "
            "int32_t accumulate, int32_t nthreads")

# what a kernel with a fused epilogue (``epilogue``) takes after those: the bias vector and its
# stride along n, the residual and its strides (0 where it broadcasts); NULL where the op has none
EPILOGUE_ARGS = (", const {TC} *bias, int64_t sbias, "
                 "const {TC} *R, int64_t sRb, int64_t sRm, int64_t sRn")

# the inputs' element type (bfloat16 and float16: their bit patterns)
C_TYPE = {"float32": "float", "float64": "double", "bfloat16": "uint16_t", "float16": "uint16_t"}
# np.matmul's result dtype
OUTPUT_DTYPE = {"float32": "float32", "float64": "float64", "bfloat16": "float32", "float16": "float16"}


def abi_args(dtype: str, fused: bool = False) -> str:
    """The kernel's C parameter list for inputs of ``dtype`` (``fused``: with a fused epilogue)."""
    tc = C_TYPE[OUTPUT_DTYPE[dtype]]
    return ABI_ARGS.format(T=C_TYPE[dtype], TC=tc) + (EPILOGUE_ARGS.format(TC=tc) if fused else "")

# Non-zero return codes.  -3 and -4 come from the call path (the trampoline and the cffi path),
# never from a kernel; the caller then copies (-3) or computes into a temporary (-4).
ERRORS = {
    -1: "out of memory for packing buffers",
    -2: "the operands do not meet this kernel's precondition (its layout, or an exact-size kernel's sizes)",
    -3: "an operand is not aligned to its element size (address or strides)",
    -4: "the output overlaps an input operand",
    -5: "the operating system refused this process the AMX tile registers",
}


def error_message(code: int) -> str:
    return ERRORS.get(code, "unknown error code")


def function_type(name: str, dtype: str, fused: bool = False) -> str:
    """A C typedef of a pointer to a kernel for inputs of ``dtype`` (``"void"``: any dtype;
    ``fused``: a kernel with a fused epilogue)."""
    args = ABI_ARGS.format(T="void", TC="void") if dtype == "void" else abi_args(dtype, fused)
    return f"typedef int (*{name})({args});"


class KernelError(LoopTuneError, RuntimeError):
    """A kernel returned a failure code (``code``: one of ``ERRORS``)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_code(cls, symbol: str, code: int) -> "KernelError":
        return cls(f"{symbol} returned {code}: {error_message(code)}", code)
