/* looptune thread pool (see looptune.runtime.compiler.pool for the design) */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#ifndef LT_POOL_LINKAGE
#define LT_POOL_LINKAGE __attribute__((visibility("default")))
#endif
#ifndef LT_POOL_DECLARED
#define LT_POOL_DECLARED
typedef void (*lt_pool_task)(const void *ctx, int64_t iteration, int tid);
#define LT_POOL_AVAILABLE 1
#endif

#if defined(__x86_64__) || defined(__i386__)
#define LT_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define LT_PAUSE() __asm__ __volatile__("yield" ::: "memory")
#else
#define LT_PAUSE() ((void)0)
#endif

/* the word iterations are taken from: generation (odd while a loop is being published),
   participants so far, next iteration */
#define LT_GEN(s) ((s) >> 32)
#define LT_GEN_MASK 0xffffffffu          /* generations wrap at 32 bits */
#define LT_JOINED(s) (((s) >> 20) & 0xfffu)
#define LT_NEXT(s) ((s) & 0xfffffu)
#define LT_ONE_JOINED ((uint64_t)1 << 20)
#define LT_MAX_THREADS 4095        /* participants fit 12 bits */
#define LT_MAX_CHUNKS 0xfffffu     /* iterations are grouped into at most this many chunks */

static struct {
    _Atomic uint64_t state;
    _Atomic(lt_pool_task) task;            /* the loop being run */
    _Atomic(const void *) ctx;
    _Atomic int64_t first, count, chunks, nthreads;   /* iterations [first, count) */
    _Atomic int64_t chunks_per_thread;     /* 1 in a gang: every iteration on a thread of its own */
    _Atomic int64_t done;                  /* chunks finished */
    _Atomic int busy;                      /* a caller owns the pool */
    _Atomic int sleepers;                  /* workers waiting on `wake` */
    _Atomic int caller_sleeping;
    _Atomic int64_t worker_spin_ns, caller_spin_ns;
    _Atomic int workers;                   /* started (changed by the pool's owner only) */
    /* contention back-off (kernel loops only): a worker lost its core while in a loop, or one
       descheduled in the middle of an iteration held the caller (a stall), so until
       `solo_until_ns` loops start on the caller alone and bring the workers in only after
       `solo_head_ns`; each such sign doubles the back-off, each clean call with workers halves it */
    _Atomic int64_t solo_until_ns, backoff_ns, backoff_min_ns, backoff_max_ns, solo_head_ns, stall_min_ns;
    _Atomic int64_t stalls, solo_calls;    /* diagnostics */
    _Atomic int shared_core;               /* a worker lost its core while in a loop, since the caller looked */
    pthread_mutex_t mu;
    pthread_cond_t wake, finished;
} lt_pool = {
    .state = (uint64_t)2 << 32 | LT_MAX_CHUNKS,
    .worker_spin_ns = 50000, .caller_spin_ns = 2000000,
    .backoff_ns = 1000000, .backoff_min_ns = 1000000, .backoff_max_ns = 128000000,
    .solo_head_ns = 500000, .stall_min_ns = 50000,
    .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .finished = PTHREAD_COND_INITIALIZER,
};
static pthread_once_t lt_pool_once = PTHREAD_ONCE_INIT;
static _Atomic int64_t lt_pool_blas_gangs;   /* OpenBLAS calls served (for tests and diagnostics) */
static _Thread_local int lt_pool_inside;   /* this thread runs pool work: a worker, or a caller in a loop */

static int64_t lt_pool_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int64_t lt_pool_cpu_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* whether a thread that ran chunks for `wall_ns`, of which it was on a core `cpu_ns`, lost its
   core to another thread: for a fifth of that time and over 50 us (an interrupt costs a few us;
   another runnable thread on the core, a scheduler time slice) */
static int lt_pool_lost_core(int64_t wall_ns, int64_t cpu_ns)
{
    int64_t lost = wall_ns - cpu_ns;
    return lost > 50000 && 5 * lost > wall_ns;
}

/* take and run chunks of loop `gen` until none is left; *tid is -1 until this thread joins;
   returns the chunks this thread ran */
