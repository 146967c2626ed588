"""Honest baselines: which OpenBLAS core numpy runs, which fits the CPU, the child-process numpy,
and ``looptune bench`` naming the core and comparing against the best library."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from looptune.runtime.compiler.machine import CpuInfo
from looptune.tuner.ship.baselines import baseline_core, blas_info, fitting_core, numpy_blas_entry
from looptune.tuner.ship.timing import LocalSampler, time_interleaved, turn_order
from looptune.tuner.ship.bench import BenchRow, baselines_line, table, to_json

LOOPTUNE = [sys.executable, "-c", "from looptune.tuner.cli import main; main()"]
AVX2 = ("avx", "avx2", "fma", "sse4_2")
AVX512 = (*AVX2, "avx512bw", "avx512dq", "avx512f", "avx512vl")


def _cpu(features=AVX512, extensions=(), model="Fake CPU", arch="x86_64") -> CpuInfo:
    return CpuInfo(arch=arch, model_name=model, features=tuple(sorted(features)), cores=2, l1d_bytes=32 << 10,
                   l2_bytes=1 << 20, l3_bytes=32 << 20, machine_cores=2, extensions=tuple(sorted(extensions)))


def _pool(core: str, api: str = "openblas") -> list[dict]:
    return [{"user_api": "openmp", "internal_api": "openmp", "prefix": "libgomp", "version": None},
            {"user_api": "blas", "internal_api": api, "prefix": "libscipy_openblas", "version": "0.3.31.188.0",
             "filepath": "/site-packages/numpy.libs/libscipy_openblas64_.so", "architecture": core}]


def test_haswell_on_an_avx512_cpu_is_below_and_skylakex_fits():
    info = blas_info(_pool("Haswell"), _cpu(), forced="")
    assert info.core == "Haswell" and info.core_isa == "avx2" and info.cpu_isa == "avx512"
    assert info.below and info.fit == "SkylakeX"
    assert baseline_core(info) == "SkylakeX" and baseline_core(info, "off") is None
    assert "Haswell kernels" in info.describe() and "below this CPU's AVX-512" in info.describe()
    assert info.to_dict()["below"] is True and info.to_dict()["prefix"] == "libscipy_openblas"


def test_skylakex_on_avx512_and_haswell_on_avx2_are_not_below():
    info = blas_info(_pool("SkylakeX"), _cpu(), forced="")
    assert not info.below and info.fit == "SkylakeX" and baseline_core(info) is None
    assert baseline_core(info, "Cooperlake") == "Cooperlake"          # asked for by name: always
    info = blas_info(_pool("Haswell"), _cpu(AVX2), forced="")
    assert not info.below and info.fit == "Haswell" and baseline_core(info) is None
    assert "this CPU's ISA" in info.describe()


def test_the_fitting_core_follows_the_cpu_features():
    assert fitting_core(_cpu(extensions=("avx512_bf16",), model="AMD Ryzen 9 9950X")) == "Cooperlake"   # Zen 5
    assert fitting_core(_cpu(extensions=("amx_bf16", "amx_tile", "avx512_bf16"))) == "SapphireRapids"
    assert fitting_core(_cpu(AVX2, model="AMD EPYC 7B13")) == "Zen"
    assert fitting_core(_cpu(("neon", "asimd"), arch="aarch64")) is None
    zen5 = blas_info(_pool("Haswell"), _cpu(extensions=("avx512_bf16",), model="AMD EPYC 9B45"), forced="")
    assert zen5.below and baseline_core(zen5) == "Cooperlake"
    # SkylakeX on an AMX CPU: the same AVX-512 float kernels, not below
    assert not blas_info(_pool("SkylakeX"), _cpu(extensions=("amx_bf16", "amx_tile", "avx512_bf16")), forced="").below


def test_a_forced_core_is_named_and_other_blas_libraries_are_not_judged():
    info = blas_info(_pool("Haswell"), _cpu(), forced="haswell")
    assert info.below and "forced by OPENBLAS_CORETYPE=haswell (numpy runs that core)" in info.describe()
    fell_back = blas_info(_pool("SkylakeX"), _cpu(), forced="SapphireRapids")
    assert "OPENBLAS_CORETYPE=SapphireRapids is set; OpenBLAS runs SkylakeX" in fell_back.describe()
    mkl = blas_info(_pool("", api="mkl"), _cpu(), forced="")
    assert not mkl.below and baseline_core(mkl) is None
    assert not blas_info([], _cpu(), forced="").below
    pool = [{"user_api": "blas", "internal_api": "openblas", "filepath": "/torch/lib/libopenblas.so", "architecture": "Zen"},
            *_pool("SkylakeX")]
    assert numpy_blas_entry(pool)["architecture"] == "SkylakeX"        # numpy's, not another package's


def test_the_timer_takes_turns_with_samplers():
    order: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def prepare(self, min_sample_s):
            pass

        def sample(self):
            order.append(self.name)
            return 1e-3, 1e-3

    seconds = time_interleaved({"a": Fake("a"), "b": Fake("b"), "c": LocalSampler(lambda: None)}, min_repeats=2,
                               max_repeats=2, min_time_s=0.0, min_sample_s=1e-5, alternate=True)
    assert order == ["a", "b", "b", "a"] and seconds["a"] == 1e-3 and seconds["c"] > 0
    assert turn_order(["x", "y"], 3) == ["y", "x"]


def test_the_table_compares_against_the_best_library():
    rows = [BenchRow("64 64 64", "k1", "exact", 120.0, 50.0, 80.0, True, 1e-7, numpy_core="SkylakeX",
                     numpy_core_gflops=100.0),
            BenchRow("16 16 16 dtype=bfloat16", "k2", "default", 30.0, 5.0, 60.0, True, 1e-3)]
    assert rows[0].best_library == "numpy@SkylakeX" and rows[0].vs_best == pytest.approx(1.2)
    assert rows[1].best_library == "torch" and rows[1].vs_best == pytest.approx(0.5)
    lines = table(rows).splitlines()
    assert lines[0].split()[7:10] == ["numpy", "numpy@SkylakeX", "torch"] and "numpy@SkylakeX" in lines[2]
    report = to_json(rows, threads=1, machine="m", blas=blas_info(_pool("Haswell"), _cpu(), forced=""),
                     numpy_core="SkylakeX")
    assert report["blas"]["core"] == "Haswell" and report["blas"]["below"] and report["numpy_core_requested"] == "SkylakeX"
    assert report["baselines"] == ["numpy", "numpy@SkylakeX", "torch"]
    assert report["geomean_vs_best"] == pytest.approx((1.2 * 0.5) ** 0.5) and report["rows"][1]["vs_numpy_core"] is None
    header = baselines_line(blas_info(_pool("Haswell"), _cpu(), forced=""), rows, "SkylakeX")
    assert "Haswell kernels" in header and "numpy in a child process, OPENBLAS_CORETYPE=SkylakeX" in header


def test_bench_json_names_the_core_and_times_numpy_on_it_in_a_child(tmp_path):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401

    entry = numpy_blas_entry(threadpoolctl.threadpool_info()) or {}
    core = entry.get("architecture") or ""
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("32 24 40\n")
    env = dict(os.environ, LOOPTUNE_DB="", LOOPTUNE_NO_EMBEDDED_DB="1", LOOPTUNE_FALLBACK="off")
    env.pop("OPENBLAS_CORETYPE", None)
    done = subprocess.run([*LOOPTUNE, "bench", "--shapes", str(shapes), "--db", str(tmp_path / "none.h5"), "--json",
                           "--no-torch", "--numpy-core", core or "off"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["blas"]["core"] == core and report["blas"]["library"] == entry.get("internal_api", "")
    assert report["blas"]["forced"] == ""
    row = report["rows"][0]
    assert row["vs_best"] == pytest.approx(row["looptune_gflops"] / row["best_gflops"])
    if core:        # the child ran the same core, as a baseline of its own
        assert row["numpy_core"] == core and row["numpy_core_gflops"] > 0
        assert report["baselines"] == ["numpy", f"numpy@{core}"] and report["numpy_core_requested"] == core
