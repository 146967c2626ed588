"""The dispatch key and the thread rule of a kernel call, defined once.

Every path that runs a kernel for a ``runtime.matmul`` call asks these two functions (the
runtime's Python paths, fused calls, the measurement worker, which times what the runtime
runs, and ``looptune export``'s dispatcher, which writes the rule into C); the compiled
``serve`` path (``trampoline``) applies the same rule in C, and
``tests/runtime/test_dispatch_keys.py`` checks that every path files a call under the key
``dispatch_key`` gives.

The key is what one resolution is cached under: kernel dtype name, m, n, k, batch entries per
kernel call, layout ("nn", "nt", "tn", "tt"), threads after the rule, and for a fused epilogue
its op (``epilogue.OPS``; plain products leave it out, which keeps their keys short).
"""
from __future__ import annotations

from looptune.runtime.compiler.epilogue import PLAIN
from looptune.runtime.compiler.workload import MatmulProblem

# problems below this many flops run on one thread whatever is asked: starting threads costs
# more than they save (``RuntimeSettings.small_flops`` may change it per process)
SMALL_FLOPS = 1.5e6


def call_threads(flops: float, threads: int, small_flops: float = SMALL_FLOPS) -> int:
    """The thread count a kernel call of ``flops`` gets when ``threads`` are asked for."""
    return 1 if flops < small_flops else threads


def dispatch_key(name: str, m: int, n: int, k: int, count: int, layout: str, threads: int,
                 small_flops: float = SMALL_FLOPS, op: str = PLAIN) -> tuple:
    """The key of a kernel call (the module docstring), the thread rule applied to ``threads``."""
    t = call_threads(2.0 * count * m * n * k, threads, small_flops)
    return (name, m, n, k, count, layout, t) if op == PLAIN else (name, m, n, k, count, layout, t, op)


def key_problem(key: tuple) -> MatmulProblem:
    """The problem a dispatch key stands for."""
    name, m, n, k, count, layout, threads = key[:7]
    return MatmulProblem(m, n, k, count, name, layout, threads, key[7] if len(key) > 7 else PLAIN)
