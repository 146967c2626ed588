"""export with fused records: an entry point per dtype and epilogue (looptune_sgemm_bias_gelu_tanh,
...), each taking exactly its op's operands, compiles as one translation unit with several fused
kernels at every level, matches numpy's unfused composition from C on tuned and untuned shapes,
refuses missing or overlapping operands, and is listed by the header and the manifest; build-db takes
shape lines with ``epilogue=``."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from click.testing import CliRunner

from looptune.database import MachineKey, Record, commit, load
from looptune.runtime.compiler.defaults import BlockingParams, default_schedule
from looptune.runtime.compiler.epilogue import activate, of_op
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.cli import main
from looptune.tuner.ship.export import ExportError, make_plan
from looptune.tuner.ship.export_c import header_text, source_text
from looptune.tuner.ship.export_levels import MASK_VARIABLE
from ship_fakes import export_and_link

CC = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason="needs a C compiler")

GELU = "matmul+bias+gelu_tanh"
RESIDUAL = "matmul+bias+relu+residual"
SILU = "matmul+silu+residual"
# (M, N, K, dtype, op, schedule): two gelu_tanh kernels of different tiles, a residual one, a float64
# one, and plain records of the same sizes (a family apart)
TUNED = [(64, 96, 128, "float32", GELU, BlockingParams(8, 32, 64, 64, 128).schedule()),
         (40, 70, 50, "float32", GELU, BlockingParams(6, 16, 48, 64, 96).schedule()),
         (33, 48, 65, "float32", RESIDUAL, BlockingParams(4, 16, 32, 64, 64).schedule()),
         (30, 20, 70, "float64", SILU, BlockingParams(4, 8, 32, 32, 40).schedule())]

# driver OP M N K LDA LDB LDC LDR a.bin b.bin bias.bin r.bin c.bin: C through the op's entry point
DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "looptune.h"

static void *load(const char *path, size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    FILE *f = fopen(path, "rb");
    if (!f || fread(p, 1, bytes, f) != bytes) exit(3);
    fclose(f);
    return p;
}

int main(int argc, char **argv)
{
    if (argc != 14) return 2;
    const char *op = argv[1];
    const long long M = atoll(argv[2]), N = atoll(argv[3]), K = atoll(argv[4]);
    const long long lda = atoll(argv[5]), ldb = atoll(argv[6]), ldc = atoll(argv[7]), ldr = atoll(argv[8]);
    const int dbl = strcmp(op, "silu_residual") == 0;
    const size_t item = dbl ? sizeof(double) : sizeof(float);
    void *A = load(argv[9], item * M * lda), *B = load(argv[10], item * K * ldb);
    void *bias = load(argv[11], item * N), *R = load(argv[12], item * M * ldr);
    void *C = malloc(item * M * ldc);
    memset(C, 0xff, item * M * ldc);     /* NaN everywhere: the library must overwrite C */
    int rc;
    const char *kernel;
    if (strcmp(op, "bias_gelu_tanh") == 0) {
        rc = looptune_sgemm_bias_gelu_tanh(M, N, K, A, lda, B, ldb, C, ldc, bias);
        kernel = looptune_sgemm_bias_gelu_tanh_kernel(M, N, K);
        if (looptune_sgemm_bias_gelu_tanh(M, N, K, A, lda, B, ldb, C, ldc, 0) != LOOPTUNE_EINVAL) return 5;
        if (looptune_sgemm_bias_gelu_tanh(M, N, K, A, lda, B, ldb, C, ldc, (float *)C) != LOOPTUNE_EINVAL) return 5;
    } else if (strcmp(op, "bias_relu_residual") == 0) {
        rc = looptune_sgemm_bias_relu_residual(M, N, K, A, lda, B, ldb, C, ldc, bias, R, ldr);
        kernel = looptune_sgemm_bias_relu_residual_kernel(M, N, K);
        if (looptune_sgemm_bias_relu_residual(M, N, K, A, lda, B, ldb, C, ldc, bias, C, ldc) != LOOPTUNE_EINVAL) return 5;
        if (looptune_sgemm_bias_relu_residual(M, N, K, A, lda, B, ldb, C, ldc, bias, R, N - 1) != LOOPTUNE_EINVAL) return 5;
        if (looptune_sgemm_bias_relu_residual(M, N, K, A, lda, B, ldb, C, ldc, bias, 0, ldr) != LOOPTUNE_EINVAL) return 5;
    } else if (dbl) {
        rc = looptune_dgemm_silu_residual(M, N, K, A, lda, B, ldb, C, ldc, R, ldr);
        kernel = looptune_dgemm_silu_residual_kernel(M, N, K);
    } else {
        rc = looptune_sgemm(M, N, K, A, lda, B, ldb, C, ldc);
        kernel = looptune_sgemm_kernel(M, N, K);
    }
    if (rc != 0) { fprintf(stderr, "rc %d\n", rc); return 4; }
    for (long long m = 0; m < M; m++)       /* the padding between rows is left alone */
        for (long long n = N; n < ldc; n++)
            if (memcmp((char *)C + item * (m * ldc + n), "\xff\xff\xff\xff", 4)) { fprintf(stderr, "wrote pad\n"); return 6; }
    FILE *f = fopen(argv[13], "wb"); fwrite(C, item, M * ldc, f); fclose(f);
    printf("%s %s\n", kernel, looptune_cpu_level());
    return 0;
}
"""