static int64_t lt_pool_work(uint64_t gen, int *tid, int notify)
{
    lt_pool_task task = atomic_load_explicit(&lt_pool.task, memory_order_relaxed);
    const void *ctx = atomic_load_explicit(&lt_pool.ctx, memory_order_relaxed);
    int64_t first = atomic_load_explicit(&lt_pool.first, memory_order_relaxed);
    int64_t span = atomic_load_explicit(&lt_pool.count, memory_order_relaxed) - first;   /* iterations published */
    int64_t chunks = atomic_load_explicit(&lt_pool.chunks, memory_order_relaxed);
    int64_t nthreads = atomic_load_explicit(&lt_pool.nthreads, memory_order_relaxed);
    int64_t per_thread = atomic_load_explicit(&lt_pool.chunks_per_thread, memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire);
    uint64_t s = atomic_load_explicit(&lt_pool.state, memory_order_relaxed);
    int64_t ran = 0;
    while (ran < per_thread) {
        if (LT_GEN(s) != gen || (int64_t)LT_NEXT(s) >= chunks) break;     /* another loop, or none left */
        uint64_t next = s + 1;
        if (*tid < 0) {
            if ((int64_t)LT_JOINED(s) >= nthreads) break;                 /* enough threads on it */
            next += LT_ONE_JOINED;
        }
        if (!atomic_compare_exchange_weak_explicit(&lt_pool.state, &s, next, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;                                                     /* s was reloaded */
        if (*tid < 0) *tid = (int)LT_JOINED(s);
        int64_t c = (int64_t)LT_NEXT(s), lo = first + c * span / chunks, hi = first + (c + 1) * span / chunks;
        for (int64_t i = lo; i < hi; i++) task(ctx, i, *tid);
        ran++;
        if (atomic_fetch_add(&lt_pool.done, 1) + 1 == chunks && notify && atomic_load(&lt_pool.caller_sleeping)) {
            pthread_mutex_lock(&lt_pool.mu);
            pthread_cond_broadcast(&lt_pool.finished);
            pthread_mutex_unlock(&lt_pool.mu);
        }
        s = atomic_load_explicit(&lt_pool.state, memory_order_relaxed);
    }
    return ran;
}

/* a worker: wait for a loop newer than the last one seen, help with it, repeat */
static void *lt_pool_worker(void *arg)
{
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    lt_pool_inside = 1;
    for (;;) {
        uint64_t s = atomic_load_explicit(&lt_pool.state, memory_order_acquire);
        int64_t start = lt_pool_now_ns(), spin = atomic_load_explicit(&lt_pool.worker_spin_ns, memory_order_relaxed);
        for (unsigned n = 1; LT_GEN(s) == seen || (LT_GEN(s) & 1); n++) {
            if ((n & 63) == 0 && lt_pool_now_ns() - start > spin) {
                pthread_mutex_lock(&lt_pool.mu);
                atomic_fetch_add(&lt_pool.sleepers, 1);
                while (s = atomic_load(&lt_pool.state), LT_GEN(s) == seen || (LT_GEN(s) & 1))
                    pthread_cond_wait(&lt_pool.wake, &lt_pool.mu);
                atomic_fetch_sub(&lt_pool.sleepers, 1);
                pthread_mutex_unlock(&lt_pool.mu);
                break;
            }
            LT_PAUSE();
            s = atomic_load_explicit(&lt_pool.state, memory_order_acquire);
        }
        seen = LT_GEN(s);
        int tid = -1;
        int64_t wall = lt_pool_now_ns(), cpu = lt_pool_cpu_ns();
        int64_t ran = lt_pool_work(seen, &tid, 1);
        if (ran > 0 && lt_pool_lost_core(lt_pool_now_ns() - wall, lt_pool_cpu_ns() - cpu))
            atomic_store_explicit(&lt_pool.shared_core, 1, memory_order_relaxed);   /* the caller's next look */
    }
    return 0;
}

/* in a forked child: only the forking thread exists, so the pool starts empty */
static void lt_pool_after_fork_child(void)
{
    uint64_t gen = LT_GEN(atomic_load(&lt_pool.state));
    atomic_store(&lt_pool.state, (((gen | 1) + 1) & LT_GEN_MASK) << 32 | LT_MAX_CHUNKS);
    atomic_store(&lt_pool.workers, 0);
    atomic_store(&lt_pool.busy, 0);
    atomic_store(&lt_pool.sleepers, 0);
    atomic_store(&lt_pool.caller_sleeping, 0);
    atomic_store(&lt_pool.solo_until_ns, 0);
    pthread_mutex_init(&lt_pool.mu, 0);
    pthread_cond_init(&lt_pool.wake, 0);
    pthread_cond_init(&lt_pool.finished, 0);
}

static void lt_pool_register_fork(void) { pthread_atfork(0, 0, lt_pool_after_fork_child); }

/* called before the pool is first taken: a child forked while another thread holds the pool
   (`busy`) must find it free, so the fork handler has to be in place by then */
static void lt_pool_watch_forks(void) { pthread_once(&lt_pool_once, lt_pool_register_fork); }

/* threads we start block every signal: signals stay with the application's threads */
static void lt_pool_block_signals(sigset_t *old)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, old);
}

