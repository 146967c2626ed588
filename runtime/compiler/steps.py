"""The schedule steps, in one table: for each op, its arguments (the grammar) and its transform.

A step is defined once, as a transform under ``@step``: the decorator's keywords are the
step's arguments with their validators (what a stored trace may say), the function is what
the step does to a loop nest (a pure function nest -> nest that raises ``ScheduleError``)::

    @step(loop=loop_name, factor=int_in(2, MAX_SPLIT_FACTOR))
    def split(nest, loop, factor): ...

``STEPS`` (op -> ``StepDef``) is the closed grammar: ``looptune.runtime.compiler.trace``
validates every step against it, ``Schedule.apply`` applies steps through it.  Adding a step
(``prefetch`` below was the latest) is one decorated function here, plus the annotation it
sets on ``LoopNest`` if it adds one, its place in ``canonical_schedule``, and the code generator.

Validation is plain data checking: a step that passes holds only op names from ``STEPS``,
loop names of the form ``m``, ``m.o``, ``m.i.o`` ..., operand letters and bounded integers.
Nothing in it can become anything but those tokens in generated C, which is why a database
from an untrusted source cannot make us compile arbitrary code.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping

from looptune.runtime.compiler.ir import (DIMS, MAX_LOOP_DEPTH, OPERANDS, Loop, LoopNest, ScheduleError,
                                          require)

MAX_SPLIT_FACTOR = 1 << 16
MAX_UNROLL = 64

ArgCheck = Callable[[Any, str], Any]     # (value, "op.argument") -> the value, or TraceFormatError


class TraceFormatError(ScheduleError):
    """A trace (or one of its steps) is not in the schedule grammar."""


# ---- argument kinds ----------------------------------------------------------------------------

_LOOP_NAME = re.compile(r"^[%s](\.[oi]){0,%d}$" % ("".join(DIMS), MAX_LOOP_DEPTH))


def loop_name(value: Any, what: str) -> str:
    """A loop name: a dimension and up to ``MAX_LOOP_DEPTH`` ``.o``/``.i`` parts."""
    if not isinstance(value, str) or not _LOOP_NAME.match(value):
        raise TraceFormatError(f"{what} must be a loop name like 'm', 'n.o' or 'k.i.i', got {value!r}")
    return value


def loop_names(value: Any, what: str) -> tuple[str, ...]:
    """A non-empty list of distinct loop names (held as a tuple)."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= len(DIMS) * MAX_LOOP_DEPTH:
        raise TraceFormatError(f"{what} must be a non-empty list of loop names, got {value!r}")
    names = tuple(loop_name(v, f"{what}[{i}]") for i, v in enumerate(value))
    if len(set(names)) != len(names):
        raise TraceFormatError(f"{what} names a loop twice: {list(names)}")
    return names


def operand_letter(value: Any, what: str) -> str:
    """An input operand letter, ``A`` or ``B``."""
    if value not in OPERANDS:
        raise TraceFormatError(f"{what} must be one of {OPERANDS}, got {value!r}")
    return value


