"""``looptune train --minutes M`` and this machine's policy: training end to end on recorded and
synthetic measurements (no compiler, seconds), the atomic save, which policy ``tune``, ``build-db``
and ``info`` use, the one warning for a machine policy that cannot serve, and bad input."""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest
from agent_fakes import SyntheticRunner
from click.testing import CliRunner

pytest.importorskip("torch")

from looptune.database import MachineKey
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent import finetune, weights
from looptune.tuner.agent.policy import DEFAULT_WEIGHTS, MACHINE, SHIPPED, Policy, PolicyError
from looptune.tuner.agent.weights import machine_policy_path, policy_identity, read_weights, write_weights
from looptune.tuner.cli import main
from looptune.tuner.measure.evaluator import Evaluator
from looptune.tuner.search import tune as tune_module
from looptune.tuner.search.tune import NO_POLICY, resolve_policy, tune
from looptune.tuner.ship.tuners import close_tuner, make_tuner

MINUTES = "0.05"          # 3 s: torch's optimizer import takes most of the first second


def train(*args, code=0):
    out = CliRunner().invoke(main, ["train", "--minutes", MINUTES, *args])
    assert out.exit_code == code, (out.exit_code, out.output, out.exception)
    return out


def install_machine_policy() -> bytes:
    """A machine policy as ``train`` leaves one: the shipped weights, keyed by this machine."""
    params, meta = read_weights(DEFAULT_WEIGHTS)
    write_weights(machine_policy_path(), params, {**meta, "machine": policy_identity(MachineKey.current()),
                                                   "name": "installed"})
    assert Policy.in_use().source == MACHINE
    return machine_policy_path().read_bytes()


def test_train_end_to_end_on_recorded_measurements(synthetic):
    out = train("--json")
    report = json.loads(out.stdout)
    assert report["problems"] + report["held_out"] == finetune.MIN_PROBLEMS and report["held_out"] >= 2
    assert report["recorded_problems"] >= 1 and report["steps"] > 0 and report["evaluations"] >= 2
    assert report["start"] == f"shipped ({Policy.load(DEFAULT_WEIGHTS).name})"
    confirmed = report["confirmed_score"] is not None and report["confirmed_score"] > report["confirmed_start_score"] * 1.01
    assert report["saved"] == os.path.exists(report["path"]) == confirmed
    assert "train" in out.stderr                              # the progress bar
    assert report["path"] == str(machine_policy_path()) and report["path"].startswith(str(synthetic))


def test_a_better_policy_is_saved_and_used_by_tune_build_db_and_info(synthetic, scripted):
    scripted(1.0, 2.0)
    out = train()
    path = machine_policy_path()
    assert "saved this machine's policy to" in out.stdout and str(path) in out.stdout
    params, meta = read_weights(path)
    assert meta["heldout_score"] == 2.0 and meta["start_score"] == 1.0
    assert meta["machine"] == policy_identity(MachineKey.current()) and "codegen_version" not in meta["machine"]
    policy = Policy.in_use()                                   # tune() and build-db's agent tuner load this
    assert policy.source == MACHINE and policy.path == str(path) and policy.name == meta["name"]
    assert resolve_policy(None).source == MACHINE
    res = tune(MatmulProblem(80, 64, 48), budget_s=2.0, evaluator=Evaluator(SyntheticRunner()), databases=False)
    assert res.ok and res.policy == meta["name"]
    info = json.loads(CliRunner().invoke(main, ["info", "--json"]).stdout)
    assert info["policy_source"] == MACHINE and info["policy_path"] == str(path)
    assert str(path) in CliRunner().invoke(main, ["info"]).stdout


def test_policy_option_still_overrides_and_none_still_disables(synthetic, monkeypatch):
    install_machine_policy()
    seen = []
    real_tune = tune_module.tune

    def synthetic_tune(problem, *, budget_s, policy):
        seen.append(policy)
        return real_tune(problem, budget_s=budget_s, policy=policy, evaluator=Evaluator(SyntheticRunner()),
                         databases=False)

    monkeypatch.setattr(tune_module, "tune", synthetic_tune)
    for option in ([], ["--policy", DEFAULT_WEIGHTS], ["--policy", "none"]):
        out = CliRunner().invoke(main, ["tune", "64", "48", "40", "--budget", "2", "--json", *option])
        assert out.exit_code == 0, out.output
    default, explicit, none = seen
    assert default.source == MACHINE and explicit.path == DEFAULT_WEIGHTS and none == NO_POLICY


