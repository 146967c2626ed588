"""Tuning on many cores and many machines: a pinned local process pool, or Dask distributed.

    build_db(problems, db, executor=PoolExecutor(2, budget_s=2.0, machine=m))
    build_db(problems, db, executor=DaskExecutor("tcp://10.0.0.5:8786", budget_s=2.0, machine=m))
    build_db(problems, db, executor=DaskExecutor("local", workers=2, budget_s=2.0, machine=m))

Every worker process runs ``tune_task``, which

1. computes the worker's own machine key and compares it with the driver's *target*: a
   worker on another CPU, compiler or code-generator version refuses every problem (its
   records would be filed under a machine the database's users do not have), and the
   driver stops sending it work;
2. claims ``cores_per_worker`` cores of its host for the life of the process (a lock file
   per core under the temp directory, ``flock``-ed, so claims die with the process) and
   pins itself there with ``sched_setaffinity``.  The measurement process and the compiler
   inherit the pinning, so two measurements never share a core, however many workers a
   host runs; a worker that finds no free core refuses too;
3. tunes with one tuner (and so one measurement runner) kept for the process's life, and
   returns the record as JSON, with every kernel it timed (``measurements``, ``RunResult`` JSON:
   the driver appends them to its machine's recordings for ``looptune train``).  The driver
   alone writes the database and the recordings.

Dask is optional (``pip install "looptune[dask]"``) and imported only by ``DaskExecutor``.
Start remote workers with one thread each, as many per host as it has cores per problem::

    dask scheduler                                    # on any host: tcp://HOST:8786
    dask worker tcp://HOST:8786 --nthreads 1 --nworkers 8     # on each tuning machine
"""
from __future__ import annotations

import collections
import ctypes
import fcntl
import multiprocessing
import os
import signal
import tempfile
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator, Optional

from looptune.database import MachineKey
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.measure.evaluator import recording_live_measurements
from looptune.tuner.measure.recordings import ResultList
from looptune.tuner.ship.executors import run_one
from looptune.tuner.ship.tuners import make_tuner

_LOCK_DIR = "looptune-cpus"


# ----------------------------------------------------------------------------- worker side

class _WorkerState:
    """Per worker process: its machine key, its claimed cores, its tuners."""

    def __init__(self) -> None:
        self.lock = threading.Lock()        # one tuning at a time per process, whatever the thread pool
        self.machine = None
        self.cores: Optional[list[int]] = None
        self._core_files: list = []
        self.tuners: dict[str, object] = {}


_STATE = _WorkerState()


