"""Parametric schedule spaces for grid and random search.

The RL agent walks the full step grammar; search baselines and database builds also
sample the BLIS-shaped subspace (``BlockingParams``), where every point is a known-good
structure and only sizes vary.  Candidates are deduplicated by their trace.

Problems with threads > 1 get every template in parallel variants (``parallel_variants``): over
the n blocks and over the m blocks (and over the batch when it has an entry per thread), each
with its block size cut so that every thread gets the same number of blocks.  These are the
loops of the BLIS structure that may run on threads: ``k.o`` may not (threads would race on
C), and the loops inside the micro-kernel may not (the IR's rule).
"""
from __future__ import annotations

import random
from dataclasses import replace

from looptune.runtime.compiler.abi import OUTPUT_DTYPE
from looptune.runtime.compiler.codegen_bf16 import AMX_TILE_ROWS, amx_tile_fits
from looptune.runtime.compiler.machine import CpuInfo, detect_cpu
from looptune.runtime.compiler.defaults import (PREFETCH_KC, BlockingParams, default_params, max_tile_rows,
                                                prefetched_n_block)
from looptune.runtime.compiler.workload import ITEMSIZE, MatmulProblem


# The accumulators' element type for inputs of a dtype: the output's, except that a float16
# kernel computes into a float32 scratch C and rounds once on store (``codegen_f16``).
ACCUMULATOR_DTYPE = {**OUTPUT_DTYPE, "float16": "float32"}


def accumulator_lanes(cpu: CpuInfo, dtype: str) -> int:
    """Lanes of one vector register of accumulators for inputs of ``dtype``: the accumulators'
    element type counts (bfloat16 and float16 inputs accumulate in float32, so 16 lanes on
    AVX-512, not 32)."""
    return cpu.vector_bytes // ITEMSIZE[ACCUMULATOR_DTYPE[dtype]]


def tile_options(cpu: CpuInfo, dtype: str) -> list[tuple[int, int]]:
    """Register tiles whose accumulators fit the register file with room for operands; for
    bfloat16 on an AMX machine also the tiles made of whole AMX tiles (16 x 16 .. 32 x 32)."""
    lanes = accumulator_lanes(cpu, dtype)
    out = []
    for nvec in (1, 2, 3, 4):
        for mr in range(2, 17):
            if mr <= max_tile_rows(cpu, nvec):
                out.append((mr, nvec * lanes))
    if dtype == "bfloat16" and cpu.bf16_isa == "amx":
        sides = range(AMX_TILE_ROWS, 4 * AMX_TILE_ROWS + 1, AMX_TILE_ROWS)
        out += [(mr, nr) for mr in sides for nr in sides if amx_tile_fits(mr, nr) and (mr, nr) not in out]
    return out


def blocking_candidates(problem: MatmulProblem, count: int, seed: int = 0,
                        cpu: CpuInfo | None = None) -> list[BlockingParams]:
    """The default parameters first, then up to ``count`` distinct random points."""
    cpu = cpu or detect_cpu()
    rng = random.Random(seed)
    base = default_params(problem, cpu)
    tiles = tile_options(cpu, problem.dtype)
    out = [base]
    seen = {base.schedule().to_json()}
    variants = (v for t in _templates(problem, base, cpu) for v in parallel_variants(problem, t, base.parallel))
    for cand in variants:
        key = cand.schedule().to_json()
        if key not in seen and len(out) < count + 1:
            seen.add(key)
            out.append(cand)
    attempts = 0
    while len(out) < count + 1 and attempts < count * 20:
        attempts += 1
        mr, nr = rng.choice(tiles) if rng.random() < 0.7 else (base.mr, base.nr)
        kc = rng.choice([4, 8, 16, 32, 64, 96, 128, 192, 256, 320, 384, 512])
        mc = mr * rng.choice([2, 4, 6, 8, 12, 16, 24, 32])
        nc = nr * rng.choice([4, 8, 16, 32, 64, 128])
        cand = replace(base, mr=mr, nr=nr, kc=min(kc, max(16, problem.k)), mc=mc, nc=nc,
                       unroll_k=rng.choice([1, 2, 4, 8]),
                       pack_a=rng.random() < 0.7, pack_b=rng.random() < 0.85, prefetch=False)
        # the default's parallel loop (if it has one), with its blocks cut so every thread gets some
        if base.parallel is not None:
            cand = parallel_variants(problem, cand, base.parallel)[0]
        key = cand.schedule().to_json()
        if key not in seen:
            seen.add(key)
            out.append(cand)
    return out


def parallel_variants(problem: MatmulProblem, params: BlockingParams,
                      prefer: str | None = None) -> list[BlockingParams]:
    """``params`` with the problem's threads over each loop that can use them, ``prefer`` first:

    * ``"n.o"``: NC cut so the n blocks come in a multiple of the thread count (each thread packs
      its own B panels), e.g. n = 256, NC 512 -> 128 for 2 threads;
    * ``"m.o"``: the same for MC and the m blocks;
    * ``"b"``: the batch, when it has an entry per thread (block sizes unchanged).

    A variant whose loop has fewer than two iterations for this problem is left out; with none
    left (a tiny problem) or one thread, ``[params]`` without a parallel loop."""
    t = problem.threads
    sequential = replace(params, parallel=None)
    if t <= 1:
        return [sequential]
    loops = sorted(("n.o", "m.o"), key=lambda name: name != prefer) + (["b"] if problem.batch >= t else [])
    out = []
    for loop in loops:
        if loop == "n.o":
            nc = _even_block(problem.n, params.nc, params.nr, t)
            cand, iterations = replace(params, parallel=loop, nc=nc), _ceil_div(problem.n, _block(nc, params.nr))
        elif loop == "m.o":
            mc = _even_block(problem.m, params.mc, params.mr, t)
            cand, iterations = replace(params, parallel=loop, mc=mc), _ceil_div(problem.m, _block(mc, params.mr))
        else:
            cand, iterations = replace(params, parallel=loop), problem.batch
        if iterations >= 2:
            out.append(cand)
    return out or [sequential]


