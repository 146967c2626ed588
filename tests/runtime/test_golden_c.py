"""Golden C for a few schedules: reviewable diffs whenever the code generator changes.

Rendered for fixed targets (not the detected CPU) so the files are the same on every machine.
Regenerate with ``pytest tests/runtime/test_golden_c.py --update-golden`` and review the diff.
"""
import json
import platform
from pathlib import Path

import pytest

from looptune.runtime.compiler.build import BuildSettings, build_many
from looptune.runtime.compiler.codegen import KernelSource, Target, render
from looptune.runtime.compiler.codegen_tiles import MAX_UNROLLED_UPDATES
from looptune.runtime.compiler.defaults import BlockingParams
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.trace import Trace

GOLDEN = Path(__file__).parent / "golden"

CASES = {
    "naive_float64_portable": (Schedule.initial(), "float64", Target("portable", 16)),
    "blis_6x16_float32_avx2": (BlockingParams(6, 16, 72, 256, 1024).schedule(), "float32", Target("avx2", 32)),
    "vector_m_parallel_float32_avx512": (
        BlockingParams(16, 6, 64, 128, 96, unroll_k=1, pack_a=False, parallel="n.o", vector="m").schedule(),
        "float32", Target("avx512", 64)),
    # m blocks in parallel under one B block every thread packs a share of (BLIS's ic loop)
    "blis_m_parallel_shared_b_float32_avx512": (
        BlockingParams(8, 32, 64, 256, 512, parallel="m.o").schedule(), "float32", Target("avx512", 64)),
    # one row of A streaming B in place, the next k block's tile prefetched (the prefetch step)
    "gemv_prefetch_float32_avx512": (
        BlockingParams(2, 64, 4, 4, 1024, unroll_k=4, pack_a=False, pack_b=False, prefetch=True).schedule(),
        "float32", Target("avx512", 64)),
}
# bfloat16: one schedule whose 32x32 tile each mode can run, in each mode (codegen_bf16.MODES)
BF16_SCHEDULE = BlockingParams(32, 32, 64, 128, 256, unroll_k=2).schedule()
CASES.update({f"blis_32x32_bfloat16_{mode}_avx512": (BF16_SCHEDULE, "bfloat16", Target("avx512", 64, mode))
              for mode in ("amx", "avx512bf16", "convert")})
# AMX reading an A the schedule leaves unpacked in place (packing only tiles it cannot read so)
CASES["blis_32x32_bfloat16_amx_direct_a_avx512"] = (
    BlockingParams(32, 32, 64, 128, 256, unroll_k=2, pack_a=False).schedule(), "bfloat16", Target("avx512", 64, "amx"))
# float16: widened while packing (both operands, whatever the schedule says), a float32 kernel
# into a scratch C, and the exported wrapper rounding it to float16 (codegen_f16); built without
# -mf16c here, so it compiles the portable conversions
CASES["blis_8x32_float16_avx512"] = (
    BlockingParams(8, 32, 64, 128, 256, pack_a=False).schedule(), "float16", Target("avx512", 64))


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_c_matches_golden(name, update_golden):
    sched, dtype, target = CASES[name]
    text = render(sched, dtype, target, symbol=f"golden_{name}").text
    path = GOLDEN / f"{name}.c"
    if update_golden:
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: generate it with --update-golden and review it"
    assert text == path.read_text(), f"generated C for {name} changed; review and rerun with --update-golden"


# What each target needs from the compiler; GCC and clang take these on any x86-64 CPU (they
# build code for the ISA, nothing runs here).  The AMX and vdpbf16ps kernels add their own
# target pragmas on top (test_bf16_golden_files_with_target_pragmas_compile builds them bare).
X86 = platform.machine().lower() in ("x86_64", "amd64")
TARGET_FLAGS = {"portable": (), "avx2": ("-mavx2", "-mfma"),
                "avx512": ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma")}


@pytest.mark.parametrize("isa", sorted(TARGET_FLAGS))
def test_golden_files_compile(tmp_path, isa):
    """The golden kernels are real C: each builds with the system compiler for its target ISA
    (the flags that ISA needs, whatever CPU runs the test)."""
    if isa != "portable" and not X86:
        pytest.skip(f"{isa} code needs an x86-64 compiler")
    names = [n for n in sorted(CASES) if CASES[n][2].isa == isa]
    assert names, f"no golden case targets {isa}"
    sources = [KernelSource(f"golden_{n}", CASES[n][1], (GOLDEN / f"{n}.c").read_text()) for n in names]
    results = build_many(sources, BuildSettings(cache_dir=tmp_path, arch_flags=TARGET_FLAGS[isa]))
    assert [r.symbol for r in results] == [s.symbol for s in sources]
    for name, r in zip(names, results):
        assert r.ok, f"{name}: {r.error}"


def test_bf16_golden_files_with_target_pragmas_compile(tmp_path):
    """The AMX and vdpbf16ps kernels name their ISA in a target pragma: they build without -m flags
    (with GCC; clang takes the flags instead)."""
    settings = BuildSettings(cache_dir=tmp_path, arch_flags=())
    if "clang" in settings.compiler:
        pytest.skip("clang ignores the GCC target pragma")
    names = [n for n in sorted(CASES) if CASES[n][1] == "bfloat16" and CASES[n][2].bf16 != "convert"]
    sources = [KernelSource(f"golden_{n}", "bfloat16", (GOLDEN / f"{n}.c").read_text()) for n in names]
    for r in build_many(sources, settings):
        assert r.ok, r.error


def test_a_tile_beyond_the_register_file_is_not_unrolled_into_a_compile_that_never_ends():
    """A 16x14 register tile (its vector side too short for the target's vectors: 224 scalar
    accumulators) unrolled 8 times took the compiler over two minutes: the unroll is cut so one
    unrolled body updates at most MAX_UNROLLED_UPDATES accumulators; a usual tile keeps its unroll."""
    def tile_schedule(mr: int, nr: int, unroll: int) -> Schedule:
        return Schedule.from_trace(Trace.from_json(json.dumps({"version": 1, "steps": [
            {"op": "split", "loop": "m", "factor": mr}, {"op": "split", "loop": "n", "factor": nr},
            {"op": "reorder", "order": ["b", "m.o", "n.o", "k", "m.i", "n.i"]},
            {"op": "register_tile", "m": "m.i", "n": "n.i"}, {"op": "unroll", "loop": "k", "factor": unroll}]})))

    huge = render(tile_schedule(16, 14, 8), "float32").text
    assert "#pragma GCC unroll 8" not in huge
    assert f"#pragma GCC unroll {MAX_UNROLLED_UPDATES // 224}" in huge
    assert "#pragma GCC unroll 8" in render(tile_schedule(6, 32, 8), "float32").text
