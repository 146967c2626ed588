"""Kernel levels of an exported library: which CPUs its kernel sets are for, and how it picks one.

A library holds one kernel set per *level* (``looptune export --targets``), each compiled for that
level's instructions only, and asks the CPU once, when it loads, which it may run.  The levels are
rungs of one ladder, lowest first::

    portable  neon  avx2  avx512  avx512bf16  amx

(``machine.ISA_LEVELS``, then the bfloat16 forms of ``machine.BF16_LEVELS`` above ``convert``,
which exist only under ``avx512``).  A CPU is at the highest rung it runs (CPUID and XGETBV on
x86-64: the OS must save the registers too; ``neon`` on aarch64); each dtype runs its highest
kernel set at or below that rung, so a library exported from AVX-512 records runs its AVX2 set
on a Zen 3, and its portable general kernels on a CPU below every target.  ``LOOPTUNE_CPU_LEVEL``
(one of the rung names) caps the rung, as OpenBLAS's ``OPENBLAS_CORETYPE`` picks a core: to test
the lower sets on a bigger CPU, or to keep a program off AVX-512.  It is read by the C library
itself, once, when it loads; it can only lower what the CPU has.

Kernels of a level are compiled with that level's instructions only: the library is one
translation unit compiled with baseline flags (dispatcher, thread pool, workspace helpers: code
any CPU of the architecture runs), and each level's kernels sit between a ``target`` pragma push
and pop naming that level's features (``build.ISA_FLAGS``), so ``make`` and the one-line build
still work.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from looptune.runtime.compiler.build import ISA_FLAGS
from looptune.runtime.compiler.codegen import Target
from looptune.runtime.compiler.machine import BF16_LEVELS, ISA_LEVELS, VECTOR_BYTES, CpuInfo, detect_cpu

LADDER = ISA_LEVELS + tuple(level for level in BF16_LEVELS if level != "convert")
MASK_VARIABLE = "LOOPTUNE_CPU_LEVEL"
FLOOR = "portable"          # every library holds at least this level's general kernels
X86_LEVELS = ("avx2", "avx512")
ARM_LEVELS = ("neon",)


def rung(level: str) -> int:
    return LADDER.index(level)


def default_targets(isa: str) -> tuple[str, ...]:
    """The records' own level, and AVX2 under AVX-512 (Zen 2 and 3, Haswell to Comet Lake);
    the portable floor is added to every library (``with_floor``)."""
    return (isa, "avx2") if isa == "avx512" else (isa,)


def with_floor(targets) -> tuple[str, ...]:
    """The library's levels, highest first: the targets and the portable floor."""
    return tuple(sorted(set(targets) | {FLOOR}, key=rung, reverse=True))


def target(level: str) -> Target:
    """The code generator's target for a level; bfloat16 kernels under AVX-512 are rendered for
    the best form the schedule allows (AMX) and get twins for lesser CPUs (``export_c``)."""
    return Target(level, VECTOR_BYTES[level], "amx" if level == "avx512" else "convert")


def features(level: str) -> str:
    """The ``target`` pragma's feature list of a level ("" for baseline code)."""
    return ",".join(flag[2:] for flag in ISA_FLAGS.get(level, ()))


@dataclass(frozen=True)
class LevelCpu(CpuInfo):
    """This machine's caches and cores with a level's ISA, whatever ``LOOPTUNE_ISA`` says here: what
    the analytic default schedules of a level are sized for."""

    level: str = FLOOR

    @classmethod
    def of(cls, level: str, cpu: CpuInfo | None = None) -> "LevelCpu":
        cpu = cpu or detect_cpu()
        return cls(**{f.name: getattr(cpu, f.name) for f in fields(CpuInfo)}, level=level)

    @property
    def vector_isa(self) -> str:
        return self.level

    @property
    def bf16_isa(self) -> str:
        return target(self.level).bf16


