"""Render a schedule to C text.  Text only: compiling and loading live in ``build``.

Every kernel has the one ABI of ``looptune.runtime.compiler.abi`` (strides in elements),
computing ``C = (accumulate ? C : 0) + A @ B`` per batch entry and returning 0, or
-1 when scratch memory cannot be had.  Kernels take any strides: an operand the
micro-kernel reads with vector loads straight from memory (not packed) but that lacks
unit stride along the vector is gathered tile by tile, so a schedule runs on every
shape and layout of its family.

Exact-size kernels (``sizes=``: the sizes become compile-time constants, the ABI stays) are
described in ``looptune.runtime.compiler.codegen_sizes``; the generic kernels never return -2.

The micro-kernel is written with GCC/Clang vector extensions (AVX-512, AVX2+FMA, NEON or SSE
code by ``-march``, the vector width chosen for the detected ISA); the transposing pack uses vector
shuffles, and only whole-register 4x4x4 products (``codegen_quads``) and bfloat16/float16 forms
use intrinsics.  Threads (the parallel loop, the packing workspace): ``codegen_threads``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from looptune.runtime.compiler import codegen_bf16 as bf16
from looptune.runtime.compiler import codegen_f16 as f16
from looptune.runtime.compiler import codegen_quads as quads
from looptune.runtime.compiler import epilogue as epi
from looptune.runtime.compiler.abi import C_TYPE, EPILOGUE_ARGS, OUTPUT_DTYPE, abi_args
from looptune.runtime.compiler.codegen_tiles import TileWriter
from looptune.runtime.compiler.codegen_sizes import FixedSizes, block_length, fixed_length
from looptune.runtime.compiler.codegen_threads import (PARALLEL_CHUNKS, POOL_DECLARATION_C, WORKSPACE_C, abi_variables,
                                                      outline_parallel)
from looptune.runtime.compiler.machine import CpuInfo, amx_permitted, detect_cpu

from looptune.runtime.compiler.ir import LoopNest, TILE_DIM_FOR_OPERAND
from looptune.runtime.compiler.schedule import Schedule

CODEGEN_VERSION = "4"      # 4: parallel loops on our thread pool, shared packs by every thread, exact-size kernels


@dataclass(frozen=True)
class Target:
    """What the generated C is specialized for, besides the schedule."""

    isa: str = "portable"        # avx512 | avx2 | neon | portable
    vector_bytes: int = 16
    bf16: str = "convert"        # how bfloat16 kernels compute: codegen_bf16.MODES

    @classmethod
    def detect(cls, cpu: CpuInfo | None = None) -> "Target":
        cpu = cpu or detect_cpu()
        return cls(cpu.vector_isa, cpu.vector_bytes, cpu.bf16_isa)

    def key(self, dtype: str) -> str:
        """What of the target a kernel of ``dtype`` depends on."""
        return f"{self.isa}/{self.vector_bytes}" + (f"/{self.bf16}" if dtype == "bfloat16" else "")


@dataclass(frozen=True)
class KernelSource:
    symbol: str
    dtype: str
    text: str           # a complete translation unit exporting `symbol`


SYMBOL_LETTER = {"float32": "s", "float64": "d", "bfloat16": "b", "float16": "h"}


def kernel_symbol(schedule: Schedule, dtype: str, target: Target, inputs: str | None = None,
                  sizes: FixedSizes | None = None, op: str = epi.PLAIN) -> str:
    """The kernel's C name: a digest of everything its text depends on (an exact-size kernel's
    sizes too, so it never shares a name, nor a cache entry, with the generic kernel; an
    epilogue's op)."""
    inputs = inputs or dtype
    fixed = f"|{sizes.key()}" if sizes is not None else ""
    fixed += f"|{op}" if op != epi.PLAIN else ""
    digest = hashlib.sha256(f"{CODEGEN_VERSION}|{dtype}|{inputs}|{target.key(dtype)}|{schedule.to_json()}{fixed}"
                            .encode()).hexdigest()
    letters = SYMBOL_LETTER[dtype] if inputs == dtype else SYMBOL_LETTER[inputs] + SYMBOL_LETTER[dtype]
    return f"lt_{letters}gemm_{digest[:16]}"


