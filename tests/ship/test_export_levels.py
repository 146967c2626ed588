"""export levels: a library exported from AVX-512 records runs on CPUs without AVX-512.

The library holds a kernel set per level (avx512: the tuned kernels, avx2: the analytic defaults,
portable: general kernels), each compiled for its own instructions, and picks one by CPUID when
it loads.  LOOPTUNE_CPU_LEVEL caps the level, so an AVX-512 machine runs what a Zen 3 (avx2) or
an older CPU (portable) would; a static check of the object file shows the lower levels and the
dispatcher hold no instruction of a higher level.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from looptune.database import MachineKey, Record, commit
from looptune.runtime.compiler.defaults import BlockingParams, default_schedule
from looptune.runtime.compiler.machine import detect_cpu
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.ship.export import ExportError, make_plan
from looptune.tuner.ship.export_c import header_text, source_text
from looptune.tuner.ship.export_levels import LADDER, MASK_VARIABLE, LevelCpu
from ship_fakes import COMPILER, export_and_link

X86 = platform.machine() in ("x86_64", "AMD64")
pytestmark = [pytest.mark.skipif(shutil.which(COMPILER) is None, reason="needs a C compiler"),
              pytest.mark.skipif(not X86, reason="AVX-512 records are for x86-64")]

AVX512 = ("avx", "avx2", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma", "sse4_2")
# (M, N, K, dtype, schedule): an AVX-512 register tile (12x32 float32: 24 zmm accumulators), the
# AVX-512 defaults of a GEMV-like and a square shape
TUNED = [(96, 96, 64, "float32", BlockingParams(12, 32, 48, 64, 64).schedule()),
         (4, 512, 256, "float32", None),
         (80, 72, 64, "float64", None)]
UNTUNED = [(100, 90, 70, "float32"), (3, 1000, 5, "float32"), (33, 17, 300, "float64")]

DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "looptune.h"

/* driver DTYPE M N K a.bin b.bin c.bin: C = A B through the library; prints the level and kernel */
int main(int argc, char **argv)
{
    if (argc != 8) return 2;
    const int dbl = strcmp(argv[1], "float64") == 0;
    const long long M = atoll(argv[2]), N = atoll(argv[3]), K = atoll(argv[4]);
    const size_t item = dbl ? sizeof(double) : sizeof(float);
    void *A = malloc(item * M * K), *B = malloc(item * K * N), *C = malloc(item * M * N);
    FILE *f = fopen(argv[5], "rb"); if (fread(A, item, M * K, f) != (size_t)(M * K)) return 3; fclose(f);
    f = fopen(argv[6], "rb"); if (fread(B, item, K * N, f) != (size_t)(K * N)) return 3; fclose(f);
    memset(C, 0xff, item * M * N);
    const int rc = dbl ? looptune_dgemm(M, N, K, A, K, B, N, C, N) : looptune_sgemm(M, N, K, A, K, B, N, C, N);
    if (rc != 0) { fprintf(stderr, "rc %d\n", rc); return 4; }
    f = fopen(argv[7], "wb"); fwrite(C, item, M * N, f); fclose(f);
    printf("%s %s\n", looptune_cpu_level(), dbl ? looptune_dgemm_kernel(M, N, K) : looptune_sgemm_kernel(M, N, K));
    return 0;
}
"""


def avx512_machine():
    """The key of an AVX-512 machine, whatever this one is."""
    return replace(MachineKey.current(), cpu_model="Test AVX-512 CPU", isa="avx512", features=AVX512)


def _records():
    cpu = LevelCpu.of("avx512")
    out = []
    for m, n, k, dtype, schedule in TUNED:
        p = MatmulProblem(m, n, k, dtype=dtype)
        schedule = schedule or default_schedule(p, cpu)
        out.append(Record(p, avx512_machine(), schedule.trace, 50.0, 1.0, 40.0, True, "test", "test", 1))
    return out


