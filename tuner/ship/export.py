"""``looptune export``: the tuned kernels of a database as a standalone C library.

    files = export_library("schedules.h5", "out/")          # out/looptune.c, looptune.h, Makefile
    # cc -O2 -fopenmp ... -c out/looptune.c ; link with -fopenmp -lm

The library has no Python, no LoopTune and no compiler at run time::

    int looptune_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                       const float *B, int64_t ldb, float *C, int64_t ldc);   /* C = A B, row-major */
    int looptune_dgemm(... double ...);

What goes in: the records of one machine for row-major (``nn``), unbatched problems of
one thread count, each distinct schedule rendered once (a schedule replays on every size
of its family, so many shapes usually share a kernel).  With ``shapes``, exactly those
shapes: their own record, else the nearest record's kernel.  Plus one *general* kernel
per dtype, the analytic default schedule sized for a mid-size problem.

Dispatch, per call: binary search of a table sorted by (M, N, K) for an exact tuned
shape; else the nearest tuned shape in log2 size (as the runtime's lookup) if it is
within ``NEAREST_MAX_DISTANCE``; else the general kernel.  Every kernel is correct for
every shape; the table only decides which is fastest.
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

from looptune.runtime.compiler.abi import C_TYPE, function_type
from looptune.runtime.compiler.build import BuildSettings, compile_errors, portable_flags
from looptune.runtime.compiler.codegen import CODEGEN_VERSION, Target, render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.machine import VECTOR_BYTES
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.configuration import RuntimeSettings

# The exported dispatcher behaves as runtime.matmul with default settings:
NEAREST_MAX_DISTANCE = RuntimeSettings.max_distance   # log2 size units: nearer records serve a shape
SMALL_FLOPS = RuntimeSettings.small_flops             # below this a call runs on one thread
GENERAL_SIZE = 512             # the general kernel is the default schedule of a 512^3 problem
PREFIX = {"float32": "s", "float64": "d"}


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
        isa = self.machine.isa
        return Target(isa, VECTOR_BYTES.get(isa, VECTOR_BYTES["portable"]))

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
    for dtype in ("float32", "float64"):
        general = default_schedule(MatmulProblem(GENERAL_SIZE, GENERAL_SIZE, GENERAL_SIZE, dtype=dtype, threads=threads))
        kernel_for(dtype, general, general=True)
    ordered = tuple(entries[key] for key in sorted(entries))
    return Plan(machine, threads, tuple(kernels), ordered)


# ----------------------------------------------------------------------------- C text

def _kernel_text(kernel: Kernel, target: Target) -> str:
    """The rendered kernel, made file-local: its symbol and helpers stay out of the library's ABI."""
    text = render(kernel.schedule, kernel.dtype, target, symbol=kernel.symbol).text
    head = f"int {kernel.symbol}("
    if text.count("\n" + head) != 1:
        raise AssertionError(f"unexpected kernel text for {kernel.symbol}")
    return text.replace("\n" + head, "\nstatic int " + kernel.symbol + "(")