def _block(size: int, tile: int) -> int:
    """The block a ``BlockingParams`` size becomes in its schedule: whole tiles, at least two."""
    return max(2 * tile, size // tile * tile)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _even_block(extent: int, size: int, tile: int, threads: int) -> int:
    """A block size (whole tiles) giving ``extent`` a multiple of ``threads`` blocks, as few as can be."""
    blocks = _ceil_div(_ceil_div(extent, _block(size, tile)), threads) * threads
    return _ceil_div(_ceil_div(extent, blocks), tile) * tile


def _templates(problem: MatmulProblem, base: BlockingParams, cpu: CpuInfo) -> list[BlockingParams]:
    """Structures that won sweeps on x86 (AVX2 and AVX-512) and ARM, expressed in vector widths so
    they carry over between ISAs: tall-narrow tiles with A read in place for small problems, wide
    tiles with both operands packed for large ones."""
    lanes = accumulator_lanes(cpu, problem.dtype)
    base = replace(base, prefetch=False)      # (the default's own choice is the first candidate)
    k = max(16, min(problem.k, 512))
    small = problem.m * problem.k * problem.itemsize <= cpu.l2_bytes // 2
    out = [
        replace(base, mr=8, nr=lanes, mc=256, kc=min(k, 256), nc=32 * lanes, unroll_k=4, pack_a=False, pack_b=True),
        replace(base, mr=8, nr=lanes, mc=256, kc=min(k, 256), nc=32 * lanes, unroll_k=4, pack_a=False, pack_b=False),
        replace(base, mr=6, nr=lanes, mc=36, kc=min(k, 256), nc=32 * lanes, unroll_k=8, pack_a=False, pack_b=True),
        replace(base, mr=5, nr=4 * lanes, mc=80, kc=min(k, 256), nc=256 * lanes, unroll_k=2, pack_a=False, pack_b=True),
        replace(base, mr=12, nr=2 * lanes, mc=96, kc=min(k, 384), nc=128 * lanes, unroll_k=1, pack_a=True, pack_b=True),
        replace(base, mr=6, nr=3 * lanes, mc=48, kc=min(k, 512), nc=96 * lanes, unroll_k=1, pack_a=True, pack_b=True),
    ]
    if not small:
        out = out[3:] + out[:3]
    if problem.dtype == "bfloat16" and cpu.bf16_isa == "amx":
        # AMX: the other shapes of whole tiles first, with the default's long k blocks
        out = [replace(base, mr=mr, nr=nr, mc=max(mr, base.mc // mr * mr), nc=max(nr, base.nc // nr * nr))
               for mr, nr in ((16, 32), (32, 16), (16, 48))] + out
    if problem.m <= 64:
        # Skinny M (decode, GEMV-like): little to reuse in A, so stream B rows in place: a few k
        # rows at a time outside wide n tiles keeps every B row contiguous (axpy order), no packing.
        skinny = [replace(base, mr=mr, nr=nr * lanes, mc=2 * mr, kc=8, nc=1 << 14, unroll_k=8, pack_a=False, pack_b=False)
                  for mr, nr in ((2, 4), (4, 4), (2, 2), (8, 2), (16, 1), (8, 4))]
        if problem.m <= 2:
            # ... with short k blocks whose successor is prefetched (the ``prefetch`` step)
            skinny = [replace(c, kc=PREFETCH_KC, unroll_k=PREFETCH_KC, prefetch=True,
                              nc=prefetched_n_block(cpu, c.nr, problem.itemsize)) for c in skinny[:3:2]] + skinny
        # ... or keep a whole column panel of C in registers across all of K (A packed once, B
        # read in place, C written once): wins when M nearly fills a tile (8 x 1024 x 1024: 105
        # GFLOPS against 70 for the streaming form).
        resident = _register_resident(problem, base, cpu, lanes)
        if problem.m <= 16:
            mixed = [c for pair in zip(skinny, resident) for c in pair]
            out = mixed + skinny[len(resident):] + out
        else:
            out = out + resident + skinny
    valid = set(tile_options(cpu, problem.dtype))
    return [c for c in out if (c.mr, c.nr) in valid or cpu.vector_registers >= 32]


def _register_resident(problem: MatmulProblem, base: BlockingParams, cpu: CpuInfo, lanes: int) -> list[BlockingParams]:
    """Skinny-M tiles that cover M (or 8 rows of it) and accumulate over the whole of K."""
    mr = min(max(problem.m, 2), 8)
    kc = max(16, min(-(-problem.k // 16) * 16, 4096))
    shapes = [(mr, 2), (min(max(problem.m, 2), 16), 1) if problem.m > 8 else (mr, 4)]
    out = []
    for m_r, nvec in shapes:
        if m_r <= max_tile_rows(cpu, nvec):
            out.append(replace(base, mr=m_r, nr=nvec * lanes, mc=2 * m_r, kc=kc, nc=1 << 14, unroll_k=4,
                               pack_a=True, pack_b=problem.layout[1] == "t", parallel=base.parallel))
    return out
