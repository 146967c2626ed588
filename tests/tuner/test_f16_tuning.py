"""float16 through the tuner: the worker verifies float16 kernels with float32's tolerance plus
float16's rounding (and catches wrong ones, and one that sums in float16), search spaces use
float32 accumulator lanes, the agent sees the dtype, and `looptune tune --dtype float16` stores a
record the runtime then serves."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from hand_kernels import FAST, build_kernels, runner  # noqa: F401 - runner is a fixture

from looptune.database import load
from looptune.runtime.compiler.abi import abi_args
from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen import Target, render
from looptune.runtime.compiler.codegen_f16 import prelude
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.ir import MAX_TILE_SIDE
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.workload import MAX_DIM, MatmulProblem, parse_shapes
from looptune.tuner.agent.actions import AgentState
from looptune.tuner.agent.observe import DTYPE_FEATURE, observe
from looptune.tuner.cli import main
from looptune.tuner.measure.runner import Candidate, RunStatus, default_tolerance
from looptune.tuner.search.mutate import factor_mutations
from looptune.tuner.search.spaces import accumulator_lanes, blocking_candidates, tile_options

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

SIGNATURE = "int {name}(" + abi_args("float16") + ")"     # the one kernel ABI, for float16 inputs and C

NAIVE_BODY = """{
    (void)nthreads;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float acc = accumulate ? lt_f16_to_f32(C[b*sCb + m*sCm + n*sCn]) : 0.0f;
          for (int64_t k = 0; k < K; ++k)
            acc = ACC(acc + lt_f16_to_f32(A[b*sAb + m*sAm + k*sAk]) * lt_f16_to_f32(B[b*sBb + k*sBk + n*sBn]));
          C[b*sCb + m*sCm + n*sCn] = lt_f32_to_f16(acc);
        }
    return 0;
}"""

# the kernels' own conversions; to_h rounds a float32 to float16 precision (an accumulator kept in
# float16), bf to bfloat16 precision (nearest even)
PRELUDE = "#include <stdint.h>\n" + "\n".join(prelude()) + """
static inline float to_h(float f) { return lt_f16_to_f32(lt_f32_to_f16(f)); }
static inline float bf(float f) { union { float f; uint32_t u; } v = { f };
    v.u = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) & 0xffff0000u; return v.f; }
