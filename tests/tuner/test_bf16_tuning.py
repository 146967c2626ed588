"""bfloat16 through the tuner: the worker verifies bf16 kernels with float32's tolerance (and catches
wrong ones), search spaces use float32 accumulator lanes, the agent sees the dtype, and
`looptune tune --dtype bfloat16` stores a record the runtime then finds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hand_kernels import FAST, build_kernels, runner  # noqa: F401 - runner is a fixture

from looptune.database import load
from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import Target, render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.ir import MAX_TILE_SIDE
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.workload import MatmulProblem, parse_shapes
from looptune.tuner.agent.actions import AgentState
from looptune.tuner.agent.observe import DTYPE_FEATURE, observe
from looptune.tuner.cli import main
from looptune.runtime.compiler.abi import abi_args
from looptune.tuner.measure.runner import Candidate, RunStatus, default_tolerance
from looptune.tuner.search.mutate import factor_mutations
from looptune.tuner.search.spaces import accumulator_lanes, blocking_candidates, tile_options

pytest.importorskip("ml_dtypes")
needs_cc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

SIGNATURE = "int {name}(" + abi_args("bfloat16") + ")"     # the one kernel ABI, for bf16 inputs

NAIVE_BODY = """{
    (void)nthreads;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float acc = accumulate ? C[b*sCb + m*sCm + n*sCn] : 0.0f;
          for (int64_t k = 0; k < K; ++k)
            acc = ACC(acc + bf(A[b*sAb + m*sAm + k*sAk]) * bf(B[b*sBb + k*sBk + n*sBn]));
          C[b*sCb + m*sCm + n*sCn] = acc;
        }
    return 0;
}"""

PRELUDE = """#include <stdint.h>
static inline float bf(uint16_t h) { union { uint32_t u; float f; } v = { (uint32_t)h << 16 }; return v.f; }
/* rounds a float32 to bf16 precision (nearest even): an accumulator kept in bf16 */
static inline float to_bf(float f) { union { float f; uint32_t u; } v = { f };
    v.u = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) & 0xffff0000u; return v.f; }
