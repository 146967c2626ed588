"""What machine are we on?  CPU model, vector ISA, cores and caches, detected, never assumed.

Both the code generator (which vector width, how many registers) and the database
(records are keyed by machine) need this, so it lives in the bottom layer.
"""
from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass

from looptune.runtime.compiler import environment

# Vector ISAs the code generator targets, narrowest first.  ``LOOPTUNE_ISA`` caps the target at one
# of them (tests force avx2 and portable code on an AVX-512 machine; ``LOOPTUNE_NO_AVX512=1`` is
# the older spelling of ``LOOPTUNE_ISA=avx2``).  It can only narrow what the CPU supports.
ISA_LEVELS = ("portable", "neon", "avx2", "avx512")
VECTOR_BYTES = {"portable": 16, "neon": 16, "avx2": 32, "avx512": 64}   # vector register width per ISA


def isa_cap() -> str | None:
    """The ISA ceiling asked for in the environment, or None."""
    cap = environment.choice("LOOPTUNE_ISA", ISA_LEVELS, "")
    if cap:
        return cap
    if environment.flag("LOOPTUNE_NO_AVX512"):
        return "avx2"
    return None


# Features that change generated code or its speed; everything else in /proc/cpuinfo is noise for us.
RELEVANT_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq", "neon", "asimd", "sve")
# bfloat16 instructions.  Kept apart from RELEVANT_FEATURES, which is part of every database record's
# machine key (records written before bfloat16 existed still match); kernels' cache keys include both.
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "amx_tile")
# How bfloat16 kernels compute, weakest first; ``LOOPTUNE_BF16`` caps it like ``LOOPTUNE_ISA``:
#   convert     bf16 widened to float32 while packing, float32 micro-kernel (any CPU)
#   avx512bf16  vdpbf16ps: pairs of bf16 products summed into float32 lanes (Zen 4, Cooper Lake, ...)
#   amx         AMX tiles, tdpbf16ps (Sapphire Rapids and later), when the OS grants the tile state
BF16_LEVELS = ("convert", "avx512bf16", "amx")


@dataclass(frozen=True)
class CpuInfo:
    arch: str                      # "x86_64", "aarch64", ...
    model_name: str                # "AMD EPYC 9B14", ...
    features: tuple[str, ...]      # sorted subset of RELEVANT_FEATURES
    cores: int                     # logical CPUs this process may run on (its affinity mask)
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int
    machine_cores: int = 0         # logical CPUs of the machine, whatever this process is pinned to
    extensions: tuple[str, ...] = ()   # sorted subset of BF16_FEATURES

    @property
    def bf16_isa(self) -> str:
        """How bfloat16 kernels compute here: one of ``BF16_LEVELS`` (capped by ``LOOPTUNE_BF16``,
        and by ``LOOPTUNE_ISA``: the BF16 instructions need the AVX-512 target)."""
        cap = environment.choice("LOOPTUNE_BF16", BF16_LEVELS, "amx")
        allowed = BF16_LEVELS[: BF16_LEVELS.index(cap) + 1]
        f = set(self.extensions)
        if self.vector_isa != "avx512" or "avx512_bf16" not in f:
            return "convert"
        if "amx" in allowed and {"amx_bf16", "amx_tile"} <= f:
            return "amx"      # if Linux grants the tile state: asked when a bf16 kernel is rendered
        return "avx512bf16" if "avx512bf16" in allowed else "convert"

    @property
    def vector_isa(self) -> str:
        """The widest vector ISA the code generator targets here: avx512, avx2, neon or portable."""
        f = set(self.features)
        cap = isa_cap()
        allowed = ISA_LEVELS if cap is None else ISA_LEVELS[: ISA_LEVELS.index(cap) + 1]
        if "avx512" in allowed and {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= f:
            return "avx512"
        if "avx2" in allowed and {"avx2", "fma"} <= f:
            return "avx2"
        if "neon" in allowed and self.arch in ("aarch64", "arm64") and ({"asimd", "neon"} & f or self.arch == "arm64"):
            return "neon"
        return "portable"

    @property
    def vector_bytes(self) -> int:
        return VECTOR_BYTES[self.vector_isa]

    @property
    def vector_registers(self) -> int:
        return {"avx512": 32, "avx2": 16, "neon": 32}.get(self.vector_isa, 16)

    @property
    def fma_units(self) -> int:
        """FMA pipes per core at the vector width above (2 on every recent x86 and big ARM core)."""
        return 2


@functools.lru_cache(maxsize=1)
def amx_permitted() -> bool:
    """Ask Linux for the AMX tile data state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``; the grant is
    process-wide and kept across fork).  Kernels ask again themselves before using tiles."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        import ctypes     # lazily: only processes that render a bf16 kernel ask

        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
        return libc.syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def _cache_bytes(level_type: tuple[int, str], default: int) -> int:
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            d = os.path.join(base, entry)
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            if (level, kind) == level_type or (level == level_type[0] and kind == "Unified"):
                with open(os.path.join(d, "size")) as f:
                    text = f.read().strip()
                m = re.match(r"(\d+)([KMG]?)", text)
                if m:
                    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
    except OSError:
        pass
    return default


@functools.lru_cache(maxsize=1)
def detect_cpu() -> CpuInfo:
    arch = platform.machine() or "unknown"
    model = ""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if not model:
        model = platform.processor() or arch
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    features = tuple(sorted(f for f in RELEVANT_FEATURES if f in flags))
    return CpuInfo(
        arch=arch,
        model_name=model,
        features=features,
        cores=cores,
        l1d_bytes=_cache_bytes((1, "Data"), 32 << 10),
        l2_bytes=_cache_bytes((2, "Unified"), 512 << 10),
        l3_bytes=_cache_bytes((3, "Unified"), 8 << 20),
        machine_cores=os.cpu_count() or cores,
        extensions=tuple(sorted(f for f in BF16_FEATURES if f in flags)),
    )
