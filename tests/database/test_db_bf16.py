"""bfloat16 records: stored, loaded, exported and imported like any other, shown by ``looptune db``,
and looked up only within their own family (a float32 record never serves bfloat16)."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from looptune.database import ScheduleIndex, load, save
from looptune.database.cli import db

from db_testlib import LOCAL, make_record


def _records():
    return [make_record(64, dtype="bfloat16"), make_record(128, 256, 512, dtype="bfloat16", layout="tn", batch=2,
                                                           threads=4, gflops=900.0),
            make_record(64, dtype="float32", gflops=50.0)]


def test_bf16_records_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    save(path, _records())
    loaded = load(path).records
    assert sorted(r.problem.key() for r in loaded) == sorted(r.problem.key() for r in _records())
    assert {r.problem.key(): r for r in loaded} == {r.problem.key(): r for r in _records()}
    jsonl = tmp_path / "s.jsonl"
    assert CliRunner().invoke(db, ["export", str(path), "--out", str(jsonl)]).exit_code == 0
    assert sum(json.loads(line)["problem"]["dtype"] == "bfloat16" for line in jsonl.read_text().splitlines()) == 2
    fresh = tmp_path / "fresh.h5"
    assert CliRunner().invoke(db, ["import", str(fresh), str(jsonl)]).exit_code == 0
    assert load(fresh).records == load(path).records


def test_db_commands_show_bf16_records(tmp_path):
    path = tmp_path / "s.h5"
    save(path, _records())
    listing = CliRunner().invoke(db, ["list", str(path)])
    assert listing.exit_code == 0 and "matmul:bfloat16:nn:t1:b1:64x64x64" in listing.output
    info = CliRunner().invoke(db, ["info", str(path)])
    assert info.exit_code == 0 and "family matmul:bfloat16:nn:1: 1 records" in info.output
    verify = CliRunner().invoke(db, ["verify", str(path)])
    assert verify.exit_code == 0, verify.output


def test_lookup_keeps_bf16_in_its_family():
    index = ScheduleIndex(_records(), LOCAL)
    exact = index.best("matmul:bfloat16:nn:t1:b1:64x64x64")
    assert exact is not None and exact.exact and exact.record == _records()[0]
    # no bfloat16 record of this size: the nearest bfloat16 one (64^3, log2(80/64) away) answers,
    # not the float32 64^3 record at the same distance, nor the bfloat16 record of another family
    near = index.best("matmul:bfloat16:nn:t1:b1:64x64x80")
    assert near is not None, "the bfloat16 family has a record: a bfloat16 problem must get one"
    assert near.record == _records()[0] and not near.exact and near.local
    assert near.distance == pytest.approx(math.log2(80 / 64))
    assert [m.record.problem.dtype for m in index.nearest("matmul:bfloat16:nn:t1:b1:64x64x80", 5)] == ["bfloat16"]
    # and the other way round: float32 gets its own record, never a bfloat16 one
    assert index.best("matmul:float32:nn:t1:b1:64x64x80").record == _records()[2]
    # a family with only a float32 record of this very size has nothing for bfloat16
    only_float32 = ScheduleIndex([make_record(64, dtype="float32")], LOCAL)
    assert only_float32.best("matmul:bfloat16:nn:t1:b1:64x64x64") is None
    assert only_float32.nearest("matmul:bfloat16:nn:t1:b1:64x64x64", 3) == []
