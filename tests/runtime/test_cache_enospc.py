"""A full disk (ENOSPC) in the kernel cache: the build fails with an error that says so, nothing
half-written is cached (no ref names a file, no temporary is left behind), the kernel is
rebuilt the next time, and the runtime meanwhile computes the right answer through numpy.

The disk is made full by making the calls the cache uses (fsync, the rename that publishes a
file, the ref's write) fail with ENOSPC; where the sandbox allows a private mount namespace
(``unshare -m``, as root), also on a real, tiny, full tmpfs.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime.compiler import cache as disk
from looptune.runtime.compiler import pool, trampoline
from looptune.runtime.compiler.build import BuildSettings, build_many
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.runtime.configuration import RuntimeSettings

CC = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason="needs a C compiler")

PROBLEM = MatmulProblem(40, 24, 56)


def enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def in_cache(cache: Path, path) -> bool:
    return Path(os.fspath(path)).resolve().is_relative_to(cache.resolve())


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def full_disk_at(stage: str, cache: Path, monkeypatch) -> None:
    """Make writes into ``cache`` run out of space at ``stage``."""
    if stage in ("fsync .so", "fsync ref"):
        real_fsync = os.fsync

        def fake_fsync(fd):
            target = fd_path(fd)
            name = os.path.basename(target)
            hit = (name.endswith(".so") and "/build-" in target) if stage == "fsync .so" else \
                (name.startswith(disk.TEMP_PREFIX) and ".json." in name)
            if target and in_cache(cache, target) and hit:
                raise enospc(target)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fake_fsync)
    elif stage in ("rename .so", "rename ref"):
        real_replace = os.replace
        suffix = ".so" if stage == "rename .so" else ".json"

        def fake_replace(src, dst, *args, **kwargs):
            if in_cache(cache, dst) and os.fspath(dst).endswith(suffix):
                raise enospc(os.fspath(dst))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", fake_replace)
    elif stage == "write ref":
        real_open = builtins.open

        class HalfWritten:
            def __init__(self, f):
                self.f = f

            def write(self, text):
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise enospc(self.f.name)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if "w" in mode and in_cache(cache, file) and os.path.basename(os.fspath(file)).startswith(disk.TEMP_PREFIX):
                return HalfWritten(f)
            return f

        monkeypatch.setattr(disk, "open", fake_open, raising=False)    # the cache module's own ``open``
    else:
        raise AssertionError(stage)


def temporaries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(disk.TEMP_PREFIX))


def assert_runs_right(result) -> None:
    assert result.ok, result.error
    a, b, c = PROBLEM.make_operands(0)
    Kernel(result.so_path, result.symbol, "float32")(a, b, c)
    np.testing.assert_allclose(c, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-4, atol=1e-3)


STAGES = ["fsync .so", "rename .so", "write ref", "fsync ref", "rename ref"]

def build_on_a_full_disk(tmp_path, stage, monkeypatch):
    cache = tmp_path / "cache"
    settings = BuildSettings(cache_dir=cache, jobs=1)
    source = render(default_schedule(PROBLEM), "float32")
    full_disk_at(stage, cache, monkeypatch)
    [failed] = build_many([source], settings)
    monkeypatch.undo()
    return cache, settings, source, failed


@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_while_caching_a_kernel(tmp_path, stage, monkeypatch):
    cache, settings, source, failed = build_on_a_full_disk(tmp_path, stage, monkeypatch)
    assert not failed.ok
    assert "cannot write the kernel cache" in failed.error and "No space left on device" in failed.error
    assert list(cache.glob("*.json")) == []                 # no ref: nothing is cached half-written
    for so in cache.glob("*.so"):                           # a library published whole before its ref failed
        assert disk.sha256_of(so)[1].startswith(so.stem.removeprefix("lib-"))

    [again] = build_many([source], settings)                # room again: rebuilt, cached, right
    assert again.ok and not again.cached
    assert_runs_right(again)
    [hit] = build_many([source], settings)
    assert hit.cached and hit.so_path == again.so_path


@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_while_caching_leaves_no_temporary(tmp_path, stage, monkeypatch):
    cache, _, _, failed = build_on_a_full_disk(tmp_path, stage, monkeypatch)
    assert not failed.ok
    assert temporaries(cache) == []


@pytest.fixture
def fresh_runtime(tmp_path, monkeypatch):
    """The runtime with a kernel cache of this test's own and no databases; the pool and the
    trampoline (built once per process) are loaded first, from the suite's cache."""
    pool.load()
    trampoline.load()
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOOPTUNE_CACHE_DIR", str(cache))
    # no hand-off: a guess's trial against numpy would decide by timing, and this is about the cache
    runtime.configure(user_db=None, embedded_db=None, fallback="off", numpy_handoff=False)
    yield cache
    monkeypatch.undo()
    fresh = RuntimeSettings.from_env()
    runtime.configure(**{f: getattr(fresh, f) for f in fresh.__dataclass_fields__})


