"""Schedules: a trace of named steps and the loop nest it produces.

``Schedule`` pairs the trace (what is stored and shared) with the nest it replays
to (what the code generator reads).  Both are immutable; ``apply`` returns a new
schedule, so rollouts, beam search and undo cost nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable

from looptune.runtime.compiler.trace import Step, Trace, TraceFormatError

from looptune.runtime.compiler import ir
from looptune.runtime.compiler.ir import LoopNest, ScheduleError

_APPLY: dict[str, Callable[..., LoopNest]] = {
    "split": lambda nest, s: ir.split(nest, s["loop"], s["factor"]),
    "swap": lambda nest, s: ir.swap(nest, s["loop"], s["other"]),
    "reorder": lambda nest, s: ir.reorder(nest, tuple(s["order"])),
    "register_tile": lambda nest, s: ir.register_tile(nest, s["m"], s["n"]),
    "vectorize": lambda nest, s: ir.vectorize(nest, s["loop"]),
    "unroll": lambda nest, s: ir.unroll(nest, s["loop"], s["factor"]),
    "pack": lambda nest, s: ir.pack(nest, s["operand"], s["at"]),
    "parallel": lambda nest, s: ir.parallel(nest, s["loop"]),
}


@dataclass(frozen=True)
class Schedule:
    trace: Trace
    nest: LoopNest

    @classmethod
    def initial(cls) -> "Schedule":
        return cls(Trace(), LoopNest.initial())

    @classmethod
    def from_trace(cls, trace: Trace | Iterable[Step]) -> "Schedule":
        """Replay a trace from the initial nest; raises ScheduleError at the first illegal step."""
        sched = cls.initial()
        for number, step in enumerate(trace, 1):
            try:
                sched = sched.apply(step)
            except ScheduleError as e:
                raise ScheduleError(f"step {number} ({step}): {e}") from None
        return sched

    @classmethod
    def from_json(cls, text: str | bytes) -> "Schedule":
        try:
            trace = Trace.from_json(text)
        except TraceFormatError as e:
            raise ScheduleError(str(e)) from None
        return cls.from_trace(trace)

    def to_json(self) -> str:
        return self.trace.to_json()

    def apply(self, step: Step) -> "Schedule":
        return Schedule(self.trace.append(step), _APPLY[step.op](self.nest, step))

    def step(self, op: str, **args) -> "Schedule":
        """Convenience: ``sched.step("split", loop="m", factor=16)``."""
        try:
            step = Step.make(op, **args)
        except TraceFormatError as e:
            raise ScheduleError(str(e)) from None
        return self.apply(step)

    def is_legal(self, step: Step) -> bool:
        try:
            self.apply(step)
            return True
        except ScheduleError:
            return False

    def __str__(self) -> str:
        return str(self.nest)


# ---- canonical form: one trace per nest -----------------------------------------------------

def canonical_schedule(nest: LoopNest) -> Schedule:
    """The canonical trace of a nest: splits breadth-first by name, one reorder, then annotations.

    Many action sequences reach the same nest; measuring, caching and compiling by the
    canonical trace means each distinct nest is built once and measured once per problem.
    """
    blocks = {l.name: l.block for l in nest.loops}
    names = set(blocks)

    def blk(name: str) -> int:
        return blocks[name] if name in blocks else blk(name + ".i")

    steps: list[Step] = []
    queue = list(ir.DIMS)
    while queue:
        x = queue.pop(0)
        if x in names:
            continue
        steps.append(Step.make("split", loop=x, factor=blk(x + ".o") // blk(x + ".i")))
        queue += [x + ".o", x + ".i"]
    s = Schedule.from_trace(steps)
    if s.nest.names != nest.names:
        s = s.step("reorder", order=list(nest.names))
    if nest.tile:
        s = s.step("register_tile", m=nest.tile[0], n=nest.tile[1])
        if nest.vector != nest.tile[1]:
            s = s.step("vectorize", loop=nest.vector)
    for operand, at in nest.pack:
        s = s.step("pack", operand=operand, at=at)
    for name, factor in nest.unroll:
        s = s.step("unroll", loop=name, factor=factor)
    if nest.parallel:
        s = s.step("parallel", loop=nest.parallel)
    return s


@functools.lru_cache(maxsize=65536)
def canonical_key(nest: LoopNest) -> str:
    """Canonical trace JSON: the tag under which a nest's measurements are recorded."""
    return canonical_schedule(nest).to_json()