def host_level() -> str:
    """This CPU's level as the library sees it (features, not LOOPTUNE_ISA, which only the runtime reads)."""
    f = set(detect_cpu().features)
    return "avx512" if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= f else "avx2" if {"avx2", "fma"} <= f else "portable"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The default export of AVX-512 records (levels avx512, avx2, portable), built with its Makefile."""
    root = tmp_path_factory.mktemp("export_levels")
    db = root / "s.h5"
    commit(db, _records())
    return export_and_link(root, db, DRIVER)


def run(root, m, n, k, dtype, level=None):
    """(level, kernel) the library reports, after checking its C against numpy."""
    rng = np.random.default_rng(m * 7919 + n * 31 + k)
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    a.tofile(root / "a.bin")
    b.tofile(root / "b.bin")
    env = {key: value for key, value in os.environ.items() if key != MASK_VARIABLE}
    if level is not None:
        env[MASK_VARIABLE] = level
    done = subprocess.run([str(root / "driver"), dtype, str(m), str(n), str(k), *(str(root / f) for f in ("a.bin", "b.bin", "c.bin"))],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, (done.returncode, done.stderr)
    c = np.fromfile(root / "c.bin", dtype=dtype).reshape(m, n)
    tol = 1e-4 if dtype == "float32" else 1e-11
    np.testing.assert_allclose(c, a.astype(np.float64) @ b.astype(np.float64), rtol=tol, atol=tol * np.sqrt(k))
    served, kernel = done.stdout.split()
    return served, kernel, done.stderr


@pytest.mark.parametrize("mask", [None, "avx2", "portable"])
def test_avx512_records_run_at_the_cpus_level(library, mask):
    """Unmasked, the CPU's own level serves (the tuned kernels on an AVX-512 CPU, the avx2 set on an
    AVX2 one); masked to avx2 (a Zen 3) or portable, the kernels of that level, right answers."""
    order = ("portable", "avx2", "avx512")
    expect = min(host_level(), mask or "avx512", key=order.index)
    for m, n, k, dtype, _ in TUNED:
        served, kernel, _ = run(library, m, n, k, dtype, mask)
        assert served == expect
        p = "d" if dtype == "float64" else "s"     # tuned at avx512, the shape's default at avx2
        assert re.fullmatch({"avx512": f"looptune_{p}_k[0-9]+", "avx2": f"looptune_{p}_avx2_d[0-9]+",
                             "portable": f"looptune_{p}_portable_general"}[expect], kernel)
    for m, n, k, dtype in UNTUNED:
        served, kernel, _ = run(library, m, n, k, dtype, mask)
        assert served == expect and (expect == "avx512" or f"_{expect}_" in kernel)


def test_mask_only_lowers_and_unknown_values_are_ignored(library):
    """amx on a library without bfloat16 kernels: its highest level (or the CPU's); a typo: a warning."""
    assert run(library, 96, 96, 64, "float32", "amx")[0] == host_level()
    served, _, err = run(library, 96, 96, 64, "float32", "avx9")
    assert served == host_level() and f"{MASK_VARIABLE}=avx9 ignored" in err


def _instruction_kinds(obj) -> dict[str, set[str]]:
    """function name -> the encodings of its instructions: legacy, vex (AVX, AVX2, FMA, AMX), evex (AVX-512)."""
    listing = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True, check=True).stdout
    kinds: dict[str, set[str]] = {}
    func = None
    for line in listing.splitlines():
        if (m := re.match(r"^[0-9a-f]+ <(.+)>:$", line)):
            func = kinds.setdefault(m.group(1), set())
        elif func is not None and (m := re.match(r"^\s+[0-9a-f]+:\t([0-9a-f ]+)\t\S", line)):
            codes = [b for b in m.group(1).split() if b not in ("67", "26", "2e", "36", "3e", "64", "65")]
            func.add("evex" if codes[0] == "62" else "vex" if codes[0] in ("c4", "c5") else "legacy")
    return kinds


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_each_level_is_compiled_for_its_own_instructions(library):
    """No AVX-512 (EVEX) instruction outside the avx512 kernels, no AVX (VEX) one outside the avx2
    and avx512 kernels: dispatcher, thread pool, workspace and portable kernels run on any x86-64."""
    manifest = json.loads((library / "lib" / "manifest.json").read_text())
    assert [lv["level"] for lv in manifest["levels"]] == ["avx512", "avx2", "portable"]
    assert manifest["cpu_level_variable"] == MASK_VARIABLE
    level_of = {k["symbol"]: k["level"] for k in manifest["kernels"]}
    assert {k["level"] for k in manifest["kernels"] if k["tuned"]} == {"avx512"}
    kinds = _instruction_kinds(library / "lib" / "looptune.o")
    seen = set()
    for func, used in kinds.items():
        owner = [s for s in level_of if func == s or func.startswith((s + "_", s + "."))]
        level = level_of[max(owner, key=len)] if owner else "baseline"
        seen.add(level)
        allowed = {"avx512": {"legacy", "vex", "evex"}, "avx2": {"legacy", "vex"}}.get(level, {"legacy"})
        assert used <= allowed, f"{func} ({level}) uses {used - allowed}"
    assert seen == {"avx512", "avx2", "portable", "baseline"}
    assert "evex" in set().union(*(u for f, u in kinds.items() if f.startswith("looptune_s_k")))   # the check sees AVX-512
    header = (library / "lib" / "looptune.h").read_text()
    assert "avx512 (tuned), avx2 (defaults), portable (general)" in header and "looptune_cpu_level(void)" in header
    cflags = next(line for line in (library / "lib" / "Makefile").read_text().splitlines() if line.startswith("CFLAGS"))
    assert "-m" not in cflags.replace("-math", "")


def test_targets(tmp_path):
    records = _records()
    plan = make_plan(records, targets="avx2")          # AVX2 CPUs only: defaults, no tuned kernel
    assert plan.levels == ("avx2", "portable") and not any(k.tuned for k in plan.kernels)
    plan = make_plan(records, targets=["avx512", "portable"])
    assert plan.levels == ("avx512", "portable") and plan.describe_levels() == "avx512 (tuned), portable (defaults)"
    assert all(k.symbol.startswith("looptune_") for k in plan.kernels)
    portable_only = make_plan(records, targets="portable")
    assert "pragma GCC target" not in source_text(portable_only) and "portable (defaults)" in header_text(portable_only, "cc")
    for bad, message in (("avx9", "unknown target level avx9"), ("avx2,neon", "one architecture"), (" , ", "none")):
        with pytest.raises(ExportError, match=message):
            make_plan(records, targets=bad)
    assert LADDER == ("portable", "neon", "avx2", "avx512", "avx512bf16", "amx")
