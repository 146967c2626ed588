"""The agent's action space: a named, enumerated list of edits to a loop nest under a cursor.

The state the agent edits is an ``AgentState``: an immutable ``Schedule`` (trace + nest) plus
a cursor, the index of the loop the next edit applies to (the LoopTune paper's cursor)::

    for b:                              for b:
      for m:          <- cursor   swap_down   for n:
        for n:            ==>                   for m:        <- cursor
          for k: ...                              for k: ...

Actions (``ACTION_SPACE_VERSION`` names this exact list; a trained policy is only valid for it):

* the paper's ``up``, ``down`` (move the cursor), ``swap_up``, ``swap_down`` (interchange the
  cursor loop with its neighbour; the cursor follows the loop) and ``split_<f>`` (split the
  cursor loop by ``f``; the cursor stays on the outer part), with 14 factors instead of 4, 8, 16;
* ``tile_<R>x<V>v``: the register tile, ``R`` rows of ``V`` vector registers, in this CPU's units
  (``tile_size``: NR is V vectors of the accumulator type, 16 float32 lanes on AVX-512 and 8 on
  AVX2), so an action asks for the same share of the register file on every CPU; a tile whose
  accumulators, one row of vectors and a broadcast do not fit the register file is illegal.  A
  macro: split the innermost m and n loops by MR and NR, move the two inner parts innermost and
  make them the register-tiled micro-kernel.  As single cursor steps this takes 6-10 moves
  before anything gets faster, which an episode (and a 2-second tuning budget) cannot afford,
  and the code generator needs exactly this shape anyway.  (v1's tiles were in float32 elements
  of AVX-512, ``tile_12x32``: on AVX2 the same action spilled its accumulators);
* ``vec_m``, ``vec_n``: which register-tile loop maps to SIMD lanes;
* ``pack_A``, ``pack_B``: pack that operand into panels at the cursor loop;
* ``unroll_<u>``: unroll the cursor loop (for a k loop inside the micro-kernel: the k unroll);
* ``parallel``: run the cursor loop on threads (only for problems with threads > 1);
* ``stop``: end the episode here (the paper's agent could not say "done").

Legality is the IR's (``ScheduleError``) plus three environment rules that remove pure waste:
no-op edits (re-packing where already packed, unroll to the current factor), splits by a
factor at least the loop's trip count for the problem (one outer iteration), and ``parallel``
on single-threaded problems.  ``legal_mask`` is exact by construction: it tries each of the
fixed number of actions, every try is O(loops), and masks are memoized per (nest, cursor).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from looptune.runtime.compiler.trace import Step
from looptune.runtime.compiler import ir
from looptune.runtime.compiler.defaults import max_tile_rows
from looptune.runtime.compiler.ir import LoopNest, ScheduleError
from looptune.runtime.compiler.machine import CpuInfo, detect_cpu
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.compiler.schedule import Schedule
from looptune.tuner.search.spaces import accumulator_lanes

ACTION_SPACE_VERSION = "looptune-actions-v2"

SPLIT_FACTORS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
# (rows, vectors per row): on AVX-512 float32 the v1 tiles 4x16 ... 14x16, 4x32 ... 12x32
TILE_SHAPES = ((4, 1), (6, 1), (7, 1), (8, 1), (10, 1), (12, 1), (14, 1), (4, 2), (6, 2), (8, 2), (12, 2))
UNROLLS = (2, 4, 8)


@dataclass(frozen=True)
class Action:
    name: str
    kind: str          # up, down, swap_up, swap_down, split, tile, vec, pack, unroll, parallel, stop
    arg: object = None

    @property
    def moves_cursor_only(self) -> bool:
        return self.kind in ("up", "down")


def _build_actions() -> tuple[Action, ...]:
    acts = [Action("up", "up"), Action("down", "down"), Action("swap_up", "swap_up"), Action("swap_down", "swap_down")]
    acts += [Action(f"split_{f}", "split", f) for f in SPLIT_FACTORS]
    acts += [Action(f"tile_{r}x{v}v", "tile", (r, v)) for r, v in TILE_SHAPES]
    acts += [Action("vec_m", "vec", "m"), Action("vec_n", "vec", "n")]
    acts += [Action(f"pack_{operand}", "pack", operand) for operand in ir.OPERANDS]
    acts += [Action(f"unroll_{u}", "unroll", u) for u in UNROLLS]
    acts += [Action("parallel", "parallel"), Action("stop", "stop")]
    return tuple(acts)


ACTIONS: tuple[Action, ...] = _build_actions()
ACTION_NAMES: tuple[str, ...] = tuple(a.name for a in ACTIONS)
ACTION_INDEX: dict[str, int] = {a.name: i for i, a in enumerate(ACTIONS)}
NUM_ACTIONS = len(ACTIONS)
STOP = ACTION_INDEX["stop"]
EDIT_ACTIONS = tuple(i for i, a in enumerate(ACTIONS) if a.kind not in ("up", "down", "stop"))


@dataclass(frozen=True)
class AgentState:
    """A schedule and the cursor.  Immutable: search nodes and rollouts share freely."""

    schedule: Schedule
    cursor: int = 1

    @property
    def nest(self) -> LoopNest:
        return self.schedule.nest

    @classmethod
    def initial(cls, start: Optional[Schedule] = None) -> "AgentState":
        """The paper's start: the natural nest ``b, m, n, k`` without splits, cursor on ``m``."""
        return cls(start or Schedule.initial(), 1)


