"""Files written before ``MatmulProblem`` became the database's problem type still load, and
what we write now is byte-for-byte what we wrote then (HDF5 columns and record JSON)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from looptune.database import Record, load, save
from looptune.database.records import problem_from_dict, problem_from_key
from looptune.runtime.compiler.workload import MatmulProblem

SHIPPED = Path(__file__).resolve().parents[2] / "runtime" / "data" / "default.h5"
# The shipped database as the code before the layout change wrote it (code generator 2): kept
# as a fixture so "files made before still load, and are written back the same" stays proven
# after the shipped file is regenerated.
BEFORE = Path(__file__).resolve().parent / "data" / "default-before-layout.h5"

# One record as the previous code (ProblemKey, ``Record.budget``) wrote it with ``to_json``.
OLD_JSON = (
    '{"budget":37,"gflops_median":33.656951053249756,"gflops_spread":0.18949360960573194,"machine":{"arch":"x86_64",'
    '"codegen_version":"2","compiler":"cc (Debian 12.2.0-14+deb12u1) 12.2.0","cores":2,"cpu_model":"AMD EPYC",'
    '"features":["avx","avx2","avx512bw","avx512dq","avx512f","avx512vl","fma","sse4_2"],"isa":"avx512"},'
    '"numpy_gflops":35.99361775680891,"policy":"dqn-gnn-s1","problem":{"batch":1,"dtype":"float32","k":512,'
    '"layout":"nn","m":1,"n":512,"op":"matmul","threads":1},"search":"default","timestamp":1795567809.4954207,'
    '"trace":{"steps":[{"factor":4,"loop":"m","op":"split"},{"factor":512,"loop":"n","op":"split"},'
    '{"factor":8,"loop":"k","op":"split"},{"factor":2,"loop":"m.i","op":"split"},{"factor":64,"loop":"n.i",'
    '"op":"split"},{"op":"reorder","order":["b","n.o","k.o","m.o","n.i.o","m.i.o","k.i","m.i.i","n.i.i"]},'
    '{"m":"m.i.i","n":"n.i.i","op":"register_tile"},{"factor":8,"loop":"k.i","op":"unroll"}],"version":1},'
    '"verified":true,"version":1}'
)


def test_old_record_json_loads_and_is_written_back_identically():
    record = Record.from_json(OLD_JSON)
    assert record.problem == MatmulProblem(1, 512, 512) and record.candidates == 37
    assert record.to_json() == OLD_JSON


@pytest.mark.parametrize("path", [SHIPPED, BEFORE], ids=["shipped", "before-layout"])
def test_shipped_database_problems_round_trip_through_the_one_type(path):
    db = load(path)
    assert len(db) > 0
    for record in db.records[::max(1, len(db) // 12)]:
        p = record.problem
        assert type(p) is MatmulProblem
        key, as_dict = p.key(), p.to_dict()
        assert MatmulProblem.from_key(key) == problem_from_key(key) == p
        assert MatmulProblem.from_key(key).key() == key
        assert problem_from_dict(as_dict) == p and problem_from_dict(as_dict).to_dict() == as_dict
        assert json.loads(record.to_json())["problem"] == as_dict
        assert Record.from_json(record.to_json()).to_json() == record.to_json()


@pytest.mark.parametrize("path", [SHIPPED, BEFORE], ids=["shipped", "before-layout"])
def test_shipped_database_is_rewritten_with_identical_columns(tmp_path, path):
    copy = tmp_path / "copy.h5"
    save(copy, load(path).records)
    with h5py.File(path, "r") as old, h5py.File(copy, "r") as new:
        assert dict(old.attrs) == dict(new.attrs)
        for table in ("steps", "traces", "machines", "records"):
            assert sorted(old[table]) == sorted(new[table])
            for name in old[table]:
                a, b = old[table][name], new[table][name]
                assert a.dtype == b.dtype and np.array_equal(a[()], b[()]), f"/{table}/{name} differs"
                assert a.attrs["sha256"] == b.attrs["sha256"]