/* start workers until `want` exist (fewer if the system refuses threads) */
static void lt_pool_grow(int want)
{
    if (lt_pool.workers >= want) return;
    sigset_t old;
    lt_pool_block_signals(&old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    uintptr_t seen = (uintptr_t)LT_GEN(atomic_load(&lt_pool.state));
    for (pthread_t t; lt_pool.workers < want && pthread_create(&t, &attr, lt_pool_worker, (void *)seen) == 0;)
        lt_pool.workers++;
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, 0);
}

/* a kernel loop just ran: learn whether its threads share cores (see lt_pool.solo_until_ns).
   `own` chunks took the caller `own_ns`; it then waited `wait_ns` for chunks workers had taken;
   `shared_core`: a worker lost its core while in a loop since the caller last looked. */
static void lt_pool_learn(int64_t own, int64_t own_ns, int64_t wait_ns, int64_t joined, int shared_core)
{
    if (!shared_core && (own <= 0 || joined <= 1)) return;   /* no worker took part, or only workers */
    int64_t backoff = atomic_load_explicit(&lt_pool.backoff_ns, memory_order_relaxed);
    if (shared_core || (wait_ns > atomic_load_explicit(&lt_pool.stall_min_ns, memory_order_relaxed)
                        && wait_ns > 2 * (own_ns / own))) {
        /* a thread of the loop lost its core while in it, or the caller waited longer than two
           of its own chunks take (a worker descheduled in the middle of one): the loop's
           threads share cores with other threads (another library's spinning thread, another
           process, or each other), and the next short calls would be held as long again */
        atomic_fetch_add_explicit(&lt_pool.stalls, 1, memory_order_relaxed);
        atomic_store_explicit(&lt_pool.solo_until_ns, lt_pool_now_ns() + backoff, memory_order_relaxed);
        int64_t most = atomic_load_explicit(&lt_pool.backoff_max_ns, memory_order_relaxed);
        atomic_store_explicit(&lt_pool.backoff_ns, 2 * backoff < most ? 2 * backoff : most, memory_order_relaxed);
    } else {
        int64_t least = atomic_load_explicit(&lt_pool.backoff_min_ns, memory_order_relaxed);
        atomic_store_explicit(&lt_pool.backoff_ns, backoff / 2 > least ? backoff / 2 : least, memory_order_relaxed);
    }
}

/* publish iterations [first, count) of a loop and take part in it, as thread number 0; returns
   once every iteration has run */
static void lt_pool_run(int nthreads, int64_t first, int64_t count, lt_pool_task task, const void *ctx,
                        int64_t per_thread)
{
    int64_t span = count - first;
    int64_t chunks = span < (int64_t)LT_MAX_CHUNKS ? span : (int64_t)LT_MAX_CHUNKS;
    uint64_t gen = (LT_GEN(atomic_load_explicit(&lt_pool.state, memory_order_relaxed)) + 1) & LT_GEN_MASK;   /* odd: writing */
    atomic_store_explicit(&lt_pool.state, gen << 32 | LT_MAX_CHUNKS, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&lt_pool.task, task, memory_order_relaxed);
    atomic_store_explicit(&lt_pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&lt_pool.first, first, memory_order_relaxed);
    atomic_store_explicit(&lt_pool.count, count, memory_order_relaxed);
    atomic_store_explicit(&lt_pool.chunks, chunks, memory_order_relaxed);
    atomic_store_explicit(&lt_pool.nthreads, nthreads, memory_order_relaxed);
    atomic_store_explicit(&lt_pool.chunks_per_thread, per_thread, memory_order_relaxed);
    atomic_store_explicit(&lt_pool.done, 0, memory_order_relaxed);
    gen = (gen + 1) & LT_GEN_MASK;      /* as read back from the word, also when it wraps to 0 */
    atomic_store(&lt_pool.state, gen << 32 | LT_ONE_JOINED);      /* published, the caller joined (seq_cst) */
    if (atomic_load(&lt_pool.sleepers) > 0) {     /* wake as many as could take part, no more */
        pthread_mutex_lock(&lt_pool.mu);
        int asleep = atomic_load(&lt_pool.sleepers);
        for (int i = 0; i < asleep && i < nthreads - 1; i++)
            pthread_cond_signal(&lt_pool.wake);
        pthread_mutex_unlock(&lt_pool.mu);
    }
    int tid = 0;
    int64_t t0 = lt_pool_now_ns();
    lt_pool_inside = 1;
    int64_t own = lt_pool_work(gen, &tid, 0);
    lt_pool_inside = 0;
    /* what is left are chunks other threads took (or, in a gang, will take) and have not finished */
    int64_t start = lt_pool_now_ns(), spin = atomic_load_explicit(&lt_pool.caller_spin_ns, memory_order_relaxed);
    for (unsigned n = 1; atomic_load_explicit(&lt_pool.done, memory_order_acquire) < chunks; n++) {
        if ((n & 63) == 0 && lt_pool_now_ns() - start > spin) {
            pthread_mutex_lock(&lt_pool.mu);
            atomic_store(&lt_pool.caller_sleeping, 1);
            while (atomic_load(&lt_pool.done) < chunks)
                pthread_cond_wait(&lt_pool.finished, &lt_pool.mu);
            atomic_store(&lt_pool.caller_sleeping, 0);
            pthread_mutex_unlock(&lt_pool.mu);
            break;
        }
        LT_PAUSE();
    }
    if (per_thread == INT64_MAX)        /* a kernel loop (a gang's jobs wait for each other anyway) */
        lt_pool_learn(own, start - t0, lt_pool_now_ns() - start, (int64_t)LT_JOINED(atomic_load(&lt_pool.state)),
                      atomic_exchange_explicit(&lt_pool.shared_core, 0, memory_order_relaxed));
}