def region_open(level: str) -> list[str]:
    """C lines before a level's kernels: its features for every function up to ``region_close``.

    GCC's pragma defines the feature macros of the features it names (clang's attribute defines
    none), and no level names f16c: code testing ``__F16C__`` (the float16 kernels' store loop,
    ``codegen_f16``) takes its portable path in every level, which is exact on every CPU."""
    feats = features(level)
    if not feats:
        return [f"/* ==== {level} kernels: baseline code ==== */"]
    return [f"/* ==== {level} kernels: compiled for {feats} only; run where the CPU is at {level} or above ==== */",
            "#if defined(__clang__)",
            f'#pragma clang attribute push (__attribute__((target("{feats}"))), apply_to = function)',
            "#else",
            "#pragma GCC push_options",
            f'#pragma GCC target("{feats}")',
            "#endif"]


def region_close(level: str) -> list[str]:
    if not features(level):
        return []
    return ["#if defined(__clang__)", "#pragma clang attribute pop", "#else", "#pragma GCC pop_options", "#endif",
            f"/* ==== end of {level} kernels ==== */"]


def cpu_text(library_levels) -> str:
    """The C that finds the CPU's rung once and caps it by ``LOOPTUNE_CPU_LEVEL``;
    ``library_levels``: the rungs of the library's kernel sets (``looptune_cpu_level``)."""
    r = {level: rung(level) for level in LADDER}
    names = ", ".join(f'"{level}"' for level in LADDER)
    held = sorted(set(library_levels), key=rung, reverse=True)
    return rf"""
/* ---- the CPU's level: {' < '.join(LADDER)} ---- */
#include <stdio.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#define LT_RUNGS {len(LADDER)}
static const char *const lt_rung_names[LT_RUNGS] = {{ {names} }};
/* the levels this library has kernels for, highest first */
static const int lt_library_rungs[{len(held)}] = {{ {', '.join(str(r[level]) for level in held)} }};

/* the highest rung this CPU runs: CPUID says the CPU has it, XGETBV that the OS saves its registers */
static int lt_cpu_detect(void)
{{
#if defined(__x86_64__) || defined(__i386__)
    unsigned a = 0, b = 0, c = 0, d = 0, lo = 0, hi = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u) || !((c >> 28) & 1u) || !((c >> 12) & 1u))
        return {r["portable"]};     /* no OSXSAVE, AVX or FMA */
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 0x6u) != 0x6u || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 5) & 1u))
        return {r["portable"]};     /* the OS does not save YMM registers, or no AVX2 */
    /* AMX-BF16 and AMX-TILE (EDX 22, 24), tile state in XCR0 (bits 17, 18) */
    const int amx = ((d >> 22) & 1u) && ((d >> 24) & 1u) && (lo & 0x60000u) == 0x60000u;
    /* AVX512 F, DQ, BW, VL (EBX 16, 17, 30, 31); opmask and ZMM state in XCR0 (bits 5 to 7) */
    if (!(((b >> 16) & 1u) && ((b >> 17) & 1u) && ((b >> 30) & 1u) && ((b >> 31) & 1u)) || (lo & 0xe0u) != 0xe0u)
        return {r["avx2"]};
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1u))
        return {r["avx512"]};       /* no AVX512_BF16 */
    return amx ? {r["amx"]} : {r["avx512bf16"]};
#elif defined(__aarch64__)
    return {r["neon"]};
#else
    return {r["portable"]};
#endif
}}

/* the rung the library dispatches on: the CPU's, capped by {MASK_VARIABLE}; found once */
static volatile int lt_rung_found = -1;
static int lt_rung(void)
{{
    int level = lt_rung_found;
    if (level >= 0) return level;
    level = lt_cpu_detect();
    const char *cap = getenv("{MASK_VARIABLE}");
    if (cap && *cap) {{
        int i = 0;
        while (i < LT_RUNGS && strcmp(cap, lt_rung_names[i]) != 0) i++;
        if (i < LT_RUNGS) level = i < level ? i : level;
        else fprintf(stderr, "looptune: {MASK_VARIABLE}=%s ignored: not one of {' '.join(LADDER)}\n", cap);
    }}
    lt_rung_found = level;
    return level;
}}

static void __attribute__((constructor)) lt_rung_at_load(void) {{ (void)lt_rung(); }}

const char *looptune_cpu_level(void)
{{
    const int level = lt_rung();
    int i = 0;
    while (lt_library_rungs[i] > level) i++;      /* the last is portable's, 0 */
    return lt_rung_names[lt_library_rungs[i]];
}}
"""
