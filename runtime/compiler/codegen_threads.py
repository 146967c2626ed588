"""C text for how generated kernels use threads: the per-thread workspace and the parallel loop.

**Workspace.**  Packing panels live in a workspace per (kernel, calling thread), grown on demand
and reused across calls (a malloc of megabytes per call would cost page faults).  Each thread's
workspaces are chained on the value of one pthread key per kernel library (created once with
``pthread_once``), whose destructor frees them when the thread exits: a program that calls
from many short-lived threads keeps a bounded footprint.  Should the process run out of keys
(``PTHREAD_KEYS_MAX``), a kernel frees its workspace at the end of every call instead.

**Parallel loop.**  The body of the schedule's parallel loop is outlined into a static function
over one iteration (``SYMBOL_par``), called from an OpenMP ``parallel for`` when ``nthreads >
1`` and from a plain loop otherwise.  A call with ``nthreads == 1`` therefore never enters the
OpenMP runtime, which is what keeps kernels usable in a process forked after libgomp started
its thread pool (libgomp cannot run a parallel region there: its pool threads did not survive
the fork; the runtime serves such a child with one thread, see ``looptune.runtime.resolve``).
The body is emitted once, so code size does not double.
"""
from __future__ import annotations

import re

# Shared by every kernel of a translation unit (kernels are concatenated into one unit by
# ``build_many`` and ``looptune export``), hence the include guard.
WORKSPACE_C = r"""
#ifndef LT_WORKSPACE_DEFINED
#define LT_WORKSPACE_DEFINED
#include <pthread.h>
/* A kernel's packing workspace for one calling thread.  A thread's workspaces are chained on
   the value of lt_ws_key, whose destructor frees them when the thread exits. */
typedef struct lt_ws { void *base; int64_t bytes; struct lt_ws **slot; struct lt_ws *next; } lt_ws;
static pthread_once_t lt_ws_once = PTHREAD_ONCE_INIT;
static pthread_key_t lt_ws_key;
static int lt_ws_keyed;     /* 0: no key could be created; workspaces are freed after each call */

static void lt_ws_free_all(void *head)
{
    for (lt_ws *w = (lt_ws *)head, *next; w; w = next) {
        next = w->next;
        *w->slot = 0;       /* the kernel's thread-local pointer: a later call starts afresh */
        free(w->base);
        free(w);
    }
}

static void lt_ws_make_key(void) { lt_ws_keyed = pthread_key_create(&lt_ws_key, lt_ws_free_all) == 0; }

/* unloading the library must not leave a thread-exit destructor pointing into unmapped code */
static void __attribute__((destructor)) lt_ws_unload(void) { if (lt_ws_keyed) pthread_key_delete(lt_ws_key); }

/* this thread's workspace *slot, 64-byte aligned with room for `bytes`; NULL without memory */
static void *lt_ws_get(lt_ws **slot, int64_t bytes)
{
    lt_ws *w = *slot;
    if (w && w->bytes >= bytes) return w->base;
    if (!w) {
        pthread_once(&lt_ws_once, lt_ws_make_key);
        if (!(w = (lt_ws *)calloc(1, sizeof *w))) return 0;
        w->slot = slot;
        if (lt_ws_keyed) {
            w->next = (lt_ws *)pthread_getspecific(lt_ws_key);
            if (pthread_setspecific(lt_ws_key, w)) { free(w); return 0; }
        }
        *slot = w;
    }
    free(w->base);
    w->base = aligned_alloc(64, (size_t)((bytes + 63) / 64 * 64));
    w->bytes = w->base ? bytes : 0;
    return w->base;
}

/* end of a call: without a key nothing would free the workspace at thread exit, so free it now */
static void lt_ws_end(lt_ws **slot)
{
    if (!*slot || lt_ws_keyed) return;
    free((*slot)->base);
    free(*slot);
    *slot = 0;
}
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


def outline_parallel(prefix: str, visible: list[tuple[str, str]], body: list[str], header: str,
                     loop_var: str, indent: str) -> tuple[list[str], list[str]]:
    """Split a parallel loop into (file-scope C, the loop at its place in the kernel).

    ``body`` is the loop's body as lines of a function at depth 1, reading ``loop_var`` and the
    thread number ``tid``; ``visible`` the (type, name) of every variable the kernel has at the
    loop (only those the body names are passed on); ``header`` the loop's ``for (...)``;
    ``indent`` the loop's indentation in the kernel.
    """
    text = "\n".join(body)
    used = [(t, n) for t, n in visible if re.search(rf"\b{re.escape(n)}\b", text)]
    ctx, fn = f"{prefix}_ctx", f"{prefix}_par"
    scope = [
        "",
        f"/* what the parallel loop's body reads of the kernel's variables */",
        "typedef struct {",
        *(f"    {t}{'' if t.endswith('*') else ' '}{n};" for t, n in used),
        f"}} {ctx};",
        "",
        f"/* one iteration of the parallel loop, run by thread number tid (it picks the thread's workspace copies) */",
        f"static __attribute__((noinline)) void {fn}(const {ctx} *ctx, int64_t {loop_var}, int tid)",
        "{",
        *([] if re.search(r"\btid\b", text) else ["    (void)tid;"]),
        *(f"    {_const_declaration(t, n)} = ctx->{n};" for t, n in used),
        *body,
        "}",
    ]
    at = [
        f"const {ctx} ctx = {{{', '.join(n for _, n in used)}}};",
        "if (nthreads > 1) {",
        "    #pragma omp parallel for num_threads(nthreads) schedule(static)",
        f"    {header} {fn}(&ctx, {loop_var}, omp_get_thread_num());",
        "} else {",
        f"    {header} {fn}(&ctx, {loop_var}, 0);",
        "}",
    ]
    return scope, [indent + line for line in at]
