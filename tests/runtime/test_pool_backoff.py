"""The thread pool's back-off (``runtime/compiler/pool.c``): when a worker lost its core, and how
the back-off period doubles on each sign of a shared core, stops at its cap, and halves on each
clean call down to its floor.

The period lives in the pool's private state, so these tests compile a harness that includes
``pool.c`` itself (``pool.POOL_C``, every function static) and drives ``lt_pool_lost_core`` and
``lt_pool_learn`` directly, reading ``lt_pool.backoff_ns``; one more runs real loops in which a
worker sleeps (wall time without CPU time: a lost core).  Through the shipped library the period
is read through its accessor ``lt_pool_backoff_ns`` (the last test).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import time

import pytest

from looptune.runtime.compiler import pool
from looptune.runtime.compiler.build import BuildSettings

MS = 1_000_000
US = 1_000

HARNESS = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void show(const char *what)
{
    int64_t now = lt_pool_now_ns(), until = atomic_load(&lt_pool.solo_until_ns);
    printf("%s %lld %lld %lld\n", what, (long long)atomic_load(&lt_pool.backoff_ns),
           (long long)atomic_load(&lt_pool.stalls), (long long)(until > now ? until - now : 0));
}

/* a loop in which a worker sleeps through its first iteration (wall time without CPU time) while
   the caller's iterations are instant once a worker is in: the caller waits far longer than two
   of its own iterations take, however late the worker was scheduled */
static _Atomic int worker_in;
static void sleepy(const void *ctx, int64_t i, int tid)
{
    (void)ctx; (void)i;
    if (tid != 0) {
        if (atomic_exchange(&worker_in, 1)) return;
        struct timespec t = {0, 50 * 1000 * 1000};
        nanosleep(&t, 0);
    } else {
        int64_t give_up = lt_pool_now_ns() + (int64_t)10 * 1000 * 1000 * 1000;
        while (!atomic_load(&worker_in) && lt_pool_now_ns() < give_up) LT_PAUSE();   /* wait for a worker */
    }
}
static _Atomic int on_worker;
static void count(const void *ctx, int64_t i, int tid) { (void)ctx; (void)i; if (tid != 0) atomic_fetch_add(&on_worker, 1); }

int main(int argc, char **argv)
{
    alarm(60);
    if (!strcmp(argv[1], "lost")) {
        int64_t cases[][2] = {{1000 * US, 1000 * US}, {1000 * US, 700 * US}, {100 * US, 90 * US},
                              {1000 * US, 850 * US}, {1000 * US, 790 * US}, {60 * US, 0}, {50 * US, 0}, {40 * US, 0}};
        for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; i++)
            printf("lost %lld %lld %d\n", (long long)cases[i][0], (long long)cases[i][1],
                   lt_pool_lost_core(cases[i][0], cases[i][1]));
        return 0;
    }
    if (!strcmp(argv[1], "learn")) {
        lt_pool_set_backoff(1 * MS, 128 * MS, 500 * US, 50 * US);
        show("start");
        for (int i = 0; i < 9; i++) { lt_pool_learn(4, 400 * US, 0, 2, 1); show("lost-core"); }  /* a worker lost its core */
        for (int i = 0; i < 9; i++) { lt_pool_learn(4, 400 * US, 20 * US, 2, 0); show("clean"); } /* workers, no wait */
        lt_pool_learn(4, 400 * US, 300 * US, 2, 0); show("stall");          /* waited 300 us > 2 x 100 us own chunks */
        lt_pool_learn(4, 400 * US, 150 * US, 2, 0); show("short-wait");     /* 150 us < 2 x 100 us: clean */
        lt_pool_learn(100, 400 * US, 45 * US, 2, 0); show("tiny-wait");     /* over 2 x 4 us but under 50 us: clean */
        lt_pool_learn(4, 400 * US, 300 * US, 2, 0); show("stall");
        lt_pool_learn(4, 400 * US, 9000 * US, 1, 0); show("caller-alone"); /* no worker took part: no lesson */
        lt_pool_learn(0, 0, 9000 * US, 2, 0); show("workers-only");         /* the caller ran nothing: no lesson */
        lt_pool_learn(0, 0, 9000 * US, 1, 1); show("lost-alone");          /* a worker's lost core counts anyway */
        return 0;
    }
    if (!strcmp(argv[1], "live")) {
        lt_pool_set_backoff(5000 * MS, 40000 * MS, 30000 * MS, 1 * MS);   /* long periods: never expire here */
        show("start");
        lt_pool_for(2, 1000, sleepy, 0);
        printf("worker %d\n", atomic_load(&worker_in));
        show("after-sleepy");
        int64_t solo = lt_pool_solo_calls();
        lt_pool_for(4, 64, count, 0);                 /* backing off: the caller alone, within the solo head */
        printf("solo %lld %d\n", (long long)(lt_pool_solo_calls() - solo), atomic_load(&on_worker));
        return 0;
    }
    return 2;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = BuildSettings.from_env().compiler
    if shutil.which(compiler) is None:
        pytest.skip("needs a C compiler")
    tmp = tmp_path_factory.mktemp("pool-backoff")
    src = tmp / "backoff.c"
    src.write_text(f"#define MS ((int64_t)1000000)\n#define US ((int64_t)1000)\n{pool.POOL_C}\n{HARNESS}")
    exe = tmp / "backoff"
    built = subprocess.run([compiler, "-O2", "-std=gnu11", "-pthread", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]

    def run(mode: str) -> list[list[str]]:
        done = subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
        return [line.split() for line in done.stdout.strip().splitlines()]

    return run


def test_a_worker_lost_its_core_when_it_lost_a_fifth_of_its_time_and_over_50_us(harness):
    found = {(int(w), int(c)): bool(int(lost)) for _, w, c, lost in harness("lost")}
    assert found == {
        (1000 * US, 1000 * US): False,    # on its core throughout
        (1000 * US, 700 * US): True,      # lost 300 us of 1 ms
        (100 * US, 90 * US): False,       # 10 us: an interrupt, not another thread
        (1000 * US, 850 * US): False,     # 150 us, but under a fifth
        (1000 * US, 790 * US): True,      # 210 us: over a fifth
        (60 * US, 0): True,
        (50 * US, 0): False,              # not over 50 us
        (40 * US, 0): False,
    }


def test_the_back_off_doubles_to_its_cap_and_halves_to_its_floor(harness):
    steps = [(what, int(backoff), int(stalls), int(solo_left)) for what, backoff, stalls, solo_left in harness("learn")]
    what, backoff, stalls, solo_left = steps[0]
    assert (what, backoff, stalls, solo_left) == ("start", 1 * MS, 0, 0)

    lost = steps[1:10]
    assert [s[1] for s in lost] == [2 * MS, 4 * MS, 8 * MS, 16 * MS, 32 * MS, 64 * MS, 128 * MS, 128 * MS, 128 * MS]
    assert [s[2] for s in lost] == list(range(1, 10))                  # each sign counts as a stall
    # each sign starts a solo period as long as the back-off before it was doubled (the capped one here)
    assert 0 < lost[-1][3] <= 128 * MS

    clean = steps[10:19]
    assert [s[1] for s in clean] == [64 * MS, 32 * MS, 16 * MS, 8 * MS, 4 * MS, 2 * MS, 1 * MS, 1 * MS, 1 * MS]
    assert {s[2] for s in clean} == {9}                                # no stall counted

    rest = {i: s for i, s in enumerate(steps[19:])}
    assert [(s[0], s[1], s[2]) for s in rest.values()] == [
        ("stall", 2 * MS, 10),           # the caller waited longer than two of its chunks: doubled
        ("short-wait", 1 * MS, 10),      # not longer than two chunks: a clean call, halved
        ("tiny-wait", 1 * MS, 10),       # not over stall_min: clean (at the floor)
        ("stall", 2 * MS, 11),
        ("caller-alone", 2 * MS, 11),    # no worker took part: nothing learnt
        ("workers-only", 2 * MS, 11),    # the caller took no chunk: nothing learnt
        ("lost-alone", 4 * MS, 12),      # but a worker that lost its core is a sign whatever the rest
    ]


def test_a_worker_that_sleeps_through_its_iteration_makes_the_pool_back_off(harness):
    """Real threads: the worker's iteration takes 50 ms of wall time and almost no CPU time, so it
    lost its core; the pool doubles its period and the next loop runs on the caller alone."""
    steps = {line[0]: line[1:] for line in harness("live")}
    assert steps["start"][:2] == [str(5000 * MS), "0"]
    assert steps["worker"] == ["1"], "no worker joined the loop"
    backoff, stalls, solo_left = map(int, steps["after-sleepy"])
    assert backoff == 10000 * MS and stalls == 1                       # doubled once, one stall
    assert 4000 * MS < solo_left <= 5000 * MS                          # alone for the period before doubling
    assert steps["solo"] == ["1", "0"]                                 # the next loop: the caller alone


# ---- the shipped library ----------------------------------------------------------------------------

def _library():
    return pool.load()


def test_the_shipped_pool_doubles_its_back_off_on_a_lost_core():
    lib = _library()     # looked up here, not at collection: the suite's kernel cache is set by then
    assert lib is not None, "the thread pool library could not be built"
    task_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int)
    lib.lt_pool_for.argtypes = [ctypes.c_int, ctypes.c_int64, task_type, ctypes.c_void_p]
    lib.lt_pool_set_backoff.argtypes = [ctypes.c_int64] * 4
    lib.lt_pool_backoff_ns.restype = lib.lt_pool_stalls.restype = ctypes.c_int64
    joined = []

    @task_type
    def task(_ctx, it, tid):
        if tid != 0:
            if not joined:
                joined.append(it)
                time.sleep(0.05)           # wall time, no CPU time: a lost core
        else:
            deadline = time.monotonic() + 10
            while not joined and time.monotonic() < deadline:
                time.sleep(0)

    try:
        for cap, expected in ((40000 * MS, 10000 * MS), (7000 * MS, 7000 * MS)):   # doubled; capped
            lib.lt_pool_set_backoff(5000 * MS, cap, 30000 * MS, 1 * MS)
            assert lib.lt_pool_backoff_ns() == 5000 * MS
            stalls = lib.lt_pool_stalls()
            joined.clear()
            assert lib.lt_pool_for(2, 1000, task, None) == 0
            assert joined, "no worker joined the loop"
            assert lib.lt_pool_stalls() == stalls + 1
            assert lib.lt_pool_backoff_ns() == expected
    finally:
        lib.lt_pool_set_backoff(1 * MS, 128 * MS, 500 * US, 50 * US)     # pool.c's defaults
