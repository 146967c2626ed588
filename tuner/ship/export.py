"""``looptune export``: the tuned kernels of a database as a standalone C library.

    files = export_library("schedules.h5", "out/")          # out/looptune.c, looptune.h, Makefile
    # cc -O2 -fopenmp ... -c out/looptune.c ; link with -fopenmp -lm

The library has no Python, no LoopTune and no compiler at run time::

    int looptune_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                       const float *B, int64_t ldb, float *C, int64_t ldc);   /* C = A B, row-major */
    int looptune_dgemm(... double ...);
    int looptune_bgemm(... const uint16_t *A ... const uint16_t *B ... float *C ...);   /* bfloat16 */
    int looptune_hgemm(... const uint16_t *A ... const uint16_t *B ... uint16_t *C ...);  /* float16 */
    int looptune_sgemm_bias_gelu_tanh(... float *C, int64_t ldc, const float *bias);   /* fused */
    const char *looptune_cpu_level(void);     /* the level of the kernel set that serves */

What goes in: the records of one machine for row-major (``nn``), unbatched problems of
one thread count, each distinct schedule rendered once (a schedule replays on every size
of its family, so many shapes usually share a kernel).  With ``shapes``, exactly those
shapes: their own record, else the nearest record's kernel.  ``looptune_bgemm``
(bfloat16 inputs, float32 C) is there when the plan has bfloat16 shapes; see ``export_c`` for
how its kernels pick AMX, vdpbf16ps or the portable form at run time.  ``looptune_hgemm``
(float16 inputs and C, float32 accumulation) likewise when the plan has float16 shapes.  Fused
epilogues (records or shapes whose op is not "matmul") get an entry point per dtype and op
(``export_fused``, which says why), with kernels of their own: a fused shape without a record
of its op takes the plain product's nearest record, as ``runtime.matmul`` does.

Levels (``targets``, ``export_levels``): one kernel set per target level, each compiled for that
level's instructions only, and the library runs the highest set the CPU can.  At the records' own
level a shape runs its tuned kernel; at any other level the analytic default schedule of the
shape for that level.  A tuned trace would replay there too (every schedule renders on every
ISA), but it was chosen by timings on the records' CPU, and its register tile is sized for that
ISA's registers: an AVX-512 tile of 12x32 float32 (24 accumulators of 32 registers) becomes 48
accumulators at AVX2's width, of 16 registers, and spills.  The default is what
``runtime.matmul`` itself serves an untuned shape with on that CPU.  Each level also has one
*general* kernel per dtype (the analytic default sized for a mid-size problem), and a portable
level with at least its general kernels is always inside, so no CPU of the architecture is left
without a kernel.  Default targets: the records' level, and AVX2 under AVX-512.

Dispatch, per call: binary search of a table sorted by (M, N, K) for an exact tuned
shape; else the nearest tuned shape in log2 size (as the runtime's lookup) if it is
within ``NEAREST_MAX_DISTANCE``; else the general kernel, each at the level the CPU runs.
Every kernel is correct for every shape; the table only decides which is fastest.  The C text
is ``export_c``'s.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from looptune.database.records import MachineKey
from looptune.runtime.compiler.build import BuildSettings, compile_errors, portable_flags
from looptune.runtime.compiler.codegen import CODEGEN_VERSION
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.epilogue import PLAIN
from looptune.runtime.compiler.machine import ISA_LEVELS
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.tuner.ship import export_levels as levels_
from looptune.tuner.ship.export_c import DTYPE_ORDER, OPTIONAL_DTYPES, entry_points, header_text, source_text
from looptune.tuner.ship.export_fused import FUSED_DTYPES, entry_name, family

GENERAL_SIZE = 512             # the general kernel is the default schedule of a 512^3 problem


class ExportError(LoopTuneError, ValueError):
    """Nothing to export, or an ambiguous choice of machine."""


@dataclass(frozen=True)
class Entry:
    dtype: str
    m: int
    n: int
    k: int
    kernels: tuple[int, ...]  # per Plan.levels: index into Plan.kernels
    exact: bool              # tuned for exactly this shape (else: borrowed from the nearest record)
    gflops: float            # the record's measured GFLOPS (0 when borrowed)
    numpy_gflops: float
    op: str = PLAIN          # a fused epilogue's shape: its entry point's table

    @property
    def kernel(self) -> int:
        """The kernel at the library's highest level."""
        return self.kernels[0]