def render(schedule: Schedule, dtype: str, target: Target | None = None, symbol: str | None = None,
           inputs: str | None = None, sizes: FixedSizes | None = None, op: str = epi.PLAIN) -> KernelSource:
    """C text of ``schedule``'s kernel computing in ``dtype``.  ``inputs="float32"`` with dtype
    bfloat16: the kernel reads float32 and rounds it to bf16 while packing (its ABI is float32's,
    and so is the returned ``KernelSource.dtype``).  ``sizes``: the exact-size kernel for those
    sizes (``codegen_sizes``); None: the kernel for every size.  ``op``: the problem's, with its
    fused epilogue (``epilogue``; float32, float64 and bfloat16 kernels)."""
    if target is None:
        target = Target.detect()
        if dtype == "bfloat16" and target.bf16 == "amx" and not amx_permitted():
            # asked only now, when a bf16 kernel is wanted: the grant enlarges every signal frame
            # of the process, which a float-only application should not pay for
            target = replace(target, bf16="avx512bf16")
    inputs = inputs or dtype
    if inputs != dtype and (dtype, inputs) != ("bfloat16", "float32"):
        raise ValueError(f"a {dtype} kernel cannot read {inputs} inputs")
    if sizes is not None and (min(sizes[1:]) < 1 or sizes.batch is not None and sizes.batch < 1):
        raise ValueError(f"an exact-size kernel needs positive sizes, not {sizes}")
    epilogue = epi.of_op(op)
    if not epilogue.empty and dtype == "float16":
        raise ValueError("float16 kernels have no fused epilogue")
    symbol = symbol or kernel_symbol(schedule, dtype, target, inputs, sizes, op)
    body = _KernelWriter(schedule.nest, dtype, target, symbol, inputs, sizes, epilogue).write()
    return KernelSource(symbol, inputs, body)


