"""Runtime settings from the environment: unusable values are named in one warning and the
default applies; thread counts are capped and default to the detected cores; a user database
that is not a regular file is refused without being opened; a live-tuned result that cannot be
stored is still served, and the log says why it was not stored."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from looptune.runtime.compiler import environment
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.workload import MAX_THREADS, MatmulProblem
from looptune.runtime.hooks import register_live_tuner
from looptune.runtime.live import LiveTuningQueue
from looptune.runtime.configuration import RuntimeSettings, not_a_database_file
from looptune.tuner.ship import live


def warnings_about(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]


def test_thread_default_is_the_detected_core_count():
    assert RuntimeSettings.from_env({}).threads == detect_cpu().cores
    assert RuntimeSettings.from_env({"OMP_NUM_THREADS": "3,2"}).threads == 3       # OpenMP's nested form


@pytest.mark.parametrize("name", ["LOOPTUNE_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"])
def test_thread_counts_above_the_maximum_are_capped_with_one_warning(caplog, name):
    value = str(MAX_THREADS + 1 + len(name))                         # a value no other test warned about
    for _ in range(3):
        assert RuntimeSettings.from_env({name: value}).threads == MAX_THREADS
    (message,) = warnings_about(caplog, name)
    assert value in message and str(MAX_THREADS) in message


@pytest.mark.parametrize("value", ["abc", "0", "-4", "2.5"])
def test_unparsable_thread_counts_warn_once_and_fall_back(caplog, value):
    for _ in range(2):
        assert RuntimeSettings.from_env({"LOOPTUNE_NUM_THREADS": value}).threads == detect_cpu().cores
    (message,) = warnings_about(caplog, "LOOPTUNE_NUM_THREADS")
    assert repr(value) in message
    # the next variable in line still counts
    assert RuntimeSettings.from_env({"LOOPTUNE_NUM_THREADS": value, "OMP_NUM_THREADS": "3"}).threads == 3


def test_other_unusable_values_warn_and_take_the_default(caplog):
    env = {"LOOPTUNE_FALLBACK": "sometimes", "LOOPTUNE_TUNE_BUDGET": "nan", "LOOPTUNE_NO_EMBEDDED_DB": "yes"}
    settings = RuntimeSettings.from_env(env)
    assert (settings.fallback, settings.tune_budget_s) == ("nearest", 2.0)
    for name in env:
        assert len(warnings_about(caplog, name)) == 1, name
    assert RuntimeSettings.from_env({"LOOPTUNE_TUNE_BUDGET": "inf"}).tune_budget_s == 2.0
    assert RuntimeSettings.from_env({"LOOPTUNE_FALLBACK": " Tune "}).fallback == "tune"


def test_explicit_settings_are_still_checked():
    with pytest.raises(ValueError, match="threads"):
        RuntimeSettings(threads=MAX_THREADS + 1)
    with pytest.raises(ValueError, match="tune_budget_s"):
        RuntimeSettings(tune_budget_s=float("inf"))


def test_matmul_runs_with_an_oversized_thread_variable(tmp_path):
    """Every non-tiny call used to raise (numpy caps such values instead)."""
    code = ("import numpy as np; from looptune import runtime\n"
            "a = np.arange(96 * 96, dtype=np.float32).reshape(96, 96) % 7\n"
            "for _ in range(2): assert np.allclose(runtime.matmul(a, a), a @ a)\n"
            "runtime.configure(); assert np.allclose(runtime.matmul(a, a), a @ a)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "100000", "LOOPTUNE_DB": str(tmp_path / "none.h5")}
    env.pop("LOOPTUNE_NUM_THREADS", None)
    env.pop("OPENBLAS_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("OMP_NUM_THREADS") == 1, done.stderr                 # one warning, naming it


@pytest.mark.timeout(60)
def test_fifo_user_database_is_refused_without_opening_it(tmp_path, caplog):
    fifo = tmp_path / "db.fifo"
    os.mkfifo(fifo)
    assert "FIFO" in not_a_database_file(fifo)
    assert not_a_database_file(tmp_path / "absent.h5") is None
    assert RuntimeSettings.from_env({"LOOPTUNE_DB": str(fifo)}).user_db is None
    assert RuntimeSettings().updated(user_db=fifo).user_db is None
    assert warnings_about(caplog, "LOOPTUNE_DB") and warnings_about(caplog, "user_db")
    # and a process whose LOOPTUNE_DB names it serves from the other databases
    code = ("import numpy as np; from looptune import runtime\n"
            "a = np.ones((64, 64)); assert (runtime.matmul(a, a) == 64).all()\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LOOPTUNE_DB": str(fifo)},
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0 and "FIFO" in done.stderr, done.stderr


def fake_tune(problem, budget_s):
    return SimpleNamespace(problem=problem, schedule=default_schedule(problem), gflops=50.0, numpy_gflops=40.0,
                           gflops_spread=0.5, found_by="fake", policy="fake", candidates=1, ok=True)


def test_live_result_is_kept_when_the_database_cannot_be_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(live, "tune", fake_tune)
    problem = MatmulProblem(48, 48, 48)
    fresh = tmp_path / "new-folder" / "s.h5"                       # a first run: the folder is made
    assert live.tune_and_store(problem, 0.1, str(fresh)).stored and fresh.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    outcome = live.tune_and_store(problem, 0.1, str(blocker / "s.h5"))
    assert outcome is not None and not outcome.stored and "a-file" in outcome.store_error

    served = []
    register_live_tuner(lambda p, budget_s, user_db: live.tune_and_store(p, budget_s, user_db))
    try:
        queue = LiveTuningQueue(0.1, str(blocker / "s.h5"), lambda key, p, result: served.append(result))
        assert queue.submit("key", problem) and queue.wait(60)
    finally:
        register_live_tuner(None)
    assert len(served) == 1 and queue.tuned == 1 and queue.failed == 0
    (message,) = warnings_about(caplog, "could not store")
    assert "tuned, but could not store: " in message and "a-file" in message


def test_flags_and_paths():
    assert environment.flag("X", {"X": "1"}) and not environment.flag("X", {}) and not environment.flag("X", {"X": "0"})
    assert environment.user_db_path({"LOOPTUNE_DB": ""}) is None
    assert environment.user_db_path({"LOOPTUNE_DB": "~/x.h5"}) == Path("~/x.h5").expanduser()
    assert environment.compiler_command({"CC": "gcc"}) == "gcc"
    assert environment.compiler_command({"CC": "gcc", "LOOPTUNE_CC": "clang"}) == "clang"
    assert environment.positive_seconds("B", 2.0, {"B": "1e309"}) == 2.0          # inf


def test_runtime_settings_is_the_function_after_the_configuration_module_loads():
    import looptune.runtime.configuration  # noqa: F401  (once named settings, it shadowed the function)
    from looptune import runtime

    assert callable(runtime.settings) and runtime.settings().threads >= 1
