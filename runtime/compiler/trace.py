"""The schedule trace: a closed grammar of named steps, serialized as JSON.

A trace is the only form in which a schedule is stored or shared.  It says
"split loop n by 16", never "loop 3 has 112 iterations", so one trace replays on
every shape of its family.  This module owns the *syntax* of traces (which ops
exist, which arguments each takes, their types and ranges); the meaning of each
step (what it does to a loop nest) lives in ``looptune.runtime.compiler.schedule``.

Everything here is plain data validation: a trace that passes ``Trace.from_json``
holds only op names from a fixed set, loop names of the form ``m``, ``m.o``,
``m.i.o`` ..., operand letters and bounded integers.  Nothing in it can become
anything but those tokens in generated C, which is why a database from an
untrusted source cannot make us compile arbitrary code.

JSON form::

    {"version": 1, "steps": [{"op": "split", "loop": "n", "factor": 16},
                             {"op": "swap", "loop": "k", "other": "n.i"}, ...]}
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

TRACE_FORMAT_VERSION = 1

DIMS = ("b", "m", "n", "k")
OPERANDS = ("A", "B")
MAX_STEPS = 64
MAX_LOOP_DEPTH = 8          # at most 8 splits along one path of one dimension
MAX_SPLIT_FACTOR = 1 << 16
MAX_UNROLL = 64

_LOOP_NAME = re.compile(r"^[bmnk](\.[oi]){0,%d}$" % MAX_LOOP_DEPTH)


class TraceFormatError(LoopTuneError, ValueError):
    """A trace (or one of its steps) is not in the schedule grammar."""


def _loop(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _LOOP_NAME.match(value):
        raise TraceFormatError(f"{what} must be a loop name like 'm', 'n.o' or 'k.i.i', got {value!r}")
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    # bool is an int subclass in Python; JSON true/false is not a number here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceFormatError(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise TraceFormatError(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def _operand(value: Any, what: str) -> str:
    if value not in OPERANDS:
        raise TraceFormatError(f"{what} must be one of {OPERANDS}, got {value!r}")
    return value


def _loop_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 4 * MAX_LOOP_DEPTH:
        raise TraceFormatError(f"{what} must be a non-empty list of loop names, got {value!r}")
    names = tuple(_loop(v, f"{what}[{i}]") for i, v in enumerate(value))
    if len(set(names)) != len(names):
        raise TraceFormatError(f"{what} names a loop twice: {list(names)}")
    return names


# op -> {argument: validator}.  The closed grammar: nothing else is a step.
_GRAMMAR: dict[str, dict[str, Any]] = {
    "split": {"loop": _loop, "factor": lambda v, w: _int(v, w, 2, MAX_SPLIT_FACTOR)},
    "swap": {"loop": _loop, "other": _loop},
    "reorder": {"order": _loop_list},
    "register_tile": {"m": _loop, "n": _loop},
    "vectorize": {"loop": _loop},
    "unroll": {"loop": _loop, "factor": lambda v, w: _int(v, w, 1, MAX_UNROLL)},
    "pack": {"operand": _operand, "at": _loop},
    "parallel": {"loop": _loop},
}
STEP_OPS = tuple(_GRAMMAR)


@dataclass(frozen=True)
class Step:
    """One named schedule step, e.g. ``Step("split", (("loop", "m"), ("factor", 16)))``.

    Arguments are kept as a sorted tuple of pairs so a Step is hashable and two
    equal steps compare equal however they were built.
    """

    op: str
    args: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        checked = _check_step(self.op, dict(self.args))
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


def _check_step(op: Any, args: dict[str, Any]) -> dict[str, Any]:
    if op not in _GRAMMAR:
        raise TraceFormatError(f"unknown step op {op!r}; the grammar has {list(STEP_OPS)}")
    spec = _GRAMMAR[op]
    missing = sorted(set(spec) - set(args))
    extra = sorted(set(args) - set(spec))
    if missing or extra:
        raise TraceFormatError(f"step {op!r} takes arguments {sorted(spec)}; missing {missing}, unexpected {extra}")
    return {name: check(args[name], f"{op}.{name}") for name, check in spec.items()}


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
        if len(text) > 64 * 1024:
            raise TraceFormatError("trace JSON is larger than 64 KiB")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"trace is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        return "; ".join(str(s) for s in self.steps) or "<empty trace>"