class _KernelWriter(TileWriter):
    def __init__(self, nest: LoopNest, dtype: str, target: Target, symbol: str, inputs: str,
                 sizes: FixedSizes | None = None, epilogue: epi.Epilogue = epi.Epilogue()) -> None:
        self.nest, self.dtype, self.target, self.symbol = nest, dtype, target, symbol
        self.sizes = sizes
        # each dimension's full range as the C text names it: the ABI's variables, or literals
        self.extent = {"b": "batch", "m": "M", "n": "N", "k": "K"}
        if sizes:
            self.extent.update({d: str(v) for d, v in sizes.extents().items() if v is not None})
        self.half = dtype == "float16"        # float16: float32 arithmetic into a scratch C (codegen_f16)
        self.abi = f16.INNER_ABI if self.half else abi_args(inputs)
        self.T = C_TYPE[inputs]                       # the inputs' elements
        self.TC = "float" if self.half else C_TYPE[OUTPUT_DTYPE[dtype]]   # C's, the accumulators' and the vectors'
        self.epilogue = None if epilogue.empty else epilogue
        if self.epilogue:       # its operands' arguments follow the ABI's
            self.abi += EPILOGUE_ARGS.format(TC=self.TC)
        self.itemsize = 4 if self.TC == "float" else 8
        self.prefix = symbol
        self.lines: list[str] = []
        self.depth = 1
        self.visible = abi_variables(self.abi)    # (type, name) of the kernel's variables so far
        self.shared_packs: dict[str, list[str]] = {}   # operand -> C of its pack shared by the threads
        self.outlined: list[str] = []      # the parallel loop's body as a function, if there is one
        self.uses_workspace = False
        self.start = nest.kernel_start()
        self.packs = dict(nest.pack)
        self.bf16 = None                   # for bfloat16: codegen_bf16.MODES, chosen for this nest
        self.TP = self.T                   # packed panels' elements
        self.widen = f16.WIDEN if self.half else "lt_bf16_to_f32"    # a 16-bit input to float32
        if self.half:                      # widened while packing, as a bfloat16 "convert" kernel
            self.bf16 = "convert"
            self.packs = dict(bf16.pack_positions(nest)) if nest.tile else {}
            self.TP = "float"
        elif dtype == "bfloat16":
            self.bf16 = bf16.choose_mode(nest, target.bf16, target.vector_bytes // 4)
            self.packs = dict(bf16.pack_positions(nest)) if nest.tile else {}
            self.TP = "float" if self.bf16 == "convert" else "uint16_t"
        # AMX on bf16 inputs reads an A the schedule leaves unpacked straight from memory (its rows
        # hold consecutive k), packing only tiles that cannot be read so into a scratch panel ("Q")
        self.amx_direct_a = self.bf16 == "amx" and self.T == "uint16_t" and "A" not in dict(nest.pack)
        if self.amx_direct_a:
            del self.packs["A"]
        if nest.tile:
            self.mr, self.nr = nest.tile_sizes  # type: ignore[misc]
            self.vdim = nest.vector_dim
            # vector operand X (loaded as vectors along V), broadcast operand Y (scalars along U)
            self.X, self.Y = ("B", "A") if self.vdim == "n" else ("A", "B")
            self.V = self.nr if self.vdim == "n" else self.mr
            self.U = self.mr if self.vdim == "n" else self.nr
            lanes = [b // self.itemsize for b in (target.vector_bytes, 32, 16) if b <= target.vector_bytes]
            self.W = next((w for w in lanes if self.V % w == 0), 1)

    # ---- small helpers ------------------------------------------------------------------
    def emit(self, line: str = "") -> None:
        self.lines.append("    " * self.depth + line if line else "")

    @staticmethod
    def cname(loop: str) -> str:
        return loop.replace(".", "_")

    # ---- whole file -------------------------------------------------------------------------
    def write(self) -> str:
        self.depth = 1
        self._prologue()
        self._loops()
        if self.bf16 == "amx":
            self.emit("_tile_release();")
        if self.uses_workspace:
            self.emit("lt_ws_end(&ws_slot);")
        self.emit("return 0;")
        mode = f", {self.bf16} ({self.T} inputs)" if self.bf16 else ""
        if self.sizes:
            b, m, n, k = self.sizes
            mode += f", exact sizes {'any' if b is None else b} x {m}x{n}x{k} (batch x MxNxK)"
        out = [
            f"/* generated by looptune codegen v{CODEGEN_VERSION}: {self.dtype}{mode}, target {self.target.isa} */",
            "#include <stdint.h>", "#include <stdlib.h>", "#include <string.h>",
            "#ifdef _OPENMP", "#include <omp.h>", "#else", "#define omp_get_thread_num() 0", "#endif",
            "#define LT_MIN(a, b) ((a) < (b) ? (a) : (b))",
        ]
        if self.nest.tile and self._one_register_product():
            out.append("#include <immintrin.h>")
        if self.half:
            out += f16.prelude()
        elif self.bf16:
            out += bf16.prelude(self.bf16)
        if self.epilogue:
            out += epi.c_prelude(self.epilogue, self.TC) + epi.c_function(self.prefix, self.epilogue, self.TC)
        if self.uses_workspace or self.half:
            out += WORKSPACE_C
        if self.outlined:
            out += POOL_DECLARATION_C
        if self.nest.tile:
            out += self._vector_types() + self._pack_functions() + self._micro_kernel()
        if self._dense_stack():
            out += quads.stack_scope(self.prefix, self.TC, self.nest.parallel is not None)
        out += [line for operand in sorted(self.shared_packs) for line in self.shared_packs[operand]]
        out += self.outlined
        out.append(f"static int {f16.inner_symbol(self.symbol)}({self.abi})" if self.half
                   else f"int {self.symbol}({self.abi})")
        out.append("{")
        out += self.lines
        out.append("}")
        if self.half:
            check = None
            if self.sizes:
                check = self._sizes_mismatch()
            out += f16.wrapper(self.symbol, check, bool(self.nest.tile))
        elif self.bf16:
            out += bf16.postlude(self.bf16)
        return "\n".join(out) + "\n"

    # ---- kernel body ---------------------------------------------------------------------------
    def _prologue(self) -> None:
        e, (batch, M, N, K) = self.emit, (self.extent[d] for d in "bmnk")
        if self.sizes:
            e(f"if ({self._sizes_mismatch()}) return -2;  /* not the sizes compiled for */")
            if self.sizes.batch is None:
                e("if (batch <= 0) return 0;")
        else:
            e("if (batch <= 0 || M <= 0 || N <= 0) return 0;")
        e("if (nthreads < 1) nthreads = 1;")
        if self._dense_stack():
            for line in quads.stack_call(self.prefix, self.nest.parallel is not None, PARALLEL_CHUNKS):
                e(line)
        if not (self.sizes and self.nest.tile):
            e(f"if ({K} <= 0 || !(" + ("1" if self.nest.tile else "0") + ")) {")
            e("    if (!accumulate)")
            e(f"        for (int64_t b = 0; b < {batch}; b++) for (int64_t m = 0; m < {M}; m++) "
              f"for (int64_t n = 0; n < {N}; n++)")
            e("            C[b * sCb + m * sCm + n * sCn] = 0;")
            if self.epilogue:
                e(f"    if ({K} <= 0) {{")
                e(f"        {self._whole_epilogue()}")
                e("        return 0;")
                e("    }")
            else:
                e(f"    if ({K} <= 0) return 0;")
            e("}")
        if not self.nest.tile:
            return
        if self.bf16 == "amx":
            e("if (!lt_amx_granted()) return -5;")
        self._workspace()
        if self.bf16 == "amx":
            e("lt_amx_configure();")

    def _whole_epilogue(self) -> str:
        """C applying the epilogue to all of C (a nest without a register tile, or K = 0)."""
        b = self.extent["b"]
        return (f"for (int64_t b = 0; b < {b}; b++) "
                + epi.c_call(self.prefix, "C + b * sCb", self.extent["m"], self.extent["n"], "0", "0", "b"))

    def _sizes_mismatch(self) -> str:
        """C condition: the arguments are not the sizes an exact-size kernel was compiled for."""
        return " || ".join(f"{arg} != {value}" for arg, value in zip(("batch", "M", "N", "K"), self.sizes)
                           if value is not None)

    def _constant(self, dim: str) -> bool:
        return bool(self.sizes) and self.extent[dim].isdigit()

    def _block_extent(self, at_index: int, dim: str) -> str:
        """The largest range of `dim` seen inside the body of loop number `at_index`."""
        size = self.extent[dim]
        for l in reversed(self.nest.loops[: at_index + 1]):
            if l.dim == dim:
                if l.block == 1:
                    return "(int64_t)1"
                return str(min(l.block, int(size))) if self._constant(dim) else f"LT_MIN((int64_t){l.block}, {size})"
        return size

    def _workspace(self) -> None:
        """One scratch area per kernel and calling thread, grown on demand, reused across calls and
        freed when the thread exits (``lt_ws_get``, see ``codegen_threads``); a parallel loop's
        threads each use their own copy of what they pack."""
        e, T = self.emit, self.TP
        edge_panel = self.X not in self.packs and not self.bf16
        if not self.packs and not edge_panel and not self.amx_direct_a:
            return
        par = self.nest.index(self.nest.parallel) if self.nest.parallel else None
        offsets = []
        if edge_panel:
            # a zero-padded copy of an X tile (kc x V): a narrower-than-V edge, or one without unit stride along V
            ksize = self._block_extent(self.start - 1, "k")
            e(f"const int64_t wsE = {self.V} * {ksize} + 16;  /* per copy */")
            e(f"const int64_t wsE_copies = {'nthreads' if par is not None else '1'};")
            offsets.append("E")
        if self.amx_direct_a:
            ksize = self._block_extent(self.start - 1, "k")
            e(f"const int64_t wsQ = ({self.mr} * ({ksize} + {bf16.AMX_K_STEP}) + 47) / 32 * 32;  /* per copy, 64-byte multiple */")
            e(f"const int64_t wsQ_copies = {'nthreads' if par is not None else '1'};")
            offsets.append("Q")
        for operand in sorted(self.packs):
            at = self.nest.index(self.packs[operand])
            tdim = TILE_DIM_FOR_OPERAND[operand]
            R = self.mr if tdim == "m" else self.nr
            tsize = self._block_extent(at, tdim)
            ksize = self._block_extent(at, "k")
            if self.bf16:
                ksize = f"({ksize} + {bf16.k_group(self.bf16, operand)[1]})"    # k padded to whole groups
            copies = "nthreads" if par is not None and at >= par else "1"
            size = f"(({tsize} + {R - 1}) / {R}) * {R} * {ksize} + 16"
            if self.bf16:      # 2-byte panels: keep every copy 64-byte aligned for pair and tile loads
                size = f"({size} + 31) / 32 * 32"
            e(f"const int64_t ws{operand} = {size};  /* per copy */")
            e(f"const int64_t ws{operand}_copies = {copies};")
            offsets.append(operand)
        total = " + ".join(f"ws{o} * ws{o}_copies" for o in offsets)
        self.uses_workspace = True
        e("static _Thread_local lt_ws *ws_slot = 0;")
        e(f"const int64_t ws_need = {total};")
        e(f"{T} *const ws_base = ({T} *)lt_ws_get(&ws_slot, ws_need * (int64_t)sizeof({T}));")
        e("if (!ws_base) return -1;")
        prev = "ws_base"
        for o in offsets:
            e(f"{T} *const ws{o}_base = {prev};")
            prev = f"ws{o}_base + ws{o} * ws{o}_copies"
            self.visible += [("int64_t", f"ws{o}"), (f"{T} *", f"ws{o}_base")]

    def _loops(self) -> None:
        nest, e = self.nest, self.emit
        rng = {d: ("0", self.extent[d]) for d in "mnkb"}
        # an exact-size kernel: each range's length where it is the same constant on every iteration
        known = {d: int(self.extent[d]) if self._constant(d) else None for d in "mnkb"}
        pack_at: dict[str, list[str]] = {}
        for operand, at in self.packs.items():
            pack_at.setdefault(at, []).append(operand)
        unroll = dict(nest.unroll)
        opened = 0
        kernel_part = None      # at the parallel loop: the kernel's lines so far, depth, open loops, ...
        for i, loop in enumerate(nest.loops[: self.start]):
            lo, ln = rng[loop.dim]
            v = "i_" + self.cname(loop.name)
            header = f"for (int64_t {v} = {lo}; {v} < {lo} + {ln}; {v} += {loop.block})"
            if nest.parallel == loop.name:
                # the rest of the nest is written as the body of a function over one iteration
                kernel_part = (self.lines, self.depth, opened, (v, lo, ln, loop.block), list(self.visible))
                self.lines, self.depth, opened = [], 1, 0
                if self.bf16 == "amx":
                    e("lt_amx_configure();    /* tile configuration is per thread */")
            else:
                if loop.name in unroll:
                    e(f"#pragma GCC unroll {unroll[loop.name]}")
                e(header + " {")
                self.depth += 1
                opened += 1
            n_lo, n_len = f"lo_{self.cname(loop.name)}", f"len_{self.cname(loop.name)}"
            e(f"const int64_t {n_lo} = {v};")
            e(f"const int64_t {n_len} = {block_length(loop.block, known[loop.dim], lo, ln, v)};")
            known[loop.dim] = fixed_length(loop.block, known[loop.dim])
            e(f"(void){n_len};")
            rng[loop.dim] = (n_lo, n_len)
            self.visible += [("int64_t", n_lo), ("int64_t", n_len)]
            for operand in sorted(pack_at.get(loop.name, [])):
                self._emit_pack(operand, rng, inside_parallel=self._inside_parallel(i))
        if nest.tile:
            self._emit_tile_call(rng)
        else:
            b, m, n, k = (rng[d][0] for d in "bmnk")
            a, bb = f"A[{b} * sAb + {m} * sAm + {k} * sAk]", f"B[{b} * sBb + {k} * sBk + {n} * sBn]"
            if self.bf16 and self.T == "uint16_t":
                a, bb = f"{self.widen}({a})", f"{self.widen}({bb})"
            elif self.bf16:
                a, bb = f"lt_bf16_to_f32(lt_f32_to_bf16({a}))", f"lt_bf16_to_f32(lt_f32_to_bf16({bb}))"
            e(f"C[{b} * sCb + {m} * sCm + {n} * sCn] += {a} * {bb};")
        for _ in range(opened):
            self.depth -= 1
            e("}")
        if self.bf16 == "amx" and kernel_part is not None:
            e("_tile_release();")
        if kernel_part is not None:
            lines, depth, opened, (v, lo, ln, step), visible = kernel_part
            chunked = self.nest.loops[self.nest.index(self.nest.parallel)].dim == "b"
            self.outlined, at = outline_parallel(self.prefix, visible, self.lines, v, lo, ln, step, "    " * depth, chunked)
            self.lines, self.depth = lines + at, depth
            for _ in range(opened):
                self.depth -= 1
                e("}")
        if self.epilogue and not nest.tile:     # after every loop (and a parallel one's threads): once
            e(self._whole_epilogue())

    def _inside_parallel(self, index: int) -> bool:
        return self.nest.parallel is not None and index >= self.nest.index(self.nest.parallel)
