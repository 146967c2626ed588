"""Runners: measure candidate kernels and return typed results; nothing raises across them.

A *candidate* is a problem plus a built artifact (``.so`` path and symbol) plus an opaque
tag (usually the schedule trace JSON).  A runner turns a batch of candidates into one
``RunResult`` each: a time when the kernel was verified correct, otherwise a status and an
error message (cf. TVM's ``RunnerResult(run_secs, error_msg)``).  Search and the agent ask a
runner, they never see an exception from a bad kernel.

* ``LocalRunner`` runs kernels in a persistent worker process (``looptune.tuner.measure.worker``)
  with a per-candidate timeout; the worker is restarted after a crash or a hang.
* ``looptune.tuner.measure.replay`` records results and answers from recordings (Kernel
  Tuner's simulation mode), so agent tests are deterministic and training is cheap.
"""
from __future__ import annotations

import abc
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import replace
from typing import Any, Sequence

from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.protocol import (THREAD_ENV_VARS, Artifact, Candidate, MeasureConfig, RunResult, RunStatus,
                                             default_tolerance)

__all__ = ["Artifact", "Candidate", "MeasureConfig", "RunStatus", "RunResult", "Runner", "LocalRunner",
           "default_tolerance"]


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(xs)

    def q(p: float) -> float:          # linear interpolation, numpy's default
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.25), q(0.5), q(0.75)


class Runner(abc.ABC):
    """``run(candidates) -> results``, one result per candidate, in order.  Close when done."""

    @abc.abstractmethod
    def run(self, candidates: Sequence[Candidate]) -> list[RunResult]: ...

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- local runner