@pytest.mark.parametrize("scores", [(1.0,), (1.0, 1.005)], ids=["no-gain", "gain-under-MIN_GAIN"])
def test_nothing_better_leaves_the_previous_policy_as_it_was(synthetic, scripted, scores):
    before = install_machine_policy()
    scripted(*scores)
    out = train()
    assert "kept this machine's" in out.stdout
    assert machine_policy_path().read_bytes() == before


def test_ctrl_c_keeps_the_best_policy_so_far(synthetic, scripted):
    scripted(1.0, 2.0, KeyboardInterrupt)
    out = train(code=130)
    assert "interrupted" in out.stdout
    assert read_weights(machine_policy_path())[1]["heldout_score"] == 2.0


def test_ctrl_c_before_anything_beat_the_start_writes_nothing(synthetic, scripted):
    scripted(1.0, KeyboardInterrupt)
    out = train(code=130)
    assert "kept shipped" in out.stdout and not machine_policy_path().exists()


@pytest.mark.parametrize("fault", ["disk full while writing", "killed before the rename"])
def test_a_save_that_fails_leaves_the_previous_policy_intact(synthetic, monkeypatch, scripted, fault):
    before = install_machine_policy()
    scripted(1.0, 3.0)
    if fault == "disk full while writing":
        def savez(f, **arrays):
            f.write(b"PK\x03\x04 half an archive")
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(weights.np, "savez_compressed", savez)
        out = train(code=1)
        assert "No space left on device" in out.output and "unchanged" in out.output
    else:
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith(".npz"):
                raise KeyboardInterrupt
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
        train(code=130)
    assert machine_policy_path().read_bytes() == before
    assert sorted(p.name for p in synthetic.iterdir() if p.name.startswith(".")) == []   # no temporary left


def junk(path, shipped):
    path.write_bytes(b"not an archive at all")


def foreign(path, shipped):
    params, meta = shipped
    other = {**policy_identity(MachineKey.current()), "cpu_model": "Some Other CPU"}
    write_weights(path, params, {**meta, "machine": other})


def other_observation(path, shipped):
    params, meta = shipped
    write_weights(path, params, {**meta, "machine": policy_identity(MachineKey.current()), "observation": "graph-v0"})


def missing_array(path, shipped):
    params, meta = shipped
    write_weights(path, {k: v for k, v in params.items() if k != "head.weight"},
                  {**meta, "machine": policy_identity(MachineKey.current())})


def a_directory(path, shipped):
    path.mkdir()


@pytest.mark.parametrize("damage, why", [(junk, "not a LoopTune policy file"), (foreign, "another machine"),
                                         (other_observation, "observation"), (missing_array, "head.weight"),
                                         (a_directory, "directory")])
def test_a_machine_policy_that_cannot_serve_is_one_warning_and_the_shipped_policy(user_dir, caplog, damage, why):
    path = machine_policy_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    damage(path, read_weights(DEFAULT_WEIGHTS))
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        first, second = Policy.in_use(), resolve_policy(None)
        info = json.loads(CliRunner().invoke(main, ["info", "--json"]).stdout)
    assert first.source == second.source == SHIPPED == info["policy_source"] and first.path == DEFAULT_WEIGHTS
    warnings = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert why in warnings[0] and "using the shipped policy" in warnings[0]


