"""bench (table, --json, --plot) and the shape presets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from looptune.database import MachineKey, Record, save
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.workload import MatmulProblem, read_shapes
from looptune.tuner.ship.bench import BenchRow, geomean, served_summary, table
from looptune.tuner.ship.presets import PRESETS, preset_problems, preset_text
from looptune.tuner.ship.timing import time_interleaved

LOOPTUNE = [sys.executable, "-c", "from looptune.tuner.cli import main; main()"]
SHAPES = Path(__file__).resolve().parents[2] / "tools" / "shapes"


def test_presets_parse_and_have_the_documented_sizes():
    sizes = {name: len(preset_problems(name)) for name in PRESETS}
    assert sizes["paper"] == 2197
    assert 8 <= sizes["quick"] <= 12
    assert all(n > 0 for n in sizes.values())
    quick = preset_problems("quick", threads=2)
    assert all(p.threads == 2 for p in quick) and max(p.flops for p in quick) <= 2 * 256 ** 3


def test_presets_agree_with_the_shape_files():
    assert preset_problems("paper") == read_shapes(SHAPES / "looptune-paper.txt")
    assert preset_problems("dl-public") == read_shapes(SHAPES / "dl-public.txt")


def test_unknown_preset():
    with pytest.raises(KeyError, match="presets: quick"):
        preset_text("nope")


def test_interleaved_timing_returns_a_median_per_function():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    seconds = time_interleaved({"a": a, "b": b}, min_repeats=3, min_time_s=0.0, min_sample_s=1e-4)
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    assert calls["a"] > 3 and calls["b"] > 3


def test_table_has_ratios_and_geomean():
    rows = [BenchRow("64 64 64", "k1", "exact", 100.0, 50.0, 80.0, True, 1e-7),
            BenchRow("32 32 32", "k2", "nearest", 25.0, 50.0, None, False, 0.5)]
    text = table(rows)
    lines = text.splitlines()
    assert "vs best" in lines[0] and "vs numpy" not in lines[0] and "WRONG" in text
    assert lines[2].split()[-3:] == ["torch", "1.25x", "ok"]          # 100 GFLOPS against torch's 80, not numpy's 50
    assert lines[3].split()[-3:] == ["numpy", "0.50x", "WRONG"]
    foot = lines[-2].split()      # LoopTune over numpy, over torch, over the best library
    assert foot[-3:] == [f"{geomean([2.0, 0.5]):.2f}x", "1.25x", f"{geomean([1.25, 0.5]):.2f}x"]
    assert "no problem has an exact record" in text.splitlines()[-1]


def test_table_puts_stored_next_to_served_and_flags_shortfalls():
    rows = [BenchRow("64 64 64", "k1", "exact", 90.0, 50.0, None, True, 1e-7, 60.0, 100.0),     # 0.90, 0.60 !
            BenchRow("32 32 32", "k2", "numpy", 40.0, 40.0, None, True, 0.0, 40.0, 40.0),       # 1.00, 1.00
            BenchRow("16 16 16", "k3", "nearest", 10.0, 50.0, None, True, 0.0, 9.0)]            # no record
    assert rows[0].served_vs_stored == pytest.approx(0.9) and rows[0].served_out_vs_stored == pytest.approx(0.6)
    assert rows[0].below_stored and not rows[1].below_stored and not rows[2].below_stored
    assert rows[2].served_vs_stored is None and rows[2].served_out_vs_stored is None
    lines = table(rows).splitlines()
    assert "stored" in lines[0] and "srv/sto" in lines[0] and "out/sto" in lines[0]
    assert " 0.60!" in lines[2] and " 0.90 " in lines[2] and "!" not in lines[3] and "!" not in lines[4]
    assert lines[2].split()[3] == "exact" and lines[3].split()[3] == "numpy"
    summary = served_summary(rows)
    assert summary == lines[-1]
    assert f"geomean {geomean([0.9, 1.0]):.2f} (fresh output)" in summary
    assert f"{geomean([0.6, 1.0]):.2f} (out=)" in summary and "1 below 0.9" in summary


def _env():
    return dict(os.environ, LOOPTUNE_DB="", LOOPTUNE_NO_EMBEDDED_DB="1")   # no database: analytic defaults


def test_bench_json_and_plot(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("48 32 64\n16 16 16 dtype=float64\n")
    db = tmp_path / "none.h5"
    plot = tmp_path / "bench.png"
    # the generated kernels alone (no trial against numpy), so every row is the analytic default's
    args = [*LOOPTUNE, "bench", "--shapes", str(shapes), "--db", str(db), "--json", "--no-handoff"]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(plot)]
    except ImportError:
        plot = None
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["threads"] == 1 and report["all_correct"]
    assert [r["problem"] for r in report["rows"]] == ["48 32 64", "16 16 16 dtype=float64"]
    for row in report["rows"]:
        assert row["source"] == "default" and row["looptune_gflops"] > 0 and row["numpy_gflops"] > 0
        assert row["vs_numpy"] == pytest.approx(row["looptune_gflops"] / row["numpy_gflops"])
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _record(problem: MatmulProblem, gflops: float, numpy_gflops: float) -> Record:
    return Record(problem, MachineKey.current(), default_schedule(problem).trace, gflops, 0.0, numpy_gflops, True)


def _bench_json(args, env) -> dict:
    done = subprocess.run([*LOOPTUNE, "bench", *args, "--json", "--no-torch"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_bench_reports_stored_against_served_with_and_without_the_numpy_handoff(tmp_path):
    kept = MatmulProblem(48, 32, 64)                      # tiny stored figure: served beats it
    handed = MatmulProblem(40, 24, 32, dtype="float64")   # "no candidate beat numpy": numpy serves it
    db = tmp_path / "db.h5"
    save(db, [_record(kept, 1e-3, 1e-4), _record(handed, 1e-3, 1e6)])
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("48 32 64\n40 24 32 dtype=float64\n20 20 20\n")
    env = dict(_env(), LOOPTUNE_FALLBACK="off")
    args = ["--shapes", str(shapes), "--db", str(db)]

    # with the hand-off: the record that says numpy was faster hands its problem to numpy
    report = _bench_json(args, env)
    assert report["numpy_handoff"] is True and report["all_correct"]
    handed_row = {r["problem"]: r for r in report["rows"]}["40 24 32 dtype=float64"]
    assert handed_row["source"] == "numpy" and handed_row["stored_gflops"] == 1e6 and handed_row["below_stored"]

    # without it (and without trials against numpy, which would decide by timing) every row is a kernel
    report = _bench_json([*args, "--no-handoff"], env)
    assert report["numpy_handoff"] is False and report["all_correct"]
    rows = {r["problem"]: r for r in report["rows"]}
    kept_row, handed_row, none_row = rows["48 32 64"], rows["40 24 32 dtype=float64"], rows["20 20 20"]
    assert kept_row["source"] == "exact" and kept_row["stored_gflops"] == 1e-3 and not kept_row["below_stored"]
    assert kept_row["served_vs_stored"] == pytest.approx(kept_row["looptune_gflops"] / 1e-3)
    assert kept_row["served_out_vs_stored"] == pytest.approx(kept_row["looptune_out_gflops"] / 1e-3)
    assert handed_row["source"] == "exact" and handed_row["stored_gflops"] == 1e-3 and not handed_row["below_stored"]
    assert none_row["source"] == "default" and none_row["stored_gflops"] is None and not none_row["below_stored"]
    assert none_row["served_vs_stored"] is None and none_row["looptune_out_gflops"] > 0
    assert report["geomean_served_vs_stored"] == pytest.approx(
        geomean([kept_row["served_vs_stored"], handed_row["served_vs_stored"]]))


def test_bench_table_shows_the_served_summary(tmp_path):
    problem = MatmulProblem(48, 32, 64)
    db = tmp_path / "db.h5"
    save(db, [_record(problem, 1e6, 1.0)])               # an unreachable stored figure: flagged
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("48 32 64\n")
    # the record's kernel serves (no trial against numpy, which would decide by timing)
    done = subprocess.run([*LOOPTUNE, "bench", "--shapes", str(shapes), "--db", str(db), "--no-torch", "--no-handoff"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("served/stored over 1 exact records") and "1 below 0.9" in lines[-1]
    assert "!" in next(line for line in lines if line.startswith("48 32 64"))
