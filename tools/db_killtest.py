#!/usr/bin/env python
"""kill -9 a database writer at random moments; the database must survive every time.

Each iteration forks a writer that commits one record at a time (lock, re-read, merge,
write temporary, fsync, rename) and reports each commit on a pipe *after* ``commit``
returns.  The parent sends SIGKILL after a random delay, then checks that the database
opens (checksums, schema, every record valid), holds every commit the writer reported,
and holds nothing the writer did not write.  The next iteration's writer also proves
that a lock and temporaries left by a killed writer do not block or confuse the next.

    python tools/db_killtest.py                  # 200 iterations (CI runs 20 via the test suite)
    python tools/db_killtest.py --iterations 1000 --background 20000
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time

from looptune.database import MachineKey, MatmulProblem, Record, StoreSettings, commit, load, save
from looptune.runtime.compiler.trace import Step, Trace

MACHINE = MachineKey("x86_64", "Killtest CPU", "avx2", ("avx2", "fma"), 4, "gcc 12.2.0", "1")
TRACE = Trace((Step.make("split", loop="m", factor=8), Step.make("split", loop="n", factor=16),
               Step.make("vectorize", loop="n.i"), Step.make("unroll", loop="m.i", factor=4)))


def record(i: int, batch: int = 1) -> Record:
    """The i-th commit's record: a distinct problem, fields derived from i so content is checkable
    (``candidates`` carries i)."""
    return Record(MatmulProblem(i + 1, 64, 32, batch=batch), MACHINE, TRACE, 100.0 + i, 1.0, 50.0, True,
                  "killtest", "none", i, 1.7e9 + i)


def _writer(path: str, start: int, report_fd: int, signal_fd: int | None = None) -> None:
    """Commit record after record; with ``signal_fd``, the first commit stops between writing its
    temporary file and publishing it, and says so on ``signal_fd`` (a kill that surely lands
    mid-write)."""
    if signal_fd is not None:
        real_fsync = os.fsync

        def fsync_then_wait(fd: int) -> None:
            real_fsync(fd)
            os.write(signal_fd, b"W")
            time.sleep(60)              # the parent kills us here

        os.fsync = fsync_then_wait
    for i in range(start, start + 100_000):
        commit(path, [record(i)], StoreSettings(lock_timeout_s=30))
        os.write(report_fd, f"{i}\n".encode())


def _run_writer(path: str, start: int, delay: float, mid_write: bool = False) -> list[int]:
    """Fork a writer, SIGKILL it after ``delay`` seconds (or, with ``mid_write``, once its first
    commit has written its temporary file), return the commits it reported."""
    read_fd, write_fd = os.pipe()
    signal_r, signal_w = os.pipe() if mid_write else (None, None)
    pid = os.fork()
    if pid == 0:   # child: no cleanup handlers, no return into the parent's code
        os.close(read_fd)
        try:
            _writer(path, start, write_fd, signal_w)
        finally:
            os._exit(0)
    os.close(write_fd)
    if mid_write:
        os.close(signal_w)
        os.read(signal_r, 1)          # the temporary is written and fsynced, not yet renamed
        os.close(signal_r)
    else:
        time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    return [int(line) for line in b"".join(chunks).split()]


def run(iterations: int, directory: str, seed: int = 0, max_delay: float = 0.3, background: int = 2000,
        verbose: bool = True) -> dict[str, int]:
    """Run the kill test; raise AssertionError on the first lost or damaged commit."""
    rng = random.Random(seed)
    path = os.path.join(directory, "killtest.h5")
    # Background records make each commit rewrite a realistic file, so kills land mid-write too.
    save(path, [record(i, batch=2) for i in range(background)])
    committed: set[int] = set()
    next_id = 0
    stats = {"iterations": 0, "commits": 0, "killed_mid_write": 0}
    for iteration in range(iterations):
        # every fifth kill is aimed between a commit's write and its rename; the rest fall at random
        reported = _run_writer(path, next_id, rng.uniform(0, max_delay), mid_write=iteration % 5 == 2)
        committed.update(reported)
        leftovers = [n for n in os.listdir(directory) if n.startswith(".killtest.h5.tmp.")]
        stats["killed_mid_write"] += bool(leftovers)
        db = load(path)                                    # must open: raises on any damage
        ids = {r.candidates for r in db if r.problem.batch == 1}
        lost = committed - ids
        assert not lost, f"iteration {iteration}: completed commits missing after kill: {sorted(lost)[:10]}"
        for r in db:
            expected = record(r.candidates, batch=r.problem.batch)
            assert r == expected, f"iteration {iteration}: record differs from what was written: {r}"
        assert len(db) == background + len(ids), f"iteration {iteration}: unexpected records"
        next_id = max(ids, default=-1) + 1
        stats["iterations"] += 1
        stats["commits"] = len(ids)
        if verbose:
            print(f"iteration {iteration + 1}/{iterations}: {len(reported)} commits reported, "
                  f"{len(ids)} in database{', killed mid-write' if leftovers else ''}", flush=True)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.3, help="kill after uniform(0, this) seconds")
    parser.add_argument("--background", type=int, default=2000, help="records already in the database")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        try:
            stats = run(args.iterations, directory, args.seed, args.max_delay, args.background, not args.quiet)
        except AssertionError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
    print(f"OK: {stats['iterations']} kills, {stats['commits']} commits all present, "
          f"{stats['killed_mid_write']} kills landed mid-write, {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
