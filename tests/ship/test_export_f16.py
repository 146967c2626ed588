"""export with float16 records: looptune_hgemm (uint16_t IEEE-half A, B and C, float32
accumulation) compiles next to the other dtypes, with several float16 kernels in the one translation
unit and at every level, and matches numpy; build-db takes dtype=float16 shape lines."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from looptune.database import MachineKey, Record, commit, load
from ship_fakes import export_and_link
from looptune.runtime.compiler.defaults import BlockingParams, default_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.cli import main
from looptune.tuner.ship.export import make_plan
from looptune.tuner.ship.export_c import header_text, source_text
from looptune.tuner.ship.export_levels import MASK_VARIABLE

CC = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason="needs a C compiler")

# (M, N, K, schedule): three float16 kernels of different tiles in one library
TUNED = [(64, 64, 64, BlockingParams(8, 32, 64, 64, 64).schedule()),
         (40, 96, 50, BlockingParams(6, 32, 48, 64, 128).schedule()),
         (30, 20, 70, BlockingParams(5, 10, 20, 32, 40).schedule())]

DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "looptune.h"

/* driver M N K LDA LDB LDC a.bin b.bin c.bin: C = A B through looptune_hgemm, C written out */
int main(int argc, char **argv)
{
    if (argc != 10) return 2;
    const long long M = atoll(argv[1]), N = atoll(argv[2]), K = atoll(argv[3]);
    const long long lda = atoll(argv[4]), ldb = atoll(argv[5]), ldc = atoll(argv[6]);
    uint16_t *A = malloc(2 * M * lda), *B = malloc(2 * K * ldb), *C = malloc(2 * M * ldc);
    FILE *f = fopen(argv[7], "rb"); if (fread(A, 2, M * lda, f) != (size_t)(M * lda)) return 3; fclose(f);
    f = fopen(argv[8], "rb"); if (fread(B, 2, K * ldb, f) != (size_t)(K * ldb)) return 3; fclose(f);
    memset(C, 0xff, 2 * M * ldc);   /* NaN everywhere: the library must overwrite C */
    const int rc = looptune_hgemm(M, N, K, A, lda, B, ldb, C, ldc);
    if (rc != 0) { fprintf(stderr, "rc %d\n", rc); return 4; }
    for (long long m = 0; m < M; m++)       /* the padding between rows is left alone */
        for (long long n = N; n < ldc; n++)
            if (C[m * ldc + n] != 0xffff) { fprintf(stderr, "wrote C[%lld, %lld]\n", m, n); return 6; }
    f = fopen(argv[9], "wb"); fwrite(C, 2, M * ldc, f); fclose(f);
    printf("%s %s\n", looptune_hgemm_kernel(M, N, K), looptune_cpu_level());
    if (looptune_hgemm(2, 2, 2, A, 1, B, 2, C, 2) != LOOPTUNE_EINVAL) return 5;   /* lda < K */
    return 0;
}
"""


def _records():
    machine = MachineKey.current()
    out = [Record(MatmulProblem(m, n, k, dtype="float16"), machine, s.trace, 50.0, 1.0, 1.0, True, "t", "t", 1)
           for m, n, k, s in TUNED]
    for p in (MatmulProblem(48, 48, 48), MatmulProblem(30, 20, 70, dtype="bfloat16")):    # dtypes side by side
        schedule = TUNED[2][3] if p.dtype == "bfloat16" else default_schedule(p)
        out.append(Record(p, machine, schedule.trace, 50.0, 1.0, 40.0, True, "t", "t", 1))
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_f16")
    db = root / "s.h5"
    commit(db, _records())
    return export_and_link(root, db, DRIVER)


def error_bound(a, b) -> np.ndarray:
    """float32 accumulation of K exact products (gamma(K) of sum |a b|), then one rounding to
    float16 (half an ulp, or 2**-25 for a subnormal): as tests/runtime/test_f16_matmul.py."""
    k = a.shape[1]
    gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    g = gamma * np.matmul(np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)))
    return g + 2.0 ** -11 * (np.abs(np.matmul(a.astype(np.float64), b.astype(np.float64))) + g) + 2.0 ** -25


