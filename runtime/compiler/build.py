"""Compile rendered kernels with the system C compiler and cache the shared objects.

This is the one place that chooses the compiler and its flags: kernels, the call
trampoline, the peak microbenchmark and the exported C library all take them from here.

We call the compiler directly: cffi's ``ffi.compile`` spends seconds in setuptools.
A batch of kernels is split into at most ``jobs`` translation units compiled in
parallel, one compiler process each, so 16 candidates cost a few compiler starts; a
unit that fails is compiled again kernel by kernel, so one bad kernel fails alone.

The on-disk cache is keyed by a hash of the source, the flags, the compiler's
version and the CPU (model and ISA features), so a kernel built for another CPU
or by another compiler is never picked up.  Entries are written durably and
verified (size and sha256) before they are loaded; a damaged entry is removed and
rebuilt once (see ``looptune.runtime.compiler.cache``).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from looptune.runtime.compiler import cache as disk
from looptune.runtime.compiler import environment
from looptune.runtime.compiler.machine import detect_cpu

from looptune.runtime.compiler.codegen import CODEGEN_VERSION, KernelSource

# No -ffast-math: NaN/Inf and rounding follow IEEE except for FMA contraction.
CODE_FLAGS = ("-O2", "-std=gnu11", "-fPIC", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno")
BASE_FLAGS = CODE_FLAGS + ("-shared",)
# Flags that enable one vector ISA (for code built to run on any CPU that has it, not -march=native).
ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"),
    "avx2": ("-mavx2", "-mfma"),
    "neon": (),                  # baseline on aarch64
    "portable": (),
}


def portable_flags(isa: str) -> tuple[str, ...]:
    """Flags for an object file that runs on every CPU with vector ISA ``isa`` (the exported library)."""
    return CODE_FLAGS + ISA_FLAGS.get(isa, ())


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
    cache_max_bytes: int = disk.CACHE_MAX_BYTES   # size cap of the cache directory (<= 0: none)

    @classmethod
    def from_env(cls) -> "BuildSettings":
        return cls(compiler=environment.compiler_command(), cache_dir=environment.kernel_cache_dir())

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        import platformdirs   # only without LOOPTUNE_CACHE_DIR: keeps it off the runtime's import path

        return Path(platformdirs.user_cache_dir("looptune")) / "kernels"

    def open_cache(self) -> Path:
        """The cache directory, created, and cleaned up on its first use in this process."""
        return disk.open_cache(self.resolved_cache_dir(), self.cache_max_bytes)

    def shared_library_command(self, sources: Sequence[str | os.PathLike], out: str | os.PathLike,
                               extra: Sequence[str] = ()) -> list[str]:
        """The command line that compiles C files into a shared object with our flags."""
        return [self.compiler, *self.flags, *self.arch_flags, *extra, *map(str, sources), "-o", str(out)]


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
        "cpu": [cpu.arch, cpu.model_name, cpu.features, cpu.extensions],
        "codegen": CODEGEN_VERSION,
    }, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _ref_path(cache: Path, key: str) -> Path:
    return cache / f"{key}.json"


def lookup_cached(source: KernelSource, settings: BuildSettings) -> tuple[BuildResult | None, str | None]:
    """(the verified cache entry for ``source`` or None, why the entry was unusable or None).
    An unusable entry has been removed: the caller rebuilds it."""
    cache = settings.open_cache()
    so, data, problem = disk.check_ref(_ref_path(cache, cache_key(source, settings)))
    if so is not None and data is not None and data.get("symbol") == source.symbol:
        return BuildResult(source.symbol, str(so), cached=True), None
    return None, problem


def build(source: KernelSource, settings: BuildSettings | None = None) -> BuildResult:
    return build_many([source], settings)[0]


def build_many(sources: Sequence[KernelSource], settings: BuildSettings | None = None) -> list[BuildResult]:
    """Build every source (cache hits cost a file read and, once per process, a hash); results
    come back in order.  A failure is a result with ``error``, never an exception, and does not
    stop the other sources from building."""
    settings = settings or BuildSettings.from_env()
    results: dict[int, BuildResult] = {}
    todo: list[int] = []
    seen: dict[str, int] = {}
    damaged: dict[str, str] = {}            # symbol -> why its cache entry was thrown away
    for i, src in enumerate(sources):
        hit, problem = lookup_cached(src, settings)
        if problem is not None:
            damaged[src.symbol] = problem
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
                why = damaged.get(res.symbol)
                if why is not None and not res.ok:
                    res = BuildResult(res.symbol, None, f"the cached kernel was damaged ({why}) and rebuilding it "
                                                        f"failed: {res.error}", res.seconds)
                results[i] = res
    for i, src in enumerate(sources):       # duplicates of a symbol share the first one's result
        if i not in results:
            results[i] = results[seen[src.symbol]]
    return [results[i] for i in range(len(sources))]


def _compile_chunks(chunks: list[list[KernelSource]], settings: BuildSettings) -> list[list[BuildResult]]:
    cache = settings.open_cache()
    work = Path(tempfile.mkdtemp(prefix=disk.TEMP_PREFIX, dir=cache))
    try:
        procs = []
        for n, chunk in enumerate(chunks):
            text = "\n".join(s.text for s in chunk)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            c_file, so_tmp = work / f"unit{n}.c", work / f"unit{n}-{digest}.so"
            c_file.write_text(text)
            cmd = settings.shared_library_command([c_file], so_tmp)
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            except OSError as e:
                procs.append((chunk, None, so_tmp, t0, str(e)))
                continue
            procs.append((chunk, proc, so_tmp, t0, None))
        outcomes = []
        for chunk, proc, so_tmp, t0, err in procs:
            if proc is not None:
                try:
                    _, stderr = proc.communicate(timeout=settings.timeout_s)
                    err = None if proc.returncode == 0 else (stderr.strip() or f"compiler exited {proc.returncode}")
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    err = f"compiler timed out after {settings.timeout_s} s"
            seconds = (time.perf_counter() - t0) / len(chunk)
            if err is None:
                try:
                    outcomes.append(_publish(chunk, so_tmp, cache, settings, seconds))
                    continue
                except OSError as e:          # disk full, cache not writable, ...
                    err = f"cannot write the kernel cache {cache}: {e}"
            outcomes.append([BuildResult(s.symbol, None, _trim(err), seconds) for s in chunk])
        return outcomes
    finally:
        shutil.rmtree(work, ignore_errors=True)
        disk.maybe_trim(cache, settings.cache_max_bytes)


def _publish(chunk: list[KernelSource], so_tmp: Path, cache: Path, settings: BuildSettings,
             seconds: float) -> list[BuildResult]:
    """Move a compiled unit into the cache (named by its content hash) and write one ref per kernel."""
    size, sha256 = disk.sha256_of(so_tmp)
    final = disk.publish_file(so_tmp, cache, sha256, ".so")
    for s in chunk:
        disk.write_ref(_ref_path(cache, cache_key(s, settings)),
                       {"so": final.name, "symbol": s.symbol, "size": size, "sha256": sha256}, sync_dir=False)
    disk.fsync_path(cache)
    return [BuildResult(s.symbol, str(final), None, seconds) for s in chunk]


def compile_errors(c_file: str | os.PathLike, flags: Sequence[str], settings: BuildSettings | None = None) -> str | None:
    """Compile ``c_file`` to an object with exactly ``flags`` (output discarded): the compiler's
    errors, or None when it compiles.  Checks C meant to be built elsewhere (the exported library)."""
    settings = settings or BuildSettings.from_env()
    cmd = [settings.compiler, *flags, "-c", str(c_file), "-o", os.devnull]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run the C compiler {settings.compiler!r}: {e}"
    return None if done.returncode == 0 else _trim(done.stderr.strip() or f"compiler exited {done.returncode}")


def _trim(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit] + "\n... (truncated)"


def cached_helper(name: str, source: str, flags: Sequence[str], suffix: str, settings: BuildSettings,
                  extra: Sequence[str] = ()) -> Path:
    """A small helper library (the call trampoline, the thread pool) compiled once into the
    kernel cache under ``name`` (callers put their source's hash in it), published durably under
    its content hash and verified (size, sha256) before it is used: a damaged entry is removed
    and rebuilt once.  Raises OSError when it cannot be built."""
    cache = settings.open_cache()
    ref = cache / f"{name}.json"
    path, _, _ = disk.check_ref(ref)        # a damaged entry is removed here
    if path is not None:
        return path
    with tempfile.TemporaryDirectory(prefix=disk.TEMP_PREFIX, dir=cache) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        tool = BuildSettings(compiler=settings.compiler, flags=tuple(flags), arch_flags=())
        done = subprocess.run(tool.shared_library_command([src], out, extra), capture_output=True, text=True,
                              timeout=settings.timeout_s)
        if done.returncode != 0:
            raise OSError(f"the compiler failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        size, sha256 = disk.sha256_of(out)
        published = disk.publish_file(out, cache, sha256, suffix, prefix=f"{name}-")
    disk.write_ref(ref, {"so": published.name, "size": size, "sha256": sha256})
    path, _, problem = disk.check_ref(ref)
    if path is None:
        raise OSError(f"the rebuilt {name} does not verify: {problem}")
    return path
