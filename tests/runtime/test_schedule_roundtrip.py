"""Every transform: save -> load -> replay -> equal; illegal steps raise ScheduleError with a reason."""
import json
import random

import pytest

from looptune.runtime.compiler.trace import Step, Trace, TraceFormatError
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.ir import LoopNest, ScheduleError
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from schedules import random_schedules

BLIS = (Schedule.initial()
        .step("split", loop="n", factor=64).step("split", loop="k", factor=32).step("split", loop="m", factor=24)
        .step("split", loop="n.i", factor=16).step("split", loop="m.i", factor=6))


def roundtrip(s: Schedule) -> None:
    text = s.to_json()
    again = Schedule.from_json(json.loads(json.dumps(text)))
    assert again == s
    assert again.nest == s.nest and again.trace == s.trace


@pytest.mark.parametrize("build", [
    lambda s: s.step("split", loop="m", factor=8),
    lambda s: s.step("swap", loop="n", other="k"),
    lambda s: s.step("reorder", order=["b", "k", "m", "n"]),
    lambda s: BLIS.step("swap", loop="m.i.i", other="n.o"),
    lambda s: BLIS.step("reorder", order=["b", "n.o", "k.o", "m.o", "n.i.o", "m.i.o", "k.i", "m.i.i", "n.i.i"])
                  .step("register_tile", m="m.i.i", n="n.i.i"),
    lambda s: BLIS.step("reorder", order=["b", "n.o", "k.o", "m.o", "n.i.o", "m.i.o", "k.i", "n.i.i", "m.i.i"])
                  .step("register_tile", m="m.i.i", n="n.i.i").step("vectorize", loop="m.i.i"),
    lambda s: s.step("unroll", loop="k", factor=4),
    lambda s: default_schedule(MatmulProblem(100, 100, 100)),
    lambda s: default_schedule(MatmulProblem(300, 200, 100, threads=2)),
], ids=["split", "swap", "reorder", "swap-split", "register_tile", "vectorize", "unroll", "pack", "parallel"])
def test_each_transform_round_trips(build):
    roundtrip(build(Schedule.initial()))


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
