"""Every transform: save -> load -> replay -> equal; illegal steps raise ScheduleError with a reason."""
import json

import pytest

from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.errors import LoopTuneError
from looptune.runtime.compiler.trace import Trace, TraceFormatError
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.ir import LoopNest, ScheduleError
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule, canonical_schedule
from looptune.runtime.compiler.steps import STEPS
from schedules import random_schedules

BLIS = (Schedule.initial()
        .step("split", loop="n", factor=64).step("split", loop="k", factor=32).step("split", loop="m", factor=24)
        .step("split", loop="n.i", factor=16).step("split", loop="m.i", factor=6))


def roundtrip(s: Schedule) -> None:
    text = s.to_json()
    again = Schedule.from_json(json.loads(json.dumps(text)))
    assert again == s
    assert again.nest == s.nest and again.trace == s.trace


TILED = (BLIS.step("reorder", order=["b", "n.o", "k.o", "m.o", "n.i.o", "m.i.o", "k.i", "m.i.i", "n.i.i"])
         .step("register_tile", m="m.i.i", n="n.i.i"))

# One schedule per step op, ending with that op.  Keyed by op so the test below, which iterates over
# the step table, fails for a new op until it gets an example here.
EXAMPLES = {
    "split": lambda: Schedule.initial().step("split", loop="m", factor=8),
    "swap": lambda: BLIS.step("swap", loop="m.i.i", other="n.o"),
    "reorder": lambda: Schedule.initial().step("reorder", order=["b", "k", "m", "n"]),
    "register_tile": lambda: TILED,
    "vectorize": lambda: (BLIS.step("reorder", order=["b", "n.o", "k.o", "m.o", "n.i.o", "m.i.o", "k.i", "n.i.i", "m.i.i"])
                          .step("register_tile", m="m.i.i", n="n.i.i").step("vectorize", loop="m.i.i")),
    "unroll": lambda: TILED.step("unroll", loop="k.i", factor=4),
    "pack": lambda: TILED.step("pack", operand="B", at="k.o").step("pack", operand="A", at="m.o"),
    "parallel": lambda: TILED.step("parallel", loop="n.o"),
    "prefetch": lambda: TILED.step("prefetch", operand="B"),
}


@pytest.mark.parametrize("op", sorted(STEPS))
def test_every_step_op_round_trips(op):
    """save -> load -> replay -> equal for every op of the step table; the canonical form keeps the
    op's effect, and the code generator renders it."""
    assert op in EXAMPLES, f"step op {op!r} has no round-trip example in EXAMPLES"
    s = EXAMPLES[op]()
    assert s.trace.steps[-1].op == op
    roundtrip(s)
    assert Schedule.from_trace(s.trace.steps[:-1]).nest != s.nest       # the step did something
    canonical = canonical_schedule(s.nest)
    assert canonical.nest == s.nest
    roundtrip(canonical)
    assert render(s, "float32").text


@pytest.mark.parametrize("build", [
    lambda: Schedule.initial().step("swap", loop="n", other="k"),
    lambda: Schedule.initial().step("unroll", loop="k", factor=4),
    lambda: default_schedule(MatmulProblem(100, 100, 100)),
    lambda: default_schedule(MatmulProblem(300, 200, 100, threads=2)),
    lambda: default_schedule(MatmulProblem(4, 300, 100, layout="nt")),
], ids=["swap-untiled", "unroll-untiled", "default", "default-parallel", "default-gemv"])
def test_more_schedules_round_trip(build):
    roundtrip(build())


def test_random_schedules_round_trip():
    for s in random_schedules(60, seed=1):
        roundtrip(s)


def test_replay_is_size_free():
    """One trace replays on every shape of its family: steps name loops, not positions or trip counts."""
    s = default_schedule(MatmulProblem(1024, 1024, 1024))
    for sizes in [dict(b=1, m=1, n=1, k=1), dict(b=3, m=7, n=1000, k=13)]:
        assert "C[b,m,n]" in Schedule.from_json(s.to_json()).nest.pretty(sizes)


@pytest.mark.parametrize("make, why", [
    (lambda: Schedule.initial().step("split", loop="m.o", factor=2), "no loop named"),
    (lambda: Schedule.initial().step("split", loop="b", factor=2), "batch"),
    (lambda: Schedule.initial().step("swap", loop="m", other="k"), "adjacent"),
    (lambda: Schedule.initial().step("swap", loop="b", other="m"), "outermost"),
    (lambda: BLIS.step("swap", loop="m.o", other="m.i.o"), "one dimension"),
    (lambda: BLIS.step("reorder", order=["b", "m.i.o", "m.o", "m.i.i", "n.o", "n.i.o", "n.i.i", "k.o", "k.i"]), "nested"),
    (lambda: Schedule.initial().step("register_tile", m="m", n="n"), "register-tile"),
    (lambda: Schedule.initial().step("pack", operand="A", at="m"), "needs a register tile"),
    (lambda: Schedule.initial().step("parallel", loop="k"), "reduction"),
    (lambda: Schedule.initial().step("vectorize", loop="n"), "needs a register tile"),
    (lambda: default_schedule(MatmulProblem(64, 64, 64)).step("split", loop="m.i.i", factor=2), "register-tile loop"),
    (lambda: Schedule.initial().step("prefetch", operand="B"), "needs a register tile"),
    (lambda: TILED.step("prefetch", operand="A"), "streams B as vectors"),
    (lambda: TILED.step("pack", operand="B", at="k.o").step("prefetch", operand="B"), "is packed"),
    (lambda: TILED.step("prefetch", operand="B").step("pack", operand="B", at="k.o"), "is packed"),
    (lambda: TILED.step("prefetch", operand="B").step("vectorize", loop="m.i.i"), "streams A as vectors"),
])
def test_illegal_steps_raise_one_error_type_with_reason(make, why):
    with pytest.raises(ScheduleError, match=why):
        make()


