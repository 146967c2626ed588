"""export with bfloat16 records: looptune_bgemm (uint16_t bf16 A and B, float C) compiles and matches numpy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from looptune.database import MachineKey, Record, commit
from ship_fakes import export_and_link
from looptune.runtime.compiler.defaults import BlockingParams, default_schedule
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.ship.export import make_plan
from looptune.tuner.ship.export_c import header_text, source_text
from looptune.tuner.ship.export_levels import MASK_VARIABLE

ml_dtypes = pytest.importorskip("ml_dtypes")
CC = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason="needs a C compiler")

# (M, N, K, schedule): an AMX-shaped tile, a vdpbf16ps-shaped one, and one no fast form can run
TUNED = [(64, 64, 64, BlockingParams(32, 32, 64, 64, 64).schedule()),
         (40, 96, 50, BlockingParams(6, 32, 48, 64, 128).schedule()),
         (30, 20, 70, BlockingParams(5, 10, 20, 32, 40).schedule())]

DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "looptune.h"

/* driver M N K LDA LDB LDC a.bin b.bin c.bin: C = A B through looptune_bgemm, C written out */
int main(int argc, char **argv)
{
    if (argc != 10) return 2;
    const long long M = atoll(argv[1]), N = atoll(argv[2]), K = atoll(argv[3]);
    const long long lda = atoll(argv[4]), ldb = atoll(argv[5]), ldc = atoll(argv[6]);
    uint16_t *A = malloc(2 * M * lda), *B = malloc(2 * K * ldb);
    float *C = malloc(4 * M * ldc);
    FILE *f = fopen(argv[7], "rb"); if (fread(A, 2, M * lda, f) != (size_t)(M * lda)) return 3; fclose(f);
    f = fopen(argv[8], "rb"); if (fread(B, 2, K * ldb, f) != (size_t)(K * ldb)) return 3; fclose(f);
    memset(C, 0xff, 4 * M * ldc);   /* NaN everywhere: the library must overwrite C */
    const int rc = looptune_bgemm(M, N, K, A, lda, B, ldb, C, ldc);
    if (rc != 0) { fprintf(stderr, "rc %d\n", rc); return 4; }
    f = fopen(argv[9], "wb"); fwrite(C, 4, M * ldc, f); fclose(f);
    printf("%s\n", looptune_bgemm_kernel(M, N, K));
    if (looptune_bgemm(2, 2, 2, A, 1, B, 2, C, 2) != LOOPTUNE_EINVAL) return 5;   /* lda < K */
    return 0;
}
"""


def _records():
    machine = MachineKey.current()
    out = [Record(MatmulProblem(m, n, k, dtype="bfloat16"), machine, s.trace, 50.0, 1.0, 40.0, True, "t", "t", 1)
           for m, n, k, s in TUNED]
    p = MatmulProblem(48, 48, 48)
    out.append(Record(p, machine, default_schedule(p).trace, 50.0, 1.0, 40.0, True, "t", "t", 1))
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_bf16")
    db = root / "s.h5"
    commit(db, _records())
    return export_and_link(root, db, DRIVER)


