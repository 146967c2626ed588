"""float16 records: stored, loaded, exported and imported like any other, their traces replaying
to the schedule that was stored, shown by ``looptune db``, and looked up only within their own
family (neither a float32 nor a bfloat16 record ever serves float16, nor the other way round)."""
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

TUNED = MatmulProblem(96, 80, 72, dtype="float16")
TUNED_TRACE = default_schedule(TUNED).trace      # a real tiled, packed schedule, not a toy trace


def _records():
    return [make_record(64, dtype="float16"),
            make_record(128, 256, 512, dtype="float16", layout="tn", batch=2, threads=4, gflops=900.0),
            make_record(96, 80, 72, dtype="float16", trace=TUNED_TRACE, gflops=70.0),
            make_record(64, dtype="float32", gflops=50.0),
            make_record(64, 64, 80, dtype="bfloat16", gflops=60.0)]


def test_f16_records_round_trip_and_replay(tmp_path):
    path = tmp_path / "s.h5"
    save(path, _records())
    loaded = load(path).records
    assert {r.problem.key(): r for r in loaded} == {r.problem.key(): r for r in _records()}
    record = next(r for r in loaded if r.problem == TUNED)
    assert record.problem.dtype == "float16" and record.trace == TUNED_TRACE
    # replayed, the stored trace is the schedule that was tuned, and renders the same float16 kernel
    replayed, original = Schedule.from_trace(record.trace), Schedule.from_trace(TUNED_TRACE)
    assert replayed.to_json() == original.to_json() and replayed.nest == original.nest
    target = Target("avx512", 64)
    assert render(replayed, "float16", target).text == render(original, "float16", target).text
    jsonl = tmp_path / "s.jsonl"
    assert CliRunner().invoke(db, ["export", str(path), "--out", str(jsonl)]).exit_code == 0
    assert sum(json.loads(line)["problem"]["dtype"] == "float16" for line in jsonl.read_text().splitlines()) == 3
    fresh = tmp_path / "fresh.h5"
    assert CliRunner().invoke(db, ["import", str(fresh), str(jsonl)]).exit_code == 0
    assert load(fresh).records == load(path).records


def test_db_commands_show_f16_records(tmp_path):
    path = tmp_path / "s.h5"
    save(path, _records())
    listing = CliRunner().invoke(db, ["list", str(path)])
    assert listing.exit_code == 0 and "matmul:float16:nn:t1:b1:64x64x64" in listing.output
    info = CliRunner().invoke(db, ["info", str(path)])
    assert info.exit_code == 0 and "family matmul:float16:nn:1: 2 records" in info.output
    verify = CliRunner().invoke(db, ["verify", str(path)])
    assert verify.exit_code == 0, verify.output


def test_lookup_keeps_f16_in_its_family():
    records = _records()
    index = ScheduleIndex(records, LOCAL)
    exact = index.best("matmul:float16:nn:t1:b1:64x64x64")
    assert exact is not None and exact.exact and exact.record == records[0]
    # no float16 record of this size: the nearest float16 one (64^3, log2(80/64) away) answers, not
    # the bfloat16 record of this very size, the float32 64^3 one, nor the float16 record of another family
    near = index.best("matmul:float16:nn:t1:b1:64x64x80")
    assert near is not None and near.record == records[0] and not near.exact and near.local
    assert near.distance == pytest.approx(math.log2(80 / 64))
    assert {m.record.problem.dtype for m in index.nearest("matmul:float16:nn:t1:b1:64x64x80", 10)} == {"float16"}
    # and the other way round: bfloat16 and float32 get their own records, never a float16 one
    assert index.best("matmul:bfloat16:nn:t1:b1:96x80x72").record == records[4]
    assert index.best("matmul:float32:nn:t1:b1:96x80x72").record == records[3]
    for key in ("matmul:bfloat16:nn:t1:b1:64x64x64", "matmul:float32:nn:t1:b1:96x80x72"):
        assert "float16" not in {m.record.problem.dtype for m in index.nearest(key, 10)}
    # a family with only float32 and bfloat16 records of this very size has nothing for float16
    others = ScheduleIndex([make_record(64, dtype="float32"), make_record(64, dtype="bfloat16")], LOCAL)
    assert others.best("matmul:float16:nn:t1:b1:64x64x64") is None
    assert others.nearest("matmul:float16:nn:t1:b1:64x64x64", 3) == []
    only_f16 = ScheduleIndex([make_record(64, dtype="float16")], LOCAL)
    assert only_f16.best("matmul:float32:nn:t1:b1:64x64x64") is None
    assert only_f16.best("matmul:bfloat16:nn:t1:b1:64x64x64") is None
