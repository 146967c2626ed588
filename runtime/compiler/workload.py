"""The workload: a (batched) matmul problem, and the shape-file format that lists them.

``C[b, m, n] = sum_k A[b, m, k] * B[b, k, n]``

A problem is what a schedule is tuned *for*; its family is everything but the sizes
(op, dtype, layout, threads), and a schedule trace replays on any member of its family.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

import math
import os
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

DTYPES = ("float32", "float64")
LAYOUTS = ("nn", "tn", "nt", "tt")   # t: that operand (A first, B second) is a transposed view
MAX_DIM = 1 << 24
MAX_THREADS = 1024


class ProblemError(LoopTuneError, ValueError):
    """A problem description is out of range or malformed."""


@dataclass(frozen=True, order=True)
class MatmulProblem:
    m: int
    n: int
    k: int
    batch: int = 1
    dtype: str = "float32"
    layout: str = "nn"
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("m", "n", "k", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
                raise ProblemError(f"{name} must be an integer in [1, {MAX_DIM}], got {v!r}")
        if self.dtype not in DTYPES:
            raise ProblemError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise ProblemError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= MAX_THREADS:
            raise ProblemError(f"threads must be an integer in [1, {MAX_THREADS}], got {self.threads!r}")

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.n * self.k

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 8

    @property
    def family(self) -> tuple[str, str, str, int]:
        """What a schedule trace is specific to: everything but the sizes."""
        return ("matmul", self.dtype, self.layout, self.threads)

    def with_threads(self, threads: int) -> "MatmulProblem":
        return replace(self, threads=threads)

    def features(self) -> tuple[float, ...]:
        """Continuous features for nearest-neighbour lookup within a family."""
        return (math.log2(self.m), math.log2(self.n), math.log2(self.k), math.log2(self.batch))

    def key(self) -> str:
        """A compact, stable, human-readable key: ``matmul:float32:nn:t1:b1:64x64x64``."""
        return f"matmul:{self.dtype}:{self.layout}:t{self.threads}:b{self.batch}:{self.m}x{self.n}x{self.k}"

    @classmethod
    def from_key(cls, key: str) -> "MatmulProblem":
        try:
            op, dtype, layout, t, b, sizes = key.split(":")
            if op != "matmul" or not t.startswith("t") or not b.startswith("b"):
                raise ValueError
            m, n, k = (int(x) for x in sizes.split("x"))
            return cls(m, n, k, batch=int(b[1:]), dtype=dtype, layout=layout, threads=int(t[1:]))
        except ValueError:
            raise ProblemError(f"not a problem key: {key!r}") from None

    def __str__(self) -> str:
        extra = [f"batch={self.batch}"] if self.batch != 1 else []
        extra += [f"dtype={self.dtype}"] if self.dtype != "float32" else []
        extra += [f"layout={self.layout}"] if self.layout != "nn" else []
        extra += [f"threads={self.threads}"] if self.threads != 1 else []
        return " ".join([f"{self.m} {self.n} {self.k}", *extra])

    def make_operands(self, seed: int = 0):
        """Random A, B (as views with this problem's layout) and a C to write into."""
        import numpy as np

        rng = np.random.default_rng(seed)
        dt = np.dtype(self.dtype)
        b, m, n, k = self.batch, self.m, self.n, self.k
        a = rng.standard_normal((b, k, m) if self.layout[0] == "t" else (b, m, k)).astype(dt)
        bb = rng.standard_normal((b, n, k) if self.layout[1] == "t" else (b, k, n)).astype(dt)
        if self.layout[0] == "t":
            a = a.transpose(0, 2, 1)
        if self.layout[1] == "t":
            bb = bb.transpose(0, 2, 1)
        c = np.empty((b, m, n), dtype=dt)
        return a, bb, c


def parse_shape_line(line: str, *, threads: int = 1) -> MatmulProblem | None:
    """``M N K [batch=B] [dtype=...] [layout=..]`` -> problem; blank lines and comments -> None."""
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
        if not sep or key not in ("batch", "dtype", "layout", "threads"):
            raise ProblemError(f"unknown option {p!r} in {line.strip()!r}")
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