/* run task(ctx, i, tid) for i in [0, count) on up to nthreads threads, the caller among them as
   thread number 0; returns 0 (the loop always completes, on the caller alone if need be) */
LT_POOL_LINKAGE int lt_pool_for(int nthreads, int64_t count, lt_pool_task task, const void *ctx)
{
    if (nthreads > LT_MAX_THREADS) nthreads = LT_MAX_THREADS;
    if (nthreads > 1 && count > 1) lt_pool_watch_forks();
    if (nthreads <= 1 || count <= 1 || atomic_exchange_explicit(&lt_pool.busy, 1, memory_order_acquire)) {
        for (int64_t i = 0; i < count; i++) task(ctx, i, 0);    /* alone (or the pool is taken) */
        return 0;
    }
    if (nthreads > count) nthreads = (int)count;
    lt_pool_grow(nthreads - 1);
    int64_t first = 0, now = lt_pool_now_ns();
    if (now < atomic_load_explicit(&lt_pool.solo_until_ns, memory_order_relaxed)) {
        /* backing off: the caller starts alone; a loop still running after solo_head_ns gets
           the workers for the rest, if more than two iterations are left (a short call never
           waits on a descheduled worker; one or two iterations the caller finishes sooner than
           a worker at half a core's speed would finish one) */
        atomic_fetch_add_explicit(&lt_pool.solo_calls, 1, memory_order_relaxed);
        int64_t until = now + atomic_load_explicit(&lt_pool.solo_head_ns, memory_order_relaxed);
        lt_pool_inside = 1;
        while (first < count) {
            task(ctx, first++, 0);
            if (count - first > 2 && lt_pool_now_ns() > until) break;
        }
        lt_pool_inside = 0;
    }
    if (first < count) lt_pool_run(nthreads, first, count, task, ctx, INT64_MAX);
    atomic_store_explicit(&lt_pool.busy, 0, memory_order_release);
    return 0;
}

/* OpenBLAS's threading callback (``openblas_set_threads_callback_function``): its jobs of one
   call wait for each other, so they run as a gang, each on a thread of its own, and a caller
   finding the pool busy waits for it instead of running them one after another. */
typedef void (*lt_pool_dojob)(int thread_num, void *jobdata, int dojob_data);
typedef struct { lt_pool_dojob dojob; char *jobdata; size_t size; int data; } lt_pool_jobs;

static void lt_pool_job(const void *ctx, int64_t i, int tid)
{
    const lt_pool_jobs *jobs = (const lt_pool_jobs *)ctx;
    (void)tid;
    jobs->dojob((int)i, jobs->jobdata + (size_t)i * jobs->size, jobs->data);
}

/* a gang on threads of its own, for a BLAS call made from inside pool work (which holds the pool) */
typedef struct { lt_pool_jobs *jobs; int i; } lt_pool_gang_member;

static void *lt_pool_gang_thread(void *arg)
{
    lt_pool_gang_member *m = (lt_pool_gang_member *)arg;
    lt_pool_job(m->jobs, m->i, 0);
    return 0;
}

