"""export: a standalone C library, compiled with the system compiler, checked against numpy from C."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from looptune.database import MachineKey, Record, commit
from ship_fakes import export_and_link
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.ship.export import ExportError, export_library, make_plan
from looptune.tuner.search.spaces import blocking_candidates

CC = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason="needs a C compiler")

# Tuned shapes (M, N, K, dtype, which blocking candidate: 0 = the analytic default).
TUNED = [(64, 64, 64, "float32", 1), (96, 80, 112, "float32", 2), (100, 100, 100, "float32", 1),
         (48, 64, 80, "float64", 3)]

DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "looptune.h"

/* driver DTYPE M N K LDA LDB LDC a.bin b.bin c.bin: C = A B through the library, C written out */
int main(int argc, char **argv)
{
    if (argc != 11) return 2;
    const int dbl = strcmp(argv[1], "float64") == 0;
    const long long M = atoll(argv[2]), N = atoll(argv[3]), K = atoll(argv[4]);
    const long long lda = atoll(argv[5]), ldb = atoll(argv[6]), ldc = atoll(argv[7]);
    const size_t item = dbl ? sizeof(double) : sizeof(float);
    void *A = malloc(item * M * lda), *B = malloc(item * K * ldb), *C = malloc(item * M * ldc);
    FILE *f = fopen(argv[8], "rb"); if (fread(A, item, M * lda, f) != (size_t)(M * lda)) return 3; fclose(f);
    f = fopen(argv[9], "rb"); if (fread(B, item, K * ldb, f) != (size_t)(K * ldb)) return 3; fclose(f);
    memset(C, 0xff, item * M * ldc);   /* NaN everywhere: the library must overwrite C */
    const int rc = dbl ? looptune_dgemm(M, N, K, A, lda, B, ldb, C, ldc) : looptune_sgemm(M, N, K, A, lda, B, ldb, C, ldc);
    if (rc != 0) { fprintf(stderr, "rc %d\n", rc); return 4; }
    f = fopen(argv[10], "wb"); fwrite(C, item, M * ldc, f); fclose(f);
    printf("%s\n", dbl ? looptune_dgemm_kernel(M, N, K) : looptune_sgemm_kernel(M, N, K));
    /* bad arguments are refused, not crashed on */
    if (looptune_sgemm(-1, 1, 1, 0, 1, 0, 1, 0, 1) != LOOPTUNE_EINVAL) return 5;
    if (looptune_sgemm(2, 2, 2, A, 1, B, 2, C, 2) != LOOPTUNE_EINVAL) return 5;   /* lda < K */
    if (looptune_dgemm(0, 5, 5, 0, 5, 0, 5, 0, 5) != 0) return 5;                /* empty: nothing to do */
    return 0;
}
"""


