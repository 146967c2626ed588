"""The analytic default schedule: the five-loop GEMM structure of BLIS, sized for this CPU.

::

    for n.o  step NC:                 B block (KC x NC) lives in L3
      for k.o  step KC:               pack B panels (NR wide)
        for m.o  step MC:             A block (MC x KC) lives in L2; pack A panels (MR tall)
          for n.i.o step NR:
            for m.i.o step MR:
              micro-kernel: for k.i: MR x NR accumulators in registers

It is expressed as an ordinary trace, so the tuner can start from it, the database
can store it, and it replays on any size of its family.  ``BlockingParams`` is
also the search space of the grid/random searches: every point is one trace.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from looptune.runtime.compiler.machine import CpuInfo, detect_cpu

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule

# Register tiles (MR, NR) that keep the accumulators, one row of vectors and a broadcast in registers.
_TILES = {
    ("avx512", "float32"): (12, 32), ("avx512", "float64"): (12, 16),
    ("avx2", "float32"): (6, 16), ("avx2", "float64"): (6, 8),
    ("neon", "float32"): (8, 12), ("neon", "float64"): (8, 6),
    ("portable", "float32"): (4, 8), ("portable", "float64"): (4, 4),
}


@dataclass(frozen=True)
class BlockingParams:
    mr: int
    nr: int
    mc: int
    kc: int
    nc: int
    unroll_k: int = 4
    pack_a: bool = True
    pack_b: bool = True
    parallel: str | None = None      # None, "m.o" or "n.o"
    vector: str = "n"                # the tile dimension mapped to SIMD lanes
    inner: str = "m"                 # the innermost tile loop: m (B's micro-panel reused by the
                                     # next tiles) or n (A's micro-panel reused)
    prefetch: bool = False           # prefetch the vector operand's next k block (if it is unpacked)

    def schedule(self) -> Schedule:
        """The trace for these parameters (splits that do not apply are left out)."""
        s = Schedule.initial()
        mc = max(self.mr * 2, self.mc // self.mr * self.mr)
        nc = max(self.nr * 2, self.nc // self.nr * self.nr)
        s = s.step("split", loop="n", factor=nc).step("split", loop="k", factor=max(2, self.kc))
        s = s.step("split", loop="m", factor=mc)
        s = s.step("split", loop="n.i", factor=self.nr).step("split", loop="m.i", factor=self.mr)
        tiles = ["n.i.o", "m.i.o"] if self.inner == "m" else ["m.i.o", "n.i.o"]
        s = s.step("reorder", order=["b", "n.o", "k.o", "m.o", *tiles, "k.i", "m.i.i", "n.i.i"])
        s = s.step("register_tile", m="m.i.i", n="n.i.i")
        if self.vector == "m":
            s = s.step("vectorize", loop="m.i.i")
        if self.pack_b:
            s = s.step("pack", operand="B", at="k.o")
        if self.pack_a:
            s = s.step("pack", operand="A", at="m.o")
        streamed = "B" if self.vector == "n" else "A"
        if self.prefetch and not (self.pack_b if streamed == "B" else self.pack_a):
            s = s.step("prefetch", operand=streamed)
        if self.unroll_k > 1:
            s = s.step("unroll", loop="k.i", factor=self.unroll_k)
        if self.parallel:
            s = s.step("parallel", loop=self.parallel)
        return s


# bfloat16 by how its kernels compute (``machine.BF16_LEVELS``): four 16x16 AMX tiles; on vdpbf16ps
# the float32 tile (the accumulators are float32); converted to float32 while packing, float32's.
_BF16_TILES = {"amx": (32, 32), "avx512bf16": (12, 32)}
PREFETCH_KC = 4     # the k block of a streamed GEMV whose next block is prefetched


def default_tile(cpu: CpuInfo, dtype: str) -> tuple[int, int]:
    if dtype == "bfloat16":
        return _BF16_TILES.get(cpu.bf16_isa) or _TILES[(cpu.vector_isa, "float32")]
    if dtype == "float16":      # widened to float32 while packing: float32's tile (codegen_f16)
        return _TILES[(cpu.vector_isa, "float32")]
    return _TILES[(cpu.vector_isa, dtype)]


def panel_itemsize(problem: MatmulProblem) -> int:
    """Bytes of one element of a packed panel: float16 kernels pack float32 (``codegen_f16``)."""
    return 4 if problem.dtype == "float16" else problem.itemsize


def default_params(problem: MatmulProblem, cpu: CpuInfo | None = None) -> BlockingParams:
    """Cache-derived blocking: KC so an NR-wide B panel and an MR-tall A panel share L1,
    MC so the A block fills about half of L2, NC so the B block fits in L3; GEMV-like
    problems (M <= 16) stream B instead."""
    cpu = cpu or detect_cpu()
    mr, nr = default_tile(cpu, problem.dtype)
    size = panel_itemsize(problem)
    kc = max(64, min(512, cpu.l1d_bytes // ((mr + nr) * size) // 16 * 16 * 2))
    if problem.dtype == "bfloat16" and cpu.bf16_isa == "amx":
        # AMX: C stays in tile registers over the whole k block, and reloading C costs more than
        # panels that outgrow L1 (measured), so k blocks are long, in whole 32-k steps
        kc = 1024
    kc = min(kc, _round_up(problem.k, 32 if problem.dtype == "bfloat16" else 16))
    mc = max(mr, (cpu.l2_bytes // 2 // (kc * size)) // mr * mr)
    nc = max(nr, (cpu.l3_bytes // 4 // (kc * size)) // nr * nr)
    amx_inner = "m"
    if problem.dtype == "bfloat16" and cpu.bf16_isa == "amx":
        # both blocks in L2 (B's half of it, A's an eighth): the AMX tile reads its panels at a
        # rate only L2 keeps up with (measured best at 1024^3 on a 2 MB L2: mc 128, nc 512)
        mc = max(mr, (cpu.l2_bytes // 8 // (kc * size)) // mr * mr)
        nc = max(nr, (cpu.l2_bytes // 2 // (kc * size)) // nr * nr)
        amx_inner = "n"     # an A micro-panel serves the tiles across the B block (measured +4 %)
    mc = min(mc, _round_up(problem.m, mr))
    nc = min(nc, _round_up(problem.n, nr))
    # A packed only when it outgrows half of L2: a smaller A is read from L2 in place for less than
    # packing it costs (1 thread, Sapphire Rapids: 128^3 145 -> 159 GFLOPS, 131x67x263 82 -> 97,
    # 512^3 147 -> 149; as AVX2: 128^3 92 -> 100; 1024^3, packed, 140 -> 144)
    pack_a = problem.dtype not in ("float32", "float64") or problem.m * problem.k * size > cpu.l2_bytes // 2
    params = BlockingParams(mr, nr, mc, kc, nc, inner=amx_inner, pack_a=pack_a)
    shape = form(problem, cpu)      # the one decision the resolver's nearest-record rule also reads
    if shape == "narrow":
        params = narrow_params(problem, cpu)
        mr, nr, mc, nc = params.mr, params.nr, params.mc, params.nc
    elif shape == "gemv":
        # GEMV-like: A has nothing to reuse, so stream B in place, a few rows at a time outside
        # wide n tiles (every B row is read contiguously), and pack nothing.
        # k blocks of 8 rows of B, which the next tiles of m find in L1; a K of at most 64 is one
        # block (C is then stored once: 16x20000x16 79 -> 104 GFLOPS, 16x4096x64 76 -> 92)
        lanes = cpu.vector_bytes // size
        mr, nr = 2 if problem.m <= 2 else 4, min(64, 4 * lanes)
        kc = problem.k if 2 <= problem.k <= SHORT_GEMV_K else 8
        params = BlockingParams(mr, nr, 2 * mr, kc, _round_up(problem.n, nr), unroll_k=8, pack_a=False,
                                pack_b=problem.layout[1] == "t")    # vector loads need unit stride along n
        if problem.dtype == "bfloat16" and cpu.bf16_isa == "amx":
            # bf16 packs both operands anyway, so AMX wins here too: one 16-row tile (M padded),
            # one or two column tiles, and k blocks as long as a quarter of L2 holds B's block
            # (measured: 8x1024x1024 1.6x, 16x16x20000 25x the vdpbf16ps streaming kernel)
            nr = 16 if problem.n <= 16 else 32
            kc = max(32, min(4096, cpu.l2_bytes // 4 // (_round_up(problem.n, nr) * size)) // 32 * 32)
            params = BlockingParams(16, nr, 16, min(kc, _round_up(problem.k, 32)), _round_up(problem.n, nr),
                                    unroll_k=1)
        if problem.m == 1 and problem.dtype in ("float32", "float64") and not params.pack_b:
            # One row of A: every B row is read once, and each k block opens new streams the
            # hardware prefetcher has to find.  Short k blocks with the next block's tile
            # prefetched into L1, in n blocks whose sweep (kc rows of nc) fits a third of L1 so the
            # lines are still there when used: on a Zen 5 core 1x1024x1024 went from 47 to 58
            # GFLOPS and 1x4096x1024 from 33 to 46 (tools/bench_gemv.py).  From two rows of A on
            # the hint cost more than it saved.
            params = replace(params, kc=PREFETCH_KC, unroll_k=PREFETCH_KC, prefetch=True,
                             nc=min(params.nc, prefetched_n_block(cpu, nr, size)))
        mc, nc = params.mc, params.nc
    if problem.threads > 1:
        # Prefer splitting N across threads: each thread then packs its own B panel in parallel
        # (with m.o parallel, B is packed by one thread while the others wait).  Block counts are
        # multiples of the thread count so no thread gets an extra block.
        t = problem.threads
        if problem.n >= t * nr * 4 or problem.n >= problem.m:
            blocks = _round_up(-(-problem.n // nc), t)
            params = replace(params, parallel="n.o", nc=_round_up(-(-problem.n // blocks), nr))
        else:
            blocks = _round_up(-(-problem.m // mc), t)
            params = replace(params, parallel="m.o", mc=_round_up(-(-problem.m // blocks), mr))
    return params


# GEMV-like products: M up to this (A has nothing to reuse); with K up to SHORT_GEMV_K, all of K in
# one block
GEMV_M = 16
SHORT_GEMV_K = 64

# k blocks of a narrow product: its accumulators stay in registers this long (measured at 16x16x20000
# on a Sapphire Rapids core: 4096 129 GFLOPS, the whole 20000 114)
NARROW_KC = 4096


def max_tile_rows(cpu: CpuInfo, vectors: int) -> int:
    """The most rows a register tile of ``vectors`` vector registers per row may have on ``cpu``:
    its accumulators, one row of B's vectors and A's broadcast fit the register file."""
    return (cpu.vector_registers - vectors - 1) // vectors


def is_narrow(problem: MatmulProblem, cpu: CpuInfo | None = None) -> bool:
    """A float product whose N fits one or two vector registers (20000x16x16, 16x16x20000): each
    element of A feeds at most two vector FMAs, so packing A costs more than it saves.  N = 1 is
    a matrix-vector product (numpy's, ``handoff.dot_products``)."""
    cpu = cpu or detect_cpu()
    return (problem.dtype in ("float32", "float64") and problem.m >= 2
            and 2 <= problem.n <= 2 * (cpu.vector_bytes // problem.itemsize))


def form(problem: MatmulProblem, cpu: CpuInfo | None = None) -> str:
    """Which of ``default_params``' forms a problem takes: ``narrow``, ``gemv`` (M <= 16) or
    ``blocked``.  A record tuned for one form is not the nearest record of a problem of another."""
    if is_narrow(problem, cpu):
        return "narrow"
    return "gemv" if problem.m <= GEMV_M else "blocked"


def narrow_params(problem: MatmulProblem, cpu: CpuInfo | None = None) -> BlockingParams | None:
    """A narrow product's form: tiles exactly N wide (a tile rounded up to whole vectors sends its
    edge through the scratch tile), all of M in one tile row-block when M <= 16 (B is then read
    once) and else 8 rows (more rows of A in flight ran slower), within the register file; A and
    B read in place (B packed only when its n stride is not 1); long k blocks.  None for other
    problems.  At 1 thread on a Sapphire Rapids core against numpy: 20000x16x16 107 GFLOPS (59),
    16x16x20000 129 (63), 12544x24x144 91 (89), 4096x8x512 59 (42); the blocked default gave 24,
    9.5, 41 and 22."""
    cpu = cpu or detect_cpu()
    if not is_narrow(problem, cpu):
        return None
    vectors = -(-problem.n // (cpu.vector_bytes // problem.itemsize))
    rows = problem.m if problem.m <= GEMV_M else 8
    mr = max(2, min(rows, max_tile_rows(cpu, vectors)))
    kc = min(NARROW_KC, _round_up(problem.k, 16))
    return BlockingParams(mr, problem.n, _round_up(min(problem.m, 4096), mr), kc, problem.n,
                          unroll_k=4, pack_a=False, pack_b=problem.layout[1] == "t")


def prefetched_n_block(cpu: CpuInfo, nr: int, itemsize: int) -> int:
    """The widest n block (whole tiles of ``nr``) whose sweep of ``PREFETCH_KC`` rows fits a third
    of L1: the lines the ``prefetch`` step fetches for the next k block are still there when the
    sweep comes back to them (measured at 1x4096x1024: n blocks of 1024 46 GFLOPS, of 1536 42)."""
    return max(nr, cpu.l1d_bytes // 3 // (PREFETCH_KC * itemsize) // nr * nr)


# Stacks of matrices at most this big in every dimension get ``small_stack_schedule``.
SMALL_MATRIX = 32


def small_stack_schedule(problem: MatmulProblem, cpu: CpuInfo | None = None) -> Schedule | None:
    """A stack of small matrices (libxsmm's case): each product is one register tile or a few,
    read straight from the operands (packing a 4x4 matrix costs more than multiplying it), k
    unrolled, the batch the outer and parallel loop; rendered as an exact-size kernel for any
    batch (``FixedSizes.of_matrices``).  None when the problem is not such a stack, or when its
    rows are not whole 16-byte vectors (a scalar tile loses to numpy's loop; BENCHMARKS.md,
    "Stacks of small matrices")."""
    if problem.batch < 2 or max(problem.m, problem.n, problem.k) > SMALL_MATRIX:
        return None
    if problem.dtype not in ("float32", "float64") or problem.n % (16 // problem.itemsize):
        return None
    cpu = cpu or detect_cpu()
    lanes = max(1, cpu.vector_bytes // problem.itemsize)
    budget = max(4, cpu.vector_registers // 2)       # accumulators: half the registers
    nr = problem.n if -(-problem.n // lanes) <= budget // 2 else lanes * (budget // 2)
    mr = max(1, min(problem.m, budget // -(-nr // lanes)))
    s = Schedule.initial()
    s = s.step("split", loop="m", factor=max(2, mr)).step("split", loop="n", factor=max(2, nr))
    s = s.step("split", loop="k", factor=max(2, problem.k))
    s = s.step("reorder", order=["b", "n.o", "k.o", "m.o", "k.i", "m.i", "n.i"])
    s = s.step("register_tile", m="m.i", n="n.i")
    if problem.k > 1:
        s = s.step("unroll", loop="k.i", factor=min(problem.k, 8))
    if problem.threads > 1:
        s = s.step("parallel", loop="b")     # in chunks of the stack (``codegen_threads.outline_parallel``)
    return s


def default_schedule(problem: MatmulProblem, cpu: CpuInfo | None = None) -> Schedule:
    return small_stack_schedule(problem, cpu) or default_params(problem, cpu).schedule()


def _round_up(x: int, to: int) -> int:
    return max(to, -(-x // to) * to)
