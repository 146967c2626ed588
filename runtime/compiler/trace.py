"""The schedule trace: a sequence of named steps, serialized as JSON.

A trace is the only form in which a schedule is stored or shared.  It says
"split loop n by 16", never "loop 3 has 112 iterations", so one trace replays on
every shape of its family.  This module owns the *stored form* of traces; which ops
exist, which arguments each takes and what each does to a loop nest is the step table
``looptune.runtime.compiler.steps.STEPS``, against which every ``Step`` is validated when
it is made, so a ``Trace`` that exists is in the grammar (``TraceFormatError`` otherwise).

JSON form::

    {"version": 1, "steps": [{"op": "split", "loop": "n", "factor": 16},
                             {"op": "swap", "loop": "k", "other": "n.i"}, ...]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

# TraceFormatError is re-exported: the database and users import it from here.
from looptune.runtime.compiler.steps import TraceFormatError, check_step

TRACE_FORMAT_VERSION = 1
MAX_STEPS = 64
MAX_TRACE_JSON_BYTES = 64 * 1024

__all__ = ["MAX_STEPS", "TRACE_FORMAT_VERSION", "Step", "Trace", "TraceFormatError"]


@dataclass(frozen=True)
class Step:
    """One named schedule step, e.g. ``Step("split", (("loop", "m"), ("factor", 16)))``.

    Arguments are kept as a sorted tuple of pairs so a Step is hashable and two
    equal steps compare equal however they were built.
    """

    op: str
    args: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        checked = check_step(self.op, dict(self.args))
        object.__setattr__(self, "args", tuple(sorted(checked.items())))

    @classmethod
    def make(cls, op: str, **args: Any) -> "Step":
        return cls(op, tuple(args.items()))

    def __getitem__(self, key: str) -> Any:
        for k, v in self.args:
            if k == key:
                return v
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.args}}

    @classmethod
    def from_dict(cls, data: Any) -> "Step":
        if not isinstance(data, dict):
            raise TraceFormatError(f"a step must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        op = data.pop("op", None)
        return cls(op, tuple(data.items()))

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" if not isinstance(v, tuple) else f"{k}={list(v)}" for k, v in self.args)
        return f"{self.op}({inner})"


@dataclass(frozen=True)
class Trace:
    """An ordered, immutable sequence of steps."""

    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if len(steps) > MAX_STEPS:
            raise TraceFormatError(f"a trace holds at most {MAX_STEPS} steps, got {len(steps)}")
        if not all(isinstance(s, Step) for s in steps):
            raise TraceFormatError("a trace holds Step values only")
        object.__setattr__(self, "steps", steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def append(self, step: Step) -> "Trace":
        return Trace(self.steps + (step,))

    def extend(self, steps: Iterable[Step]) -> "Trace":
        return Trace(self.steps + tuple(steps))

    def to_dict(self) -> dict[str, Any]:
        return {"version": TRACE_FORMAT_VERSION, "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "Trace":
        if not isinstance(data, dict):
            raise TraceFormatError(f"a trace must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != TRACE_FORMAT_VERSION:
            raise TraceFormatError(
                f"trace format version {version!r} is not supported (this build reads version {TRACE_FORMAT_VERSION})")
        extra = sorted(set(data) - {"version", "steps"})
        if extra:
            raise TraceFormatError(f"unexpected trace fields {extra}")
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise TraceFormatError("trace.steps must be a list")
        if len(steps) > MAX_STEPS:
            raise TraceFormatError(f"a trace holds at most {MAX_STEPS} steps, got {len(steps)}")
        return cls(tuple(Step.from_dict(s) for s in steps))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Trace":
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TraceFormatError(f"trace is not UTF-8: {e}") from None
        if len(text) > MAX_TRACE_JSON_BYTES:
            raise TraceFormatError(f"trace JSON is larger than {MAX_TRACE_JSON_BYTES // 1024} KiB")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"trace is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        return "; ".join(str(s) for s in self.steps) or "<empty trace>"
