"""``looptune export``: the tuned kernels of a database as a standalone C library.

    files = export_library("schedules.h5", "out/")          # out/looptune.c, looptune.h, Makefile
    # cc -O2 -fopenmp ... -c out/looptune.c ; link with -fopenmp -lm

The library has no Python, no LoopTune and no compiler at run time::

    int looptune_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                       const float *B, int64_t ldb, float *C, int64_t ldc);   /* C = A B, row-major */
    int looptune_dgemm(... double ...);
    int looptune_bgemm(... const uint16_t *A ... const uint16_t *B ... float *C ...);   /* bfloat16 */

What goes in: the records of one machine for row-major (``nn``), unbatched problems of
one thread count, each distinct schedule rendered once (a schedule replays on every size
of its family, so many shapes usually share a kernel).  With ``shapes``, exactly those
shapes: their own record, else the nearest record's kernel.  Plus one *general* kernel
per dtype, the analytic default schedule sized for a mid-size problem.  ``looptune_bgemm``
(bfloat16 inputs, float32 C) is there when the plan has bfloat16 shapes; see ``export_c`` for
how its kernels pick AMX, vdpbf16ps or the portable form at run time.

Dispatch, per call: binary search of a table sorted by (M, N, K) for an exact tuned
shape; else the nearest tuned shape in log2 size (as the runtime's lookup) if it is
within ``NEAREST_MAX_DISTANCE``; else the general kernel.  Every kernel is correct for
every shape; the table only decides which is fastest.  The C text is ``export_c``'s.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from looptune.runtime.compiler.build import BuildSettings, compile_errors, portable_flags
from looptune.runtime.compiler.codegen import CODEGEN_VERSION, Target
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.machine import VECTOR_BYTES
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.tuner.ship.export_c import PREFIX, header_text, source_text

GENERAL_SIZE = 512             # the general kernel is the default schedule of a 512^3 problem


class ExportError(LoopTuneError, ValueError):
    """Nothing to export, or an ambiguous choice of machine."""


@dataclass(frozen=True)
class Entry:
    dtype: str
    m: int
    n: int
    k: int
    kernel: int              # index into Plan.kernels
    exact: bool              # tuned for exactly this shape (else: borrowed from the nearest record)
    gflops: float            # the record's measured GFLOPS (0 when borrowed)
    numpy_gflops: float


@dataclass(frozen=True)
class Kernel:
    dtype: str
    schedule: Schedule
    symbol: str
    general: bool = False


@dataclass(frozen=True)
class Plan:
    machine: object                  # database MachineKey
    threads: int
    kernels: tuple[Kernel, ...]
    entries: tuple[Entry, ...]       # sorted by (dtype, m, n, k)

    @property
    def target(self) -> Target:
        """The ISA's target; bfloat16 kernels are rendered for the best it may have (AMX on
        AVX-512: the machine key does not say, and the library checks at run time)."""
        isa = self.machine.isa
        return Target(isa, VECTOR_BYTES.get(isa, VECTOR_BYTES["portable"]), "amx" if isa == "avx512" else "convert")

    def cflags(self) -> tuple[str, ...]:
        """No -march=native: the library is for every machine of the tuned kind, not just the one building it."""
        return portable_flags(self.machine.isa)


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
    from looptune.runtime.resolve import current_machine

    here = current_machine()
    if here in machines:
        return here
    if len(machines) == 1:
        return next(iter(machines))
    if not machines:
        raise ExportError("the database is empty")
    listing = "\n  ".join(f"{m.short()}: {n} records" for m, n in machines.items())
    raise ExportError(f"the database holds several machines and none is this one:\n  {listing}")


def make_plan(records: Iterable, *, machine=None, threads: int = 1,
              shapes: Optional[Iterable[MatmulProblem]] = None) -> Plan:
    from looptune.database import ScheduleIndex

    records = list(records)
    machine = choose_machine(records, machine)
    usable = [r for r in records if r.machine == machine and r.problem.layout == "nn"
              and r.problem.batch == 1 and r.problem.threads == threads and r.verified]
    kernels: list[Kernel] = []
    by_trace: dict[tuple[str, str], int] = {}

    def kernel_for(dtype: str, schedule: Schedule, general: bool = False) -> int:
        key = (dtype, schedule.to_json())
        if key not in by_trace:
            by_trace[key] = len(kernels)
            kind = "general" if general else f"k{sum(1 for k in kernels if k.dtype == dtype and not k.general)}"
            kernels.append(Kernel(dtype, schedule, f"looptune_{PREFIX[dtype]}_{kind}", general))
        return by_trace[key]

    entries: dict[tuple[str, int, int, int], Entry] = {}
    if shapes is None:
        for r in sorted(usable, key=lambda r: (r.problem.dtype, r.problem.m, r.problem.n, r.problem.k)):
            p = r.problem
            entries[(p.dtype, p.m, p.n, p.k)] = Entry(p.dtype, p.m, p.n, p.k,
                                                      kernel_for(p.dtype, Schedule.from_trace(r.trace)), True,
                                                      r.gflops_median, r.numpy_gflops)
    else:
        index = ScheduleIndex(usable, machine)
        for s in shapes:
            if s.layout != "nn" or s.batch != 1:
                continue             # the library's API is row-major and unbatched
            p = MatmulProblem(s.m, s.n, s.k, dtype=s.dtype, threads=threads)
            match = index.best(p.key())
            if match is None:
                continue             # no record of the family: the general kernel serves it
            r = match.record
            entries[(p.dtype, p.m, p.n, p.k)] = Entry(p.dtype, p.m, p.n, p.k,
                                                      kernel_for(p.dtype, Schedule.from_trace(r.trace)), match.exact,
                                                      r.gflops_median if match.exact else 0.0,
                                                      r.numpy_gflops if match.exact else 0.0)
    with_bf16 = any(dtype == "bfloat16" for dtype, *_ in entries)      # bfloat16 only where tuned
    for dtype in ("float32", "float64") + (("bfloat16",) if with_bf16 else ()):
        general = default_schedule(MatmulProblem(GENERAL_SIZE, GENERAL_SIZE, GENERAL_SIZE, dtype=dtype, threads=threads))
        kernel_for(dtype, general, general=True)
    ordered = tuple(entries[key] for key in sorted(entries))
    return Plan(machine, threads, tuple(kernels), ordered)


def makefile_text(plan: Plan) -> str:
    return f"""# Builds the exported LoopTune kernels: liblooptune.a and liblooptune.so.
