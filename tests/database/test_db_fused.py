"""Fused records (an op with an epilogue, e.g. "matmul+bias+gelu_tanh"): stored, loaded, exported and
imported like any other, their traces replaying to the schedule that was stored and rendering the
same fused kernel, shown with their op by ``looptune db``, and looked up only within their own op:
neither the plain product's records nor another epilogue's ever answer a fused problem's lookup,
nor the other way round (the runtime's fallback to the plain family is its own, explicit step)."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from looptune.database import ScheduleIndex, load, save
from looptune.database.cli import db
from looptune.runtime.compiler.codegen import Target, render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.workload import MatmulProblem

from db_testlib import LOCAL, make_record

GELU = "matmul+bias+gelu_tanh"
RELU = "matmul+bias+relu+residual"
TUNED = MatmulProblem(96, 80, 72, op=GELU)
TUNED_TRACE = default_schedule(TUNED).trace      # a real tiled, packed schedule


def _records():
    return [make_record(64, op=GELU),
            make_record(96, 80, 72, op=GELU, trace=TUNED_TRACE, gflops=70.0),
            make_record(128, 256, 512, op=RELU, dtype="float64", layout="tn", batch=2, threads=4, gflops=900.0),
            make_record(64, gflops=50.0),                               # the plain product, same size
            make_record(64, 64, 80, op="matmul+bias+gelu", gflops=60.0)]      # another epilogue, a size nearer


def test_fused_records_round_trip_and_replay(tmp_path):
    path = tmp_path / "s.h5"
    save(path, _records())
    loaded = load(path).records
    assert {r.problem.key(): r for r in loaded} == {r.problem.key(): r for r in _records()}
    record = next(r for r in loaded if r.problem == TUNED)
    assert record.problem.op == GELU and record.problem.key() == "matmul+bias+gelu_tanh:float32:nn:t1:b1:96x80x72"
    assert record.trace == TUNED_TRACE
    # replayed, the stored trace is the schedule that was tuned, and renders the same fused kernel
    replayed, original = Schedule.from_trace(record.trace), Schedule.from_trace(TUNED_TRACE)
    assert replayed.to_json() == original.to_json() and replayed.nest == original.nest
    target = Target("avx512", 64)
    text = render(replayed, "float32", target, op=record.problem.op).text
    assert text == render(original, "float32", target, op=GELU).text and "_epilogue(" in text
    jsonl = tmp_path / "s.jsonl"
    assert CliRunner().invoke(db, ["export", str(path), "--out", str(jsonl)]).exit_code == 0
    ops = [json.loads(line)["problem"]["op"] for line in jsonl.read_text().splitlines()]
    assert sorted(ops) == sorted(r.problem.op for r in _records())
    fresh = tmp_path / "fresh.h5"
    assert CliRunner().invoke(db, ["import", str(fresh), str(jsonl)]).exit_code == 0
    assert load(fresh).records == load(path).records


def test_db_commands_show_the_op(tmp_path):
    path = tmp_path / "s.h5"
    save(path, _records())
    listing = CliRunner().invoke(db, ["list", str(path)])
    assert listing.exit_code == 0
    assert "matmul+bias+gelu_tanh:float32:nn:t1:b1:96x80x72" in listing.output
    assert "matmul+bias+relu+residual:float64:tn:t4:b2:128x256x512" in listing.output
    assert "matmul:float32:nn:t1:b1:64x64x64" in listing.output
    info = CliRunner().invoke(db, ["info", str(path)])
    assert info.exit_code == 0 and "family matmul+bias+gelu_tanh:float32:nn:1: 2 records" in info.output
    assert CliRunner().invoke(db, ["verify", str(path)]).exit_code == 0


def test_lookup_never_crosses_ops():
    records = _records()
    index = ScheduleIndex(records, LOCAL)
    # the fused 64^3 record answers the fused 64^3 problem, not the plain record of the same size
    exact = index.best(f"{GELU}:float32:nn:t1:b1:64x64x64")
    assert exact is not None and exact.exact and exact.record == records[0]
    # no record of this size: the nearest record of the op (64^3) answers, not the other epilogue's
    # record of this very size (64x64x80) nor the plain product's
    near = index.best(f"{GELU}:float32:nn:t1:b1:64x64x80")
    assert near is not None and near.record == records[0] and not near.exact
    assert near.distance == pytest.approx(math.log2(80 / 64))
    assert {m.record.problem.op for m in index.nearest(f"{GELU}:float32:nn:t1:b1:64x64x80", 10)} == {GELU}
    # the plain product and the other epilogue get their own records, never a gelu_tanh one
    assert index.best("matmul:float32:nn:t1:b1:96x80x72").record == records[3]
    assert index.best("matmul+bias+gelu:float32:nn:t1:b1:96x80x72").record == records[4]
    assert {m.record.problem.op for m in index.nearest("matmul:float32:nn:t1:b1:96x80x72", 10)} == {"matmul"}
    # an op without records has nothing, whatever the other ops hold at this very size
    for key in (f"{RELU}:float32:nn:t1:b1:64x64x64", "matmul+silu:float32:nn:t1:b1:64x64x64"):
        assert index.best(key) is None and index.nearest(key, 3) == []
    only_fused = ScheduleIndex([make_record(64, op=GELU)], LOCAL)
    assert only_fused.best("matmul:float32:nn:t1:b1:64x64x64") is None