def _records():
    machine = MachineKey.current()
    out = [Record(MatmulProblem(m, n, k, dtype=dtype, op=op), machine, s.trace, 50.0, 1.0, 40.0, True, "t", "t", 1)
           for m, n, k, dtype, op, s in TUNED]
    for m, n, k, dtype, _, _ in TUNED[:2]:      # the plain product of the same sizes: its own family and kernels
        p = MatmulProblem(m, n, k, dtype=dtype)
        out.append(Record(p, machine, default_schedule(p).trace, 50.0, 1.0, 40.0, True, "t", "t", 1))
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_fused")
    db = root / "s.h5"
    commit(db, _records())
    return export_and_link(root, db, DRIVER)


def c_name(op: str) -> str:
    """The driver's name of an op: its entry point's suffix, "plain" for looptune_sgemm."""
    return "_".join(op.split("+")[1:]) or "plain"


def run_driver(root, op, m, n, k, pad=0, level=None):
    """(the kernel that served, the level), after checking C against numpy's unfused composition."""
    dtype = np.float64 if op == SILU else np.float32
    epilogue = of_op(op)
    rng = np.random.default_rng(m * 10007 + n * 101 + k)
    lda, ldb, ldc, ldr = k + pad, n + pad, n + 2 * pad, n + 3 * pad
    a = (rng.standard_normal((m, lda)) / math.sqrt(max(k, 1))).astype(dtype)   # products of size 1: activations matter
    b, bias, r = (rng.standard_normal(shape).astype(dtype) for shape in ((k, ldb), (n,), (m, ldr)))
    for x, name in ((a, "a"), (b, "b"), (bias, "bias"), (r, "r")):
        x.tofile(root / f"{name}.bin")
    env = {key: value for key, value in os.environ.items() if key != MASK_VARIABLE}
    env.update({MASK_VARIABLE: level} if level else {})
    done = subprocess.run([str(root / "driver"), c_name(op), *map(str, (m, n, k, lda, ldb, ldc, ldr)),
                           *(str(root / f"{name}.bin") for name in ("a", "b", "bias", "r", "c"))],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    c = np.fromfile(root / "c.bin", dtype=dtype).reshape(m, ldc)[:, :n]
    y = np.matmul(a[:, :k].astype(np.float64), b[:, :n].astype(np.float64))      # numpy, unfused, in float64
    y = y + bias if epilogue.bias else y
    y = activate(y, epilogue.activation)
    y = y + r[:, :n] if epilogue.residual else y
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, y, rtol=tol, atol=tol)
    kernel, served = done.stdout.split()
    return kernel, served


@pytest.mark.parametrize("m, n, k, op", [(m, n, k, op) for m, n, k, _, op, _ in TUNED], ids=str)
def test_tuned_fused_shapes_match_numpy(library, m, n, k, op):
    kernel, _ = run_driver(library, op, m, n, k)
    assert kernel.startswith(f"looptune_{'d' if op == SILU else 's'}_{c_name(op)}_k"), kernel
    assert run_driver(library, op, m, n, k, pad=3)[0] == kernel


@pytest.mark.parametrize("op", [GELU, RESIDUAL, SILU])
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (300, 7, 129), (65, 64, 63), (3, 200, 300), (20, 30, 0)], ids=str)
def test_untuned_fused_shapes_match_numpy(library, op, m, n, k):
    """Every other shape runs the op's nearest tuned kernel or its general one, fused too (K = 0:
    the epilogue of a zero product)."""
    kernel, _ = run_driver(library, op, m, n, k)
    assert f"_{c_name(op)}_" in kernel


def test_plain_entry_point_keeps_its_own_kernels(library):
    kernel, _ = run_driver(library, "matmul", 64, 96, 128)
    assert kernel.startswith("looptune_s_k") and "bias" not in kernel


@pytest.mark.parametrize("level", ["avx2", "portable"])
def test_lower_levels_match_numpy(library, level):
    """The fused kernels of the lower levels, on the CPU capped by LOOPTUNE_CPU_LEVEL."""
    levels = [entry["level"] for entry in json.loads((library / "lib" / "manifest.json").read_text())["levels"]]
    if level not in levels:
        pytest.skip(f"the library has no {level} level here")
    for m, n, k, _, op, _ in TUNED:       # avx2: each shape's default for the level; portable: the general kernel
        kernel, served = run_driver(library, op, m, n, k, pad=1, level=level)
        family = f"looptune_{'d' if op == SILU else 's'}_{c_name(op)}_{level}_"
        assert served == level and kernel.startswith(family + ("d" if level == "avx2" else "general"))


