"""One-factor trace mutations (tune's hill-climb): legal, distinct, one split factor away."""
from dataclasses import replace

import pytest

from looptune.runtime.compiler.defaults import PREFETCH_KC, default_params, default_schedule
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
from looptune.tuner.search.mutate import factor_mutations, interleave, parallel_mutations, prefetch_mutations
from looptune.tuner.search.spaces import tile_options
from looptune.runtime.compiler.machine import detect_cpu

TILED = ('{"steps":[{"factor":8,"loop":"m","op":"split"},{"factor":16,"loop":"n","op":"split"},'
         '{"factor":256,"loop":"k","op":"split"},{"factor":6,"loop":"m.o","op":"split"},'
         '{"op":"reorder","order":["b","m.o.o","m.o.i","n.o","k.o","k.i","m.i","n.i"]},'
         '{"m":"m.i","n":"n.i","op":"register_tile"},{"factor":8,"loop":"n.o","op":"unroll"}],"version":1}')


def splits(s: Schedule) -> dict[str, int]:
    return {st["loop"]: st["factor"] for st in s.trace if st.op == "split"}


def test_each_mutation_changes_exactly_one_split_factor():
    base = canonical_schedule(Schedule.from_json(TILED).nest)
    muts = factor_mutations(base, MatmulProblem(98, 384, 3456))
    assert muts and len({canonical_key(m.nest) for m in muts}) == len(muts)
    assert canonical_key(base.nest) not in {canonical_key(m.nest) for m in muts}
    for m in muts:
        diff = {k for k in splits(base) if splits(m).get(k) != splits(base)[k]}
        assert len(diff) == 1, (splits(base), splits(m))
        assert Schedule.from_json(m.to_json()).nest == m.nest          # save -> load -> replay -> equal