def test_the_runtime_computes_through_numpy_while_the_cache_is_full(fresh_runtime, monkeypatch, caplog):
    cache = fresh_runtime
    real_replace = os.replace

    def fake_replace(src, dst, *args, **kwargs):
        if in_cache(cache, dst):
            raise enospc(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    rng = np.random.default_rng(3)
    a = rng.standard_normal((PROBLEM.m, PROBLEM.k)).astype(np.float32)
    b = rng.standard_normal((PROBLEM.k, PROBLEM.n)).astype(np.float32)
    want = a.astype(np.float64) @ b
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", fake_replace)
        for _ in range(3):
            np.testing.assert_allclose(runtime.matmul(a, b, threads=1), want, rtol=1e-4, atol=1e-4)
        served = runtime.explain(a, b, threads=1)
    assert served.source == "numpy"
    assert "No space left on device" in served.reason
    assert list(cache.glob("*.json")) == [] and temporaries(cache) == []

    runtime.configure()                                     # room again: the next resolver builds it
    np.testing.assert_allclose(runtime.matmul(a, b, threads=1), want, rtol=1e-4, atol=1e-4)
    assert runtime.explain(a, b, threads=1).source == "default"
    refs = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    assert refs and all(disk.entry_problem(cache / r["so"], r) is None for r in refs)


# ---- a real full file system -------------------------------------------------------------------

REAL_SCRIPT = r"""
import os, subprocess, sys
mnt = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
cache = os.path.join(mnt, "cache")
os.mkdir(cache)
filler = os.path.join(mnt, "filler")
with open(filler, "wb", buffering=0) as f:         # fill the file system to the last byte
    for size in (4096, 1):
        try:
            while True:
                f.write(b"x" * size)
        except OSError:
            pass
CALL = '''
import json, logging, numpy as np
logging.basicConfig(level=logging.WARNING)
from looptune import runtime
runtime.configure(user_db=None, embedded_db=None, fallback="off", numpy_handoff=False)
rng = np.random.default_rng(0)
a = rng.standard_normal((40, 56)).astype(np.float32)
b = rng.standard_normal((56, 24)).astype(np.float32)
ok = all(np.allclose(runtime.matmul(a, b, threads=1), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4) for _ in range(3))
r = runtime.explain(a, b, threads=1)
print(json.dumps({"ok": ok, "source": r.source, "reason": r.reason}))
'''
env = dict(os.environ, LOOPTUNE_CACHE_DIR=cache, LOOPTUNE_DB="", LOOPTUNE_NO_EMBEDDED_DB="1")
def call():
    done = subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]
print(call())
print(sorted(os.listdir(cache)))
os.unlink(filler)
print(call())
print(sorted(n for n in os.listdir(cache) if n.endswith(".json") or n.startswith("build-")))
"""


def test_a_really_full_file_system_under_the_cache(in_private_tmpfs):
    mnt = in_private_tmpfs.mnt
    done = in_private_tmpfs(REAL_SCRIPT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    full, listing, freed, refs = done.stdout.strip().splitlines()[-4:]
    full, freed = json.loads(full), json.loads(freed)
    assert full["ok"] and full["source"] == "numpy"              # the right answer, through numpy
    assert "No space left on device" in full["reason"]
    assert not [n for n in eval(listing) if n.endswith(".json") or n.startswith("build-")]   # nothing half-cached
    assert freed["ok"] and freed["source"] == "default"         # room again: the kernel is built and served
    refs = eval(refs)
    assert refs and not [n for n in refs if n.startswith("build-")]
    assert os.listdir(mnt) == []          # the tmpfs lived in the script's own mount namespace