@dataclass(frozen=True)
class Kernel:
    dtype: str
    schedule: Schedule
    symbol: str
    general: bool = False
    level: str = levels_.FLOOR   # the level it is rendered and compiled for
    tuned: bool = False          # a record's trace (else an analytic default)
    op: str = PLAIN              # rendered with this fused epilogue


@dataclass(frozen=True)
class Plan:
    machine: object                  # database MachineKey
    threads: int
    kernels: tuple[Kernel, ...]
    entries: tuple[Entry, ...]       # sorted by (dtype, op, m, n, k)
    levels: tuple[str, ...] = (levels_.FLOOR,)   # kernel sets, highest first (export_levels.with_floor)
    targets: tuple[str, ...] = (levels_.FLOOR,)  # the levels with a kernel per shape (the rest: general only)
    fused: tuple[tuple[str, str], ...] = ()     # (dtype, op) of each fused entry point, sorted

    def cflags(self) -> tuple[str, ...]:
        """Baseline flags, no -march=native and no ISA flags: the dispatcher and the lower levels'
        kernels run on every CPU of the architecture; each level's kernels carry their own target."""
        return portable_flags(levels_.FLOOR)

    def level_kinds(self) -> list[tuple[str, str]]:
        """(level, what its set holds): "tuned" (the records' schedules), "defaults" (the analytic
        default of each shape for that level) or "general" (one general kernel per dtype only)."""
        return [(level, "tuned" if level == self.machine.isa else "defaults" if level in self.targets else "general")
                for level in self.levels]

    def describe_levels(self) -> str:
        """e.g. ``avx512 (tuned), avx2 (defaults), portable (general)``."""
        return ", ".join(f"{level} ({kind})" for level, kind in self.level_kinds())


@dataclass(frozen=True)
class ExportFiles:
    out_dir: Path
    c_file: Path
    h_file: Path
    makefile: Path
    manifest: Path
    plan: Plan

    def build_line(self, compiler: str | None = None) -> str:
        return build_line(self.plan, compiler)

    def compile_errors(self) -> str | None:
        """Compile the library once with its flags and our compiler: the errors, or None."""
        return compile_errors(self.c_file, self.plan.cflags())


def build_line(plan: Plan, compiler: str | None = None) -> str:
    """The command that compiles the library (``compiler``: default, the one LoopTune uses)."""
    return f"{compiler or BuildSettings.from_env().compiler} {' '.join(plan.cflags())} -c looptune.c -o looptune.o"


def choose_machine(records, machine=None):
    """The machine whose records to export: ``machine`` if given, else this machine when it has
    records, else the only machine in the database."""
    machines = {}
    for r in records:
        machines.setdefault(r.machine, 0)
        machines[r.machine] += 1
    if machine is not None:
        if machine not in machines:
            raise ExportError(f"the database has no records for {machine.short()}")
        return machine
    here = MachineKey.current()
    if here in machines:
        return here
    if len(machines) == 1:
        return next(iter(machines))
    if not machines:
        raise ExportError("the database is empty")
    listing = "\n  ".join(f"{m.short()}: {n} records" for m, n in machines.items())
    raise ExportError(f"the database holds several machines and none is this one:\n  {listing}")


def check_targets(targets: Optional[Sequence[str] | str], isa: str) -> tuple[str, ...]:
    """The target levels asked for (``"avx2,avx512"`` or a sequence), checked; None: the default
    for records of ``isa`` (``export_levels.default_targets``)."""
    if targets is None:
        return levels_.default_targets(isa if isa in ISA_LEVELS else levels_.FLOOR)
    if isinstance(targets, str):
        targets = targets.split(",")
    names = tuple(dict.fromkeys(t.strip().lower() for t in targets if t.strip()))
    unknown = [t for t in names if t not in ISA_LEVELS]
    if unknown or not names:
        raise ExportError(f"unknown target level {', '.join(unknown) or '(none)'}: the levels are {', '.join(ISA_LEVELS)}")
    if set(names) & set(levels_.X86_LEVELS) and set(names) & set(levels_.ARM_LEVELS):
        raise ExportError(f"one architecture per library: {', '.join(names)} mixes x86-64 and aarch64 levels")
    return names