def raw_policy(path, params, meta):
    """A policy file as anything but ``write_weights`` might leave one: arrays of any dtype, any metadata."""
    arrays = {**params, "__meta__": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def bad_meta(**changes):
    def damage(path, shipped):
        params, meta = shipped
        raw_policy(path, params, {**meta, "machine": policy_identity(MachineKey.current()), **changes})
    return damage


def bad_config(**changes):
    def damage(path, shipped):
        params, meta = shipped
        bad_meta(config={**meta["config"], **changes})(path, shipped)
    return damage


def bad_array(name, make):
    def damage(path, shipped):
        params, meta = shipped
        raw_policy(path, {**params, name: make(params[name])}, {**meta, "machine": policy_identity(MachineKey.current())})
    return damage


BAD_FILES = {
    "max_steps-None": bad_meta(max_steps=None), "max_steps-twelve": bad_meta(max_steps="twelve"),
    "max_steps-0": bad_meta(max_steps=0), "max_steps-list": bad_meta(max_steps=[12]),
    "gamma-high": bad_meta(gamma="high"), "gamma-None": bad_meta(gamma=None), "gamma-7": bad_meta(gamma=7),
    "actions-int": bad_meta(actions=5), "layers-three": bad_config(layers="three"), "layers-None": bad_config(layers=None),
    "arch-unknown": bad_config(arch="transformer"), "hidden-wide": bad_config(hidden="wide"),
    "strings": bad_array("head.weight", lambda a: np.full(a.shape, "abc")),
    "number-strings": bad_array("head.weight", lambda a: a.astype(str)),
    "dates": bad_array("adv.bias", lambda a: np.zeros(a.shape, dtype="datetime64[D]")),
    "complex": bad_array("adv.bias", lambda a: a.astype(np.complex64)),
}


@pytest.mark.parametrize("damage", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_metadata_or_array_dtypes_are_one_warning_and_the_shipped_policy_everywhere(user_dir, caplog, damage):
    path = machine_policy_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    damage(path, read_weights(DEFAULT_WEIGHTS))
    with caplog.at_level(logging.WARNING, logger="looptune.runtime"):
        first, second = Policy.in_use(), resolve_policy(None)
        info = CliRunner().invoke(main, ["info", "--json"])
        tuner = make_tuner("agent")
        close_tuner(tuner)
    assert info.exit_code == 0, (info.output, info.exception)
    assert first.source == second.source == tuner.policy.source == SHIPPED == json.loads(info.stdout)["policy_source"]
    warnings = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1 and "using the shipped policy" in warnings[0], warnings
    with pytest.raises(PolicyError, match="policy"):          # named explicitly, the same file is refused in one line
        Policy.load(path)
    out = CliRunner().invoke(main, ["tune", "8", "8", "8", "--policy", str(path)])
    assert out.exit_code == 2 and "--policy" in out.output and str(path) in out.output, (out.output, out.exception)


def test_policy_load_is_the_shipped_policy_and_in_use_this_machines(user_dir):
    """``Policy.load()`` keeps meaning the shipped weights (tools/evaluate.py, bench_policy.py and
    wheel_smoke.py rely on it); tune(), build-db's agent tuner, live tuning and info ask ``in_use``."""
    install_machine_policy()
    shipped = Policy.load()
    assert shipped.source == SHIPPED and shipped.path == DEFAULT_WEIGHTS and shipped.name != "installed"
    assert Policy.in_use().name == resolve_policy(None).name == "installed"
    tuner = make_tuner("auto")
    close_tuner(tuner)
    assert tuner.policy.source == MACHINE and tuner.policy.name == "installed"


def test_info_says_the_shipped_policy_without_a_machine_policy(user_dir):
    out = CliRunner().invoke(main, ["info"])
    assert out.exit_code == 0
    line = next(line for line in out.stdout.splitlines() if line.startswith("policy "))
    assert "shipped" in line


@pytest.mark.parametrize("minutes", ["0", "-1", "-0.0", "nan", "inf", "ten"])
def test_minutes_that_are_not_a_positive_finite_number_are_refused_at_parse_time(user_dir, minutes, monkeypatch):
    monkeypatch.setattr(finetune, "finetune", lambda *a, **k: pytest.fail("must not start training"))
    out = CliRunner().invoke(main, ["train", "--minutes", minutes])
    assert out.exit_code == 2 and "--minutes" in out.output
    assert "finite positive number of minutes" in out.output or "not a number of minutes" in out.output


def test_without_torch_train_names_the_extra_to_install(user_dir, monkeypatch):
    for name in ("looptune.tuner.agent.finetune", "looptune.tuner.agent.dqn", "looptune.tuner.agent.nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch now raises ImportError
    out = CliRunner().invoke(main, ["train", "--minutes", "1"])
    assert out.exit_code == 1 and out.output.count("Error:") == 1
    assert "needs torch" in out.output and "looptune[train]" in out.output
