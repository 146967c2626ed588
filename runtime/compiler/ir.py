"""Loop-nest IR for batched matmul, ``C[b,m,n] (+)= sum_k A[b,m,k] * B[b,k,n]``.

A ``LoopNest`` is an immutable value: loops over named dimensions (outer to inner)
plus annotations (register tile, vectorized loop, unroll factors, packed operands,
the parallel loop).  It is *size-free*: the same nest serves every problem of a
family, and sizes only enter when it is printed for a problem or rendered to C.

Each loop covers a range of its dimension in steps of ``block`` elements.  Splitting
loop ``m`` (block 1) by 16 gives ``m.o`` (block 16) over ``m.i`` (block 1, extent 16)::

    for m in 0..M:                    for m.o in 0..M step 16:
      S(m)                 ==>          for m.i in 0..16 (tail: M % 16):
                                          S(m.o + m.i)

Every transform here is a pure function returning a new nest or raising
``ScheduleError``; ``LoopNest.check()`` keeps the invariants the code generator
relies on and is O(loops), because the agent takes many steps per second.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

from dataclasses import dataclass, field, replace
from typing import Optional

DIMS = ("b", "m", "n", "k")
OPERAND_DIMS = {"A": ("m", "k"), "B": ("k", "n")}
TILE_DIM_FOR_OPERAND = {"A": "m", "B": "n"}   # the dimension a packed panel is laid out along
MAX_TILE_ELEMENTS = 1024                        # MR * NR accumulators; beyond this nothing fits in registers
MAX_TILE_SIDE = 64
MAX_LOOPS = 24


class ScheduleError(LoopTuneError, ValueError):
    """An illegal schedule step; the message says why."""


def _require(cond: bool, message: str) -> None:
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
        _require(len(loops) <= MAX_LOOPS, f"at most {MAX_LOOPS} loops")
        _require(len(set(self.names)) == len(loops), "loop names must be unique")
        _require(loops[0].name == "b", "the batch loop b stays outermost")
        for d in DIMS:
            blocks = [l.block for l in loops if l.dim == d]
            _require(len(blocks) >= 1 and blocks[-1] == 1, f"dimension {d} lost its innermost loop")
            _require(all(a > b for a, b in zip(blocks, blocks[1:])),
                     f"the parts of dimension {d} must stay nested outer-to-inner "
                     f"(a split's inner loop cannot move outside its outer loop)")
        start = self.kernel_start()
        if self.tile is not None:
            m_name, n_name = self.tile
            m, n = self.loop(m_name), self.loop(n_name)
            _require(m.dim == "m" and n.dim == "n", "register_tile takes an m loop and an n loop")
            _require(set(self.names[-2:]) == {m_name, n_name}, "the register-tile loops must be the two innermost loops")
            for l in (m, n):
                _require(l.is_leaf and l.extent is not None,
                         f"register-tile loop {l.name} must be the inner part of a split (a constant trip count)")
                _require(l.extent <= MAX_TILE_SIDE, f"register-tile side {l.extent} exceeds {MAX_TILE_SIDE}")
            _require(m.extent * n.extent <= MAX_TILE_ELEMENTS,  # type: ignore[operator]
                     f"a {m.extent}x{n.extent} register tile exceeds {MAX_TILE_ELEMENTS} accumulators")
            _require(self.vector in self.tile, "the vectorized loop must be one of the register-tile loops")
        else:
            _require(self.vector is None, "vectorize needs a register tile")
            _require(not self.pack, "pack needs a register tile (panels are laid out for it)")
        for name, factor in self.unroll:
            i = self.index(name)
            _require(i < start or self.loops[i].dim == "k",
                     f"{name} is a register-tile loop; it is always fully unrolled")
            _require(factor >= 1, "unroll factor must be positive")
        for operand, at in self.pack:
            self._check_pack(operand, at, start)
        if self.parallel is not None:
            i = self.index(self.parallel)
            p = self.loops[i]
            _require(p.dim != "k", f"{p.name} is a reduction loop; parallelizing it would race on C")
            _require(i < start, f"{p.name} is inside the micro-kernel and cannot be parallel")
        return self

    def _check_pack(self, operand: str, at: str, start: int) -> None:
        i = self.index(at)
        _require(i < start, f"cannot pack {operand} at {at}: that loop is inside the micro-kernel")
        tile_dim = TILE_DIM_FOR_OPERAND[operand]
        side = self.loop(self.tile[0 if tile_dim == "m" else 1]).extent  # type: ignore[index]
        for l in self.loops[i + 1:start]:
            _require(l.dim != tile_dim or l.block % side == 0,  # type: ignore[operator]
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
                lines.append("  " * depth + f"micro-kernel {mr}x{nr} (vectorized along {self.vector_dim}), "
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
                d1, d2 = OPERAND_DIMS[operand]
                lines.append("  " * depth + f"pack {operand}[{d1},{d2}] block into panels")
        lines.append("  " * depth + "C[b,m,n] += A[b,m,k] * B[b,k,n]")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.pretty()


# ---- transforms: pure functions, nest -> nest ----------------------------------------

def split(nest: LoopNest, name: str, factor: int) -> LoopNest:
    """Split loop ``name`` into ``name.o`` (outer) and ``name.i`` (inner, ``factor`` iterations)::

        for n: S(n)   ==>   for n.o step f: for n.i in 0..f: S(n.o + n.i)
    """
    i = nest.index(name)
    l = nest.loops[i]
    _require(l.dim != "b", "the batch loop is not split")
    _require(factor >= 2, "split factor must be at least 2")
    _require(l.extent is None or factor < l.extent, f"split factor {factor} must be below {name}'s {l.extent} iterations")
    _require(not nest.tile or name not in nest.tile, f"{name} is a register-tile loop")
    _require(name not in dict(nest.unroll) and name != nest.parallel and name not in dict(nest.pack).values(),
             f"{name} carries an annotation (unroll, parallel or pack); split before annotating")
    _require(len(name.split(".")) <= 8, "loops are split at most 8 levels deep")
    outer_extent = None if l.extent is None else -(-l.extent // factor)
    outer = Loop(name + ".o", l.dim, l.block * factor, outer_extent)
    inner = Loop(name + ".i", l.dim, l.block, factor)
    return replace(nest, loops=nest.loops[:i] + (outer, inner) + nest.loops[i + 1:]).check()


def swap(nest: LoopNest, name: str, other: str) -> LoopNest:
    """Interchange two adjacent loops::

        for m: for k: S   ==>   for k: for m: S
    """
    i, j = sorted((nest.index(name), nest.index(other)))
    _require(j == i + 1, f"swap takes adjacent loops; {name} and {other} are not adjacent")
    _require(nest.loops[i].dim != nest.loops[j].dim, f"{name} and {other} are parts of one dimension")
    if nest.tile:
        _require(not ({name, other} & set(nest.tile)), "register-tile loops stay innermost")
    loops = list(nest.loops)
    loops[i], loops[j] = loops[j], loops[i]
    return replace(nest, loops=tuple(loops)).check()


def reorder(nest: LoopNest, order: tuple[str, ...]) -> LoopNest:
    """Put all loops in the given order (a permutation of the current loops)."""
    _require(sorted(order) == sorted(nest.names), f"reorder needs a permutation of {list(nest.names)}, got {list(order)}")
    return replace(nest, loops=tuple(nest.loop(n) for n in order)).check()


def register_tile(nest: LoopNest, m: str, n: str) -> LoopNest:
    """Hold the C block of the innermost (m, n) loops in registers across the k loops above them;
    the n loop is vectorized unless ``vectorize`` says otherwise::

        for k.i: for m.i: for n.i: C[m,n] += A[m,k]*B[k,n]
          ==>  acc[MR][NR] = 0; for k.i: acc += A[m.i, k] (x) B[k, n.i]; C += acc
    """
    _require(nest.tile is None, "the register tile is already chosen")
    return replace(nest, tile=(m, n), vector=n).check()


def vectorize(nest: LoopNest, name: str) -> LoopNest:
    """Choose which register-tile loop maps to SIMD lanes (n: broadcast A, load B; m: the reverse)."""
    _require(nest.tile is not None, "vectorize needs a register tile")
    return replace(nest, vector=name).check()


def unroll(nest: LoopNest, name: str, factor: int) -> LoopNest:
    """Unroll a loop by ``factor`` (1 removes unrolling)."""
    nest.index(name)
    table = dict(nest.unroll)
    if factor == 1:
        table.pop(name, None)
    else:
        table[name] = factor
    return replace(nest, unroll=tuple(sorted(table.items()))).check()


def pack(nest: LoopNest, operand: str, at: str) -> LoopNest:
    """Copy the block of ``operand`` used inside loop ``at`` into a contiguous panel buffer
    at the start of each iteration of ``at``; the micro-kernel then streams the panels::

        for k.o: for m.o: ... A[m, k] ...   ==>   for k.o: for m.o: Ap = pack(A[m.o block, k.o block]); ... Ap[...]
    """
    _require(operand in OPERAND_DIMS, f"operand must be A or B, got {operand!r}")
    nest.index(at)
    table = dict(nest.pack)
    table[operand] = at
    return replace(nest, pack=tuple(sorted(table.items()))).check()


def parallel(nest: LoopNest, name: str) -> LoopNest:
    """Run the iterations of loop ``name`` on threads (static schedule)."""
    _require(nest.parallel is None, f"{nest.parallel} is already the parallel loop")
    nest.index(name)
    return replace(nest, parallel=name).check()
