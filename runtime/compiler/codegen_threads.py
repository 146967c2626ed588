"""C text for how generated kernels use threads: the per-thread workspace and the parallel loop.

**Workspace.**  Packing panels live in a workspace per (kernel, calling thread), grown on demand
and reused across calls (a malloc of megabytes per call would cost page faults).  A thread's
workspaces in one kernel library are chained, and the chain is freed when the thread exits, so
a program that calls from many short-lived threads keeps a bounded footprint.  On glibc the
chain's destructor is registered with ``__cxa_thread_atexit_impl`` (what C++ ``thread_local``
destructors use), which has no per-process limit: a tuning worker loads thousands of kernel
libraries.  Elsewhere (detected at compile time, so exported C stays portable) the chain is the
value of one pthread key per library; should the process run out of keys
(``PTHREAD_KEYS_MAX``), a kernel frees its workspace at the end of every call instead.

**Parallel loop.**  The body of the schedule's parallel loop is outlined into a static function
over one iteration (``SYMBOL_par``).  With ``nthreads > 1`` the kernel hands the loop to
LoopTune's thread pool (``lt_pool_for``, see ``looptune.runtime.compiler.pool``): the caller
takes iterations itself and never waits for a worker that has not started.  Where no pool was
loaded (the weak reference is NULL) an OpenMP ``parallel for`` runs it, and with ``nthreads ==
1`` a plain loop.  The iteration's thread number ``tid`` (below ``nthreads``) picks the
thread's workspace copies.  The body is emitted once, so code size does not double.
"""
from __future__ import annotations

import re

# Shared by every kernel of a translation unit (kernels are concatenated into one unit by
# ``build_many`` and ``looptune export``), hence the include guard.
WORKSPACE_C = r"""
#ifndef LT_WORKSPACE_DEFINED
#define LT_WORKSPACE_DEFINED
/* A kernel's packing workspace for one calling thread.  A thread's workspaces in this library
   are chained together, and the chain is freed when the thread exits. */
typedef struct lt_ws { void *base; int64_t bytes; struct lt_ws **slot; struct lt_ws *next; int chained; } lt_ws;

static void lt_ws_free_all(void *head)
{
    for (lt_ws *w = (lt_ws *)head, *next; w; w = next) {
        next = w->next;
        *w->slot = 0;       /* the kernel's thread-local pointer: a later call starts afresh */
        free(w->base);
        free(w);
    }
}

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 18))
/* glibc: the thread-exit destructor of C++ thread_local objects, registered per thread and
   library (no process-wide limit; the library stays mapped until the destructors have run) */
extern int __cxa_thread_atexit_impl(void (*dtor)(void *), void *obj, void *dso_symbol);
extern void *__dso_handle;
static _Thread_local lt_ws *lt_ws_head;    /* this thread's chain */
static _Thread_local int lt_ws_hooked;     /* its destructor is registered */

static void lt_ws_thread_exit(void *head)
{
    lt_ws_free_all(*(lt_ws **)head);
    *(lt_ws **)head = 0;
    lt_ws_hooked = 0;       /* a kernel called by a later destructor registers anew */
}

/* chain w to this thread's workspaces; 0 if nothing would free it at thread exit */
static int lt_ws_chain(lt_ws *w)
{
    if (!lt_ws_hooked)
        lt_ws_hooked = __cxa_thread_atexit_impl(lt_ws_thread_exit, &lt_ws_head, &__dso_handle) == 0;
    if (!lt_ws_hooked) return 0;
    w->next = lt_ws_head;
    lt_ws_head = w;
    return 1;
}
#else
/* elsewhere: the chain is the value of one pthread key per library, whose destructor frees it.
   Should the process run out of keys (PTHREAD_KEYS_MAX), workspaces are freed after each call. */
#include <pthread.h>
static pthread_once_t lt_ws_once = PTHREAD_ONCE_INIT;
static pthread_key_t lt_ws_key;
static int lt_ws_keyed;     /* 0: no key could be created */

static void lt_ws_make_key(void) { lt_ws_keyed = pthread_key_create(&lt_ws_key, lt_ws_free_all) == 0; }

/* unloading the library must not leave a thread-exit destructor pointing into unmapped code */
static void __attribute__((destructor)) lt_ws_unload(void) { if (lt_ws_keyed) pthread_key_delete(lt_ws_key); }

static int lt_ws_chain(lt_ws *w)
{
    pthread_once(&lt_ws_once, lt_ws_make_key);
    if (!lt_ws_keyed) return 0;
    w->next = (lt_ws *)pthread_getspecific(lt_ws_key);
    return pthread_setspecific(lt_ws_key, w) == 0;
}
#endif

/* this thread's workspace *slot, 64-byte aligned with room for `bytes`; NULL without memory */
static void *lt_ws_get(lt_ws **slot, int64_t bytes)
{
    lt_ws *w = *slot;
    if (w && w->bytes >= bytes) return w->base;
    if (!w) {
        if (!(w = (lt_ws *)calloc(1, sizeof *w))) return 0;
        w->slot = slot;
        w->chained = lt_ws_chain(w);
        *slot = w;
    }
    free(w->base);
    w->base = aligned_alloc(64, (size_t)((bytes + 63) / 64 * 64));
    w->bytes = w->base ? bytes : 0;
    return w->base;
}

/* end of a call: a workspace nothing would free at thread exit is freed now */
static void lt_ws_end(lt_ws **slot)
{
    if (!*slot || (*slot)->chained) return;
    free((*slot)->base);
    free(*slot);
    *slot = 0;
}
#endif
""".strip("\n").splitlines()


