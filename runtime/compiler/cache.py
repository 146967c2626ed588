"""The on-disk cache of compiled shared objects: written durably, verified before loading.

A cache entry is a shared object plus a small JSON *ref* naming it with its size and
sha256 (``{"so": NAME, "size": BYTES, "sha256": HEX, ...}``).  Shared objects are named
by their content hash, so processes racing to publish one write identical bytes.

Why verify: ``dlopen`` of a damaged file is not an error you can catch.  A truncated
``.so`` maps segments past the end of the file and the process dies of SIGBUS; a zeroed
one fails every load; another library under the name lacks the symbol; a byte-patched
one runs.  So every entry is checked (size, then sha256) before it is loaded, and a bad
one is removed so the caller rebuilds it.  Hashing a 50-200 KB library costs ~0.1 ms and
happens once per file per process.

Writes are durable: file contents are fsynced before the atomic rename that publishes
them, and the directory after it, so a crash cannot leave a named but empty file.

Housekeeping happens when a process first opens a cache directory: ``build-*`` folders
left by killed builds are removed once older than ``STALE_S``, and at most once per
``TRIM_INTERVAL_S`` (across processes) the cache is trimmed to its size cap, dropping
the entries used least recently (a hit refreshes its ref's modification time).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("looptune.runtime")

CACHE_MAX_BYTES = 1 << 30         # default size cap of one cache directory
STALE_S = 3600.0                  # temporary build folders older than this belong to dead builds
TRIM_INTERVAL_S = 3600.0          # trim a cache directory at most this often
TEMP_PREFIX = "build-"            # temporary folders and files inside the cache start with this
_TRIM_MARK = ".last-trim"

_opened: set[Path] = set()
_opened_lock = threading.Lock()
_verified: dict[tuple[str, int, int, int], str] = {}    # (path, inode, size, mtime_ns) -> sha256


def sha256_of(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents to disk (for a directory: the renames in it).
    The one fsync helper: the kernel cache and the database's atomic commits both use it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, cache: Path, sha256: str, suffix: str, prefix: str = "lib-") -> Path:
    """Move a finished file into the cache under a name made from its content hash.

    The file is fsynced, renamed atomically, then the directory is fsynced.  If a verified
    file of that name is already there (another process published the same bytes), it is
    kept, so libraries other processes have loaded keep their inode.
    """
    final = cache / f"{prefix}{sha256[:24]}{suffix}"
    if entry_problem(final, {"size": tmp.stat().st_size, "sha256": sha256}) is None:
        tmp.unlink(missing_ok=True)
        return final
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(cache)
    return final


def write_ref(ref: Path, data: dict[str, Any], *, sync_dir: bool = True) -> None:
    """Write a ref atomically and durably (temporary file, fsync, rename, fsync the directory)."""
    tmp = ref.with_name(f"{TEMP_PREFIX}{ref.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ref)
    except BaseException:       # a full disk: no temporary left behind
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_path(ref.parent)


def read_ref(ref: Path) -> dict[str, Any] | None:
    """A ref's contents, or None when it is missing or not a ref."""
    try:
        data = json.loads(ref.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("so"), str) and isinstance(data.get("size"), int)
            and isinstance(data.get("sha256"), str)):
        return None
    return data


def entry_problem(so: Path, ref: dict[str, Any]) -> str | None:
    """Why the file does not match its ref (missing, wrong size, wrong hash), or None if it does."""
    try:
        st = so.stat()
    except OSError as e:
        return f"{so.name} is missing ({e.strerror})"
    if st.st_size != ref["size"]:
        return f"{so.name} has {st.st_size} bytes, expected {ref['size']}"
    ident = (str(so), st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _verified.get(ident)
    if digest is None:
        try:
            _, digest = sha256_of(so)
        except OSError as e:
            return f"{so.name} cannot be read ({e.strerror})"
    if digest != ref["sha256"]:
        return f"{so.name} does not match its recorded sha256 (damaged or replaced)"
    _verified[ident] = digest
    return None


def check_ref(ref: Path) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """(verified file, ref data, None), or (None, data or None, why it is unusable).

    A damaged entry is removed (its ref and its file) so the caller rebuilds it; a missing
    ref is just a miss (reason None).  A hit refreshes the ref's time for trimming.
    """
    data = read_ref(ref)
    if data is None:
        return None, None, None
    so = ref.parent / data["so"]
    problem = entry_problem(so, data)
    if problem is not None:
        log.warning("looptune: cache entry %s is unusable (%s); rebuilding it", ref.name, problem)
        for path in (ref, so):
            try:
                path.unlink()
            except OSError:
                pass
        return None, data, problem
    try:
        os.utime(ref)
    except OSError:
        pass
    return so, data, None


def open_cache(cache: Path, max_bytes: int = CACHE_MAX_BYTES) -> Path:
    """Create the directory; on the first open in this process, clean up after killed builds
    and trim the cache if it is due."""
    cache = Path(cache)
    with _opened_lock:
        if cache in _opened:
            return cache
        cache.mkdir(parents=True, exist_ok=True)
        _opened.add(cache)
    remove_stale(cache)
    maybe_trim(cache, max_bytes)
    return cache


def remove_stale(cache: Path, older_than_s: float = STALE_S) -> int:
    """Remove temporary build folders and files older than ``older_than_s``; returns how many."""
    removed = 0
    cutoff = time.time() - older_than_s
    try:
        entries = list(os.scandir(cache))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


def maybe_trim(cache: Path, max_bytes: int, interval_s: float = TRIM_INTERVAL_S) -> None:
    """Trim now if no process did in the last ``interval_s`` seconds (``max_bytes`` <= 0: no cap)."""
    if max_bytes <= 0:
        return
    mark = cache / _TRIM_MARK
    try:
        if time.time() - mark.stat().st_mtime < interval_s:
            return
    except OSError:
        pass
    try:
        mark.touch()
    except OSError:
        return
    trim(cache, max_bytes)


def trim(cache: Path, max_bytes: int) -> int:
    """Delete the least recently used shared objects (and their refs) until the cache holds at
    most ``max_bytes``; files no ref names are deleted once stale.  Returns the bytes freed."""
    refs: dict[str, list[Path]] = {}         # file name -> refs naming it
    ref_used: dict[str, float] = {}          # file name -> latest use of any of its refs
    sizes: dict[str, int] = {}
    made: dict[str, float] = {}
    try:
        entries = list(os.scandir(cache))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.name.endswith(".json"):
            data = read_ref(Path(entry.path))
            if data is not None:
                refs.setdefault(data["so"], []).append(Path(entry.path))
                ref_used[data["so"]] = max(ref_used.get(data["so"], 0.0), st.st_mtime)
        elif entry.name.endswith(".so"):
            sizes[entry.name] = st.st_size
            made[entry.name] = st.st_mtime
    freed = 0
    cutoff = time.time() - STALE_S
    for name in [n for n in sizes if n not in refs and made[n] < cutoff]:   # orphans
        freed += _remove(cache, name, [], sizes)
    total = sum(sizes.values())
    for name in sorted(sizes, key=lambda n: ref_used.get(n, made[n])):
        if total <= max_bytes:
            break
        got = _remove(cache, name, refs.get(name, []), sizes)
        freed += got
        total -= got
    return freed


def _remove(cache: Path, name: str, refs: list[Path], sizes: dict[str, int]) -> int:
    try:
        for ref in refs:          # refs first: a reader never finds a ref to a missing file
            ref.unlink(missing_ok=True)
        (cache / name).unlink()
    except OSError:
        return 0
    return sizes.pop(name, 0)
