"""Loop-nest IR for batched matmul, ``C[b,m,n] (+)= sum_k A[b,m,k] * B[b,k,n]``, and the
constants and error type of the schedule language.

A ``LoopNest`` is an immutable value: loops over named dimensions (outer to inner)
plus annotations (register tile, vectorized loop, unroll factors, packed operands,
the parallel loop).  It is *size-free*: the same nest serves every problem of a
family, and sizes only enter when it is printed for a problem or rendered to C.

Each loop covers a range of its dimension in steps of ``block`` elements.  Splitting
loop ``m`` (block 1) by 16 gives ``m.o`` (block 16) over ``m.i`` (block 1, extent 16)::

    for m in 0..M:                    for m.o in 0..M step 16:
      S(m)                 ==>          for m.i in 0..16 (tail: M % 16):
                                          S(m.o + m.i)

The steps that edit a nest (split, swap, ..., each a pure function nest -> nest) live in
``looptune.runtime.compiler.steps`` together with their argument grammar.  ``LoopNest.check()``
keeps the invariants the code generator relies on and is O(loops), because the agent takes
many steps per second; every violation raises ``ScheduleError`` through ``require``.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

from dataclasses import dataclass
from typing import Optional

DIMS = ("b", "m", "n", "k")                      # batch, rows of C, columns of C, reduction
OPERANDS = ("A", "B")                            # the inputs a step may name (pack, prefetch)
TENSOR_DIMS = {"A": ("b", "m", "k"), "B": ("b", "k", "n"), "C": ("b", "m", "n")}
TILE_DIM_FOR_OPERAND = {"A": "m", "B": "n"}      # the dimension a packed panel is laid out along
MAX_LOOP_DEPTH = 8                               # at most 8 splits along one path of one dimension
MAX_TILE_ELEMENTS = 1024                         # MR * NR accumulators; beyond this nothing fits in registers
MAX_TILE_SIDE = 64
MAX_LOOPS = 24


class ScheduleError(LoopTuneError, ValueError):
    """An illegal schedule: a step that does not apply to the nest, or (``TraceFormatError``)
    one that is not in the grammar at all; the message says why."""


def require(cond: bool, message: str) -> None:
    """The schedule language's one check: raise ``ScheduleError(message)`` unless ``cond``.
    Transforms, the nest invariants and the tuner's action rules all reject steps through it."""
    if not cond:
        raise ScheduleError(message)


@dataclass(frozen=True)
class Loop:
    name: str                 # stable name: "m", "m.o", "m.i.o", ...
    dim: str                  # "b", "m", "n" or "k"
    block: int = 1            # elements of `dim` advanced per iteration
    extent: Optional[int] = None   # constant trip count (inner part of a split), None if size-dependent

    @property
    def is_leaf(self) -> bool:
        return self.block == 1