def make_plan(records: Iterable, *, machine=None, threads: int = 1,
              shapes: Optional[Iterable[MatmulProblem]] = None,
              targets: Optional[Sequence[str] | str] = None) -> Plan:
    from looptune.database import ScheduleIndex     # lazily: the lookup loads numpy, only when a plan is made

    records = list(records)
    machine = choose_machine(records, machine)
    targets = check_targets(targets, machine.isa)
    levels = levels_.with_floor(targets)
    usable = [r for r in records if r.machine == machine and r.problem.layout == "nn"
              and r.problem.batch == 1 and r.problem.threads == threads and r.verified]
    kernels: list[Kernel] = []
    by_trace: dict[tuple[str, str, str, str], int] = {}

    def kernel_for(dtype: str, level: str, schedule: Schedule, general: bool = False, tuned: bool = False,
                   op: str = PLAIN) -> int:
        key = (level, dtype, op, schedule.to_json())
        if key not in by_trace:
            by_trace[key] = len(kernels)
            count = sum(1 for k in kernels if k.dtype == dtype and k.op == op and k.level == level and not k.general)
            kind = "general" if general else f"{'k' if tuned else 'd'}{count}"
            home = "" if level == machine.isa else f"{level}_"
            kernels.append(Kernel(dtype, schedule, f"looptune_{family(dtype, op)}_{home}{kind}", general, level, tuned,
                                  op))
        elif general:       # a tuned or default kernel that is also the general one
            kernels[by_trace[key]] = replace(kernels[by_trace[key]], general=True)
        return by_trace[key]

    # (problem, the record's schedule, exact, gflops, numpy_gflops) per exported shape, by (dtype, op, m, n, k)
    rows: dict[tuple[str, str, int, int, int], tuple] = {}
    fused = set()               # (dtype, op) of the fused entry points
    if shapes is None:
        for r in sorted(usable, key=lambda r: (r.problem.dtype, r.problem.op, r.problem.m, r.problem.n, r.problem.k)):
            p = r.problem
            rows[(p.dtype, p.op, p.m, p.n, p.k)] = (p, Schedule.from_trace(r.trace), True, r.gflops_median,
                                                    r.numpy_gflops)
    else:
        index = ScheduleIndex(usable, machine)
        for s in shapes:
            if s.layout != "nn" or s.batch != 1:
                continue             # the library's API is row-major and unbatched
            p = MatmulProblem(s.m, s.n, s.k, dtype=s.dtype, threads=threads, op=s.op)
            fused.add((p.dtype, p.op))      # an op asked for has its entry point, records or not
            match = index.best(p.key())
            if match is None and p.op != PLAIN:     # no record of the op: the plain product's, as the runtime
                match = index.best(replace(p, op=PLAIN).key())
            if match is None:
                continue             # no record of the family: the general kernel serves it
            r = match.record
            exact = match.exact and r.problem.op == p.op
            rows[(p.dtype, p.op, p.m, p.n, p.k)] = (p, Schedule.from_trace(r.trace), exact,
                                                    r.gflops_median if exact else 0.0, r.numpy_gflops if exact else 0.0)
    fused = tuple(sorted(f for f in fused | {(dtype, op) for dtype, op, *_ in rows} if f[1] != PLAIN))
    wrong = [f"{op} on {dtype}" for dtype, op in fused if dtype not in FUSED_DTYPES]
    if wrong:
        raise ExportError(f"no fused epilogue for {', '.join(wrong)}: fused kernels are {', '.join(FUSED_DTYPES)}")
    # bfloat16 and float16 only where tuned
    dtypes = tuple(d for d in DTYPE_ORDER
                   if d not in OPTIONAL_DTYPES or any(dtype == d for dtype, *_ in rows) or any(f[0] == d for f in fused))
    cpus = {level: levels_.LevelCpu.of(level) for level in levels}
    general = {(dtype, level): default_schedule(MatmulProblem(GENERAL_SIZE, GENERAL_SIZE, GENERAL_SIZE, dtype=dtype,
                                                              threads=threads), cpus[level])
               for dtype in dtypes for level in levels}
    per_level: dict[str, dict] = {}
    for level in levels:
        at = per_level[level] = {}
        for key in sorted(rows):
            p, schedule, *_ = rows[key]
            if level == machine.isa:
                at[key] = kernel_for(p.dtype, level, schedule, tuned=True, op=p.op)
            elif level in targets:
                at[key] = kernel_for(p.dtype, level, default_schedule(p, cpus[level]), op=p.op)
            else:
                at[key] = kernel_for(p.dtype, level, general[(p.dtype, level)], general=True, op=p.op)
        for dtype, op in [(dtype, PLAIN) for dtype in dtypes] + list(fused):
            kernel_for(dtype, level, general[(dtype, level)], general=True, op=op)
    entries = tuple(Entry(dtype, m, n, k, tuple(per_level[level][key] for level in levels), *rows[key][2:], op=op)
                    for key in sorted(rows) for dtype, op, m, n, k in [key])
    return Plan(machine, threads, tuple(kernels), entries, levels, targets, fused)