"""

KERNELS = {
    "naive": NAIVE_BODY.replace("ACC(", "("),
    "wrong": NAIVE_BODY.replace("ACC(", "(").replace("k < K", "k < K - 1"),    # drops the last k term
    "bf16_accumulator": NAIVE_BODY.replace("ACC(", "to_bf("),                  # sums in bf16, not float32
}

PROBLEM = MatmulProblem(24, 20, 40, dtype="bfloat16")


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return build_kernels(tmp_path_factory.mktemp("bf16_kernels"), PRELUDE, SIGNATURE, KERNELS)


def test_bf16_tolerance_is_float32s():
    assert default_tolerance("bfloat16", 512) == default_tolerance("float32", 512)


@needs_cc
@pytest.mark.parametrize("problem", [PROBLEM, MatmulProblem(7, 9, 33, batch=2, dtype="bfloat16", layout="tn")], ids=str)
def test_a_correct_bf16_kernel_is_measured_against_numpy_on_ml_dtypes(runner, libs, problem):
    [r] = runner.run([Candidate(problem, libs["naive"])])
    assert r.status is RunStatus.OK, r.error
    assert r.gflops > 0 and r.numpy_gflops > 0      # numpy's time: np.matmul on the bf16 arrays


@needs_cc
@pytest.mark.parametrize("kernel", ["wrong", "bf16_accumulator"])
def test_wrong_bf16_kernels_are_caught(runner, libs, kernel):
    [r] = runner.run([Candidate(PROBLEM, libs[kernel])])
    assert r.status is RunStatus.WRONG_ANSWER and "elements wrong" in r.error
    [ok] = runner.run([Candidate(PROBLEM, libs["naive"])])     # and the worker goes on
    assert ok.status is RunStatus.OK


def _modes_here() -> list[str]:
    best = detect_cpu().bf16_isa
    return ["convert", "avx512bf16", "amx"][: ["convert", "avx512bf16", "amx"].index(best) + 1]


@needs_cc
@pytest.mark.parametrize("mode", _modes_here())
def test_generated_bf16_kernels_pass_the_workers_verification(runner, mode):
    cpu = detect_cpu()
    target = Target(cpu.vector_isa, cpu.vector_bytes, mode)
    problems = [MatmulProblem(70, 48, 100, dtype="bfloat16"), MatmulProblem(33, 64, 65, batch=2, dtype="bfloat16", layout="nt")]
    sources = [render(default_schedule(p), "bfloat16", target) for p in problems]
    builds = build_many(sources)
    results = runner.run([Candidate.from_build(p, b) for p, b in zip(problems, builds)])
    for r in results:
        assert r.status is RunStatus.OK, r.error


def test_search_spaces_use_float32_accumulator_lanes():
    cpu = detect_cpu()
    assert accumulator_lanes(cpu, "bfloat16") == accumulator_lanes(cpu, "float32") == cpu.vector_bytes // 4
    p = MatmulProblem(200, 300, 400, dtype="bfloat16")
    tiles = tile_options(cpu, "bfloat16")
    assert set(tile_options(cpu, "float32")) <= set(tiles)
    if cpu.bf16_isa == "amx":
        assert (32, 32) in tiles and (16, 48) in tiles and (48, 48) not in tiles
    for params in blocking_candidates(p, 30, seed=3):
        sched = params.schedule()
        assert sched.nest.tile is not None
        render(sched, "bfloat16", Target.detect(cpu))           # every candidate renders
    assert factor_mutations(default_schedule(p), p, cpu)


def test_observation_shows_bfloat16_without_changing_shapes():
    state = AgentState.initial()
    graphs = {d: observe(state, MatmulProblem(64, 64, 64, dtype=d)) for d in ("float32", "float64", "bfloat16")}
    assert len({g.flat().shape for g in graphs.values()}) == 1
    assert graphs["bfloat16"].glob[4] == DTYPE_FEATURE["bfloat16"] == 0.5
    assert (graphs["bfloat16"].flat() >= 0).all()
    tensor = {d: g.nodes[-3:] for d, g in graphs.items()}      # A, B, C: footprints by element size
    assert tensor["bfloat16"][0, 24] < tensor["float32"][0, 24] and tensor["bfloat16"][2, 24] == tensor["float32"][2, 24]


def test_shape_files_take_dtype_bfloat16():
    ps = list(parse_shapes(["64 64 64 dtype=bfloat16", "8 16 32 batch=2 dtype=bfloat16 layout=tn  # skinny"]))
    assert [p.dtype for p in ps] == ["bfloat16", "bfloat16"] and ps[1].batch == 2 and ps[1].layout == "tn"
    assert str(ps[0]) == "64 64 64 dtype=bfloat16"


@needs_cc
def test_cli_tune_bfloat16_stores_a_record_the_runtime_finds(tmp_path):
    db = tmp_path / "db.h5"
    out = CliRunner().invoke(main, ["tune", "48", "40", "64", "--dtype", "bfloat16", "--budget", "1",
                                    "--db", str(db), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["ok"] and data["problem"] == "matmul:bfloat16:nn:t1:b1:48x40x64" and data["numpy_gflops"] > 0
    [record] = load(str(db)).records
    assert record.problem.dtype == "bfloat16" and record.verified
    listing = CliRunner().invoke(main, ["db", "list", str(db)])
    assert listing.exit_code == 0 and "matmul:bfloat16:nn:t1:b1:48x40x64" in listing.output
    script = ("import numpy as np, ml_dtypes, looptune.runtime as rt\n"
              "a = np.ones((48, 64), ml_dtypes.bfloat16); b = np.ones((64, 40), ml_dtypes.bfloat16)\n"
              "r = rt.explain(a, b, threads=1)\n"
              "c = rt.matmul(a, b, threads=1)\n"
              "print(r.source, r.database, c.dtype, float(c[0, 0]))\n")
    # the record's schedule is served even if numpy won the tuning (on a busy machine it may)
    env = dict(os.environ, LOOPTUNE_DB=str(db), LOOPTUNE_NO_EMBEDDED_DB="1", LOOPTUNE_NO_NUMPY_HANDOFF="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["exact", str(db), "float32", "64.0"]


def test_skinny_bf16_templates_fit_the_tile_limit():
    """Template widths are in float32 lanes: 4 vectors of bf16 elements would be 128 wide."""
    p = MatmulProblem(8, 1024, 1024, dtype="bfloat16")
    for params in blocking_candidates(p, 40):
        assert params.schedule().nest.tile_sizes[1] <= MAX_TILE_SIDE