# The declaration a kernel's translation unit carries; LT_POOL_AVAILABLE says at run time
# whether a pool was loaded (the weak reference is NULL otherwise).
POOL_DECLARATION_C = r"""
#ifndef LT_POOL_DECLARED
#define LT_POOL_DECLARED
typedef void (*lt_pool_task)(const void *ctx, int64_t iteration, int tid);
extern int lt_pool_for(int nthreads, int64_t count, lt_pool_task task, const void *ctx) __attribute__((weak));
#define LT_POOL_AVAILABLE (lt_pool_for != 0)
#endif
""".strip("\n").splitlines()


def abi_variables(abi_args: str) -> list[tuple[str, str]]:
    """(type, name) of each parameter of a C parameter list such as the kernel ABI's."""
    out = []
    for param in abi_args.split(","):
        m = re.fullmatch(r"\s*(.*?)\s*(\w+)\s*", param)
        assert m, param
        out.append((m.group(1), m.group(2)))
    return out


def _const_declaration(ctype: str, name: str) -> str:
    return f"{ctype}const {name}" if ctype.endswith("*") else f"const {ctype} {name}"


PARALLEL_CHUNKS = 4     # tasks per thread of a chunked parallel loop (a late thread costs a quarter of its share)


def outline_parallel(prefix: str, visible: list[tuple[str, str]], body: list[str], loop_var: str,
                     start: str, length: str, step: int, indent: str,
                     chunked: bool = False) -> tuple[list[str], list[str]]:
    """Split a parallel loop into (file-scope C, the loop at its place in the kernel).

    ``chunked`` (a parallel batch loop): the pool's tasks are ``PARALLEL_CHUNKS`` runs of
    consecutive iterations per thread instead of single iterations, so a stack of thousands
    of small products costs a few tasks, not a task per product.

    The loop is ``for (loop_var = start; loop_var < start + length; loop_var += step)``;
    ``body`` is its body as lines of a function at depth 1, reading ``loop_var`` and the thread
    number ``tid``; ``visible`` the (type, name) of every variable the kernel has at the loop
    (only those the body names are passed on); ``indent`` the loop's indentation in the kernel.

    Before (the kernel)::

        for (i_m_o = 0; i_m_o < 0 + M; i_m_o += 96) { ...body... }

    After::

        static void SYMBOL_par(const SYMBOL_ctx *ctx, int64_t i_m_o, int tid) { ...body... }
        static void SYMBOL_task(const void *ctx, int64_t it, int tid)    /* iteration it */
        ...
        if (nthreads > 1 && LT_POOL_AVAILABLE) lt_pool_for(nthreads, (M + 95) / 96, SYMBOL_task, &ctx);
        else if (nthreads > 1) { #pragma omp parallel for ... SYMBOL_par(&ctx, i_m_o, omp_get_thread_num()); }
        else for (...) SYMBOL_par(&ctx, i_m_o, 0);
    """
    text = "\n".join(body)
    used = [(t, n) for t, n in visible if re.search(rf"\b{re.escape(n)}\b", text)]
    ctx, fn, task = f"{prefix}_ctx", f"{prefix}_par", f"{prefix}_task"
    header = f"for (int64_t {loop_var} = {start}; {loop_var} < {start} + {length}; {loop_var} += {step})"
    scope = [
        "",
        "/* what the parallel loop's body reads of the kernel's variables, and where the loop starts */",
        "typedef struct {",
        *(f"    {t}{'' if t.endswith('*') else ' '}{n};" for t, n in used),
        "    int64_t lt_start;",
        *(["    int64_t lt_count, lt_chunks;    /* iterations, and the runs of them the pool's tasks take */"]
          if chunked else []),
        f"}} {ctx};",
        "",
        "/* one iteration of the parallel loop, run by thread number tid (it picks the thread's workspace copies) */",
        f"static __attribute__((noinline)) void {fn}(const {ctx} *ctx, int64_t {loop_var}, int tid)",
        "{",
        *([] if re.search(r"\btid\b", text) else ["    (void)tid;"]),
        *(f"    {_const_declaration(t, n)} = ctx->{n};" for t, n in used),
        *body,
        "}",
        "",
        "/* iteration number `it` of the parallel loop, as the thread pool calls it */",
        f"static void {task}(const void *context, int64_t it, int tid)",
        "{",
        f"    const {ctx} *ctx = (const {ctx} *)context;",
        *([f"    for (int64_t i = it * ctx->lt_count / ctx->lt_chunks; i < (it + 1) * ctx->lt_count / ctx->lt_chunks; i++)",
           f"        {fn}(ctx, ctx->lt_start + i * {step}, tid);"] if chunked else
          [f"    {fn}(ctx, ctx->lt_start + it * {step}, tid);"]),
        "}",
    ]
    count = f"({length} + {step - 1}) / {step}"
    chunks = f", {count}, LT_MIN({count}, {PARALLEL_CHUNKS} * (int64_t)nthreads)" if chunked else ""
    at = [
        f"const {ctx} ctx = {{{''.join(n + ', ' for _, n in used)}{start}{chunks}}};",
        "if (nthreads > 1 && LT_POOL_AVAILABLE) {",
        f"    lt_pool_for(nthreads, {'ctx.lt_chunks' if chunked else count}, {task}, &ctx);",
        "} else if (nthreads > 1) {",
        "    #pragma omp parallel for num_threads(nthreads) schedule(static)",
        f"    {header} {fn}(&ctx, {loop_var}, omp_get_thread_num());",
        "} else {",
        f"    {header} {fn}(&ctx, {loop_var}, 0);",
        "}",
    ]
    return scope, [indent + line for line in at]