static void lt_pool_gang_apart(lt_pool_jobs *jobs, int numjobs)
{
    pthread_t *threads = (pthread_t *)malloc(sizeof(pthread_t) * (size_t)numjobs);
    lt_pool_gang_member *members = (lt_pool_gang_member *)malloc(sizeof(lt_pool_gang_member) * (size_t)numjobs);
    int started = 0;
    sigset_t old;
    lt_pool_block_signals(&old);
    for (int i = 1; threads && members && i < numjobs; i++) {
        members[i] = (lt_pool_gang_member){jobs, i};
        if (pthread_create(&threads[i], 0, lt_pool_gang_thread, &members[i]) != 0) break;
        started = i;
    }
    pthread_sigmask(SIG_SETMASK, &old, 0);
    lt_pool_job(jobs, 0, 0);
    for (int i = started + 1; i < numjobs; i++) lt_pool_job(jobs, i, 0);   /* no threads to be had */
    for (int i = 1; i <= started; i++) pthread_join(threads[i], 0);
    free(threads);
    free(members);
}

LT_POOL_LINKAGE void lt_pool_openblas(int sync, lt_pool_dojob dojob, int numjobs, size_t jobdata_elsize,
                                      void *jobdata, int dojob_data)
{
    (void)sync;     /* OpenBLAS passes 1: return once every job has run */
    lt_pool_jobs jobs = {dojob, (char *)jobdata, jobdata_elsize, dojob_data};
    atomic_fetch_add_explicit(&lt_pool_blas_gangs, 1, memory_order_relaxed);
    if (numjobs <= 1) {
        for (int i = 0; i < numjobs; i++) lt_pool_job(&jobs, i, 0);
        return;
    }
    if (lt_pool_inside || numjobs > LT_MAX_THREADS) {   /* nested in pool work, or too large a gang */
        lt_pool_gang_apart(&jobs, numjobs);
        return;
    }
    lt_pool_watch_forks();
    while (atomic_exchange_explicit(&lt_pool.busy, 1, memory_order_acquire))
        sched_yield();                  /* a kernel's loop: it never waits for BLAS, so it ends */
    lt_pool_grow(numjobs - 1);
    if (lt_pool.workers < numjobs - 1) {        /* the pool cannot have the threads */
        atomic_store_explicit(&lt_pool.busy, 0, memory_order_release);
        lt_pool_gang_apart(&jobs, numjobs);
        return;
    }
    lt_pool_run(numjobs, 0, numjobs, lt_pool_job, &jobs, 1);
    atomic_store_explicit(&lt_pool.busy, 0, memory_order_release);
}

/* how long idle workers and a waiting caller spin before they sleep */
LT_POOL_LINKAGE void lt_pool_set_spin(int64_t worker_spin_ns, int64_t caller_spin_ns)
{
    atomic_store(&lt_pool.worker_spin_ns, worker_spin_ns);
    atomic_store(&lt_pool.caller_spin_ns, caller_spin_ns);
}

/* the contention back-off (see lt_pool.solo_until_ns); resets it to `min_ns`, not backing off */
LT_POOL_LINKAGE void lt_pool_set_backoff(int64_t min_ns, int64_t max_ns, int64_t solo_head_ns, int64_t stall_min_ns)
{
    atomic_store(&lt_pool.backoff_min_ns, min_ns);
    atomic_store(&lt_pool.backoff_max_ns, max_ns);
    atomic_store(&lt_pool.solo_head_ns, solo_head_ns);
    atomic_store(&lt_pool.stall_min_ns, stall_min_ns);
    atomic_store(&lt_pool.backoff_ns, min_ns);
    atomic_store(&lt_pool.solo_until_ns, 0);
}

/* stalls seen and calls started alone while backing off (for tests and diagnostics) */
LT_POOL_LINKAGE int64_t lt_pool_stalls(void) { return atomic_load(&lt_pool.stalls); }
LT_POOL_LINKAGE int64_t lt_pool_solo_calls(void) { return atomic_load(&lt_pool.solo_calls); }
LT_POOL_LINKAGE int64_t lt_pool_backoff_ns(void) { return atomic_load(&lt_pool.backoff_ns); }

/* workers started so far, and OpenBLAS calls served (for tests and diagnostics) */
LT_POOL_LINKAGE int lt_pool_workers(void) { return lt_pool.workers; }
LT_POOL_LINKAGE int64_t lt_pool_openblas_calls(void) { return atomic_load(&lt_pool_blas_gangs); }
