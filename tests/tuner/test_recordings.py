"""This machine's recorded measurements (``tuner/measure/recordings.py``), what ``looptune train``
trains on: bounded, a torn line skipped, only live measurements, no stale file of an older code
generator left behind, and what ``build-db`` measures in this process, in its worker processes and
on Dask workers, all kept."""
from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest
from agent_fakes import SyntheticRunner
from click.testing import CliRunner

from looptune.database import MachineKey
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.cli import main
from looptune.tuner.measure.evaluator import Evaluator, recording_live_measurements
from looptune.tuner.measure.protocol import RunResult
from looptune.tuner.measure.recordings import MachineRecordings
from looptune.tuner.search.tune import NO_POLICY, tune
from looptune.tuner.ship import distributed
from looptune.tuner.ship.executors import run_one

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def synthetic_results(*problems: MatmulProblem) -> list[RunResult]:
    return Evaluator(SyntheticRunner()).evaluate([(p, default_schedule(p).nest) for p in problems])


def test_recordings_stay_bounded_and_skip_a_torn_line(tmp_path):
    recordings = MachineRecordings(tmp_path / "r.jsonl", max_bytes=20_000)
    problems = [MatmulProblem(16 + i, 16, 16) for i in range(60)]
    for p in problems:
        recordings.append(synthetic_results(p))
    assert os.path.getsize(recordings.path) <= 20_000
    with open(recordings.path, "a") as f:
        f.write('{"v": 1, "status": "ok", "problem_ke')             # a write cut short by a kill
    kept = {r.problem_key for r in recordings.results()}
    assert problems[-1].key() in kept and problems[0].key() not in kept and len(kept) < len(problems)


def test_replays_and_synthetic_runners_are_not_recorded_as_live_measurements(tmp_path):
    recordings = MachineRecordings(tmp_path / "r.jsonl")
    with recording_live_measurements(recordings):
        Evaluator(SyntheticRunner()).evaluate([(MatmulProblem(32, 32, 32), LoopNest.initial())])
    assert recordings.results() == []


def test_a_new_code_generator_leaves_no_stale_recordings_of_this_machine(user_dir):
    """A code-generator version bump starts a new file; the first write removes this machine's
    files of other versions (up to 32 MB each), never another machine's (a shared data directory),
    and what it cannot remove (here: a directory) it leaves, without an error."""
    machine = MachineKey.current()
    older = MachineRecordings.current(replace(machine, codegen_version="0"))
    other_machine = MachineRecordings.current(replace(machine, cpu_model="Some Other CPU"))
    for recordings in (older, other_machine):
        recordings.append(synthetic_results(MatmulProblem(16, 16, 16)))
    stuck = older.path.with_name(older.path.stem + "-stuck.jsonl")
    stuck.mkdir()
    current = MachineRecordings.current()
    assert current.path not in (older.path, other_machine.path) and current.path.parent == older.path.parent
    current.append(synthetic_results(MatmulProblem(24, 16, 8)))
    assert current.path.is_file() and not older.path.exists()
    assert other_machine.path.is_file() and stuck.is_dir()
    assert [r.problem_key for r in current.results()] == [MatmulProblem(24, 16, 8).key()]


def test_build_db_keeps_what_its_worker_processes_measured(user_dir, tmp_path, monkeypatch):
    """``--workers N`` and ``--scheduler`` tune in other processes; their replies carry what they
    timed (``tune_task``'s ``measurements``) and the driver records it."""
    sent = synthetic_results(MatmulProblem(24, 16, 8), MatmulProblem(24, 16, 16))

    class WorkerProcesses:          # PoolExecutor's interface, the workers' replies made up here
        slots = 2

        def __init__(self, workers, *, budget_s, machine, tuner=None, cores_per_worker=1):
            self.machine = machine

        def run(self, problems):
            for p in problems:
                reply = run_one(p, 0.5, synthetic_tuner, self.machine)
                yield p, {**reply, "measurements": [r.to_json() for r in sent if r.problem_key == p.key()]}

        def drain(self):
            return iter(())

        def close(self):
            pass
    monkeypatch.setattr(distributed, "PoolExecutor", WorkerProcesses)
    shapes = tmp_path / "two.txt"
    shapes.write_text("24 16 8\n24 16 16\n")
    out = CliRunner().invoke(main, ["build-db", "--shapes", str(shapes), "--workers", "2", "--no-bench", "--quiet"])
    assert out.exit_code == 0, (out.output, out.exception)
    assert sorted((r.problem_key, r.tag) for r in MachineRecordings.current().results()) == \
        sorted((r.problem_key, r.tag) for r in sent)


def synthetic_tuner(problem: MatmulProblem, budget_s: float):
    return tune(problem, budget_s=budget_s, policy=NO_POLICY, evaluator=Evaluator(SyntheticRunner()), databases=False)


def measuring_tuner(problem: MatmulProblem, budget_s: float):
    """A tuner that builds and times kernels (what a worker process runs), its runner closed after."""
    evaluator = Evaluator.local()
    try:
        return tune(problem, budget_s=budget_s, policy=NO_POLICY, evaluator=evaluator, databases=False)
    finally:
        evaluator.close()


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_a_worker_task_replies_with_what_it_timed():
    problem = MatmulProblem(24, 16, 8)
    reply = distributed.tune_task(problem.key(), 1.0, MachineKey.current().to_dict(), f"{__name__}:measuring_tuner",
                                  pin=False)
    assert reply["status"] == "ok", reply
    timed = [RunResult.from_json(row) for row in reply["measurements"]]
    assert timed and {r.problem_key for r in timed} == {problem.key()} and any(r.ok for r in timed)


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_build_db_records_what_it_measures_for_train(user_dir, tmp_path):
    pytest.importorskip("torch")
    # deferred: finetune imports torch (skipped above without it)
    from looptune.tuner.agent import finetune

    shapes = tmp_path / "one.txt"
    shapes.write_text("24 16 8\n")
    out = CliRunner().invoke(main, ["build-db", "--shapes", str(shapes), "--budget", "1", "--no-bench", "--quiet"])
    assert out.exit_code == 0, out.output
    recorded = MachineRecordings.current().results()
    assert {r.problem_key for r in recorded if r.ok} == {MatmulProblem(24, 16, 8).key()} and len(recorded) >= 2
    problems, count = finetune.choose_problems(recorded)
    assert count == 1 and problems[0] == MatmulProblem(24, 16, 8)