def _dispatch_text(plan: Plan, dtype: str) -> str:
    p, T = PREFIX[dtype], C_TYPE[dtype]
    kernels = [(i, k) for i, k in enumerate(plan.kernels) if k.dtype == dtype]
    local = {i: j for j, (i, _) in enumerate(kernels)}
    general = next(local[i] for i, k in kernels if k.general)
    entries = [e for e in plan.entries if e.dtype == dtype]
    fn = "looptune_" + p + "gemm"
    out = [f"/* ---- {dtype}: {len(entries)} shapes, {len(kernels)} kernels ---- */",
           function_type(f"lt_{p}fn", dtype),
           f"static const lt_{p}fn lt_{p}_kernels[{len(kernels)}] = {{ {', '.join(k.symbol for _, k in kernels)} }};",
           f"static const char *const lt_{p}_names[{len(kernels)}] = {{ "
           + ", ".join(f'"{k.symbol}"' for _, k in kernels) + " };",
           f"#define LT_{p.upper()}_GENERAL {general}",
           f"#define LT_{p.upper()}_COUNT {len(entries)}"]
    if entries:
        out.append(f"static const lt_entry lt_{p}_table[{len(entries)}] = {{")
        for e in entries:
            out.append(f"    {{{e.m}, {e.n}, {e.k}, {local[e.kernel]}}},"
                       f"{'' if e.exact else '  /* nearest record */'}")
        out.append("};")
    else:
        out.append(f"static const lt_entry lt_{p}_table[1] = {{{{0, 0, 0, LT_{p.upper()}_GENERAL}}}};")
    out += [
        f"static int lt_{p}_choose(int64_t M, int64_t N, int64_t K)",
        "{",
        f"    int64_t i = lt_find(lt_{p}_table, LT_{p.upper()}_COUNT, M, N, K);",
        f"    if (i < 0) i = lt_nearest(lt_{p}_table, LT_{p.upper()}_COUNT, M, N, K);",
        f"    return i < 0 ? LT_{p.upper()}_GENERAL : lt_{p}_table[i].kernel;",
        "}",
        "",
        f"int {fn}(int64_t M, int64_t N, int64_t K, const {T} *A, int64_t lda, const {T} *B, int64_t ldb,",
        f"    {T} *C, int64_t ldc)",
        "{",
        "    int rc = lt_check(M, N, K, A, lda, B, ldb, C, ldc);",
        "    if (rc <= 0) return rc;",
        "    const int32_t t = lt_call_threads(M, N, K);",
        f"    return lt_{p}_kernels[lt_{p}_choose(M, N, K)](1, M, N, K, A, M * lda, lda, 1, B, K * ldb, ldb, 1,",
        "        C, M * ldc, ldc, 1, 0, t);",
        "}",
        "",
        f"const char *{fn}_kernel(int64_t M, int64_t N, int64_t K)",
        "{",
        f"    return lt_{p}_names[lt_{p}_choose(M, N, K)];",
        "}",
    ]
    return "\n".join(out) + "\n"


_COMMON = r"""
/* ---- dispatch ---- */
#include <math.h>

typedef struct { int64_t m, n, k; int32_t kernel; } lt_entry;

static int lt_threads = LT_DEFAULT_THREADS;

void looptune_set_num_threads(int n) { lt_threads = n > 0 ? n : 1; }
int looptune_get_num_threads(void) { return lt_threads; }

/* 1: run a kernel; 0: nothing to compute (done); < 0: bad arguments */
static int lt_check(int64_t M, int64_t N, int64_t K, const void *A, int64_t lda, const void *B, int64_t ldb,
                    const void *C, int64_t ldc)
{
    if (M < 0 || N < 0 || K < 0) return LOOPTUNE_EINVAL;
    if (M == 0 || N == 0) return 0;
    if (!C || ldc < N || (K > 0 && (!A || !B || lda < K || ldb < N))) return LOOPTUNE_EINVAL;
    return 1;
}

static int32_t lt_call_threads(int64_t M, int64_t N, int64_t K)
{
    return 2.0 * (double)M * (double)N * (double)K < LT_SMALL_FLOPS ? 1 : lt_threads;
}

/* index of (M, N, K) in a table sorted by (m, n, k), or -1 */
static int64_t lt_find(const lt_entry *t, int64_t count, int64_t M, int64_t N, int64_t K)
{
    int64_t lo = 0, hi = count;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        const lt_entry *e = &t[mid];
        if (e->m < M || (e->m == M && (e->n < N || (e->n == N && e->k < K)))) lo = mid + 1; else hi = mid;
    }
    return lo < count && t[lo].m == M && t[lo].n == N && t[lo].k == K ? lo : -1;
}

/* the entry nearest to (M, N, K) in log2 size, if within LT_NEAREST_MAX; else -1 */
static int64_t lt_nearest(const lt_entry *t, int64_t count, int64_t M, int64_t N, int64_t K)
{
    const double lm = log2((double)M), ln = log2((double)N), lk = log2((double)K);
    double best = LT_NEAREST_MAX * LT_NEAREST_MAX;
    int64_t found = -1;
    for (int64_t i = 0; i < count; i++) {
        const double dm = log2((double)t[i].m) - lm, dn = log2((double)t[i].n) - ln, dk = log2((double)t[i].k) - lk;
        const double d = dm * dm + dn * dn + dk * dk;
        if (d <= best) { if (d < best || found < 0) found = i; best = d; }
    }
    return found;
}
"""


