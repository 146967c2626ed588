#!/usr/bin/env python3
"""Streaming forms of a few-row product (1 x N x K) against numpy, on operands placed in a cache
line where numpy's allocator puts them.

Each form is a GEMV schedule of the default's structure (B streamed in place, k blocks of
``kc`` rows outside 64-wide n tiles) with its k block, unroll and the ``prefetch`` step varied;
every form's exact-size kernel is called directly (``Kernel``), in turns with
``np.matmul(a, b, out=c)``, one thread on both sides (pinned), with the shared timer of
``looptune bench`` (``tuner/ship/timing.py``): samples of at least 5 ms, the forms and numpy
taking turns sample by sample (who goes first alternates) until each has ``--rounds`` samples and
0.1 s of them; the median sample counts.  ``--offset`` places A, B and C that many bytes past a
64-byte boundary (numpy's large arrays start 16 bytes past a page).

    OPENBLAS_NUM_THREADS=1 python tools/bench_gemv.py --shape 1 1024 1024
    OPENBLAS_NUM_THREADS=1 python tools/bench_gemv.py --shape 1 4096 1024 --offset 0
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from looptune.runtime.compiler import codegen
from looptune.runtime.compiler.build import build_many
from looptune.runtime.compiler.codegen_sizes import FixedSizes
from looptune.runtime.compiler.defaults import default_params
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.ship.timing import pinned_threads, time_interleaved

FORMS = {   # name: (kc, unroll, prefetch, n block: None for all of N)
    "kc8 u8": (8, 8, False, None), "kc8 u8 prefetch": (8, 8, True, None), "kc4 u4": (4, 4, False, None),
    "kc4 u4 prefetch": (4, 4, True, None), "kc4 u1 prefetch": (4, 1, True, None),
    "kc2 u2 prefetch": (2, 2, True, None), "kc4 u4 prefetch, n blocks of 1024": (4, 4, True, 1024),
}


def placed(shape: tuple[int, ...], dtype, offset: int) -> np.ndarray:
    """An array ``offset`` bytes past a 64-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(int(np.prod(shape)) * dtype.itemsize + 64, np.uint8)
    start = (offset - raw.ctypes.data) % 64
    return np.ndarray(shape, dtype, buffer=raw, offset=start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[1, 1024, 1024], metavar=("M", "N", "K"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--offset", type=int, default=16, help="bytes past a 64-byte boundary (default 16)")
    ap.add_argument("--rounds", type=int, default=5, help="samples per form at least (the median is kept)")
    args = ap.parse_args()
    m, n, k = args.shape
    problem = MatmulProblem(m, n, k, dtype=args.dtype)
    base = default_params(problem)
    forms = {"default": base, **{name: replace(base, kc=kc, unroll_k=u, prefetch=pf, nc=nc or -(-n // base.nr) * base.nr)
                                 for name, (kc, u, pf, nc) in FORMS.items()}}
    sources = [codegen.render(p.schedule(), args.dtype, sizes=FixedSizes.of(problem)) for p in forms.values()]
    kernels = {name: Kernel(r.so_path, r.symbol, args.dtype) for name, r in zip(forms, build_many(sources))}
    rng = np.random.default_rng(0)
    a, b, c = (placed(s, args.dtype, args.offset) for s in ((m, k), (k, n), (m, n)))
    a[...], b[...] = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    flops = 2.0 * m * n * k
    fns = {"numpy": lambda: np.matmul(a, b, out=c)}
    fns.update({name: (lambda kern=kern: kern(a, b, c)) for name, kern in kernels.items()})
    with pinned_threads(1):
        seconds = time_interleaved(fns, min_repeats=args.rounds, min_sample_s=5e-3, alternate=True)
    default = f"default: kc{base.kc} u{base.unroll_k}{' prefetch' if base.prefetch else ''}, n blocks of {base.nc}"
    print(f"| {m}x{n}x{k} {args.dtype}, operands {args.offset} B into a line ({default}) | GFLOPS | / numpy |")
    print("| --- | --- | --- |")
    for name, sec in seconds.items():
        print(f"| {name} | {flops / sec / 1e9:.1f} | {seconds['numpy'] / sec:.2f}x |")


if __name__ == "__main__":
    main()
