"""bench (table, --json, --plot) and the shape presets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from looptune.runtime.compiler.workload import read_shapes
from looptune.tuner.ship.bench import BenchRow, geomean, table, time_interleaved
from looptune.tuner.ship.presets import PRESETS, preset_problems, preset_text

LOOPTUNE = [sys.executable, "-c", "from looptune.tuner.cli import main; main()"]
SHARED = Path(__file__).resolve().parents[3] / "shared" / "shapes"


def test_presets_parse_and_have_the_documented_sizes():
    sizes = {name: len(preset_problems(name)) for name in PRESETS}
    assert sizes["paper"] == 2197
    assert 8 <= sizes["quick"] <= 12
    assert all(n > 0 for n in sizes.values())
    quick = preset_problems("quick", threads=2)
    assert all(p.threads == 2 for p in quick) and max(p.flops for p in quick) <= 2 * 256 ** 3


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/shapes is not beside the repository")
def test_presets_agree_with_the_shared_shape_files():
    assert preset_problems("paper") == read_shapes(SHARED / "looptune-paper.txt")
    assert preset_problems("dl-public") == read_shapes(SHARED / "dl-public.txt")


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
    assert "2.00x" in text and "0.50x" in text and "1.25x" in text and "WRONG" in text
    assert f"{geomean([2.0, 0.5]):.2f}x" in text.splitlines()[-1]


def _env():
    return dict(os.environ, LOOPTUNE_DB="", LOOPTUNE_NO_EMBEDDED_DB="1")   # no database: analytic defaults


def test_bench_json_and_plot(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("48 32 64\n16 16 16 dtype=float64\n")
    db = tmp_path / "none.h5"
    plot = tmp_path / "bench.png"
    args = [*LOOPTUNE, "bench", "--shapes", str(shapes), "--db", str(db), "--json"]
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
