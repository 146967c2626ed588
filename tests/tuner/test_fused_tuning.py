"""Fused epilogues through the tuner: the worker builds, verifies and times fused kernels (against
numpy's unfused composition) and rejects a kernel of another epilogue; the derived tolerance holds
for correct kernels and separates activations that differ by 1e-4; search spaces, observations
and seeds treat a fused problem as its plain twin; ``looptune tune --epilogue`` stores a record
whose key has the op, which the runtime then serves ``exact``; shape lines take ``epilogue=``
(build-db with them: tests/ship/test_export_fused.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from looptune.database import MachineKey, Record, commit, load
from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import FixedSizes, render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.epilogue import activate
from looptune.runtime.compiler.workload import MatmulProblem, ProblemError, parse_shape_line
from looptune.tuner.agent.actions import AgentState
from looptune.tuner.agent.observe import observe
from looptune.tuner.cli import main
from looptune.tuner.measure.fused import NUMPY_ACTIVATIONS, fused_reference, numpy_unfused, operand_scale
from looptune.tuner.measure.runner import Candidate, LocalRunner, MeasureConfig, RunStatus, default_tolerance
from looptune.tuner.search.seeds import nearest_seeds
from looptune.tuner.search.spaces import blocking_candidates

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

FAST = MeasureConfig(warmup=1, min_repeats=3, max_repeats=20, min_total_seconds=0.005, timeout_seconds=10.0)
GELU = "matmul+bias+gelu_tanh"
PROBLEMS = [MatmulProblem(64, 48, 768, op=GELU),
            MatmulProblem(33, 40, 70, batch=2, layout="tn", op="matmul+bias+relu+residual"),
            MatmulProblem(20, 30, 40, dtype="float64", op="matmul+silu+residual"),
            MatmulProblem(7, 300, 129, threads=2, op="matmul+bias+gelu")]


def candidate(problem, op=None):
    """The problem's exact-size kernel of the analytic default, rendered for ``op`` (default: its own)."""
    source = render(default_schedule(problem), problem.dtype, sizes=FixedSizes.of(problem), op=op or problem.op)
    [result] = build_many([source])
    return Candidate.from_build(problem, result)


@pytest.fixture(scope="module")
def runner():
    with LocalRunner(FAST) as r:
        yield r


@needs_cc
@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_the_worker_verifies_and_times_fused_kernels(runner, problem):
    [r] = runner.run([candidate(problem)])
    assert r.status is RunStatus.OK, r.error
    assert r.gflops > 0 and r.numpy_gflops > 0 and r.problem_key == problem.key()


@needs_cc
@pytest.mark.parametrize("problem, op", [(PROBLEMS[0], "matmul+bias+gelu"), (PROBLEMS[0], "matmul+bias+relu"),
                                         (PROBLEMS[0], "matmul"), (PROBLEMS[1], "matmul+bias+relu"),
                                         (PROBLEMS[3], "matmul+bias+gelu_tanh")], ids=str)
def test_a_kernel_of_another_epilogue_is_a_wrong_answer(runner, problem, op):
    """gelu and gelu_tanh differ by at most 5e-4 (at |x| near 2), and are told apart at K = 768."""
    [r] = runner.run([candidate(problem, op)])
    assert r.status is RunStatus.WRONG_ANSWER and "elements wrong" in r.error, r.error
    [ok] = runner.run([candidate(problem)])      # and the worker goes on
    assert ok.status is RunStatus.OK


@needs_cc
def test_a_kernel_reading_an_operand_the_problem_lacks_takes_only_the_worker_down(runner):
    [r] = runner.run([candidate(PROBLEMS[0], "matmul+bias+gelu_tanh+residual")])   # reads a NULL residual
    assert r.status is RunStatus.CRASH
    [ok] = runner.run([candidate(PROBLEMS[0])])
    assert ok.status is RunStatus.OK


@pytest.mark.parametrize("k", [1, 64, 768, 3072])
def test_the_tolerance_holds_and_tells_gelu_from_gelu_tanh(k):
    """The float64 reference with a float32 composition inside the bound (numpy's own, rounded the
    way a kernel rounds), and gelu in place of gelu_tanh outside it on many elements: the operands
    are scaled so that the products are O(1), where the activations differ."""
    problem = MatmulProblem(48, 64, k, op=GELU)
    ref = fused_reference(problem, 0)
    assert 1 <= k * operand_scale(k) ** 2 < 4
    bound = ref.bound(*default_tolerance("float32", k))
    y = (np.matmul(ref.a, ref.b) + ref.bias).astype(np.float32)
    good = activate(y.copy(), "gelu_tanh")
    assert np.all(np.abs(good - ref.expect) <= bound)
    assert np.all(np.abs(NUMPY_ACTIVATIONS["gelu_tanh"](y) - ref.expect) <= bound)      # what numpy is timed on
    wrong = activate(y.copy(), "gelu")
    if k > 1:
        assert np.mean(np.abs(wrong - ref.expect) > bound) > 0.05


def test_numpy_unfused_is_the_composition_a_user_writes():
    problem = MatmulProblem(20, 30, 40, op="matmul+bias+silu+residual")
    ref = fused_reference(problem, 1)
    c = np.empty((1, 20, 30), np.float32)
    got = numpy_unfused(ref.a, ref.b, c, ref.bias, "silu", ref.residual)
    assert np.all(np.abs(got - ref.expect) <= ref.bound(*default_tolerance("float32", 40)))