def run_driver(root, m, n, k, pad=0, level=None):
    """The kernel that served; ``level``: LOOPTUNE_CPU_LEVEL, the CPU level the library may use."""
    rng = np.random.default_rng(m * 10007 + n * 101 + k)
    lda, ldb, ldc = k + pad, n + pad, n + 2 * pad
    a = rng.standard_normal((m, lda)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((k, ldb)).astype(ml_dtypes.bfloat16)
    a.tofile(root / "a.bin")
    b.tofile(root / "b.bin")
    env = {key: value for key, value in os.environ.items() if key != MASK_VARIABLE}
    env.update({MASK_VARIABLE: level} if level else {})
    done = subprocess.run([str(root / "driver"), *map(str, (m, n, k, lda, ldb, ldc)),
                           str(root / "a.bin"), str(root / "b.bin"), str(root / "c.bin")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    c = np.fromfile(root / "c.bin", dtype=np.float32).reshape(m, ldc)[:, :n]
    expect = np.matmul(a[:, :k], b[:, :n])                  # numpy on ml_dtypes arrays: float32
    assert expect.dtype == np.float32
    np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    return done.stdout.strip()


@pytest.mark.parametrize("m, n, k", [(m, n, k) for m, n, k, _ in TUNED], ids=str)
def test_bf16_tuned_shapes_match_numpy(library, m, n, k):
    kernel = run_driver(library, m, n, k)
    assert kernel.startswith("looptune_b_k")
    assert run_driver(library, m, n, k, pad=3) == kernel


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (300, 7, 129), (65, 64, 63)], ids=str)
def test_bf16_untuned_shapes_match_numpy(library, m, n, k):
    run_driver(library, m, n, k)


def test_fast_kernels_run_only_where_the_cpu_has_avx512_bf16(library):
    """AMX and vdpbf16ps kernels have portable twins; the dispatcher picks by CPUID."""
    source = (library / "lib" / "looptune.c").read_text()
    header = (library / "lib" / "looptune.h").read_text()
    assert "int looptune_bgemm(" in header and "3 bfloat16 shapes" in header
    shapes = json.loads((library / "lib" / "manifest.json").read_text())["shapes"]
    kernel_of = {(s["m"], s["n"], s["k"]): s["kernel"] for s in shapes}
    amx_shaped, convert_only = kernel_of[(64, 64, 64)], kernel_of[(30, 20, 70)]
    extensions = set(detect_cpu().extensions)
    expected = (amx_shaped if {"amx_bf16", "amx_tile"} <= extensions       # AMX itself
                else amx_shaped + "_vdp" if "avx512_bf16" in extensions     # its vdpbf16ps twin (Zen 4 and 5)
                else amx_shaped + "_convert")                               # its portable twin
    served = run_driver(library, 64, 64, 64)
    if MachineKey.current().isa == "avx512":
        assert f"static int {amx_shaped}_convert(" in source          # the AMX-shaped tile's portable twin
        assert f"static int {convert_only}_convert(" not in source    # a tile no fast form runs: one rendering
        assert served == expected
    else:
        assert "_convert(" not in source and "lt_amx_granted" not in source and served == amx_shaped
    assert run_driver(library, 30, 20, 70) == convert_only


def test_no_bf16_records_no_bgemm(tmp_path):
    plan = make_plan(_records()[-1:])
    assert {k.dtype for k in plan.kernels} == {"float32", "float64"}
    assert "bgemm" not in header_text(plan, "cc") and "bgemm" not in source_text(plan)


@pytest.mark.parametrize("level", ["avx2", "avx512", "avx512bf16"])
def test_lesser_cpus_match_numpy(library, level):
    """The library as a CPU without AVX-512 runs it (avx2: the bfloat16 kernels of that level, which
    widen to float32), with AVX-512 but no AVX512_BF16 (avx512: the portable twins), or with it but
    no AMX (avx512bf16, Zen 4: vdpbf16ps twins of the AMX kernels): LOOPTUNE_CPU_LEVEL caps the
    level the library reads from CPUID."""
    source = (library / "lib" / "looptune.c").read_text()
    if MachineKey.current().isa != "avx512" or "lt_amx_granted" not in source:
        pytest.skip("no fast bfloat16 kernels for this ISA")
    if level == "avx512bf16" and "avx512_bf16" not in detect_cpu().extensions:
        pytest.skip("this CPU cannot run vdpbf16ps")
    for m, n, k, _ in TUNED:     # avx512bf16: an AMX kernel's vdpbf16ps twin, or a vdpbf16ps kernel itself
        name = run_driver(library, m, n, k, pad=1, level=level)
        if level == "avx2":
            assert name.startswith("looptune_b_avx2_d")
        else:
            assert name.endswith("_convert") == (level == "avx512") or (m, n, k) == (30, 20, 70)
    # avx512bf16: the general kernel's vdpbf16ps twin where it was rendered for AMX, else itself
    vdp = "_vdp" if "static int looptune_b_general_vdp(" in source else ""
    assert run_driver(library, 300, 7, 129, level=level) == {
        "avx2": "looptune_b_avx2_general", "avx512": "looptune_b_general_convert", "avx512bf16": "looptune_b_general" + vdp}[level]
