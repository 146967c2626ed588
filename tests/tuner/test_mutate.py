"""One-factor trace mutations (tune's hill-climb): legal, distinct, one split factor away."""
from dataclasses import replace

from looptune.runtime.compiler.defaults import PREFETCH_KC, default_params, default_schedule, prefetched_n_block
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


def nearest(values, current, limit):
    """Factor moves in the order factor_mutations tries them: nearest first, then the smaller."""
    return sorted((v for v in set(values) if v != current and v <= limit), key=lambda v: (abs(v - current), v))


def test_tile_moves_come_first_alternate_dimensions_and_fit_the_registers():
    """Expectations come from the detected target's register file (AVX-512, AVX2, NEON or portable):
    every first move is a tile that fits it, one dimension changed, m and n moves alternating."""
    base = canonical_schedule(Schedule.from_json(TILED).nest)
    problem = MatmulProblem(98, 384, 3456)
    muts = factor_mutations(base, problem)
    options = tile_options(detect_cpu(), "float32")
    m_moves = [(mr, 16) for mr in nearest([mr for mr, nr in options if nr == 16], 8, problem.m)]
    n_moves = [(8, nr) for nr in nearest([nr for mr, nr in options if mr == 8], 16, problem.n)]
    expected = interleave([m_moves, n_moves])[:4]
    assert expected and {d for d, moves in (("m", m_moves), ("n", n_moves)) if moves} == {"m", "n"}
    first = [(splits(m)["m"], splits(m)["n"]) for m in muts[:len(expected)]]
    assert first == expected
    assert all(t in options for t in first)
    if (8, 32) in options:                                  # AVX-512: the tile that wins on this shape is near
        assert (8, 32) in first


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
    assert small.nc == prefetched_n_block(cpu, small.nr, 4) and PREFETCH_KC * small.nc * 4 <= 32 * 1024 // 3
    wide = default_params(MatmulProblem(1, 4096, 1024), cpu)
    assert wide.prefetch and PREFETCH_KC * wide.nc * 4 <= 32 * 1024 // 3
    double = default_params(MatmulProblem(1, 1024, 1024, dtype="float64"), cpu)
    assert double.prefetch and PREFETCH_KC * double.nc * 8 <= 32 * 1024 // 3
    two = default_params(MatmulProblem(1, 4096, 1024, threads=2), cpu)
    assert two.prefetch and two.parallel == "n.o" and PREFETCH_KC * two.nc * 4 <= 32 * 1024 // 3
    assert -(-4096 // two.nc) % 2 == 0                        # every thread gets as many n blocks
    assert not default_params(MatmulProblem(2, 1024, 1024), cpu).prefetch
    assert not default_params(MatmulProblem(1, 1024, 1024, layout="nt"), cpu).schedule().nest.prefetch
