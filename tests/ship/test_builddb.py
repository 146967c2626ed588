"""build-db: records committed by the one driver, resumable, interrupt-safe, kill -9-safe."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from looptune.database import MachineKey, load
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.policy import Policy, PolicyError
from looptune.tuner.cli import main
from looptune.tuner.measure.protocol import RunResult, RunStatus
from looptune.tuner.search.loop import TuneResult
from looptune.tuner.ship.builddb import build_db, plan
from looptune.tuner.ship.executors import run_one
from looptune.tuner.ship.tuners import AgentTuner, SearchTuner, close_tuner, make_tuner

import ship_fakes

HERE = Path(__file__).parent
LOOPTUNE = [sys.executable, "-m", "looptune.tuner.cli"]   # the CLI of this interpreter, not the PATH's


def problems(*sizes, **kw):
    return [MatmulProblem(m, n, k, **kw) for m, n, k in sizes]


def cli_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.pop("LOOPTUNE_DB", None)
    env.update(extra)
    return env


def test_builds_every_problem_and_commits_records_for_this_machine(tmp_path):
    db = tmp_path / "s.h5"
    ps = problems((16, 16, 16), (32, 16, 48)) + problems((24, 24, 24), dtype="float64")
    seen = []
    report = build_db(ps + ps[:1], db, budget_s=0.1, tuner=ship_fakes.fake_tune, on_reply=lambda p, r: seen.append(p))
    assert (report.total, report.done, report.skipped, report.failed) == (3, 3, 0, 0)
    assert len(seen) == 3                                   # the duplicate problem is tuned once
    records = {r.problem.key(): r for r in load(db)}
    assert set(records) == {p.key() for p in ps}
    machine = MachineKey.current()
    for r in records.values():
        assert r.machine == machine and r.verified
        assert r.policy == "fake-v0" and r.search == "fake" and r.candidates == 3
        assert r.numpy_gflops == 40.0 and r.gflops_spread == pytest.approx(0.5)


def test_rerun_skips_what_the_database_has(tmp_path):
    db = tmp_path / "s.h5"
    first = problems((16, 16, 16), (32, 32, 32))
    build_db(first, db, tuner=ship_fakes.fake_tune)
    calls = []

    def tuner(problem, budget_s):
        calls.append(problem)
        return ship_fakes.fake_tune(problem, budget_s)

    report = build_db(first + problems((48, 48, 48)), db, tuner=tuner)
    assert calls == problems((48, 48, 48))
    assert (report.skipped, report.done) == (2, 1)
    assert len(load(db)) == 3


def test_records_of_another_machine_do_not_count_as_done(tmp_path):
    db = tmp_path / "s.h5"
    ps = problems((16, 16, 16))
    other = MachineKey(**{**MachineKey.current().to_dict(), "compiler": "gcc 1.0 (another toolchain)"})
    build_db(ps, db, tuner=ship_fakes.fake_tune, machine=other)
    todo, done = plan(ps, db, MachineKey.current())
    assert todo == ps and done == []


def test_a_failed_problem_is_reported_not_stored_and_retried_next_time(tmp_path):
    db = tmp_path / "s.h5"
    ps = problems((13, 16, 16), (16, 16, 16))
    report = build_db(ps, db, tuner=ship_fakes.fake_tune)
    assert (report.done, report.failed) == (1, 1)
    assert report.failures[0][0] == ps[0].key() and "wrong answer" in report.failures[0][1]
    assert plan(ps, db, MachineKey.current())[0] == ps[:1]


def test_a_tuner_that_raises_fails_one_problem_only(tmp_path):
    def broken(problem, budget_s):
        if problem.m == 16:
            raise RuntimeError("tuner bug")
        return ship_fakes.fake_tune(problem, budget_s)

    report = build_db(problems((16, 16, 16), (32, 32, 32)), tmp_path / "s.h5", tuner=broken)
    assert (report.done, report.failed) == (1, 1) and "tuner bug" in report.failures[0][1]


def test_ctrl_c_keeps_what_finished(tmp_path):
    db = tmp_path / "s.h5"
    ps = problems((16, 16, 16), (32, 32, 32), (48, 48, 48), (64, 64, 64))
    report = build_db(ps, db, tuner=ship_fakes.Interrupting(), commit_interval_s=3600)
    assert report.interrupted and report.done == 2
    assert {r.problem.key() for r in load(db)} == {p.key() for p in ps[:2]}
    assert "rerun the same command" in report.summary()


def test_a_record_carries_the_tune_result():
    p = MatmulProblem(64, 64, 64)
    run = RunResult(RunStatus.OK, seconds=1e-5, q1_seconds=0.9e-5, q3_seconds=1.1e-5, gflops=52.4,
                    numpy_seconds=2e-5, numpy_gflops=26.2)
    reply = run_one(p, 1.0, lambda problem, budget_s: TuneResult(p, default_schedule(p), run, "policy-beam",
                                                                 "dqn-v1", 7, 1.9), MachineKey.current())
    assert reply["status"] == "ok" and reply["gflops"] == 52.4
    record = json.loads(reply["record"])
    assert record["gflops_spread"] == pytest.approx(0.2 * 52.4) and record["numpy_gflops"] == 26.2
    assert (record["search"], record["policy"]) == ("policy-beam", "dqn-v1")
    failed = TuneResult(p, default_schedule(p), RunResult(RunStatus.CRASH, error="boom"), "none", "", 1, 0.1)
    reply = run_one(p, 1.0, lambda problem, budget_s: failed, MachineKey.current())
    assert reply["status"] == "failed" and reply["error"] == "boom" and "record" not in reply


def test_a_problem_too_large_for_the_budget_fails_fast_once(tmp_path):
    """8192^3 cannot be timed in 0.5 s: nothing is measured, and the failure is recorded
    (unverified, never served) so that a rerun skips the problem instead of failing again."""
    db = tmp_path / "s.h5"
    big = problems((8192, 8192, 8192))
    report = build_db(big, db, budget_s=0.5, tuner="agent")
    assert (report.done, report.failed) == (0, 1) and report.seconds < 30
    assert "budget" in report.failures[0][1] and "prune --unverified" in report.failures[0][1]
    (record,) = load(db).records
    assert record.problem == big[0] and not record.verified and record.search == "over-budget"
    again = build_db(big, db, budget_s=0.5, tuner="agent")
    assert (again.skipped, again.failed, again.done) == (1, 0, 0)


def test_cli_json_report(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("# two problems\n16 16 16\n13 8 8\n")
    db = tmp_path / "s.h5"
    result = CliRunner().invoke(main, ["build-db", "--shapes", str(shapes), "--db", str(db), "--tuner",
                                       "ship_fakes:fake_tune", "--json"])
    assert result.exit_code == 1, result.output          # one failure: a non-zero exit
    report = json.loads(result.output)
    assert (report["total"], report["done"], report["failed"]) == (2, 1, 1)
    result = CliRunner().invoke(main, ["build-db", "--preset", "nope", "--db", str(db)])
    assert result.exit_code == 2 and "nope" in result.output


def test_cli_shape_file_with_bfloat16_lines(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("64 64 64 dtype=bfloat16\n32 48 80 dtype=bfloat16 layout=tn batch=2\n64 64 64\n")
    db = tmp_path / "s.h5"
    result = CliRunner().invoke(main, ["build-db", "--shapes", str(shapes), "--db", str(db), "--tuner",
                                       "ship_fakes:fake_tune", "--json", "--no-bench"])
    assert result.exit_code == 0, result.output
    keys = sorted(r.problem.key() for r in load(db))
    assert keys == ["matmul:bfloat16:nn:t1:b1:64x64x64", "matmul:bfloat16:tn:t1:b2:32x48x80",
                    "matmul:float32:nn:t1:b1:64x64x64"]


def _record_count(db: Path) -> int:
    try:
        return len(load(db))
    except Exception:
        return 0


def _start_build(db: Path, shapes: Path, **env) -> subprocess.Popen:
    cmd = [*LOOPTUNE, "build-db", "--shapes", str(shapes), "--db", str(db),
           "--tuner", "ship_fakes:fake_tune", "--quiet", "--no-bench"]
    return subprocess.Popen(cmd, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc, db, at_least, timeout=60.0):
    deadline = time.monotonic() + timeout
    while _record_count(db) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "build made no progress"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_mid_build_then_rerun_finishes_without_redoing(tmp_path):
    shapes = tmp_path / "shapes.txt"
    sizes = [(16 + i, 16, 16) for i in range(16)]
    shapes.write_text("".join(f"{m} {n} {k}\n" for m, n, k in sizes))
    db = tmp_path / "s.h5"
    proc = _start_build(db, shapes, LOOPTUNE_FAKE_SLEEP="0.4")
    try:
        _wait_for_records(proc, db, 3)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    committed = {r.problem.key() for r in load(db)}       # the file is whole: it loads and validates
    assert 3 <= len(committed) < len(sizes)
    rerun = subprocess.run([*LOOPTUNE, "build-db", "--shapes", str(shapes),
                            "--db", str(db), "--tuner", "ship_fakes:fake_tune", "--json"],
                           env=cli_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["skipped"] == len(committed) and report["done"] == len(sizes) - len(committed)
    assert {r.problem.key() for r in load(db)} == {MatmulProblem(*s).key() for s in sizes}


@pytest.mark.slow
def test_sigterm_commits_what_finished_and_exits_130(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("".join(f"{16 + i} 16 16\n" for i in range(30)))
    db = tmp_path / "s.h5"
    proc = _start_build(db, shapes, LOOPTUNE_FAKE_SLEEP="0.2")
    try:
        _wait_for_records(proc, db, 2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in out and "rerun" in out
    assert 2 <= _record_count(db) < 30


@pytest.mark.slow
def test_console_script_quick_preset_end_to_end(tmp_path):
    """The Quickstart's job, for real (policy, compiler, measurement, database, bench table),
    on the quick preset with a short budget."""
    db = tmp_path / "s.h5"
    done = subprocess.run([*LOOPTUNE, "build-db", "--preset", "quick", "--db", str(db), "--budget", "0.4"],
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 tuned, 0 already in the database, 0 failed of 10 problems" in done.stdout
    assert "geomean" in done.stdout and "WRONG" not in done.stdout     # ends with the bench table
    assert len(load(db)) == 10


def test_make_tuner_names_the_built_in_strategies(monkeypatch):
    for spec, kind in (("auto", AgentTuner), ("agent", AgentTuner), ("search", SearchTuner)):
        tuner = make_tuner(spec)
        assert isinstance(tuner, kind)
        close_tuner(tuner)
    assert make_tuner("ship_fakes:fake_tune") is ship_fakes.fake_tune
    assert isinstance(make_tuner("ship_fakes:Interrupting"), ship_fakes.Interrupting)

    def no_policy(*args, **kwargs):
        raise PolicyError("no weights")

    monkeypatch.setattr(Policy, "load", no_policy)            # as if the weights were missing
    tuner = make_tuner("auto")
    assert isinstance(tuner, SearchTuner)
    close_tuner(tuner)
    with pytest.raises(PolicyError):
        make_tuner("agent")
    with pytest.raises(ValueError):
        make_tuner("no-colon")


def test_search_tuner_stores_a_verified_measured_schedule(tmp_path):
    db = tmp_path / "s.h5"
    report = build_db(problems((40, 24, 56)), db, budget_s=0.5, tuner="search")
    assert (report.done, report.failed) == (1, 0), report.failures
    (record,) = load(db).records
    assert record.verified and record.gflops_median > 0 and record.numpy_gflops > 0
    assert record.search in ("default", "random-search") and record.candidates >= 1