def tile_size(rows: int, vectors: int, problem: MatmulProblem, cpu: Optional[CpuInfo] = None) -> tuple[int, int]:
    """(MR, NR) of a ``rows`` x ``vectors`` register tile on ``cpu`` (default: this one), or
    ScheduleError when its accumulators, a row of B's vectors and A's broadcast exceed the
    register file (``defaults.max_tile_rows``)."""
    cpu = cpu or detect_cpu()
    ir.require(rows <= max_tile_rows(cpu, vectors),
               f"a {rows}x{vectors}-vector tile needs {rows * vectors + vectors + 1} vector registers; "
               f"this CPU has {cpu.vector_registers}")
    return rows, vectors * accumulator_lanes(cpu, problem.dtype)


def sizes_of(problem: MatmulProblem) -> dict[str, int]:
    return {"b": problem.batch, "m": problem.m, "n": problem.n, "k": problem.k}


def _trip(nest: LoopNest, i: int, problem: MatmulProblem) -> int:
    return nest.trip_counts(sizes_of(problem))[i][0]


def _leaf(nest: LoopNest, dim: str) -> str:
    return next(l.name for l in nest.loops if l.dim == dim and l.block == 1)


def _follow(nest: LoopNest, name: str) -> int:
    """Where the loop called ``name`` went after an edit (its outer part when it was split)."""
    while name.count(".") <= ir.MAX_LOOP_DEPTH:
        try:
            return nest.index(name)
        except ScheduleError:
            name = name + ".o"
    return 1