# Flags: {plan.machine.isa} ISA, no -march=native (override: make CFLAGS="...").
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
        "format": "looptune-export", "version": 1, "codegen_version": CODEGEN_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": plan.machine.to_dict(), "threads": plan.threads, "cflags": list(plan.cflags()),
        "kernels": [{"symbol": k.symbol, "dtype": k.dtype, "general": k.general,
                     "trace": json.loads(k.schedule.to_json())} for k in plan.kernels],
        "shapes": [{"dtype": e.dtype, "m": e.m, "n": e.n, "k": e.k, "kernel": plan.kernels[e.kernel].symbol,
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
                   shapes: Optional[Iterable[MatmulProblem]] = None, machine=None) -> ExportFiles:
    """Read the database, choose kernels and write ``looptune.c``, ``looptune.h``, ``Makefile``
    and ``manifest.json`` into ``out_dir``."""
    from looptune.database import load

    plan = make_plan(load(db_path), machine=machine, threads=threads, shapes=shapes)
    if not plan.entries:
        raise ExportError(f"{db_path} has no row-major, unbatched, {threads}-thread records for "
                          f"{plan.machine.short()} (only the general kernels would be exported)")
    return write_library(plan, out_dir)


def distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """The dispatcher's distance between two shapes (log2 units), for tests and reports."""
    return math.dist([math.log2(x) for x in a], [math.log2(x) for x in b])
