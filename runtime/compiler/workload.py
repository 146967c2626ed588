"""The workload: a (batched) matmul problem, and the shape-file format that lists them.

``C[b, m, n] = sum_k A[b, m, k] * B[b, k, n]``

A problem is what a schedule is tuned *for*; its family is everything but the sizes
(op, dtype, layout, threads), and a schedule trace replays on any member of its family.
``MatmulProblem`` is the one workload type: the runtime dispatches on it, the tuner tunes it
and the database stores it (its key and dict forms are the database's persisted forms).
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

import math
import os
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Mapping

from looptune.runtime.compiler.epilogue import OPS, PLAIN, Epilogue   # "matmul", and with each fused epilogue
# the inputs' dtype; bfloat16 is ml_dtypes' (result: float32); float16 is IEEE half (result: float16)
DTYPES = ("float32", "float64", "bfloat16", "float16")
ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
LAYOUTS = ("nn", "tn", "nt", "tt")   # t: that operand (A first, B second) is a transposed view
MAX_DIM = 1 << 24
MAX_THREADS = 1024
PROBLEM_FIELDS = ("op", "dtype", "layout", "threads", "batch", "m", "n", "k")   # the dict form's keys

_OP_SET, _DTYPE_SET, _LAYOUT_SET = frozenset(OPS), frozenset(DTYPES), frozenset(LAYOUTS)   # str only: hash lookups


class ProblemError(LoopTuneError, ValueError):
    """A problem description is out of range or malformed."""


def short_repr(value: object) -> str:
    """repr for error messages: hostile input can be huge (and ints over 4300 digits refuse repr)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 80 else text[:77] + "..."