def test_pack_alignment_is_checked():
    s = (Schedule.initial().step("split", loop="m", factor=20).step("split", loop="m.i", factor=6)
         .step("reorder", order=["b", "m.o", "k", "n", "m.i.o", "m.i.i"]))
    s = s.step("split", loop="n", factor=8).step("reorder", order=["b", "m.o", "k", "n.o", "m.i.o", "m.i.i", "n.i"])
    s = s.step("register_tile", m="m.i.i", n="n.i")
    s.step("pack", operand="A", at="m.o")          # panels start at multiples of 6 inside m.o
    with pytest.raises(ScheduleError, match="line up"):
        s.step("pack", operand="A", at="b")       # m.o steps by 20: panels would straddle blocks


@pytest.mark.parametrize("bad", [
    {"version": 1, "steps": [{"op": "system", "cmd": "rm -rf /"}]},
    {"version": 1, "steps": [{"op": ["split"], "loop": "m", "factor": 2}]},
    {"version": 1, "steps": [{"op": "pack", "operand": ["A"], "at": "m"}]},
    {"version": 1, "steps": [{"op": "reorder", "order": [["b"], "m"]}]},
    {"version": 1, "steps": [{"op": "split", "loop": "m); system(\"sh\"); (", "factor": 2}]},
    {"version": 1, "steps": [{"op": "split", "loop": "m", "factor": 10 ** 9}]},
    {"version": 1, "steps": [{"op": "split", "loop": "m", "factor": True}]},
    {"version": 1, "steps": [{"op": "split", "loop": "m", "factor": 4, "extra": 1}]},
    {"version": 2, "steps": []},
    [],
])
def test_trace_grammar_rejects_anything_else(bad):
    with pytest.raises(TraceFormatError):
        Trace.from_json(json.dumps(bad))


def test_pretty_printer_shows_the_nest():
    text = default_schedule(MatmulProblem(1000, 1000, 1000)).nest.pretty(dict(b=1, m=1000, n=1000, k=1000))
    assert "micro-kernel" in text and "pack B" in text and "tail" in text
    assert str(LoopNest.initial()).splitlines()[0].startswith("for b")


# Written by the implementation before the step table existed: the JSON form must not change.
ALL_OPS_JSON = (
    '{"steps":[{"factor":64,"loop":"n","op":"split"},{"factor":32,"loop":"k","op":"split"},'
    '{"factor":24,"loop":"m","op":"split"},{"factor":16,"loop":"n.i","op":"split"},{"factor":6,"loop":"m.i","op":"split"},'
    '{"op":"reorder","order":["b","n.o","k.o","m.o","n.i.o","m.i.o","k.i","m.i.i","n.i.i"]},'
    '{"m":"m.i.i","n":"n.i.i","op":"register_tile"},{"at":"k.o","op":"pack","operand":"B"},'
    '{"at":"m.o","op":"pack","operand":"A"},{"factor":4,"loop":"k.i","op":"unroll"},{"loop":"n.o","op":"parallel"},'
    '{"loop":"m.i.i","op":"vectorize"},{"loop":"n.o","op":"swap","other":"k.o"}],"version":1}')


# The ops added since, each in a trace of its own (prefetch cannot join packed operands above).
LATER_OPS_JSON = (
    '{"steps":[{"factor":2,"loop":"m","op":"split"},{"factor":64,"loop":"n","op":"split"},'
    '{"factor":8,"loop":"k","op":"split"},{"op":"reorder","order":["b","k.o","m.o","n.o","k.i","m.i","n.i"]},'
    '{"m":"m.i","n":"n.i","op":"register_tile"},{"op":"prefetch","operand":"B"}],"version":1}',)


def test_trace_json_is_byte_for_byte_stable():
    ops = set()
    for text in (ALL_OPS_JSON, *LATER_OPS_JSON):
        s = Schedule.from_json(text)
        ops |= {st.op for st in s.trace}
        assert s.to_json() == text
        assert Trace.from_json(text.encode()).to_json() == text
    assert ops == set(STEPS)


def test_one_error_family():
    """A step outside the grammar and a grammatical step that does not apply are both ScheduleErrors."""
    assert issubclass(TraceFormatError, ScheduleError)
    assert issubclass(ScheduleError, ValueError) and issubclass(ScheduleError, LoopTuneError)
    with pytest.raises(TraceFormatError, match="unknown step op"):
        Schedule.from_json('{"version": 1, "steps": [{"op": "stream", "loop": "k"}]}')
    with pytest.raises(TraceFormatError, match=r"split.factor must be in \[2"):
        Schedule.initial().step("split", loop="m", factor=1)
    with pytest.raises(ScheduleError, match="step 2 .*adjacent"):
        Schedule.from_json('{"version": 1, "steps": [{"op": "split", "loop": "m", "factor": 4},'
                           ' {"op": "swap", "loop": "m.o", "other": "k"}]}')