def apply(state: AgentState, action: int, problem: MatmulProblem) -> AgentState:
    """The state after ``action``; raises ScheduleError when it is illegal here."""
    a = ACTIONS[action]
    s, c = state.schedule, state.cursor
    nest = s.nest
    loops = nest.loops
    L = len(loops)
    if a.kind == "stop":
        return state
    if a.kind == "up":
        ir.require(c > 0, "the cursor is at the outermost loop")
        return replace(state, cursor=c - 1)
    if a.kind == "down":
        ir.require(c < L - 1, "the cursor is at the innermost loop")
        return replace(state, cursor=c + 1)
    if a.kind in ("swap_up", "swap_down"):
        j = c - 1 if a.kind == "swap_up" else c + 1
        ir.require(0 <= j < L, "no neighbour to swap with")
        return AgentState(s.step("swap", loop=loops[c].name, other=loops[j].name), j)
    if a.kind == "split":
        ir.require(_trip(nest, c, problem) > a.arg, f"split by {a.arg} leaves one outer iteration")
        return AgentState(s.step("split", loop=loops[c].name, factor=a.arg), c)
    if a.kind == "tile":
        ir.require(nest.tile is None, "the register tile is already chosen")
        mr, nr = tile_size(*a.arg, problem)
        # A tile larger than the problem is legal (the edge micro-kernels cover it): for M = 1
        # (decode-style problems) a 4 x 16 tile with one live row is still the fastest choice.
        mi, ni = nest.index(_leaf(nest, "m")), nest.index(_leaf(nest, "n"))
        m_name, n_name = loops[mi].name, loops[ni].name
        s2 = s.step("split", loop=m_name, factor=mr).step("split", loop=n_name, factor=nr)
        inner = (m_name + ".i", n_name + ".i")
        order = [n for n in s2.nest.names if n not in inner] + list(inner)
        if tuple(order) != s2.nest.names:
            s2 = s2.step("reorder", order=order)
        s2 = s2.step("register_tile", m=inner[0], n=inner[1])
        return AgentState(s2, min(_follow(s2.nest, loops[c].name), len(s2.nest.loops) - 1))
    if a.kind == "vec":
        ir.require(nest.tile is not None, "vectorize needs a register tile")
        target = nest.tile[0] if a.arg == "m" else nest.tile[1]
        ir.require(nest.vector != target, f"already vectorized along {a.arg}")
        return AgentState(s.step("vectorize", loop=target), c)
    if a.kind == "pack":
        ir.require(nest.packed(a.arg) != loops[c].name, f"{a.arg} is already packed at {loops[c].name}")
        return AgentState(s.step("pack", operand=a.arg, at=loops[c].name), c)
    if a.kind == "unroll":
        ir.require(nest.unroll_factor(loops[c].name) != a.arg, f"{loops[c].name} is already unrolled by {a.arg}")
        ir.require(_trip(nest, c, problem) > 1, "nothing to unroll")
        return AgentState(s.step("unroll", loop=loops[c].name, factor=a.arg), c)
    if a.kind == "parallel":
        ir.require(problem.threads > 1, "single-threaded problem")
        return AgentState(s.step("parallel", loop=loops[c].name), c)
    raise AssertionError(a)


def try_apply(state: AgentState, action: int, problem: MatmulProblem) -> Optional[AgentState]:
    try:
        return apply(state, action, problem)
    except ScheduleError:
        return None


def legal_mask(state: AgentState, problem: MatmulProblem) -> np.ndarray:
    """Boolean mask over ``ACTIONS``: True exactly where ``apply`` succeeds."""
    return _mask(state.nest, state.cursor, problem).copy()


@functools.lru_cache(maxsize=65536)
def _mask(nest: LoopNest, cursor: int, problem: MatmulProblem) -> np.ndarray:
    st = AgentState(Schedule.initial(), cursor)
    st = replace(st, schedule=_NestOnly(nest))   # legality depends on the nest only, not on the trace
    out = np.zeros(NUM_ACTIONS, dtype=bool)
    for i in range(NUM_ACTIONS):
        out[i] = try_apply(st, i, problem) is not None
    return out


class _NestOnly(Schedule):
    """A Schedule stand-in with an empty trace, so mask trials do not grow traces (and hit MAX_STEPS)."""

    def __init__(self, nest: LoopNest):
        object.__setattr__(self, "trace", Schedule.initial().trace)
        object.__setattr__(self, "nest", nest)

    def apply(self, step: Step) -> Schedule:
        return _NestOnly(Schedule(self.trace, self.nest).apply(step).nest)


def neighbors(state: AgentState, problem: MatmulProblem) -> list[tuple[int, int, AgentState]]:
    """Every state one *edit* away, at any cursor position: ``(cursor, action, state)``.

    Cursor moves are free (the nest does not change), so search baselines look past them
    instead of stopping at the first one, the flaw of the paper's greedy search.
    """
    out = []
    for c in range(len(state.nest.loops)):
        at = replace(state, cursor=c)
        mask = _mask(at.nest, c, problem)
        for a in EDIT_ACTIONS:
            if mask[a]:
                nxt = apply(at, a, problem)
                out.append((c, a, nxt))
    return out