"""

KERNELS = {
    "naive": NAIVE_BODY.replace("ACC(", "("),
    "wrong": NAIVE_BODY.replace("ACC(", "(").replace("k < K", "k < K - 1"),    # drops the last k term
    "f16_accumulator": NAIVE_BODY.replace("ACC(", "to_h("),                    # sums in float16, not float32
    "bf16_store": NAIVE_BODY.replace("ACC(", "(").replace(                      # C rounded to bf16 precision
        "lt_f32_to_f16(acc)", "lt_f32_to_f16(bf(acc))"),
}

PROBLEM = MatmulProblem(24, 20, 64, dtype="float16")


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return build_kernels(tmp_path_factory.mktemp("f16_kernels"), PRELUDE, SIGNATURE, KERNELS)


def test_f16_tolerance_is_float32s_plus_float16_rounding():
    for k in (16, 512, 4096):
        (rtol, atol), (rtol32, atol32) = default_tolerance("float16", k), default_tolerance("float32", k)
        assert rtol == pytest.approx(rtol32 + 2.0 ** -10) and atol == pytest.approx(atol32 + 2.0 ** -25)
    assert default_tolerance("bfloat16", 512) == default_tolerance("float32", 512)     # bfloat16 unchanged


def test_the_tolerance_holds_for_numpy_and_catches_a_lost_term():
    """numpy's own float16 result, and C += A @ B done numpy's way, pass the check the worker makes;
    dropping one k term does not."""
    rng = np.random.default_rng(1)
    for k in (16, 64, 1000, 4096):
        a, b = rng.standard_normal((60, k)).astype(np.float16), rng.standard_normal((k, 50)).astype(np.float16)
        ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
        rtol, atol = default_tolerance("float16", k)
        c = np.matmul(a, b)
        assert np.all(np.abs(c - ref) <= atol + rtol * np.abs(ref))
        twice = (c.astype(np.float32) + np.matmul(a.astype(np.float32), b.astype(np.float32))).astype(np.float16)
        assert np.all(np.abs(twice - 2 * ref) <= 2 * atol + rtol * np.abs(2 * ref))
        lost = np.matmul(a[:, :-1], b[:-1])
        assert not np.all(np.abs(lost - ref) <= atol + rtol * np.abs(ref))


@needs_cc
@pytest.mark.parametrize("problem", [PROBLEM, MatmulProblem(7, 9, 33, batch=2, dtype="float16", layout="tn")], ids=str)
def test_a_correct_f16_kernel_is_measured_against_numpy(runner, libs, problem):
    [r] = runner.run([Candidate(problem, libs["naive"])])
    assert r.status is RunStatus.OK, r.error
    assert r.gflops > 0 and r.numpy_gflops > 0      # numpy's time: np.matmul on the float16 arrays


@needs_cc
@pytest.mark.parametrize("kernel", ["wrong", "f16_accumulator", "bf16_store"])
def test_wrong_f16_kernels_are_caught(runner, libs, kernel):
    [r] = runner.run([Candidate(PROBLEM, libs[kernel])])
    assert r.status is RunStatus.WRONG_ANSWER and "elements wrong" in r.error
    [ok] = runner.run([Candidate(PROBLEM, libs["naive"])])     # and the worker goes on
    assert ok.status is RunStatus.OK


@needs_cc
def test_generated_f16_kernels_pass_the_workers_verification(runner):
    cpu = detect_cpu()
    problems = [MatmulProblem(70, 48, 100, dtype="float16"), MatmulProblem(33, 64, 65, batch=2, dtype="float16", layout="nt"),
                MatmulProblem(1, 200, 64, dtype="float16")]
    sources = [render(default_schedule(p), "float16", Target.detect(cpu)) for p in problems]
    sources += [render(blocking_candidates(problems[0], 3, seed=1)[-1].schedule(), "float16", Target.detect(cpu))]
    builds = build_many(sources)
    results = runner.run([Candidate.from_build(p, b) for p, b in zip(problems + problems[:1], builds)])
    for r in results:
        assert r.status is RunStatus.OK, r.error


def test_search_spaces_use_float32_accumulator_lanes():
    cpu = detect_cpu()
    assert accumulator_lanes(cpu, "float16") == accumulator_lanes(cpu, "float32") == cpu.vector_bytes // 4
    assert tile_options(cpu, "float16") == tile_options(cpu, "float32")
    p = MatmulProblem(200, 300, 400, dtype="float16")
    for params in blocking_candidates(p, 30, seed=3):
        sched = params.schedule()
        assert sched.nest.tile is not None
        render(sched, "float16", Target.detect(cpu))           # every candidate renders
    assert factor_mutations(default_schedule(p), p, cpu)


def test_skinny_f16_templates_fit_the_tile_limit():
    """Template widths are in float32 lanes: 4 vectors of float16 elements would be 128 wide."""
    for p in (MatmulProblem(8, 1024, 1024, dtype="float16"), MatmulProblem(1, 4096, 512, dtype="float16")):
        for params in blocking_candidates(p, 40):
            assert params.schedule().nest.tile_sizes[1] <= MAX_TILE_SIDE
            render(params.schedule(), "float16", Target.detect())


def test_observation_shows_float16_and_leaves_the_others_unchanged():
    state = AgentState.initial()
    graphs = {d: observe(state, MatmulProblem(64, 64, 64, dtype=d)) for d in ("float32", "float64", "bfloat16", "float16")}
    assert len({g.flat().shape for g in graphs.values()}) == 1
    assert {d: float(g.glob[4]) for d, g in graphs.items()} == {"float32": 0.0, "float64": 1.0, "bfloat16": 0.5,
                                                                "float16": 0.25}
    assert DTYPE_FEATURE["float16"] == 0.25 and len(set(DTYPE_FEATURE.values())) == len(DTYPE_FEATURE)
    assert (graphs["float16"].flat() >= 0).all()
    tensor = {d: g.nodes[-3:] for d, g in graphs.items()}      # A, B, C
    assert list(tensor["float16"][:, 23]) == [0.25] * 3
    # footprints as bfloat16's: 2-byte A and B, C in float32 (the scratch C the loops write)
    np.testing.assert_array_equal(tensor["float16"][:, 24], tensor["bfloat16"][:, 24])
    assert tensor["float16"][0, 24] < tensor["float32"][0, 24] and tensor["float16"][2, 24] == tensor["float32"][2, 24]
    same = graphs["float16"].nodes.copy()
    same[-3:, 23] = 0.5
    np.testing.assert_array_equal(same, graphs["bfloat16"].nodes)     # only the dtype feature tells them apart


def test_float16_problems_are_episodes_too():
    """float16 (dtype feature 0.25) stays in the gym environment's observation space."""
    pytest.importorskip("gymnasium")
    from agent_fakes import SyntheticRunner

    from looptune.tuner.agent.gym_env import LoopTuneGymEnv
    from looptune.tuner.measure.evaluator import Evaluator

    problems = [MatmulProblem(96, 64, 128, dtype="float16"), MatmulProblem(MAX_DIM, 1, MAX_DIM, dtype="float16")]
    env = LoopTuneGymEnv(problems, Evaluator(SyntheticRunner()), max_steps=8)
    rng = np.random.default_rng(3)
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        assert info["problem"].dtype == "float16" and obs in env.observation_space
        for _ in range(8):
            obs, reward, terminated, truncated, _ = env.step(int(rng.choice(np.flatnonzero(obs["action_mask"]))))
            assert obs in env.observation_space and np.isfinite(reward)
            if terminated or truncated:
                break