@dataclass(frozen=True)
class LoopNest:
    loops: tuple[Loop, ...]
    tile: Optional[tuple[str, str]] = None          # (m loop, n loop) held in registers
    vector: Optional[str] = None                    # which tile loop is vectorized
    unroll: tuple[tuple[str, int], ...] = ()        # sorted (loop, factor)
    pack: tuple[tuple[str, str], ...] = ()          # sorted (operand, loop at whose body start it is packed)
    parallel: Optional[str] = None                  # loop whose iterations run on threads
    prefetch: tuple[str, ...] = ()                  # sorted operands whose next k block the micro-kernel prefetches

    # ---- construction -------------------------------------------------------------
    @classmethod
    def initial(cls) -> "LoopNest":
        """The untuned nest: ``for b: for m: for n: for k: C[b,m,n] += A[b,m,k]*B[b,k,n]``."""
        return cls(tuple(Loop(d, d) for d in DIMS))

    # ---- queries ------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(l.name for l in self.loops)

    def index(self, name: str) -> int:
        for i, l in enumerate(self.loops):
            if l.name == name:
                return i
        raise ScheduleError(f"no loop named {name!r}; loops are {list(self.names)}")

    def loop(self, name: str) -> Loop:
        return self.loops[self.index(name)]

    def unroll_factor(self, name: str) -> int:
        return dict(self.unroll).get(name, 1)

    def packed(self, operand: str) -> Optional[str]:
        return dict(self.pack).get(operand)

    def vector_operand(self) -> Optional[str]:
        """The operand the micro-kernel reads as vectors (B when vectorized along n, A along m)."""
        dim = self.vector_dim
        return None if dim is None else ("B" if dim == "n" else "A")

    @property
    def tile_sizes(self) -> Optional[tuple[int, int]]:
        """(MR, NR) of the register tile, if one is chosen."""
        if self.tile is None:
            return None
        return self.loop(self.tile[0]).extent, self.loop(self.tile[1]).extent  # type: ignore[return-value]

    @property
    def vector_dim(self) -> Optional[str]:
        return None if self.vector is None else self.loop(self.vector).dim

    def kernel_start(self) -> int:
        """Index of the first loop that lives inside the micro-kernel.

        The micro-kernel owns the register-tile loops and the unbroken run of ``k``
        loops just above them (it keeps the accumulators in registers across that
        reduction).  Without a tile, nothing is absorbed and this is ``len(loops)``.
        """
        if self.tile is None:
            return len(self.loops)
        i = len(self.loops) - 2
        while i > 0 and self.loops[i - 1].dim == "k":
            i -= 1
        return i

    # ---- invariants ---------------------------------------------------------------
    def check(self) -> "LoopNest":
        loops = self.loops
        require(len(loops) <= MAX_LOOPS, f"at most {MAX_LOOPS} loops")
        require(len(set(self.names)) == len(loops), "loop names must be unique")
        require(loops[0].name == "b", "the batch loop b stays outermost")
        for d in DIMS:
            blocks = [l.block for l in loops if l.dim == d]
            require(len(blocks) >= 1 and blocks[-1] == 1, f"dimension {d} lost its innermost loop")
            require(all(a > b for a, b in zip(blocks, blocks[1:])),
                    f"the parts of dimension {d} must stay nested outer-to-inner "
                    f"(a split's inner loop cannot move outside its outer loop)")
        start = self.kernel_start()
        if self.tile is not None:
            m_name, n_name = self.tile
            m, n = self.loop(m_name), self.loop(n_name)
            require(m.dim == "m" and n.dim == "n", "register_tile takes an m loop and an n loop")
            require(set(self.names[-2:]) == {m_name, n_name}, "the register-tile loops must be the two innermost loops")
            for l in (m, n):
                require(l.is_leaf and l.extent is not None,
                        f"register-tile loop {l.name} must be the inner part of a split (a constant trip count)")
                require(l.extent <= MAX_TILE_SIDE, f"register-tile side {l.extent} exceeds {MAX_TILE_SIDE}")
            require(m.extent * n.extent <= MAX_TILE_ELEMENTS,  # type: ignore[operator]
                    f"a {m.extent}x{n.extent} register tile exceeds {MAX_TILE_ELEMENTS} accumulators")
            require(self.vector in self.tile, "the vectorized loop must be one of the register-tile loops")
        else:
            require(self.vector is None, "vectorize needs a register tile")
            require(not self.pack, "pack needs a register tile (panels are laid out for it)")
        for name, factor in self.unroll:
            i = self.index(name)
            require(i < start or self.loops[i].dim == "k",
                    f"{name} is a register-tile loop; it is always fully unrolled")
            require(factor >= 1, "unroll factor must be positive")
        for operand, at in self.pack:
            self._check_pack(operand, at, start)
        for operand in self.prefetch:
            require(self.tile is not None, "prefetch needs a register tile (it runs in the micro-kernel)")
            require(operand == self.vector_operand(),
                    f"prefetch {operand}: the micro-kernel streams {self.vector_operand()} as vectors, not {operand}")
            require(self.packed(operand) is None, f"prefetch {operand}: {operand} is packed (its panels are already near)")
        if self.parallel is not None:
            i = self.index(self.parallel)
            p = self.loops[i]
            require(p.dim != "k", f"{p.name} is a reduction loop; parallelizing it would race on C")
            require(i < start, f"{p.name} is inside the micro-kernel and cannot be parallel")
        return self

    def _check_pack(self, operand: str, at: str, start: int) -> None:
        i = self.index(at)
        require(i < start, f"cannot pack {operand} at {at}: that loop is inside the micro-kernel")
        tile_dim = TILE_DIM_FOR_OPERAND[operand]
        side = self.loop(self.tile[0 if tile_dim == "m" else 1]).extent  # type: ignore[index]
        for l in self.loops[i + 1:start]:
            require(l.dim != tile_dim or l.block % side == 0,  # type: ignore[operator]
                    f"cannot pack {operand} at {at}: inner loop {l.name} steps by {l.block}, "
                    f"not a multiple of the register tile's {side} along {tile_dim}, so panels would not line up")

    # ---- pretty-printing ----------------------------------------------------------
    def trip_counts(self, sizes: dict[str, int]) -> list[tuple[int, bool]]:
        """(iterations, has_tail) of every loop for concrete dimension sizes."""
        span = dict(sizes)
        out = []
        for l in self.loops:
            n = -(-span[l.dim] // l.block)
            if l.extent is not None:
                n = min(n, l.extent)
            tail = span[l.dim] % l.block != 0 or (l.extent is not None and span[l.dim] < l.extent * l.block)
            out.append((n, tail))
            span[l.dim] = min(span[l.dim], l.block)
        return out

    def pretty(self, sizes: Optional[dict[str, int]] = None) -> str:
        """Pseudo-code of the nest (with trip counts when sizes are given)."""
        lines = []
        counts = self.trip_counts(sizes) if sizes else [None] * len(self.loops)
        start = self.kernel_start()
        unroll = dict(self.unroll)
        packs: dict[str, list[str]] = {}
        for operand, at in self.pack:
            packs.setdefault(at, []).append(operand)
        depth = 0
        for i, (l, c) in enumerate(zip(self.loops, counts)):
            if i == start:
                mr, nr = self.tile_sizes  # type: ignore[misc]
                ahead = "".join(f", prefetching {op}'s next k block" for op in self.prefetch)
                lines.append("  " * depth + f"micro-kernel {mr}x{nr} (vectorized along {self.vector_dim}{ahead}), "
                             f"accumulators in registers over:")
                depth += 1
            notes = []
            if c is not None:
                notes.append(f"{c[0]} iters" + (", tail" if c[1] else ""))
            if l.block > 1:
                notes.append(f"step {l.block}")
            if self.parallel == l.name:
                notes.append("parallel")
            if l.name in unroll:
                notes.append(f"unroll {unroll[l.name]}")
            if self.tile and l.name in self.tile:
                notes.append("register tile" + (", vector" if l.name == self.vector else ""))
            lines.append("  " * depth + f"for {l.name} ({l.dim}): " + ", ".join(notes))
            depth += 1
            for operand in packs.get(l.name, []):
                _, d1, d2 = TENSOR_DIMS[operand]
                lines.append("  " * depth + f"pack {operand}[{d1},{d2}] block into panels")
        lines.append("  " * depth + "C[b,m,n] += A[b,m,k] * B[b,k,n]")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.pretty()
