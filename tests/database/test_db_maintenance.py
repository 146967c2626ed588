"""Merge (order-independent), prune, and the JSON-lines form."""
from __future__ import annotations

import io
import json
from dataclasses import replace

from hypothesis import given, strategies as st

from looptune.database import PruneRules, export_jsonl, import_jsonl, merge, prune, read_jsonl
from looptune.database.maintenance import write_jsonl

from db_testlib import FOREIGN, make_record, record_strategy

records_lists = st.lists(record_strategy(), max_size=20)


@given(records_lists, records_lists, records_lists, st.randoms(use_true_random=False))
def test_merge_gives_the_same_result_in_any_order(a, b, c, rnd):
    expected = merge(a, b, c)
    shuffled = a + b + c
    rnd.shuffle(shuffled)
    assert merge(shuffled) == expected                      # any order
    assert merge(merge(c, a), b) == expected                # any grouping
    assert merge(expected, a) == expected                   # merging again changes nothing
    assert len({r.slot for r in expected}) == len(expected)  # one record per (problem, machine)


@given(records_lists)
def test_merge_keeps_the_best_of_each_slot(records):
    merged = {r.slot: r for r in merge(records)}
    for r in records:
        assert merged[r.slot].rank >= r.rank


def test_prune_rules():
    records = [replace(make_record(1), timestamp=1000.0), make_record(2, verified=False),
               make_record(3, gflops=10.0),                                  # numpy did 50 GFLOPS
               make_record(4, machine=replace(FOREIGN, codegen_version="0")), make_record(5)]
    assert len(prune(records, PruneRules())[0]) == 5
    kept, dropped = prune(records, PruneRules(unverified=True, slower_than_numpy=True, older_than=2000.0,
                                              codegen_version="1"))
    assert [r.problem.m for r in kept] == [5] and len(dropped) == 4


def test_jsonl_round_trip(tmp_path):
    records = merge([make_record(m, batch=b) for m in (1, 5, 4096) for b in (1, 7)])
    path = tmp_path / "out.jsonl"
    assert export_jsonl(records, path) == 6
    lines = path.read_text().splitlines()
    assert all(json.loads(line)["version"] == 1 for line in lines)
    imported, rejections = import_jsonl(path)
    assert rejections == [] and merge(imported) == records


def test_jsonl_rejections_name_the_line_and_reason():
    good = io.StringIO()
    write_jsonl([make_record(8), make_record(16)], good)
    first, second = good.getvalue().splitlines()
    evil = json.loads(first)
    evil["trace"]["steps"][0]["loop"] = "m); system(\"sh\"); (void)("
    lines = [first, "", "{broken", json.dumps(evil), second, "[1, 2]", '{"version": 9}']
    records, rejections = read_jsonl(lines)
    assert [r.problem.m for r in records] == [8, 16]
    assert [r.where for r in rejections] == ["line 3", "line 4", "line 6", "line 7"]
    assert "not valid JSON" in rejections[0].reason
    assert "loop name" in rejections[1].reason
    assert "JSON object" in rejections[2].reason
    assert "version 9 is not supported" in rejections[3].reason
