"""Compile rendered kernels with the system C compiler and cache the shared objects.

We call the compiler directly: cffi's ``ffi.compile`` spends seconds in setuptools.
A batch of kernels is split into at most ``jobs`` translation units compiled in
parallel, one compiler process each, so 16 candidates cost a few compiler starts.

The on-disk cache is keyed by a hash of the source, the flags, the compiler's
version and the CPU (model and ISA features), so a kernel built for another CPU
or by another compiler is never picked up.  Writes go to a temporary name and are
published with ``os.replace``: several processes building the same kernel race
harmlessly, and a reader never sees half a file.
"""
from __future__ import annotations

from looptune.runtime.compiler.errors import LoopTuneError

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from looptune.runtime.compiler.machine import detect_cpu

from looptune.runtime.compiler.codegen import CODEGEN_VERSION, KernelSource

# No -ffast-math: NaN/Inf and rounding follow IEEE except for FMA contraction.
BASE_FLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno")


class BuildError(LoopTuneError, RuntimeError):
    """The compiler rejected a kernel or could not be run."""


@dataclass(frozen=True)
class BuildSettings:
    compiler: str = "cc"
    flags: tuple[str, ...] = BASE_FLAGS
    arch_flags: tuple[str, ...] = ("-march=native",)
    cache_dir: Path | None = None       # None: LOOPTUNE_CACHE_DIR or the platform cache directory
    jobs: int = 0                       # parallel compiler processes; 0: one per core
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls) -> "BuildSettings":
        env = os.environ
        return cls(
            compiler=env.get("LOOPTUNE_CC") or env.get("CC") or "cc",
            cache_dir=Path(env["LOOPTUNE_CACHE_DIR"]) if env.get("LOOPTUNE_CACHE_DIR") else None,
        )

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        import platformdirs

        return Path(platformdirs.user_cache_dir("looptune")) / "kernels"


@dataclass(frozen=True)
class BuildResult:
    symbol: str
    so_path: str | None          # None when the build failed
    error: str | None = None
    seconds: float = 0.0         # compiler wall time attributed to this kernel (0 for cache hits)
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.so_path is not None


@functools.lru_cache(maxsize=8)
def compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"cannot run the C compiler {compiler!r}: {e}") from None
    first = out.splitlines()[0] if out else compiler
    return first.strip()


def cache_key(source: KernelSource, settings: BuildSettings) -> str:
    cpu = detect_cpu()
    ident = json.dumps({
        "src": hashlib.sha256(source.text.encode()).hexdigest(),
        "flags": settings.flags + settings.arch_flags,
        "cc": compiler_identity(settings.compiler),
        "cpu": [cpu.arch, cpu.model_name, cpu.features],
        "codegen": CODEGEN_VERSION,
    }, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _ref_path(cache: Path, key: str) -> Path:
    return cache / f"{key}.json"


def lookup_cached(source: KernelSource, settings: BuildSettings) -> BuildResult | None:
    cache = settings.resolved_cache_dir()
    ref = _ref_path(cache, cache_key(source, settings))
    try:
        data = json.loads(ref.read_text())
        so = cache / data["so"]
        if data["symbol"] == source.symbol and so.is_file():
            return BuildResult(source.symbol, str(so), cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def build(source: KernelSource, settings: BuildSettings | None = None) -> BuildResult:
    return build_many([source], settings)[0]


def build_many(sources: Sequence[KernelSource], settings: BuildSettings | None = None) -> list[BuildResult]:
    """Build every source (cache hits cost a file read); results come back in order."""
    settings = settings or BuildSettings.from_env()
    results: dict[int, BuildResult] = {}
    todo: list[int] = []
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        hit = lookup_cached(src, settings)
        if hit is not None:
            results[i] = hit
        elif src.symbol in seen:
            continue
        else:
            seen[src.symbol] = i
            todo.append(i)
    if todo:
        jobs = settings.jobs or max(1, min(len(todo), detect_cpu().cores))
        chunks = [todo[j::jobs] for j in range(jobs) if todo[j::jobs]]
        for chunk, outcome in zip(chunks, _compile_chunks([[sources[i] for i in c] for c in chunks], settings)):
            if len(chunk) > 1 and not outcome[0].ok:
                # one bad kernel fails its whole unit: find out which, one by one
                outcome = [r[0] for r in _compile_chunks([[sources[i]] for i in chunk], settings)]
            for i, res in zip(chunk, outcome):
                results[i] = res
    for i, src in enumerate(sources):       # duplicates of a symbol share the first one's result
        if i not in results:
            results[i] = results[seen[src.symbol]]
    return [results[i] for i in range(len(sources))]


def _compile_chunks(chunks: list[list[KernelSource]], settings: BuildSettings) -> list[list[BuildResult]]:
    cache = settings.resolved_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
    try:
        procs = []
        for n, chunk in enumerate(chunks):
            text = "\n".join(s.text for s in chunk)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            c_file, so_tmp = work / f"unit{n}.c", work / f"unit{n}-{digest}.so"
            c_file.write_text(text)
            cmd = [settings.compiler, *settings.flags, *settings.arch_flags, str(c_file), "-o", str(so_tmp)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            except OSError as e:
                procs.append((chunk, None, so_tmp, digest, t0, str(e)))
                continue
            procs.append((chunk, proc, so_tmp, digest, t0, None))
        outcomes = []
        for chunk, proc, so_tmp, digest, t0, err in procs:
            if proc is not None:
                try:
                    _, stderr = proc.communicate(timeout=settings.timeout_s)
                    err = None if proc.returncode == 0 else (stderr.strip() or f"compiler exited {proc.returncode}")
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    err = f"compiler timed out after {settings.timeout_s} s"
            seconds = (time.perf_counter() - t0) / len(chunk)
            if err is not None:
                outcomes.append([BuildResult(s.symbol, None, _trim(err), seconds) for s in chunk])
                continue
            final = cache / f"lib-{digest}.so"
            os.replace(so_tmp, final)
            res = []
            for s in chunk:
                ref = _ref_path(cache, cache_key(s, settings))
                tmp = ref.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"so": final.name, "symbol": s.symbol}))
                os.replace(tmp, ref)
                res.append(BuildResult(s.symbol, str(final), None, seconds))
            outcomes.append(res)
        return outcomes
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _trim(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit] + "\n... (truncated)"