def test_a_fused_problem_searches_and_observes_as_its_plain_twin():
    fused, plain = MatmulProblem(200, 300, 400, op=GELU), MatmulProblem(200, 300, 400)
    assert [c.schedule().to_json() for c in blocking_candidates(fused, 20, seed=3)] == \
        [c.schedule().to_json() for c in blocking_candidates(plain, 20, seed=3)]
    for params in blocking_candidates(fused, 5, seed=1):
        assert "_epilogue(" in render(params.schedule(), "float32", op=fused.op).text
    state = AgentState.initial()
    np.testing.assert_array_equal(observe(state, fused).flat(), observe(state, plain).flat())


def test_seeds_of_a_fused_problem_come_from_its_own_family_then_the_plain_one(tmp_path, monkeypatch):
    machine = MachineKey.current()
    own, plain = MatmulProblem(64, 64, 64, op=GELU), MatmulProblem(64, 64, 64)
    far = MatmulProblem(512, 512, 512, op=GELU)
    records = [Record(p, machine, default_schedule(p).trace, g, 0.1, 10.0, True, "t", "t", 1)
               for p, g in ((own, 30.0), (plain, 40.0), (far, 50.0), (MatmulProblem(64, 64, 64, op="matmul+relu"), 5.0))]
    db = tmp_path / "seeds.h5"
    commit(db, records)
    monkeypatch.setenv("LOOPTUNE_DB", str(db))
    monkeypatch.setenv("LOOPTUNE_NO_EMBEDDED_DB", "1")
    seeds = nearest_seeds(MatmulProblem(64, 64, 64, op=GELU))
    assert [s.problem for s in seeds] == [own, plain, far]       # nearest first, the op's own at a tie
    assert [s.problem for s in nearest_seeds(plain)] == [plain]   # never the other way round


def test_shape_lines_take_an_epilogue():
    p = parse_shape_line("128 3072 768 dtype=float64 epilogue=bias,gelu_tanh  # BERT")
    assert p.op == "matmul+bias+gelu_tanh" and p.dtype == "float64"
    assert str(p) == "128 3072 768 dtype=float64 epilogue=bias,gelu_tanh" and parse_shape_line(str(p)) == p
    assert parse_shape_line("8 8 8 epilogue=residual,relu").op == "matmul+relu+residual"
    for bad in ("8 8 8 epilogue=tanh", "8 8 8 epilogue=relu,gelu", "8 8 8 epilogue=bias,bias"):
        with pytest.raises(ProblemError, match="epilogue"):
            parse_shape_line(bad)


def test_cli_refuses_bad_epilogues():
    bad = CliRunner().invoke(main, ["tune", "8", "8", "8", "--epilogue", "bias,tanh"])
    assert bad.exit_code == 2 and "unknown epilogue part 'tanh'" in bad.output
    half = CliRunner().invoke(main, ["tune", "8", "8", "8", "--epilogue", "relu", "--dtype", "float16"])
    assert half.exit_code == 2 and "float16 kernels have no fused epilogue" in half.output
    shown = CliRunner().invoke(main, ["schedule", "16", "16", "16", "--epilogue", "bias,silu", "--c"])
    assert shown.exit_code == 0 and "(matmul+bias+silu)" in shown.output


@needs_cc
def test_cli_tune_epilogue_stores_a_record_the_runtime_serves(tmp_path):
    db = tmp_path / "db.h5"
    out = CliRunner().invoke(main, ["tune", "64", "96", "128", "--epilogue", "bias,gelu_tanh", "--budget", "1",
                                    "--db", str(db), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["ok"] and data["problem"] == "matmul+bias+gelu_tanh:float32:nn:t1:b1:64x96x128"
    assert data["numpy_gflops"] > 0 and data["stored"] == str(db)
    [record] = load(str(db)).records
    assert record.problem.op == GELU and record.verified
    listing = CliRunner().invoke(main, ["db", "list", str(db)])
    assert listing.exit_code == 0 and "matmul+bias+gelu_tanh:float32:nn:t1:b1:64x96x128" in listing.output
    script = ("import numpy as np, looptune.runtime as rt\n"
              "from looptune.runtime.api import current_resolver\n"
              "a = np.full((64, 128), 0.01, np.float32); b = np.ones((128, 96), np.float32)\n"
              "c = rt.matmul(a, b, bias=np.full(96, -2.28, np.float32), activation='gelu_tanh', threads=1)\n"
              "[(key, (kernel, res))] = current_resolver().dispatch.items()\n"
              "print(key[-1], res.source, res.database, kernel.fused, round(float(c[0, 0]), 5))\n")
    # the record's schedule is served even if numpy won the tuning (on a busy machine it may)
    env = dict(os.environ, LOOPTUNE_DB=str(db), LOOPTUNE_NO_EMBEDDED_DB="1", LOOPTUNE_NO_NUMPY_HANDOFF="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expect = -1.0 / (1 + np.exp(1.5957691216057308 * (1 + 0.044715)))     # gelu_tanh(-1)
    assert done.stdout.split() == [GELU, "exact", str(db), "True", f"{round(expect, 5)}"]