def _records():
    machine = MachineKey.current()
    out = []
    for m, n, k, dtype, variant in TUNED:
        p = MatmulProblem(m, n, k, dtype=dtype)
        sched = blocking_candidates(p, 4, seed=1)[variant].schedule() if variant else default_schedule(p)
        out.append(Record(MatmulProblem(m, n, k, dtype=dtype), machine, sched.trace, 50.0, 1.0, 40.0, True, "test", "test", 1))
    # records the library must leave out: another thread count, a batch, a transposed layout
    p = MatmulProblem(64, 64, 64)
    for key in (MatmulProblem(64, 64, 64, threads=2), MatmulProblem(64, 64, 64, batch=4), MatmulProblem(64, 64, 64, layout="tn")):
        out.append(Record(key, machine, default_schedule(p).trace, 50.0, 1.0, 40.0, True, "test", "test", 1))
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The exported library, built with its own Makefile, and a C driver linked against it."""
    root = tmp_path_factory.mktemp("export")
    db = root / "s.h5"
    commit(db, _records())
    return export_and_link(root, db, DRIVER)


def run_driver(root: Path, m, n, k, dtype, pad=0):
    rng = np.random.default_rng(m * 10007 + n * 101 + k)
    lda, ldb, ldc = k + pad, n + pad, n + 2 * pad
    a = rng.standard_normal((m, lda)).astype(dtype)
    b = rng.standard_normal((k, ldb)).astype(dtype)
    a.tofile(root / "a.bin")
    b.tofile(root / "b.bin")
    done = subprocess.run([str(root / "driver"), dtype, str(m), str(n), str(k), str(lda), str(ldb), str(ldc),
                           str(root / "a.bin"), str(root / "b.bin"), str(root / "c.bin")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    c = np.fromfile(root / "c.bin", dtype=dtype).reshape(m, ldc)[:, :n]
    expect = a[:, :k].astype(np.float64) @ b[:, :n].astype(np.float64)
    tol = 1e-4 if dtype == "float32" else 1e-11
    np.testing.assert_allclose(c, expect, rtol=tol, atol=tol * np.sqrt(k))
    return done.stdout.strip()


@pytest.mark.parametrize("m, n, k, dtype, _variant", TUNED)
def test_tuned_shapes_match_numpy_and_use_their_own_kernel(library, m, n, k, dtype, _variant):
    kernel = run_driver(library, m, n, k, dtype)
    assert kernel != f"looptune_{dtype[5] == '6' and 'd' or 's'}_general"
    kernel_padded = run_driver(library, m, n, k, dtype, pad=3)           # lda > K, ldb > N, ldc > N
    assert kernel_padded == kernel


@pytest.mark.parametrize("m, n, k, dtype, expect", [
    (70, 60, 70, "float32", "nearest"),       # near a tuned shape
    (1, 1, 1, "float32", "general"),          # far from every tuned shape
    (1000, 7, 333, "float32", "general"),
    (50, 70, 90, "float64", "nearest"),
    (3, 500, 2, "float64", "general"),
])
def test_untuned_shapes_match_numpy(library, m, n, k, dtype, expect):
    kernel = run_driver(library, m, n, k, dtype)
    assert kernel.endswith("_general") == (expect == "general")


def test_manifest_lists_each_kernel_once(library):
    manifest = json.loads((library / "lib" / "manifest.json").read_text())
    shapes = manifest["shapes"]
    assert len(shapes) == len(TUNED)                     # threads=2, batched and tn records left out
    tuned_kernels = {s["kernel"] for s in shapes}
    symbols = [k["symbol"] for k in manifest["kernels"]]
    assert len(symbols) == len(set(symbols))
    isa = MachineKey.current().isa
    home = [k for k in manifest["kernels"] if k["level"] == isa]       # the tuned level's set
    assert len(home) == len(tuned_kernels) + 2 and all(k["tuned"] != k["general"] for k in home)
    levels = [lv["level"] for lv in manifest["levels"]]
    assert levels[0] == isa and levels[-1] == "portable"               # the portable floor is always inside
    assert all(sum(k["general"] for k in manifest["kernels"] if k["level"] == lv) == 2 for lv in levels)
    assert all(set(s["kernels"]) == set(levels) for s in shapes)
    source = (library / "lib" / "looptune.c").read_text()
    cflags = next(line for line in (library / "lib" / "Makefile").read_text().splitlines() if line.startswith("CFLAGS"))
    assert "-march" not in cflags and "-mavx" not in cflags            # baseline: each level has its own target
    assert ('#pragma GCC target("avx512f,' in source) == (isa == "avx512")
    assert all(source.count(f"static int {s}(") == 1 for s in symbols)   # kernels stay out of the ABI


def test_shapes_option_exports_exactly_those_shapes(tmp_path):
    db = tmp_path / "s.h5"
    commit(db, _records())
    files = export_library(db, tmp_path / "lib", shapes=[MatmulProblem(64, 64, 64), MatmulProblem(70, 70, 70),
                                                         MatmulProblem(64, 64, 64, layout="nt")])
    entries = {(e.m, e.n, e.k): e for e in files.plan.entries}
    assert set(entries) == {(64, 64, 64), (70, 70, 70)}
    assert entries[(64, 64, 64)].exact and not entries[(70, 70, 70)].exact


def test_nothing_to_export_is_an_error(tmp_path):
    db = tmp_path / "s.h5"
    commit(db, _records()[-3:])        # only records the library cannot use
    with pytest.raises(ExportError, match="no row-major"):
        export_library(db, tmp_path / "lib")
    with pytest.raises(ExportError, match="empty"):
        make_plan([])
