"""Trace mutations: schedules one *parameter* away from a given one, for tune()'s hill-climb.

The agent's actions cannot change a register tile once it is chosen (``tile_<MR>x<NR>`` is one
macro action from the untiled nest), and its one-edit neighbours only add steps.  A schedule
that is right in structure but wrong in one size (an 8 x 16 tile where 8 x 32 wins; a K block
of 256 where 512 wins) is one *factor* away instead.  These mutations replay the same trace
with one split factor changed:

    before: split(m, 8) split(n, 16) split(k, 256) ... register_tile(m.i, n.i) ...
    after:  split(m, 8) split(n, 32) split(k, 256) ... register_tile(m.i, n.i) ...   (tile n 16 -> 32)
            split(m, 8) split(n, 16) split(k, 512) ...                              (K block x2)

Register-tile factors move through the tiles that fit the register file (``spaces.tile_options``);
every other split factor is halved and doubled.  A mutation that does not replay (the trace
grammar and the IR's legality checks decide) is skipped, so every result is a legal schedule.

For problems with threads > 1, ``parallel_mutations`` moves the ``parallel`` step to another
loop or drops it (no action can: ``parallel`` is set once), or adds it where it is missing:

    before: ... pack(A, m.o) unroll(k.i, 4) parallel(n.o)
    after:  ... pack(A, m.o) unroll(k.i, 4) parallel(m.o)      (threads over the m blocks)
            ... pack(A, m.o) unroll(k.i, 4)                    (one thread: faster on small problems)

``prefetch_mutations`` adds or drops the ``prefetch`` step (no action takes it).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from looptune.runtime.compiler.machine import CpuInfo, detect_cpu
from looptune.runtime.compiler.trace import Step, Trace
from looptune.runtime.compiler.ir import ScheduleError
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule

from looptune.runtime.compiler.schedule import canonical_key, canonical_schedule
from looptune.tuner.search.spaces import tile_options


def _tile_splits(steps: list[Step]) -> dict[int, str]:
    """Index of the split step that sets each register-tile extent -> the tile's dimension."""
    tile = next((s for s in steps if s.op == "register_tile"), None)
    if tile is None:
        return {}
    out = {}
    for dim in ("m", "n"):
        name = tile[dim]
        if not name.endswith(".i"):
            continue
        parent = name[:-2]
        for i, s in enumerate(steps):
            if s.op == "split" and s["loop"] == parent:
                out[i] = dim
    return out


def _replay(steps: Iterable[Step]) -> Schedule | None:
    try:
        return Schedule.from_trace(Trace(tuple(steps)))
    except ScheduleError:      # TraceFormatError (a factor out of the grammar) included
        return None


def factor_mutations(schedule: Schedule, problem: MatmulProblem, cpu: CpuInfo | None = None) -> list[Schedule]:
    """Legal schedules that differ from ``schedule`` in one split factor, register-tile
    changes first (nearest tile sizes first), then cache-block halvings and doublings."""
    cpu = cpu or detect_cpu()
    steps = list(schedule.trace)
    tiles = _tile_splits(steps)
    sizes = {"m": problem.m, "n": problem.n, "k": problem.k}
    options = tile_options(cpu, problem.dtype)
    current = {dim: steps[i]["factor"] for i, dim in tiles.items()}
    per_dim: list[list[tuple[int, int]]] = []          # [(step index, new factor)], nearest first
    for i, dim in tiles.items():
        cur = steps[i]["factor"]
        if dim == "m":
            values = {mr for mr, nr in options if nr == current.get("n")}
        else:
            values = {nr for mr, nr in options if mr == current.get("m")}
        values = sorted((v for v in values if v != cur and v <= max(2, sizes[dim])), key=lambda v: (abs(v - cur), v))
        per_dim.append([(i, v) for v in values])
    tile_moves = interleave(per_dim)
    block_moves: list[tuple[int, int]] = []
    for i, s in enumerate(steps):
        if s.op != "split" or i in tiles:
            continue
        for v in (s["factor"] * 2, s["factor"] // 2):
            if 2 <= v <= sizes.get(s["loop"].split(".")[0], v):
                block_moves.append((i, v))
    out: list[Schedule] = []
    seen = {canonical_key(schedule.nest)}
    for i, v in tile_moves + block_moves:
        new = _replay(steps[:i] + [Step.make("split", loop=steps[i]["loop"], factor=v)] + steps[i + 1:])
        if new is None:
            continue
        key = canonical_key(new.nest)
        if key not in seen:
            seen.add(key)
            out.append(canonical_schedule(new.nest))
    return out


def parallel_mutations(schedule: Schedule, problem: MatmulProblem) -> list[Schedule]:
    """Legal schedules that differ from ``schedule`` in where its iterations run on threads: the
    ``parallel`` step moved to each other loop that can use the threads, then dropped after the
    first such move; for a schedule without one, ``parallel`` added at each such loop.  [] for a
    single-threaded problem.

    A loop can use the threads when the IR allows it (not a reduction ``k`` loop, outside the
    micro-kernel) and it has at least two iterations for this problem; loops with an iteration
    per thread come first, outermost first.  Dropping ``parallel`` is how a record uses fewer
    threads than allowed when one is faster."""
    if problem.threads <= 1:
        return []
    sequential = _replay(s for s in schedule.trace if s.op != "parallel")
    if sequential is None:
        return []
    nest = sequential.nest
    sizes = {"b": problem.batch, "m": problem.m, "n": problem.n, "k": problem.k}
    start = nest.kernel_start()
    usable = sorted((trips < problem.threads, i, loop.name)
                    for i, (loop, (trips, _)) in enumerate(zip(nest.loops, nest.trip_counts(sizes)))
                    if i < start and loop.dim != "k" and trips >= 2 and loop.name != schedule.nest.parallel)
    moves = [_replay(list(sequential.trace) + [Step.make("parallel", loop=name)]) for _, _, name in usable]
    out = [m for m in moves if m is not None]
    if schedule.nest.parallel is not None:
        out = out[:1] + [sequential] + out[1:]
    seen = {canonical_key(schedule.nest)}
    unique = []
    for cand in out:
        key = canonical_key(cand.nest)
        if key not in seen:
            seen.add(key)
            unique.append(canonical_schedule(cand.nest))
    return unique


def prefetch_mutations(schedule: Schedule) -> list[Schedule]:
    """The schedule with its ``prefetch`` step dropped, or added for the operand the micro-kernel
    streams as vectors where that is legal (the operand is not packed)::

        before: ... register_tile(m.i.i, n.i.i) unroll(k.i, 4)
        after:  ... register_tile(m.i.i, n.i.i) prefetch(B) unroll(k.i, 4)
    """
    nest = schedule.nest
    if nest.prefetch:
        cand = _replay(s for s in schedule.trace if s.op != "prefetch")
    elif nest.tile is None:
        return []
    else:
        cand = _replay(list(schedule.trace) + [Step.make("prefetch", operand=nest.vector_operand())])
    return [] if cand is None else [canonical_schedule(cand.nest)]


def interleave(lists: Sequence[Sequence]) -> list:
    """``[[a1, a2], [b1]] -> [a1, b1, a2]``."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out