def test_header_and_manifest_list_the_fused_entry_points(library):
    header = (library / "lib" / "looptune.h").read_text()
    source = (library / "lib" / "looptune.c").read_text()
    manifest = json.loads((library / "lib" / "manifest.json").read_text())
    for decl in ("int looptune_sgemm_bias_gelu_tanh(", "const float *bias);",
                 "int looptune_sgemm_bias_relu_residual(", "const float *bias, const float *R, int64_t ldr);",
                 "int looptune_dgemm_silu_residual(", "ldc, const double *R, int64_t ldr);",
                 "const char *looptune_sgemm_bias_gelu_tanh_kernel(", "/* matmul+bias+gelu_tanh on float32: 2 tuned shapes */"):
        assert decl in header, decl
    assert {(e["name"], e["dtype"], e["op"]) for e in manifest["entry_points"]} >= {
        ("looptune_sgemm", "float32", "matmul"), ("looptune_sgemm_bias_gelu_tanh", "float32", GELU),
        ("looptune_sgemm_bias_relu_residual", "float32", RESIDUAL), ("looptune_dgemm_silu_residual", "float64", SILU)}
    shapes = {(s["op"], s["m"], s["n"], s["k"]) for s in manifest["shapes"]}
    assert {(op, m, n, k) for m, n, k, _, op, _ in TUNED} | {("matmul", 64, 96, 128), ("matmul", 40, 70, 50)} == shapes
    fused = [k for k in manifest["kernels"] if k["op"] != "matmul"]
    assert all(k["symbol"].startswith(f"looptune_{'d' if k['dtype'] == 'float64' else 's'}_{c_name(k['op'])}_")
               for k in fused)
    # each fused op has a general kernel at every level; the activations' math is defined among the
    # shared helpers, before any level's target pragma (each kernel's own guarded copy is skipped)
    for op in (GELU, RESIDUAL, SILU):
        assert sum(k["general"] for k in fused if k["op"] == op) == len(manifest["levels"])
    assert source.index("#define LT_EPILOGUE_F32_DEFINED") < source.index("#pragma GCC target")
    assert source.index("#define LT_EPILOGUE_F64_DEFINED") < source.index("#pragma GCC target")


def test_plan_for_shapes_borrows_the_plain_record_and_keeps_asked_ops():
    """--shapes: a fused shape without a record of its op takes the plain product's (as the runtime
    does, not exact), and an op asked for has its entry point even without any record."""
    records = _records()
    shapes = [MatmulProblem(40, 70, 50, op="matmul+bias+silu"), MatmulProblem(64, 96, 128, op=GELU),
              MatmulProblem(10, 10, 10, dtype="float64", op="matmul+relu")]
    plan = make_plan(records, shapes=shapes)
    entries = {(e.op, e.m, e.n, e.k): e for e in plan.entries}
    borrowed = entries[("matmul+bias+silu", 40, 70, 50)]
    assert not borrowed.exact and borrowed.gflops == 0.0
    assert plan.kernels[borrowed.kernel].schedule.trace == default_schedule(MatmulProblem(40, 70, 50)).trace
    assert plan.kernels[borrowed.kernel].op == "matmul+bias+silu"
    assert entries[(GELU, 64, 96, 128)].exact
    assert plan.fused == (("float32", GELU), ("float32", "matmul+bias+silu"), ("float64", "matmul+relu"))
    text = source_text(plan)
    assert "int looptune_dgemm_relu(" in text and "int looptune_dgemm_relu(" in header_text(plan, "cc")
    with pytest.raises(ExportError, match="float16"):
        make_plan(records, shapes=[MatmulProblem(8, 8, 8, dtype="float16", op="matmul+relu")])


def test_no_fused_records_no_fused_entry_points():
    plan = make_plan(_records()[-2:])
    assert plan.fused == () and all(k.op == "matmul" for k in plan.kernels)
    assert "bias" not in header_text(plan, "cc") and "lt_overlap" not in source_text(plan)


def test_build_db_shape_file_with_epilogue_lines(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("64 64 64 epilogue=bias,gelu_tanh\n32 48 80 epilogue=bias,relu,residual batch=2\n64 64 64\n")
    db = tmp_path / "s.h5"
    result = CliRunner().invoke(main, ["build-db", "--shapes", str(shapes), "--db", str(db), "--tuner",
                                       "ship_fakes:fake_tune", "--json", "--no-bench"])
    assert result.exit_code == 0, result.output
    assert sorted(r.problem.key() for r in load(db)) == [
        "matmul+bias+gelu_tanh:float32:nn:t1:b1:64x64x64", "matmul+bias+relu+residual:float32:nn:t1:b2:32x48x80",
        "matmul:float32:nn:t1:b1:64x64x64"]
    half = tmp_path / "half.txt"
    half.write_text("64 64 64 dtype=float16 epilogue=relu\n")
    refused = CliRunner().invoke(main, ["build-db", "--shapes", str(half), "--db", str(db), "--tuner",
                                        "ship_fakes:fake_tune", "--no-bench"])
    assert refused.exit_code == 1 and "float16 kernels have no fused epilogue" in refused.output
