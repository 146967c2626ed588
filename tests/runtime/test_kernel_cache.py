"""The kernel cache survives damage: a bad entry is found before dlopen, removed and rebuilt.

Damaged-cache cases run in a subprocess (a truncated ``.so`` used to kill the loading
process with SIGBUS, which would take pytest down with it); each uses its own cache
directory and the real compiler.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from looptune.runtime.compiler import cache as disk
from looptune.runtime.compiler.build import BuildSettings, build_many
from looptune.runtime.compiler.codegen import KernelSource, render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.kernel import load_library
from looptune.runtime.compiler.workload import MatmulProblem

CC = os.environ.get("LOOPTUNE_CC") or os.environ.get("CC") or "cc"
pytestmark = pytest.mark.skipif(shutil.which(CC) is None, reason="needs a C compiler")

# Build one kernel through the cache, run it, report what happened as JSON.
SCRIPT = r"""
import json, sys
import numpy as np
from looptune.runtime.compiler import trampoline
from looptune.runtime.compiler.build import build
from looptune.runtime.compiler.codegen import render
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.kernel import Kernel
from looptune.runtime.compiler.workload import MatmulProblem

dtype = sys.argv[1]
p = MatmulProblem(40, 24, 56, dtype=dtype)
r = build(render(default_schedule(p), dtype))
out = {"ok": r.ok, "cached": r.cached, "so": r.so_path, "error": r.error, "trampoline": trampoline.load() is not None}
if r.ok:
    a, b, c = p.make_operands(0)
    Kernel(r.so_path, r.symbol, dtype)(a, b, c)
    out["max_err"] = float(abs(c - np.matmul(a.astype(np.float64), b.astype(np.float64))).max())
print(json.dumps(out))
"""


def run(cache: Path, dtype: str = "float32", **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, dtype], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LOOPTUNE_CACHE_DIR": str(cache), **env})
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_correct(out: dict) -> None:
    assert out["ok"], out["error"]
    assert out["max_err"] < 1e-3


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(4096)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def zero_fill(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def patch_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(0xCC for _ in range(64))     # int3 over code or garbage over data
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "empty": empty, "zero-filled": zero_fill, "byte-patched": patch_bytes}


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.mark.parametrize("how", [*DAMAGE, "another kernel"])
def test_a_damaged_kernel_is_rebuilt(cache, how):
    first = run(cache)
    assert_correct(first)
    so = Path(first["so"])
    if how == "another kernel":
        other = run(cache, "float64")
        shutil.copyfile(other["so"], so)
    else:
        DAMAGE[how](so)
    again = run(cache)
    assert_correct(again)
    assert not again["cached"]                 # rebuilt, not loaded as it was
    assert run(cache)["cached"]                # and the rebuilt entry is a normal hit afterwards


@pytest.mark.parametrize("how", ["truncated", "zero-filled", "byte-patched"])
def test_a_damaged_trampoline_is_rebuilt(cache, how):
    first = run(cache)
    assert_correct(first)
    assert first["trampoline"]
    [module] = [p for p in cache.iterdir() if p.name.startswith("_lt_call_") and p.suffix == ".so"]
    DAMAGE[how](module)
    again = run(cache)
    assert_correct(again)
    assert again["trampoline"]


def test_a_failed_rebuild_names_the_damage(cache, tmp_path):
    assert_correct(run(cache))
    so = next(cache.glob("lib-*.so"))
    truncate(so)
    # Same `--version` (so the same cache key), but every compilation fails.
    fake = tmp_path / "fake-cc"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then exec {shutil.which(CC)} --version; fi\n'
                    'echo "fake-cc: refusing to compile" >&2\nexit 1\n')
    fake.chmod(0o755)
    out = run(cache, LOOPTUNE_CC=str(fake))
    assert not out["ok"]
    assert "damaged" in out["error"] and "refusing to compile" in out["error"]
    assert not so.exists()                     # the bad file is gone, never loaded


def test_one_bad_kernel_does_not_fail_the_batch(tmp_path):
    p = MatmulProblem(16, 16, 16)
    good = [render(default_schedule(p), "float32"), render(default_schedule(p), "float64")]
    bad = KernelSource("lt_broken", "float32", "int lt_broken(void) { return syntax error; }\n")
    results = build_many([good[0], bad, good[1]], BuildSettings(cache_dir=tmp_path, jobs=1))
    assert [r.ok for r in results] == [True, False, True]
    assert "error" in results[1].error


def test_entries_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events: list[tuple] = []
    paths: dict[int, str] = {}
    real_open, real_close, real_fsync, real_replace = os.open, os.close, os.fsync, os.replace

    def spy_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        paths[fd] = str(path)
        return fd

    def spy_close(fd):
        paths.pop(fd, None)
        return real_close(fd)

    def spy_fsync(fd):
        events.append(("fsync", paths.get(fd, "a file")))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "close", spy_close)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    [result] = build_many([render(default_schedule(MatmulProblem(8, 8, 8)), "float32")],
                          BuildSettings(cache_dir=tmp_path))
    assert result.ok, result.error
    at = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == result.so_path)
    tmp = events[at][1]
    assert ("fsync", tmp) in events[:at]                       # contents on disk before the name
    assert ("fsync", str(tmp_path)) in events[at + 1:]         # the name on disk after it
    ref = next(e for e in events if e[0] == "replace" and e[2].endswith(".json"))
    assert events.index(ref) > at and ("fsync", "a file") in events[at:events.index(ref)]


def test_stale_build_folders_are_removed_when_the_cache_is_opened(tmp_path):
    old, new = tmp_path / "build-old", tmp_path / "build-new"
    for d in (old, new):
        d.mkdir()
        (d / "unit0.c").write_text("int x;\n")
    hour_ago = time.time() - 2 * disk.STALE_S
    os.utime(old, (hour_ago, hour_ago))
    disk.open_cache(tmp_path)
    assert not old.exists() and new.exists()


def test_trim_drops_the_least_recently_used_entries(tmp_path):
    now = time.time()
    for i in range(4):
        so = tmp_path / f"lib-{i}.so"
        so.write_bytes(bytes(1000))
        ref = tmp_path / f"key{i}.json"
        disk.write_ref(ref, {"so": so.name, "size": 1000, "sha256": "x"})
        os.utime(ref, (now - 100 * (4 - i),) * 2)          # lib-0 used longest ago
    orphan = tmp_path / "lib-orphan.so"
    orphan.write_bytes(b"x")
    os.utime(orphan, (now - 2 * disk.STALE_S,) * 2)
    disk.trim(tmp_path, max_bytes=2500)
    assert sorted(p.name for p in tmp_path.glob("*.so")) == ["lib-2.so", "lib-3.so"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["key2.json", "key3.json"]


def test_a_library_rebuilt_in_place_is_loaded_afresh(tmp_path):
    path = tmp_path / "lib.so"
    for value in (1, 2):
        src = tmp_path / f"v{value}.c"
        src.write_text(f"int version(void) {{ return {value}; }}\n")
        subprocess.run([CC, "-shared", "-fPIC", "-o", str(tmp_path / "new.so"), str(src)], check=True)
        os.replace(tmp_path / "new.so", path)
        assert load_library(path).version() == value
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("build-")] == []    # the copy is gone