def test_shape_files_take_dtype_float16():
    ps = list(parse_shapes(["64 64 64 dtype=float16", "8 16 32 batch=2 dtype=float16 layout=tn  # skinny"]))
    assert [p.dtype for p in ps] == ["float16", "float16"] and ps[1].batch == 2 and ps[1].layout == "tn"
    assert str(ps[0]) == "64 64 64 dtype=float16"
    assert ps[0].key() == "matmul:float16:nn:t1:b1:64x64x64" and MatmulProblem.from_key(ps[0].key()) == ps[0]


@needs_cc
def test_cli_tune_float16_stores_a_record_the_runtime_serves(tmp_path):
    db = tmp_path / "db.h5"
    out = CliRunner().invoke(main, ["tune", "64", "64", "64", "--dtype", "float16", "--budget", "1",
                                    "--db", str(db), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["ok"] and data["problem"] == "matmul:float16:nn:t1:b1:64x64x64" and data["numpy_gflops"] > 0
    assert data["stored"] == str(db)
    [record] = load(str(db)).records
    assert record.problem.dtype == "float16" and record.verified
    listing = CliRunner().invoke(main, ["db", "list", str(db)])
    assert listing.exit_code == 0 and "matmul:float16:nn:t1:b1:64x64x64" in listing.output
    script = ("import numpy as np, looptune.runtime as rt\n"
              "a = np.ones((64, 64), np.float16); b = np.full((64, 64), 0.5, np.float16)\n"
              "r = rt.explain(a, b, threads=1)\n"
              "c = rt.matmul(a, b, threads=1)\n"
              "print(r.source, r.database, c.dtype, float(c[0, 0]), bool((c == 32).all()))\n")
    # the record's schedule is served even if numpy won the tuning (on a busy machine it may)
    env = dict(os.environ, LOOPTUNE_DB=str(db), LOOPTUNE_NO_EMBEDDED_DB="1", LOOPTUNE_NO_NUMPY_HANDOFF="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["exact", str(db), "float16", "32.0", "True"]