# factor_mutations' register-tile moves from TILED's 8 x 16 tile on 98 x 384 x 3456, in order,
# written out per target (not computed with the code under test).  A tile mr x nr of nvec =
# nr / lanes vectors fits when mr * nvec + nvec + 1 <= registers; moves keep the other side
# (m moves keep nr = 16, n moves keep mr = 8), nearest first (the smaller on a tie), m and n
# alternating while both have moves.
TILE_MOVES = {
    # 32 registers of 16 float32 lanes: nr = 16 takes mr 2..16; mr = 8 takes 1..3 vectors (not 4: 8*4+5 > 32)
    "avx512": [(7, 16), (8, 32), (9, 16), (8, 48), (6, 16), (10, 16), (5, 16), (11, 16), (4, 16), (12, 16),
               (3, 16), (13, 16), (2, 16), (14, 16), (15, 16), (16, 16)],
    # 16 registers of 8 lanes: nr = 16 (2 vectors) takes mr <= 6; mr = 8 only one vector (nr = 8)
    "avx2": [(6, 16), (8, 8), (5, 16), (4, 16), (3, 16), (2, 16)],
    # 32 registers of 4 lanes: nr = 16 (4 vectors) takes mr <= 6; mr = 8 takes 1..3 vectors
    "neon": [(6, 16), (8, 12), (5, 16), (8, 8), (4, 16), (8, 4), (3, 16), (2, 16)],
    # 16 registers of 4 lanes: nr = 16 takes mr = 2 only; mr = 8 one vector
    "portable": [(2, 16), (8, 4)],
}
FAKE_CPUS = {   # a CPU of each target (LOOPTUNE_ISA may cap one below its features: the expectation follows)
    "avx512": dict(arch="x86_64", features=("avx", "avx2", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma")),
    "avx2": dict(arch="x86_64", features=("avx", "avx2", "fma")),
    "neon": dict(arch="aarch64", features=("asimd",)),
    "portable": dict(arch="x86_64", features=("sse4_2",)),
}


@pytest.mark.parametrize("target", ["detected"] + sorted(FAKE_CPUS))
def test_tile_moves_come_first_alternate_dimensions_and_fit_the_registers(target):
    """Every first move is a tile that fits the target's register file, one dimension changed,
    m and n moves alternating, nearest first: the detected CPU's and one of each target's."""
    cpu = detect_cpu() if target == "detected" else replace(detect_cpu(), **FAKE_CPUS[target])
    base = canonical_schedule(Schedule.from_json(TILED).nest)
    muts = factor_mutations(base, MatmulProblem(98, 384, 3456), cpu)
    tiles = [(splits(m)["m"], splits(m)["n"]) for m in muts]
    expected = TILE_MOVES[cpu.vector_isa]
    assert tiles[:len(expected)] == expected
    assert set(tiles[len(expected):]) == {(8, 16)}          # then the cache-block moves, same tile
    assert all(t in tile_options(cpu, "float32") for t in expected)


def test_untiled_and_default_schedules():
    assert factor_mutations(Schedule.initial(), MatmulProblem(64, 64, 64)) == []
    p = MatmulProblem(200, 300, 400)
    d = canonical_schedule(default_schedule(p).nest)
    muts = factor_mutations(d, p)
    assert muts and all(len(m.trace) == len(d.trace) for m in muts)


def test_interleave():
    assert interleave([[1, 2, 3], ["a"], []]) == [1, "a", 2, 3]


def test_parallel_mutations_move_drop_or_add_the_parallel_loop():
    p = MatmulProblem(200, 300, 400, threads=2)
    d = canonical_schedule(default_schedule(p).nest)
    assert d.nest.parallel is not None and parallel_mutations(d, MatmulProblem(200, 300, 400)) == []
    muts = parallel_mutations(d, p)
    assert len({canonical_key(m.nest) for m in muts}) == len(muts) and canonical_key(d.nest) not in \
        {canonical_key(m.nest) for m in muts}
    assert None in [m.nest.parallel for m in muts[:2]]                 # dropping it comes early
    sizes = {"b": p.batch, "m": p.m, "n": p.n, "k": p.k}
    for m in muts:
        assert Schedule.from_json(m.to_json()).nest == m.nest
        assert m.nest.loops == d.nest.loops and m.nest.pack == d.nest.pack and m.nest.tile == d.nest.tile
        if m.nest.parallel is not None:
            i = m.nest.index(m.nest.parallel)
            assert m.nest.parallel != d.nest.parallel and m.nest.loops[i].dim != "k"
            assert i < m.nest.kernel_start() and m.nest.trip_counts(sizes)[i][0] >= 2
    sequential = next(m for m in muts if m.nest.parallel is None)
    added = parallel_mutations(sequential, p)
    assert added and all(m.nest.parallel is not None for m in added)
    assert d.nest.parallel in [m.nest.parallel for m in added]


def test_prefetch_mutations_add_or_drop_the_prefetch_step():
    """Legal only for the operand the micro-kernel streams unpacked: added to a GEMV schedule,
    dropped from one that has it, never offered where both operands are packed."""
    gemv = replace(default_params(MatmulProblem(2, 1024, 1024)), prefetch=False).schedule()
    [added] = prefetch_mutations(gemv)
    assert added.nest.prefetch == ("B",) and Schedule.from_json(added.to_json()).nest == added.nest
    assert added.nest.loops == gemv.nest.loops and added.nest.unroll == gemv.nest.unroll
    [dropped] = prefetch_mutations(added)
    assert canonical_key(dropped.nest) == canonical_key(gemv.nest)
    assert prefetch_mutations(default_schedule(MatmulProblem(200, 300, 400))) == []     # B is packed
    assert prefetch_mutations(Schedule.initial()) == []


def test_gemv_default_prefetches_in_n_blocks_whose_sweep_fits_l1():
    """One row of A: the default streams B in short k blocks, prefetches the next, and cuts n into
    blocks whose sweep (PREFETCH_KC rows of them) fits a third of L1; a thread's share of n too.
    Two rows of A, or a transposed B (packed), do not prefetch."""
    cpu = replace(detect_cpu(), l1d_bytes=32 * 1024)
    small = default_params(MatmulProblem(1, 1024, 1024), cpu)
    assert small.prefetch and small.kc == PREFETCH_KC and "B" in small.schedule().nest.prefetch
    # the widest n block of whole tiles whose sweep fits: one more tile would not
    assert small.nc % small.nr == 0
    assert PREFETCH_KC * small.nc * 4 <= 32 * 1024 // 3 < PREFETCH_KC * (small.nc + small.nr) * 4
    wide = default_params(MatmulProblem(1, 4096, 1024), cpu)
    assert wide.prefetch and PREFETCH_KC * wide.nc * 4 <= 32 * 1024 // 3
    double = default_params(MatmulProblem(1, 1024, 1024, dtype="float64"), cpu)
    assert double.prefetch and PREFETCH_KC * double.nc * 8 <= 32 * 1024 // 3
    two = default_params(MatmulProblem(1, 4096, 1024, threads=2), cpu)
    assert two.prefetch and two.parallel == "n.o" and PREFETCH_KC * two.nc * 4 <= 32 * 1024 // 3
    assert -(-4096 // two.nc) % 2 == 0                        # every thread gets as many n blocks
    assert not default_params(MatmulProblem(2, 1024, 1024), cpu).prefetch
    assert not default_params(MatmulProblem(1, 1024, 1024, layout="nt"), cpu).schedule().nest.prefetch