def _checked_int(value: object, name: str, hi: int) -> int:
    """``value`` as a plain int in [1, hi]; numpy integers are welcome, bools are not counts."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ProblemError(f"{name} must be an integer in [1, {hi}], got {short_repr(value)}")
    number = value.__index__()
    if not 1 <= number <= hi:
        raise ProblemError(f"{name} must be an integer in [1, {hi}], got {short_repr(value)}")
    return number


def _checked_choice(value: object, name: str, allowed: tuple[str, ...]) -> str:
    """``value`` as the matching entry of ``allowed`` (a plain str, whatever str subclass came in)."""
    if not isinstance(value, str) or value not in allowed:
        choices = (f"'matmul', optionally with a fused epilogue such as 'matmul+bias+gelu_tanh+residual'"
                   if allowed is OPS else str(list(allowed)))
        raise ProblemError(f"{name} must be one of {choices}, got {short_repr(value)}")
    return allowed[allowed.index(value)]


@dataclass(frozen=True, order=True)
class MatmulProblem:
    """One workload, everywhere: what the runtime dispatches, the tuner tunes and the
    database stores.  Constructing one validates it, so a problem that exists is in range.

    ``op`` is ``"matmul"`` or the product with a fused epilogue (``epilogue.OPS``, e.g.
    ``"matmul+bias+gelu_tanh"``): a family of its own, in the key, the dict form and the
    database's ``op`` column; a stored record naming an unknown op fails.
    """

    m: int
    n: int
    k: int
    batch: int = 1
    dtype: str = "float32"
    layout: str = "nn"
    threads: int = 1
    op: str = "matmul"

    def __post_init__(self) -> None:
        m, n, k, b, t = self.m, self.n, self.k, self.batch, self.threads
        if (type(m) is int and type(n) is int and type(k) is int and type(b) is int and type(t) is int
                and 0 < m <= MAX_DIM and 0 < n <= MAX_DIM and 0 < k <= MAX_DIM and 0 < b <= MAX_DIM
                and 0 < t <= MAX_THREADS and type(self.dtype) is str and self.dtype in _DTYPE_SET
                and type(self.layout) is str and self.layout in _LAYOUT_SET
                and type(self.op) is str and self.op in _OP_SET):
            return     # the common case (loading 100,000 records), checked in one expression
        set_ = object.__setattr__   # the careful path: normalize numpy integers and str subclasses, or refuse
        for name in ("m", "n", "k", "batch"):
            set_(self, name, _checked_int(getattr(self, name), name, MAX_DIM))
        set_(self, "threads", _checked_int(self.threads, "threads", MAX_THREADS))
        set_(self, "dtype", _checked_choice(self.dtype, "dtype", DTYPES))
        set_(self, "layout", _checked_choice(self.layout, "layout", LAYOUTS))
        set_(self, "op", _checked_choice(self.op, "op", OPS))

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.n * self.k

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def family(self) -> tuple[str, str, str, int]:
        """What a schedule trace is specific to: everything but the sizes."""
        return (self.op, self.dtype, self.layout, self.threads)

    def with_threads(self, threads: int) -> "MatmulProblem":
        return replace(self, threads=threads)

    def features(self) -> tuple[float, float, float, float]:
        """Where the problem sits for nearest-neighbour lookup within a family: log2 of each
        size, so "twice as big" is the same step at 64 and at 4096."""
        return (math.log2(self.m), math.log2(self.n), math.log2(self.k), math.log2(self.batch))

    def key(self) -> str:
        """A compact, stable, human-readable key: ``matmul:float32:nn:t1:b1:64x64x64``."""
        return f"{self.op}:{self.dtype}:{self.layout}:t{self.threads}:b{self.batch}:{self.m}x{self.n}x{self.k}"

    @classmethod
    def from_key(cls, key: str) -> "MatmulProblem":
        """Parse a ``key()``.  Only the canonical spelling is accepted (``int()`` would also
        take "+64", " 64" and "6_4"): one problem, one key."""
        try:
            op, dtype, layout, t, b, sizes = key.split(":")
            if t[:1] != "t" or b[:1] != "b":
                raise ValueError
            m, n, k = (int(x) for x in sizes.split("x"))
            problem = cls(m, n, k, batch=int(b[1:]), dtype=dtype, layout=layout, threads=int(t[1:]), op=op)
        except ProblemError:
            raise
        except (ValueError, AttributeError, TypeError):
            raise ProblemError(f"not a problem key: {short_repr(key)} "
                               f"(expected e.g. 'matmul:float32:nn:t1:b1:64x64x64')") from None
        if problem.key() != key:
            raise ProblemError(f"problem key {short_repr(key)} is not in canonical form {problem.key()!r}")
        return problem

    def to_dict(self) -> dict[str, object]:
        """The JSON form (a record's ``problem`` object): exactly ``PROBLEM_FIELDS``."""
        return {"op": self.op, "dtype": self.dtype, "layout": self.layout, "threads": self.threads,
                "batch": self.batch, "m": self.m, "n": self.n, "k": self.k}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "MatmulProblem":
        """Inverse of ``to_dict``; missing or extra fields are refused, so typos fail loudly."""
        if not isinstance(data, Mapping):
            raise ProblemError(f"must be a JSON object, got {type(data).__name__}")
        missing = [f for f in PROBLEM_FIELDS if f not in data]
        extra = sorted(set(data) - set(PROBLEM_FIELDS), key=str)
        if missing or extra:
            raise ProblemError(f"missing fields {missing}, unexpected fields {short_repr(extra)}")
        return cls(data["m"], data["n"], data["k"], batch=data["batch"], dtype=data["dtype"],  # type: ignore[arg-type]
                   layout=data["layout"], threads=data["threads"], op=data["op"])  # type: ignore[arg-type]

    def __str__(self) -> str:
        extra = [f"batch={self.batch}"] if self.batch != 1 else []
        extra += [f"dtype={self.dtype}"] if self.dtype != "float32" else []
        extra += [f"layout={self.layout}"] if self.layout != "nn" else []
        extra += [f"threads={self.threads}"] if self.threads != 1 else []
        extra += [f"epilogue={','.join(self.op.split('+')[1:])}"] if self.op != PLAIN else []
        return " ".join([f"{self.m} {self.n} {self.k}", *extra])

    def make_operands(self, seed: int = 0):
        """Random A, B (as views with this problem's layout) and a C to write into."""
        import numpy as np     # lazily: the workload type is imported without numpy

        rng = np.random.default_rng(seed)
        dt = numpy_dtype(self.dtype)
        b, m, n, k = self.batch, self.m, self.n, self.k
        a = rng.standard_normal((b, k, m) if self.layout[0] == "t" else (b, m, k)).astype(dt)
        bb = rng.standard_normal((b, n, k) if self.layout[1] == "t" else (b, k, n)).astype(dt)
        if self.layout[0] == "t":
            a = a.transpose(0, 2, 1)
        if self.layout[1] == "t":
            bb = bb.transpose(0, 2, 1)
        c = np.empty((b, m, n), dtype=np.float32 if self.dtype == "bfloat16" else dt)
        return a, bb, c


def numpy_dtype(name: str):
    """The numpy dtype of one of ``DTYPES``; bfloat16 needs ml_dtypes (the ``bf16`` extra)."""
    import numpy as np     # lazily, as everywhere in this module: the workload type is imported without numpy

    if name == "bfloat16":
        try:
            import ml_dtypes   # the bf16 extra; only when a bf16 problem meets numpy
        except ImportError:
            raise ProblemError("bfloat16 needs ml_dtypes: pip install 'looptune[bf16]'") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def parse_shape_line(line: str, *, threads: int = 1) -> MatmulProblem | None:
    """``M N K [batch=B] [dtype=...] [layout=..] [epilogue=bias,relu]`` -> problem (``epilogue``:
    ``Epilogue.parse``'s parts, the problem's op); blank lines and comments -> None."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) < 3:
        raise ProblemError(f"expected 'M N K [key=value ...]', got {line.strip()!r}")
    try:
        m, n, k = (int(p) for p in parts[:3])
    except ValueError:
        raise ProblemError(f"M N K must be integers: {line.strip()!r}") from None
    opts: dict[str, object] = {}
    for p in parts[3:]:
        key, sep, value = p.partition("=")
        if not sep or key not in ("batch", "dtype", "layout", "threads", "epilogue"):
            raise ProblemError(f"unknown option {p!r} in {line.strip()!r}")
        if key == "epilogue":
            try:
                key, value = "op", Epilogue.parse(value).op
            except ValueError as e:
                raise ProblemError(f"{e} in {line.strip()!r}") from None
        opts[key] = int(value) if key in ("batch", "threads") and value.isdigit() else value
    opts.setdefault("threads", threads)
    return MatmulProblem(m, n, k, **opts)  # type: ignore[arg-type]


def parse_shapes(lines: Iterable[str], *, threads: int = 1) -> Iterator[MatmulProblem]:
    for number, line in enumerate(lines, 1):
        try:
            problem = parse_shape_line(line, threads=threads)
        except ProblemError as e:
            raise ProblemError(f"line {number}: {e}") from None
        if problem is not None:
            yield problem


def read_shapes(path: str | os.PathLike, *, threads: int = 1) -> list[MatmulProblem]:
    with open(path) as f:
        return list(parse_shapes(f, threads=threads))