def makefile_text(plan: Plan) -> str:
    return f"""# Builds the exported LoopTune kernels: liblooptune.a and liblooptune.so.
# Kernel levels: {plan.describe_levels()}.  Baseline flags: each level's kernels are compiled
# for its own instructions (target pragmas), and the library picks a level by CPUID when it
# loads.  Do not add -march=... or -m<isa> flags (make CFLAGS="..."): the dispatcher and the
# lower levels must run on every CPU of the architecture.
CC ?= cc
CFLAGS ?= {' '.join(plan.cflags())}
LDLIBS ?= -fopenmp -lm

all: liblooptune.a liblooptune.so

looptune.o: looptune.c looptune.h
\t$(CC) $(CFLAGS) -c looptune.c -o looptune.o

liblooptune.a: looptune.o
\t$(AR) rcs $@ looptune.o

liblooptune.so: looptune.o
\t$(CC) -shared -o $@ looptune.o $(LDLIBS)

clean:
\trm -f looptune.o liblooptune.a liblooptune.so

.PHONY: all clean
"""


def manifest(plan: Plan) -> dict:
    """What the library holds, for people and tools: machine, kernels with their traces, shapes."""
    return {
        "format": "looptune-export", "version": 3, "codegen_version": CODEGEN_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": plan.machine.to_dict(), "threads": plan.threads, "cflags": list(plan.cflags()),
        # kernel sets, highest first: the library runs the highest one the CPU can (CPUID, capped
        # by the environment variable); "tuned": the records' schedules, "defaults": the analytic
        # default of each shape for that level, "general": one general kernel per dtype only
        "levels": [{"level": level, "kernels": kind} for level, kind in plan.level_kinds()],
        "cpu_level_variable": levels_.MASK_VARIABLE,
        # version 3: fused epilogues, an entry point per (dtype, op); kernels and shapes name their op
        "entry_points": [{"name": entry_name(dtype, op), "dtype": dtype, "op": op} for dtype, op in entry_points(plan)],
        "kernels": [{"symbol": k.symbol, "dtype": k.dtype, "op": k.op, "level": k.level, "general": k.general,
                     "tuned": k.tuned, "trace": json.loads(k.schedule.to_json())} for k in plan.kernels],
        "shapes": [{"dtype": e.dtype, "op": e.op, "m": e.m, "n": e.n, "k": e.k, "kernel": plan.kernels[e.kernel].symbol,
                    "kernels": {level: plan.kernels[i].symbol for level, i in zip(plan.levels, e.kernels)},
                    "exact": e.exact, "gflops": e.gflops, "numpy_gflops": e.numpy_gflops} for e in plan.entries],
    }


def write_library(plan: Plan, out_dir: str | os.PathLike, compiler: str | None = None) -> ExportFiles:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ExportFiles(out, out / "looptune.c", out / "looptune.h", out / "Makefile", out / "manifest.json", plan)
    for path, text in ((files.c_file, source_text(plan)), (files.h_file, header_text(plan, build_line(plan, compiler))),
                       (files.makefile, makefile_text(plan)), (files.manifest, json.dumps(manifest(plan), indent=1))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return files


def export_library(db_path: str | os.PathLike, out_dir: str | os.PathLike, *, threads: int = 1,
                   shapes: Optional[Iterable[MatmulProblem]] = None, machine=None,
                   targets: Optional[Sequence[str] | str] = None) -> ExportFiles:
    """Read the database, choose kernels and write ``looptune.c``, ``looptune.h``, ``Makefile``
    and ``manifest.json`` into ``out_dir``; ``targets``: the kernel levels (``make_plan``)."""
    from looptune.database import load     # lazily: h5py loads with the store, only when a database is read

    plan = make_plan(load(db_path), machine=machine, threads=threads, shapes=shapes, targets=targets)
    if not plan.entries:
        raise ExportError(f"{db_path} has no row-major, unbatched, {threads}-thread records for "
                          f"{plan.machine.short()} (only the general kernels would be exported)")
    return write_library(plan, out_dir)


def distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """The dispatcher's distance between two shapes (log2 units), for tests and reports."""
    return math.dist([math.log2(x) for x in a], [math.log2(x) for x in b])