def run_driver(root, m, n, k, pad=0, level=None, integers=False):
    """(the kernel that served, the level); ``level``: LOOPTUNE_CPU_LEVEL; ``integers``: small integer
    operands, whose float32 sums are exact, so the result must be numpy's bit for bit."""
    rng = np.random.default_rng(m * 10007 + n * 101 + k)
    lda, ldb, ldc = k + pad, n + pad, n + 2 * pad
    make = (lambda shape: rng.integers(-1, 9, shape)) if integers else rng.standard_normal
    a, b = make((m, lda)).astype(np.float16), make((k, ldb)).astype(np.float16)
    a.tofile(root / "a.bin")
    b.tofile(root / "b.bin")
    env = {key: value for key, value in os.environ.items() if key != MASK_VARIABLE}
    env.update({MASK_VARIABLE: level} if level else {})
    done = subprocess.run([str(root / "driver"), *map(str, (m, n, k, lda, ldb, ldc)),
                           str(root / "a.bin"), str(root / "b.bin"), str(root / "c.bin")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    c = np.fromfile(root / "c.bin", dtype=np.float16).reshape(m, ldc)[:, :n]
    a, b = a[:, :k], b[:, :n]
    expect = np.matmul(a, b)
    assert expect.dtype == np.float16
    if integers:
        np.testing.assert_array_equal(c.view(np.uint16), expect.view(np.uint16))
    else:
        exact = np.matmul(a.astype(np.float64), b.astype(np.float64))
        assert np.all(np.abs(c.astype(np.float64) - exact) <= error_bound(a, b))
    kernel, served = done.stdout.split()
    return kernel, served


@pytest.mark.parametrize("m, n, k", [(m, n, k) for m, n, k, _ in TUNED], ids=str)
def test_f16_tuned_shapes_match_numpy(library, m, n, k):
    kernel, _ = run_driver(library, m, n, k)
    assert kernel.startswith("looptune_h_k")
    assert run_driver(library, m, n, k, pad=3)[0] == kernel
    assert run_driver(library, m, n, k, pad=1, integers=True)[0] == kernel


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (300, 7, 129), (65, 64, 63), (3, 200, 300)], ids=str)
def test_f16_untuned_shapes_match_numpy(library, m, n, k):
    run_driver(library, m, n, k)
    run_driver(library, m, n, k, integers=True)


def test_the_library_declares_and_holds_float16(library):
    source = (library / "lib" / "looptune.c").read_text()
    header = (library / "lib" / "looptune.h").read_text()
    manifest = json.loads((library / "lib" / "manifest.json").read_text())
    assert "int looptune_hgemm(" in header and "looptune_hgemm_kernel(" in header and "3 float16 shapes" in header
    assert "int looptune_bgemm(" in header and "int looptune_sgemm(" in header      # the other dtypes stay
    assert sorted((s["m"], s["n"], s["k"]) for s in manifest["shapes"] if s["dtype"] == "float16") == \
        sorted((m, n, k) for m, n, k, _ in TUNED)
    kernels = [k["symbol"] for k in manifest["kernels"] if k["dtype"] == "float16"]
    assert len(kernels) >= 3 + len(manifest["levels"])      # tuned kernels and a general one per level
    for symbol in kernels:       # each a file-local wrapper around its float32-C kernel
        assert f"static int {symbol}_f32(" in source and f"static int {symbol}(" in source
    # the conversions once, among the shared helpers: outside (before) every level's target pragma
    assert source.index("#define LT_F16_CONVERSIONS_DEFINED") < source.index("#pragma GCC target")
    assert "int looptune_hgemm(" in source


@pytest.mark.parametrize("level", ["avx2", "portable"])
def test_lower_levels_match_numpy(library, level):
    """The float16 kernels of the lower levels (inside their target pragmas, with the portable
    conversions) on the CPU capped by LOOPTUNE_CPU_LEVEL: the defaults of each shape at avx2, the
    general kernel at portable."""
    levels = [entry["level"] for entry in json.loads((library / "lib" / "manifest.json").read_text())["levels"]]
    if level not in levels:
        pytest.skip(f"the library has no {level} level here")
    for m, n, k, _ in TUNED:
        kernel, served = run_driver(library, m, n, k, pad=1, level=level)
        assert served == level
        assert kernel.startswith("looptune_h_avx2_d" if level == "avx2" else "looptune_h_portable_general")
        run_driver(library, m, n, k, level=level, integers=True)
    assert run_driver(library, 300, 7, 129, level=level)[0] == f"looptune_h_{level}_general"


def test_no_f16_records_no_hgemm():
    plan = make_plan(_records()[-2:-1])
    assert {k.dtype for k in plan.kernels} == {"float32", "float64"}
    assert "hgemm" not in header_text(plan, "cc") and "hgemm" not in source_text(plan)
    assert "lt_f16_to_f32" not in source_text(plan)


def test_build_db_shape_file_with_float16_lines(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("64 64 64 dtype=float16\n32 48 80 dtype=float16 layout=tn batch=2\n64 64 64\n")
    db = tmp_path / "s.h5"
    result = CliRunner().invoke(main, ["build-db", "--shapes", str(shapes), "--db", str(db), "--tuner",
                                       "ship_fakes:fake_tune", "--json", "--no-bench"])
    assert result.exit_code == 0, result.output
    keys = sorted(r.problem.key() for r in load(db))
    assert keys == ["matmul:float16:nn:t1:b1:64x64x64", "matmul:float16:tn:t1:b2:32x48x80",
                    "matmul:float32:nn:t1:b1:64x64x64"]