def int_in(lo: int, hi: int) -> ArgCheck:
    """An integer in ``[lo, hi]`` (JSON true/false is not a number here, though bool is an int in Python)."""
    def check(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TraceFormatError(f"{what} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise TraceFormatError(f"{what} must be in [{lo}, {hi}], got {value}")
        return value
    return check


# ---- the table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepDef:
    """One step op: its arguments (name -> validator) and its transform ``(nest, **args) -> nest``."""

    op: str
    args: Mapping[str, ArgCheck]
    transform: Callable[..., LoopNest]

    def check(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The validated arguments, or TraceFormatError naming what is missing, extra or malformed."""
        missing = sorted(set(self.args) - set(args))
        extra = sorted(set(args) - set(self.args))
        if missing or extra:
            raise TraceFormatError(f"step {self.op!r} takes arguments {sorted(self.args)}; "
                                   f"missing {missing}, unexpected {extra}")
        return {name: check(args[name], f"{self.op}.{name}") for name, check in self.args.items()}

    def apply(self, nest: LoopNest, args: Mapping[str, Any]) -> LoopNest:
        """The nest after this step with (already validated) ``args``; ScheduleError if illegal there."""
        return self.transform(nest, **args)


_TABLE: dict[str, StepDef] = {}
STEPS: Mapping[str, StepDef] = MappingProxyType(_TABLE)


def step(**args: ArgCheck) -> Callable[[Callable[..., LoopNest]], Callable[..., LoopNest]]:
    """Register the decorated transform as the step named after it, taking ``args``."""
    def register(transform: Callable[..., LoopNest]) -> Callable[..., LoopNest]:
        params = list(inspect.signature(transform).parameters)[1:]
        if params != list(args):
            raise TypeError(f"step {transform.__name__}: parameters {params} differ from its arguments {list(args)}")
        _TABLE[transform.__name__] = StepDef(transform.__name__, MappingProxyType(dict(args)), transform)
        return transform
    return register


def check_step(op: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one step against the grammar: its op is in ``STEPS`` and its arguments fit."""
    if not isinstance(op, str) or op not in _TABLE:     # (a JSON list or object is not hashable)
        raise TraceFormatError(f"unknown step op {op!r}; the grammar has {list(_TABLE)}")
    return _TABLE[op].check(args)


# ---- the steps: pure functions, nest -> nest ------------------------------------------------------

@step(loop=loop_name, factor=int_in(2, MAX_SPLIT_FACTOR))
def split(nest: LoopNest, loop: str, factor: int) -> LoopNest:
    """Split ``loop`` into ``loop.o`` (outer) and ``loop.i`` (inner, ``factor`` iterations)::

        for n: S(n)   ==>   for n.o step f: for n.i in 0..f: S(n.o + n.i)
    """
    i = nest.index(loop)
    l = nest.loops[i]
    require(l.dim != "b", "the batch loop is not split")
    require(l.extent is None or factor < l.extent, f"split factor {factor} must be below {loop}'s {l.extent} iterations")
    require(not nest.tile or loop not in nest.tile, f"{loop} is a register-tile loop")
    require(loop not in dict(nest.unroll) and loop != nest.parallel and loop not in dict(nest.pack).values(),
            f"{loop} carries an annotation (unroll, parallel or pack); split before annotating")
    require(loop.count(".") < MAX_LOOP_DEPTH, f"loops are split at most {MAX_LOOP_DEPTH} levels deep")
    outer_extent = None if l.extent is None else -(-l.extent // factor)
    outer = Loop(loop + ".o", l.dim, l.block * factor, outer_extent)
    inner = Loop(loop + ".i", l.dim, l.block, factor)
    return replace(nest, loops=nest.loops[:i] + (outer, inner) + nest.loops[i + 1:]).check()


@step(loop=loop_name, other=loop_name)
def swap(nest: LoopNest, loop: str, other: str) -> LoopNest:
    """Interchange two adjacent loops::

        for m: for k: S   ==>   for k: for m: S
    """
    i, j = sorted((nest.index(loop), nest.index(other)))
    require(j == i + 1, f"swap takes adjacent loops; {loop} and {other} are not adjacent")
    require(nest.loops[i].dim != nest.loops[j].dim, f"{loop} and {other} are parts of one dimension")
    if nest.tile:
        require(not ({loop, other} & set(nest.tile)), "register-tile loops stay innermost")
    loops = list(nest.loops)
    loops[i], loops[j] = loops[j], loops[i]
    return replace(nest, loops=tuple(loops)).check()


@step(order=loop_names)
def reorder(nest: LoopNest, order: tuple[str, ...]) -> LoopNest:
    """Put all loops in the given order (a permutation of the current loops)."""
    require(sorted(order) == sorted(nest.names), f"reorder needs a permutation of {list(nest.names)}, got {list(order)}")
    return replace(nest, loops=tuple(nest.loop(n) for n in order)).check()


@step(m=loop_name, n=loop_name)
def register_tile(nest: LoopNest, m: str, n: str) -> LoopNest:
    """Hold the C block of the innermost (m, n) loops in registers across the k loops above them;
    the n loop is vectorized unless ``vectorize`` says otherwise::

        for k.i: for m.i: for n.i: C[m,n] += A[m,k]*B[k,n]
          ==>  acc[MR][NR] = 0; for k.i: acc += A[m.i, k] (x) B[k, n.i]; C += acc
    """
    require(nest.tile is None, "the register tile is already chosen")
    return replace(nest, tile=(m, n), vector=n).check()


@step(loop=loop_name)
def vectorize(nest: LoopNest, loop: str) -> LoopNest:
    """Choose which register-tile loop maps to SIMD lanes (n: broadcast A, load B; m: the reverse)."""
    require(nest.tile is not None, "vectorize needs a register tile")
    return replace(nest, vector=loop).check()


@step(loop=loop_name, factor=int_in(1, MAX_UNROLL))
def unroll(nest: LoopNest, loop: str, factor: int) -> LoopNest:
    """Unroll a loop by ``factor`` (1 removes unrolling)."""
    nest.index(loop)
    table = dict(nest.unroll)
    if factor == 1:
        table.pop(loop, None)
    else:
        table[loop] = factor
    return replace(nest, unroll=tuple(sorted(table.items()))).check()


@step(operand=operand_letter, at=loop_name)
def pack(nest: LoopNest, operand: str, at: str) -> LoopNest:
    """Copy the block of ``operand`` used inside loop ``at`` into a contiguous panel buffer
    at the start of each iteration of ``at``; the micro-kernel then streams the panels::

        for k.o: for m.o: ... A[m, k] ...   ==>   for k.o: for m.o: Ap = pack(A[m.o block, k.o block]); ... Ap[...]
    """
    nest.index(at)
    table = dict(nest.pack)
    table[operand] = at
    return replace(nest, pack=tuple(sorted(table.items()))).check()


@step(operand=operand_letter)
def prefetch(nest: LoopNest, operand: str) -> LoopNest:
    """While the micro-kernel reads its k rows of the unpacked ``operand`` it streams as vectors,
    prefetch into L1 the same columns ``kc`` rows further on: the tile the next block of the k
    loop will read there.  For streaming problems (matrix-vector and few-row products, where a
    B row is read once) every k block otherwise starts new hardware-prefetch streams; the hint
    changes no result::

        for k.o step kc: for n.i.o: tile(B[k.o : k.o+kc, n.i.o : n.i.o+nr])
          ==>  for k.o step kc: for n.i.o: tile(B[k.o : k.o+kc, ...]); prefetch(B[k.o+kc : k.o+2kc, ...])
    """
    table = set(nest.prefetch) | {operand}
    return replace(nest, prefetch=tuple(sorted(table))).check()


@step(loop=loop_name)
def parallel(nest: LoopNest, loop: str) -> LoopNest:
    """Run the iterations of ``loop`` on threads (static schedule)."""
    require(nest.parallel is None, f"{nest.parallel} is already the parallel loop")
    nest.index(loop)
    return replace(nest, parallel=loop).check()