def shared_pack(prefix: str, operand: str, panel: int, ctype: str) -> list[str]:
    """File-scope C that lets every thread of a call pack one shared block together.

    A pack above the parallel loop (B packed at ``k.o`` outside a parallel ``m.o``: BLIS's ic
    loop sharing one packed B) is written once and read by every thread.  Packed by the calling
    thread alone, it is the serial part of the call that grows with the core count; here it is
    split into groups of whole ``panel``-wide panels that the pool's threads take like loop
    iterations (``shared_pack_call``).  ``SYMBOL_pack{operand}`` is the one-thread pack.
    """
    job, task, pack = f"{prefix}_pack{operand}_job", f"{prefix}_pack{operand}_task", f"{prefix}_pack{operand}"
    return [
        "",
        f"/* the shared {operand} block, packed by every thread of the call: panels of group `it` */",
        f"typedef struct {{ const {ctype} *src; int64_t st, sk, tlen, klen; {ctype} *dst; int64_t groups; }} {job};",
        "",
        f"static void {task}(const void *context, int64_t it, int tid)",
        "{",
        f"    const {job} *j = (const {job} *)context;",
        "    const int64_t panels = (j->tlen + " + str(panel - 1) + f") / {panel};",
        f"    const int64_t t0 = it * panels / j->groups * {panel};",
        f"    const int64_t t1 = LT_MIN(j->tlen, (it + 1) * panels / j->groups * {panel});",
        "    (void)tid;",
        f"    if (t1 > t0) {pack}(j->src + t0 * j->st, j->st, j->sk, t1 - t0, j->klen, j->dst + t0 * j->klen);",
        "}",
    ]


def shared_pack_call(prefix: str, operand: str, panel: int, args: tuple[str, str, str, str, str, str]) -> list[str]:
    """The kernel's lines that pack a shared block: on the pool's threads (groups of panels, a
    few per thread so a late thread costs little) when the call has several, else alone."""
    src, st, sk, tlen, klen, dst = args
    job, task, pack = f"{prefix}_pack{operand}_job", f"{prefix}_pack{operand}_task", f"{prefix}_pack{operand}"
    return [
        f"if (nthreads > 1 && LT_POOL_AVAILABLE && {tlen} > {panel}) {{",
        f"    const {job} job = {{{src}, {st}, {sk}, {tlen}, {klen}, {dst}, "
        f"LT_MIN(({tlen} + {panel - 1}) / {panel}, 4 * (int64_t)nthreads)}};",
        f"    lt_pool_for(nthreads, job.groups, {task}, &job);",
        "} else {",
        f"    {pack}({src}, {st}, {sk}, {tlen}, {klen}, {dst});",
        "}",
    ]