def header_text(plan: Plan, compiler: str | None = None) -> str:
    counts = {d: sum(1 for e in plan.entries if e.dtype == d) for d in ("float32", "float64")}
    return f"""/* looptune.h: tuned matmul kernels exported by `looptune export` (codegen v{CODEGEN_VERSION}).

   Tuned on: {plan.machine.short()}
   Kernels for vector ISA {plan.machine.isa}; {counts['float32']} float32 and {counts['float64']} float64 shapes
   tuned for {plan.threads} thread(s); any other shape runs the nearest tuned kernel or the general one.

   Build (or run `make`):
       {build_line(plan, compiler)}
       ar rcs liblooptune.a looptune.o
   Link your program with: -fopenmp -lm
   Without -fopenmp the kernels build and run single-threaded (no libgomp needed).
   The ISA flags are those of the tuned machine's vector ISA, not -march=native: the library
   runs on any CPU with that ISA.

   C = A B, row-major: A is M x K (row stride lda >= K), B is K x N (ldb >= N), C is M x N
   (ldc >= N); C is overwritten.  Returns 0 on success, LOOPTUNE_EINVAL (-4) for bad
   arguments, -1 if the packing workspace could not be allocated.  Thread-safe: each
   calling thread has its own workspace.
*/
#ifndef LOOPTUNE_H
#define LOOPTUNE_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

#define LOOPTUNE_EINVAL (-4)

int looptune_sgemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float *C, int64_t ldc);
int looptune_dgemm(int64_t M, int64_t N, int64_t K, const double *A, int64_t lda,
                   const double *B, int64_t ldb, double *C, int64_t ldc);

/* Threads for problems of {SMALL_FLOPS / 1e6:g} MFLOP and more (smaller ones run on one); default {plan.threads}.
   Set it once, before calling from several threads. */
void looptune_set_num_threads(int n);
int looptune_get_num_threads(void);

/* The name of the kernel that serves a shape (for logs and tests): looptune_s_kN or looptune_s_general. */
const char *looptune_sgemm_kernel(int64_t M, int64_t N, int64_t K);
const char *looptune_dgemm_kernel(int64_t M, int64_t N, int64_t K);

#ifdef __cplusplus
}}
#endif
#endif
"""


def source_text(plan: Plan) -> str:
    target = plan.target
    parts = [f"/* looptune.c: generated by `looptune export` from a schedule database; do not edit.\n"
             f"   Tuned on {plan.machine.short()}; see looptune.h for the build line. */",
             '#include "looptune.h"',
             f"#define LT_DEFAULT_THREADS {plan.threads}",
             f"#define LT_SMALL_FLOPS {SMALL_FLOPS:.1f}",
             f"#define LT_NEAREST_MAX {NEAREST_MAX_DISTANCE:.3f}"]
    for kernel in plan.kernels:
        parts.append(_kernel_text(kernel, target))
    parts.append(_COMMON)
    for dtype in ("float32", "float64"):
        parts.append(_dispatch_text(plan, dtype))
    return "\n".join(parts)


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
    for path, text in ((files.c_file, source_text(plan)), (files.h_file, header_text(plan, compiler)),
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