def claim_cores(count: int, lock_dir: Optional[str] = None) -> tuple[list[int], list]:
    """Claim ``count`` cores this process may run on that no other live looptune worker on the
    host holds.  Returns (cores, open lock files); ([], []) if not enough are free."""
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), _LOCK_DIR)
    os.makedirs(lock_dir, exist_ok=True)
    cores, files = [], []
    for cpu in sorted(os.sched_getaffinity(0)):
        f = open(os.path.join(lock_dir, f"cpu{cpu}.lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        cores.append(cpu)
        files.append(f)
        if len(cores) == count:
            return cores, files
    for f in files:
        f.close()
    return [], []


def pin_process(cores: Iterable[int]) -> None:
    """Pin every thread of this process (Linux affinity is per thread) and so its future children."""
    cores = set(cores)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = []
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:
            pass        # a thread that ended meanwhile
    os.sched_setaffinity(0, cores)


def _machine_difference(mine, target) -> str:
    fields = [f for f in ("arch", "cpu_model", "isa", "features", "cores", "compiler", "codegen_version")
              if getattr(mine, f) != getattr(target, f)]
    return ", ".join(f"{f}: {getattr(mine, f)!r} here, {getattr(target, f)!r} wanted" for f in fields)


def _worker_address() -> str:
    try:
        from distributed import get_worker     # optional dependency (Dask), and heavy: only in Dask workers

        return get_worker().address
    except Exception:       # not in a Dask worker (process pool)
        return ""


def tune_task(problem_key: str, budget_s: float, target: dict, tuner_spec: Optional[str],
              cores_per_worker: int = 1, pin: bool = True) -> dict:
    """Tune one problem on this worker; a JSON-able reply with ``status`` ok, failed or refused."""
    base = {"problem": problem_key, "worker": _worker_address(), "pid": os.getpid()}
    state = _STATE
    with state.lock:
        if state.machine is None:
            state.machine = MachineKey.current()    # the machine's key (all its cores), whatever this worker is pinned to
        wanted = MachineKey.from_dict(target)
        if state.machine != wanted:
            return {**base, "status": "refused", "error": f"machine differs: {_machine_difference(state.machine, wanted)}"}
        if pin:
            if state.cores is None:
                state.cores, state._core_files = claim_cores(cores_per_worker)
            if not state.cores:
                return {**base, "status": "refused",
                        "error": f"no {cores_per_worker} free core(s) on this host: run fewer workers"}
            pin_process(state.cores)
        key = tuner_spec or "auto"
        tuner = state.tuners.get(key)
        if tuner is None:
            tuner = state.tuners[key] = make_tuner(tuner_spec)
        problem = MatmulProblem.from_key(problem_key)
        measured = ResultList()
        with recording_live_measurements(measured):
            reply = run_one(problem, budget_s, tuner, state.machine)
    return {**reply, **base, "cores": state.cores or [], "measurements": measured.rows}


def _pool_init() -> None:
    """Pool workers leave Ctrl-C to the driver and die with it (even on kill -9)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except Exception:
        pass


# ----------------------------------------------------------------------------- executors

def max_local_workers(cores_per_worker: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // max(1, cores_per_worker))


class PoolExecutor:
    """``workers`` pinned processes on this machine (no Dask needed)."""

    def __init__(self, workers: int, *, budget_s: float, machine, tuner: Optional[str] = None,
                 cores_per_worker: int = 1) -> None:
        limit = max_local_workers(cores_per_worker)
        if workers > limit:
            raise ValueError(f"{workers} workers of {cores_per_worker} core(s) each would share cores: "
                             f"this machine has {limit * cores_per_worker} usable; use --workers {limit} or fewer")
        self.slots = workers
        self.budget_s, self.target, self.tuner, self.cores_per_worker = budget_s, machine.to_dict(), tuner, cores_per_worker
        self._pool = None
        self._inflight: dict = {}

    def _new_pool(self):
        return ProcessPoolExecutor(self.slots, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_init)

    def run(self, problems: Iterable[MatmulProblem]) -> Iterator[tuple[MatmulProblem, dict]]:
        queue = collections.deque(problems)
        refusals: collections.Counter = collections.Counter()
        inflight = self._inflight
        self._pool = self._pool or self._new_pool()
        while queue or inflight:
            while queue and len(inflight) < 2 * self.slots:
                p = queue.popleft()
                inflight[self._pool.submit(tune_task, p.key(), self.budget_s, self.target, self.tuner,
                                           self.cores_per_worker, True)] = p
            finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for f in finished:
                p = inflight.pop(f)
                try:
                    reply = f.result()
                except BrokenProcessPool as e:
                    reply = {"status": "failed", "error": f"worker process died: {e}"}
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    queue.extendleft(reversed([q for q in inflight.values()]))
                    inflight.clear()
                    self._pool = self._new_pool()
                except Exception as e:
                    reply = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                if reply.get("status") == "refused" and refusals[p] < 2 * self.slots:
                    refusals[p] += 1        # another worker may take it (a core freed up)
                    queue.append(p)
                    continue
                yield p, reply

    def drain(self) -> Iterator[tuple[MatmulProblem, dict]]:
        """After an interrupt: drop what has not started, let the running problems finish."""
        running = [f for f in self._inflight if not f.cancel()]
        for f in as_completed(running):
            p = self._inflight.pop(f)
            try:
                yield p, f.result()
            except Exception:
                continue
        self._inflight.clear()

    def abort(self) -> None:
        """A second Ctrl-C: stop the workers now, running problems and all."""
        if self._pool is not None:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            self._pool = None
        self._inflight.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _connect(client_class, address: str, timeout_s: float):
    """A Dask client of ``address``, or OSError within about ``timeout_s``: a server that accepts
    the connection but does not speak Dask's protocol (an HTTP server, a typo'd port) would
    otherwise hold ``Client`` past its own timeout."""
    outcome: list = []

    def connect() -> None:
        try:
            outcome.append(client_class(address, timeout=timeout_s))
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome.append(e)

    thread = threading.Thread(target=connect, name="looptune-dask-connect", daemon=True)
    thread.start()
    thread.join(timeout_s + 5.0)
    if not outcome:
        raise TimeoutError(f"{address} did not answer as a Dask scheduler within {timeout_s:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


class DaskExecutor:
    """Problems go to the workers of a Dask scheduler (``tcp://HOST:PORT``), or of a
    ``LocalCluster`` of ``workers`` single-threaded processes on loopback (``"local"``)."""

    def __init__(self, address: str, *, budget_s: float, machine, workers: int = 1, tuner: Optional[str] = None,
                 cores_per_worker: int = 1, connect_timeout_s: float = 30.0) -> None:
        try:
            from distributed import Client, LocalCluster      # optional dependency, heavy: only when asked for
        except ImportError:
            raise ImportError('Dask distributed is not installed: pip install "dask[distributed]" '
                              "(LoopTune's [dask] extra)") from None
        self.budget_s, self.target, self.tuner, self.cores_per_worker = budget_s, machine.to_dict(), tuner, cores_per_worker
        self.cluster = None
        if address == "local":
            limit = max_local_workers(cores_per_worker)
            if workers > limit:
                raise ValueError(f"{workers} workers of {cores_per_worker} core(s) each would share cores; "
                                 f"at most {limit} here")
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        host="127.0.0.1", dashboard_address=None, silence_logs=40)
            address = self.cluster.scheduler_address
        self.address = address
        self.client = _connect(Client, address, connect_timeout_s)
        self.excluded: dict[str, str] = {}     # worker address -> why it refused
        self.slots = max(1, len(self.client.scheduler_info()["workers"]))
        self._futures: dict = {}

    def workers(self) -> list[str]:
        return sorted(self.client.scheduler_info()["workers"])

    def run(self, problems: Iterable[MatmulProblem]) -> Iterator[tuple[MatmulProblem, dict]]:
        from distributed import as_completed as dask_as_completed     # optional dependency (see __init__)

        queue = collections.deque(problems)
        completed = dask_as_completed()

        def submit(p: MatmulProblem) -> bool:
            allowed = [w for w in self.workers() if w not in self.excluded]
            if not allowed:
                return False
            f = self.client.submit(tune_task, p.key(), self.budget_s, self.target, self.tuner, self.cores_per_worker,
                                   True, pure=False, workers=allowed if self.excluded else None,
                                   allow_other_workers=False)
            self._futures[f] = p
            completed.add(f)
            return True

        def refuse_all(why: str) -> Iterator[tuple[MatmulProblem, dict]]:
            while queue:
                yield queue.popleft(), {"status": "refused", "error": why}

        self.slots = max(1, len(self.workers()))
        while queue and len(self._futures) < 2 * self.slots:
            if not submit(queue[0]):
                yield from refuse_all(f"no worker accepts this machine: {self._why()}")
                return
            queue.popleft()
        for f in completed:
            p = self._futures.pop(f)
            try:
                reply = f.result()
            except Exception as e:        # the task raised on the worker (e.g. looptune missing there)
                reply = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if reply.get("status") == "refused" and reply.get("worker"):
                self.excluded[reply["worker"]] = reply.get("error", "")
                if submit(p):
                    continue
                yield p, reply
                yield from refuse_all(f"no worker accepts this machine: {self._why()}")
                continue
            yield p, reply
            while queue and len(self._futures) < 2 * self.slots:
                if not submit(queue[0]):
                    yield from refuse_all(f"no worker accepts this machine: {self._why()}")
                    break
                queue.popleft()

    def drain(self) -> Iterator[tuple[MatmulProblem, dict]]:
        """After an interrupt: give the submitted problems one budget (plus slack) to come back."""
        from distributed import wait as dask_wait     # optional dependency (see __init__)

        futures = list(self._futures)
        if not futures:
            return
        done, _ = dask_wait(futures, timeout=self.budget_s * 2 + 10)
        for f in done:
            p = self._futures.pop(f)
            try:
                yield p, f.result()
            except Exception:
                continue

    def _why(self) -> str:
        return "; ".join(f"{w}: {why}" for w, why in sorted(self.excluded.items())) or "no workers"

    def close(self) -> None:
        try:
            if self._futures:
                self.client.cancel(list(self._futures))
                self._futures.clear()
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
                self.cluster = None
