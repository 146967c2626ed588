#!/usr/bin/env python3
"""The exported C library against runtime.matmul, on the exported (tuned) shapes.

Two views, both single-threaded unless --threads says otherwise:

* native: a C harness times ``looptune_sgemm``/``dgemm`` from the exported library, and the
  runtime's own compiled kernel for the same shape (same schedule, built by the runtime's
  build cache with its flags) called through the kernel ABI.  Only compile flags and the
  dispatcher differ.  Each is run 3 times, alternating; the median of the medians counts.
* python: ``runtime.matmul(a, b)`` against the exported library called through ctypes, in
  the same process, sampled in turns (``looptune.tuner.ship.timing.time_interleaved``).

    nice -n 10 taskset -c 1 python tools/bench_export.py --db schedules.h5 --out /tmp/lib [--json out.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HARNESS = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*abi_f)(int64_t, int64_t, int64_t, int64_t, const void *, int64_t, int64_t, int64_t,
                     const void *, int64_t, int64_t, int64_t, void *, int64_t, int64_t, int64_t, int32_t, int32_t);
typedef int (*gemm_f)(int64_t, int64_t, int64_t, const void *, int64_t, const void *, int64_t, void *, int64_t);

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }

/* harness MODE(export|kernel) SO SYMBOL DTYPE M N K THREADS -> median seconds per call */
int main(int argc, char **argv)
{
    if (argc != 9) return 2;
    const int exported = strcmp(argv[1], "export") == 0, dbl = strcmp(argv[4], "float64") == 0;
    const int64_t M = atoll(argv[5]), N = atoll(argv[6]), K = atoll(argv[7]);
    const int32_t T = atoi(argv[8]);
    void *lib = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 3; }
    void *fn = dlsym(lib, argv[3]);
    if (!fn) { fprintf(stderr, "no symbol %s\n", argv[3]); return 3; }
    const size_t item = dbl ? 8 : 4;
    char *A = aligned_alloc(64, item * M * K + 64), *B = aligned_alloc(64, item * K * N + 64), *C = aligned_alloc(64, item * M * N + 64);
    for (int64_t i = 0; i < M * K; i++) { if (dbl) ((double *)A)[i] = (i % 17) * 0.1 - 0.8; else ((float *)A)[i] = (i % 17) * 0.1f - 0.8f; }
    for (int64_t i = 0; i < K * N; i++) { if (dbl) ((double *)B)[i] = (i % 13) * 0.1 - 0.6; else ((float *)B)[i] = (i % 13) * 0.1f - 0.6f; }
#define CALL() (exported ? ((gemm_f)fn)(M, N, K, A, K, B, N, C, N) \
                         : ((abi_f)fn)(1, M, N, K, A, M * K, K, 1, B, K * N, N, 1, C, M * N, N, 1, 0, T))
    if (CALL() != 0) return 4;
    CALL();
    int number = 1;
    for (;;) {
        double t0 = now();
        for (int i = 0; i < number; i++) CALL();
        if (now() - t0 >= 1e-3) break;
        number *= 2;
    }
    double samples[400]; int n = 0; double spent = 0;
    while (n < 400 && (n < 15 || spent < 0.3)) {
        double t0 = now();
        for (int i = 0; i < number; i++) CALL();
        double dt = now() - t0;
        samples[n++] = dt / number; spent += dt;
    }
    qsort(samples, n, sizeof(double), cmp);
    printf("%.9g\n", samples[n / 2]);
    return 0;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the per-shape results here")
    args = ap.parse_args()

    import numpy as np

    from looptune import runtime
    from looptune.runtime.compiler.build import build
    from looptune.runtime.compiler.codegen import render
    from looptune.runtime.compiler.workload import MatmulProblem
    from looptune.tuner.ship.timing import pinned_threads, time_interleaved
    from looptune.tuner.ship.export import export_library

    out = Path(args.out or tempfile.mkdtemp(prefix="looptune-export-"))
    files = export_library(args.db, out, threads=args.threads)
    cc = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"
    subprocess.run(["make", "-s", f"CC={cc}", "liblooptune.so"], cwd=out, check=True)
    harness = out / "harness"
    (out / "harness.c").write_text(HARNESS)
    subprocess.run([cc, "-O2", "-std=gnu11", str(out / "harness.c"), "-o", str(harness), "-ldl"], check=True)
    lib = ctypes.CDLL(str(out / "liblooptune.so"))
    runtime.configure(user_db=args.db, threads=args.threads)

    rows = []
    with pinned_threads(args.threads):
        for e in files.plan.entries:
            if not e.exact or e.op != "matmul":     # the plain entry points' tuned shapes
                continue
            p = MatmulProblem(e.m, e.n, e.k, dtype=e.dtype, threads=args.threads)
            res = runtime.explain((e.m, e.n, e.k), dtype=e.dtype, threads=args.threads)
            built = build(render(res.schedule, e.dtype))
            native = {"export": [], "kernel": []}
            for _ in range(3):
                for mode, so, sym in (("export", out / "liblooptune.so", f"looptune_{e.dtype == 'float64' and 'd' or 's'}gemm"),
                                      ("kernel", built.so_path, built.symbol)):
                    done = subprocess.run([str(harness), mode, str(so), sym, e.dtype, str(e.m), str(e.n), str(e.k),
                                           str(args.threads)], capture_output=True, text=True, check=True)
                    native[mode].append(float(done.stdout))
            a, b, _ = p.make_operands()
            a, b = np.ascontiguousarray(a[0]), np.ascontiguousarray(b[0])
            c = np.empty((e.m, e.n), dtype=e.dtype)
            fn = lib.looptune_dgemm if e.dtype == "float64" else lib.looptune_sgemm
            fn.restype = ctypes.c_int
            pa, pb, pc = (ctypes.c_void_p(x.ctypes.data) for x in (a, b, c))
            i64 = ctypes.c_int64
            M, N, K = i64(e.m), i64(e.n), i64(e.k)

            def exported():
                return fn(M, N, K, pa, K, pb, N, pc, N)

            assert exported() == 0
            np.testing.assert_allclose(c, runtime.matmul(a, b, threads=args.threads), rtol=1e-3 if e.dtype == "float32" else 1e-9,
                                       atol=1e-3 if e.dtype == "float32" else 1e-9)
            py = time_interleaved({"runtime": lambda: runtime.matmul(a, b, threads=args.threads), "export": exported},
                                  min_time_s=0.2, min_repeats=9)
            row = {"shape": str(p.with_threads(1)), "source": res.source,
                   "native_export_s": statistics.median(native["export"]),
                   "native_kernel_s": statistics.median(native["kernel"]),
                   "python_runtime_s": py["runtime"], "python_export_s": py["export"]}
            row["native_ratio"] = row["native_kernel_s"] / row["native_export_s"]     # > 1: export faster
            row["python_ratio"] = row["python_runtime_s"] / row["python_export_s"]
            rows.append(row)
            print(f"{row['shape']:28} {res.source:7} native: export {p.flops / row['native_export_s'] / 1e9:7.1f} "
                  f"kernel {p.flops / row['native_kernel_s'] / 1e9:7.1f} GFLOPS ({row['native_ratio']:.3f})   "
                  f"python: export {p.flops / row['python_export_s'] / 1e9:7.1f} runtime.matmul "
                  f"{p.flops / row['python_runtime_s'] / 1e9:7.1f} GFLOPS ({row['python_ratio']:.3f})", flush=True)

    def geo(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    summary = {"shapes": len(rows),
               "native_geomean_export_speed_over_kernel": geo([r["native_ratio"] for r in rows]),
               "native_worst": min(r["native_ratio"] for r in rows),
               "python_geomean_export_speed_over_runtime_matmul": geo([r["python_ratio"] for r in rows]),
               "python_worst": min(r["python_ratio"] for r in rows),
               "within_5pct_native": sum(r["native_ratio"] >= 0.95 for r in rows),
               "within_5pct_python": sum(r["python_ratio"] >= 0.95 for r in rows)}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