class _WorkerProcess:
    """One ``python -m looptune.tuner.measure.worker`` process, pinned to a thread count."""

    def __init__(self, threads: int, scratch: str, startup_timeout: float, python: str):
        env = dict(os.environ)
        env.update({v: str(threads) for v in THREAD_ENV_VARS})
        env["PYTHONFAULTHANDLER"] = "1"
        log = os.path.join(scratch, f"worker-t{threads}.stderr")
        open(log, "wb").close()                  # fresh log per worker; O_APPEND below so our
        self.stderr = open(log, "ab+")           # seeks never move the child's write position
        self.proc = subprocess.Popen([python, "-m", "looptune.tuner.measure.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env, cwd=scratch,
                                     start_new_session=True)   # Ctrl-C reaches us; we kill it
        self._buf = b""
        self._mark = 0                           # stderr offset where the current request began
        hello = self._recv(time.monotonic() + startup_timeout)
        if not isinstance(hello, dict) or hello.get("status") != "ready":
            err = self.describe_death()
            self.kill()
            raise RuntimeError(f"worker did not start: {hello!r} {err}")

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """The worker's reply, or "timeout" / "died"."""
        self._mark = self.stderr.seek(0, os.SEEK_END)
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return "died"
        return self._recv(time.monotonic() + timeout)

    def _recv(self, deadline: float) -> dict[str, Any] | str:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return "died"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def describe_death(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "worker closed its pipe but is still running"
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        self.stderr.seek(self._mark)
        tail = self.stderr.read()[-1500:].decode(errors="replace").strip()
        return f"worker {how}" + (f"; stderr:\n{tail}" if tail else "")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        _kill(self.proc)
        self.stderr.close()


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (its own session: whatever a kernel forked dies too)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass


def _cleanup(workers: dict[int, _WorkerProcess], scratch: str) -> None:
    for w in list(workers.values()):
        w.kill()
    workers.clear()
    shutil.rmtree(scratch, ignore_errors=True)


class LocalRunner(Runner):
    """Time candidates serially in a persistent worker process, one worker per thread count.

    Process start (Python + numpy import) costs ~0.2 s, so the worker lives across candidates
    and is only replaced when a kernel kills it (crash) or holds it (timeout: SIGKILL), or
    after ``max_candidates_per_worker`` loaded libraries.  Thread counts are fixed at worker
    start (BLAS and OpenMP read them once), hence one worker per ``problem.threads``.  The
    numpy reference time is measured once per problem and cached for the runner's life.
    Workers are killed on ``close()``, on garbage collection and at interpreter exit.
    """

    def __init__(self, config: MeasureConfig = MeasureConfig(), *, startup_timeout: float = 60.0,
                 max_candidates_per_worker: int = 2000, measure_numpy: bool = True, python: str = sys.executable):
        self.config = config
        self.startup_timeout = startup_timeout
        self.max_candidates_per_worker = max_candidates_per_worker
        self.measure_numpy = measure_numpy
        self.python = python
        self.restarts = 0                       # workers replaced after a crash or timeout
        self._scratch = tempfile.mkdtemp(prefix="looptune-runner-")
        self._workers: dict[int, _WorkerProcess] = {}
        self._served: dict[int, int] = {}
        self._reference: dict[MatmulProblem, tuple[float, int, bool]] = {}  # -> (seconds, tries, settled)
        self._finalizer = weakref.finalize(self, _cleanup, self._workers, self._scratch)

    def worker_pids(self) -> dict[int, int]:
        """threads -> pid of the live workers (for tests and debugging)."""
        return {t: w.proc.pid for t, w in self._workers.items() if w.alive()}

    def close(self) -> None:
        self._finalizer()

    def run(self, candidates: Sequence[Candidate]) -> list[RunResult]:
        return [self._run_one(c) for c in candidates]

    def _run_one(self, cand: Candidate) -> RunResult:
        base = RunResult(RunStatus.RUNNER_ERROR, problem_key=cand.problem.key(), tag=cand.tag)
        if cand.artifact is None:
            return replace(base, status=RunStatus.BUILD_ERROR, error=cand.build_error or "no artifact")
        if not self._finalizer.alive:
            return replace(base, error="runner is closed")
        try:
            numpy_seconds = self.numpy_seconds(cand.problem)
            msg = {"op": "run", "problem": cand.problem.key(), "so_path": os.path.abspath(cand.artifact.so_path),
                   "symbol": cand.artifact.symbol, "config": self.config.to_json(),
                   "reference_seconds": numpy_seconds}
            reply = self._request(cand.problem.threads, msg)
        except Exception as e:   # e.g. the worker cannot start: our failure, reported as such
            return replace(base, error=f"{type(e).__name__}: {e}")
        if isinstance(reply, RunResult):
            return replace(reply, problem_key=base.problem_key, tag=base.tag)
        result = self._to_result(base, reply, cand.problem)
        if numpy_seconds is not None:
            result = replace(result, numpy_seconds=numpy_seconds,
                             numpy_gflops=cand.problem.flops / numpy_seconds / 1e9)
        return result

    def numpy_seconds(self, problem: MatmulProblem) -> float | None:
        """Median np.matmul time, measured once per problem; measured again (at most 3 times in
        all, keeping the fastest) while other processes were visibly taking the cores."""
        if not self.measure_numpy:
            return None
        seconds, tries, settled = self._reference.get(problem, (math.inf, 0, False))
        if not settled:
            msg = {"op": "reference", "problem": problem.key(), "config": self.config.to_json()}
            reply = self._request(problem.threads, msg)
            tries += 1
            ok = isinstance(reply, dict) and reply.get("status") == RunStatus.OK.value
            if ok:
                seconds = min(seconds, _quartiles(reply["seconds"])[1])
            disturbed = ok and (reply.get("cpu_share") or 1.0) < 0.9
            self._reference[problem] = (seconds, tries, tries >= 3 or not disturbed)
        return None if seconds == math.inf else seconds

    def numpy_second_opinion(self, problem: MatmulProblem) -> None:
        """Time np.matmul once more, keeping the faster.  The first timing overlaps the first
        compiles (``Evaluator.prefetch``), and the compiler on the next core slows a memory-bound
        numpy call without taking its core (1x4096x1024: 36 GFLOPS then, 46 to 48 quiet), which
        the CPU-share check cannot see.  With the finalists no compile runs (``search.loop._confirm``)."""
        if not self.measure_numpy:
            return
        seconds, tries, _ = self._reference.get(problem, (math.inf, 0, False))
        msg = {"op": "reference", "problem": problem.key(), "config": self.config.to_json()}
        reply = self._request(problem.threads, msg)
        if isinstance(reply, dict) and reply.get("status") == RunStatus.OK.value:
            seconds = min(seconds, _quartiles(reply["seconds"])[1])
        self._reference[problem] = (seconds, tries + 1, True)

    def _request(self, threads: int, msg: dict[str, Any]) -> dict[str, Any] | RunResult:
        """Send one request; a dead or hung worker becomes a CRASH / TIMEOUT result."""
        worker = self._workers.get(threads)
        if worker is not None and (not worker.alive() or self._served[threads] >= self.max_candidates_per_worker):
            worker.kill()
            worker = None
        if worker is None:
            worker = self._workers[threads] = _WorkerProcess(threads, self._scratch, self.startup_timeout, self.python)
            self._served[threads] = 0
        self._served[threads] += 1
        timeout = self.config.timeout_seconds
        reply = worker.request(msg, timeout)
        if isinstance(reply, dict):
            return reply
        if reply == "timeout":
            worker.kill()
            status, error = RunStatus.TIMEOUT, f"no answer within {timeout:g} s; worker killed"
        else:
            status, error = RunStatus.CRASH, worker.describe_death()
            worker.kill()
        del self._workers[threads]
        self.restarts += 1
        return RunResult(status, error=error)

    @staticmethod
    def _to_result(base: RunResult, reply: dict[str, Any], problem: MatmulProblem) -> RunResult:
        try:
            status = RunStatus(reply.get("status"))
        except ValueError:
            return replace(base, error=f"malformed worker reply: {reply!r}")
        if status is not RunStatus.OK:
            return replace(base, status=status, error=reply.get("error", ""))
        samples = tuple(float(s) for s in reply["seconds"])
        q1, med, q3 = _quartiles(samples)
        return replace(base, status=status, seconds=med, q1_seconds=q1, q3_seconds=q3, samples=samples,
                       number=int(reply["number"]), gflops=problem.flops / med / 1e9,
                       cpu_share=reply.get("cpu_share"))
