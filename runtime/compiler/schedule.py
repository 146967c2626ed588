"""Schedules: a trace of named steps and the loop nest it produces.

``Schedule`` pairs the trace (what is stored and shared) with the nest it replays
to (what the code generator reads).  Both are immutable; ``apply`` returns a new
schedule, so rollouts, beam search and undo cost nothing.  What each step does is the
step table's (``looptune.runtime.compiler.steps.STEPS``); this module adds replay and the
canonical form.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

from looptune.runtime.compiler.ir import DIMS, LoopNest, ScheduleError
from looptune.runtime.compiler.steps import STEPS
from looptune.runtime.compiler.trace import Step, Trace


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
            except ScheduleError as e:     # same error type, the message says which step
                raise type(e)(f"step {number} ({step}): {e}") from None
        return sched

    @classmethod
    def from_json(cls, text: str | bytes) -> "Schedule":
        """Parse and replay a stored trace; ScheduleError (TraceFormatError if not in the grammar)."""
        return cls.from_trace(Trace.from_json(text))

    def to_json(self) -> str:
        return self.trace.to_json()

    def apply(self, step: Step) -> "Schedule":
        """The schedule after ``step``; ScheduleError (with the reason) if it is illegal here."""
        return Schedule(self.trace.append(step), STEPS[step.op].apply(self.nest, dict(step.args)))

    def step(self, op: str, **args) -> "Schedule":
        """Convenience: ``sched.step("split", loop="m", factor=16)``."""
        return self.apply(Step.make(op, **args))

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
    queue = list(DIMS)
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
    for operand in nest.prefetch:
        s = s.step("prefetch", operand=operand)
    for name, factor in nest.unroll:
        s = s.step("unroll", loop=name, factor=factor)
    if nest.parallel:
        s = s.step("parallel", loop=nest.parallel)
    return s


@functools.lru_cache(maxsize=65536)
def canonical_key(nest: LoopNest) -> str:
    """Canonical trace JSON: the tag under which a nest's measurements are recorded."""
    return canonical_schedule(nest).to_json()
