"""Every call path files a call under the key ``dispatch.dispatch_key`` gives (the one home of the
key and of the thread rule): the compiled ``serve``, the planned Python path (cold and warm,
without ``serve``), casts and looped stacks, fused calls and ``explain``, on both sides of the
small-problem threshold; and a plan holds the key its thread count and threshold make."""
from __future__ import annotations

import numpy as np
import pytest

from looptune import runtime
from looptune.runtime import api
from looptune.runtime.api import current_resolver
from looptune.runtime.call_plan import NumpyPlan, Plan, plan_for
from looptune.runtime.compiler.dispatch import SMALL_FLOPS, dispatch_key, key_problem


@pytest.fixture
def fresh():
    before = runtime.settings()
    runtime.configure(threads=3, numpy_handoff=False)
    yield current_resolver()
    runtime.configure(threads=before.threads, numpy_handoff=before.numpy_handoff)


def new_keys(resolver, call) -> set:
    resolver.dispatch.clear()
    call()
    return set(resolver.dispatch)


# (m, n, k): 2mnk just below and just above the threshold (1.5 MFLOP: 2 * 90 * 90 * 92 = 1.49e6)
SIZES = [(90, 90, 92), (90, 90, 93)]


@pytest.mark.parametrize("m, n, k", SIZES)
@pytest.mark.parametrize("path", ["serve", "threads=", "python", "planned", "looped", "fused", "explain"])
def test_every_path_files_the_key_dispatch_key_gives(fresh, monkeypatch, m, n, k, path):
    assert fresh.settings.small_flops == SMALL_FLOPS
    a = np.ones((m, k), np.float32)
    b = np.ones((k, n), np.float32)
    count, layout = 1, "nn"
    if path == "serve":
        call = lambda: runtime.matmul(a, b)                         # noqa: E731 - plain arrays: the C path
    elif path == "threads=":
        call = lambda: runtime.matmul(a, b, threads=3)              # noqa: E731
    elif path == "python":
        monkeypatch.setattr(api, "_serve", None)                    # no compiled path: the plan's
        call = lambda: [runtime.matmul(a, b) for _ in range(2)]     # noqa: E731 - cold, then warm
    elif path == "planned":
        at = np.asfortranarray(a)
        layout = "tn"
        call = lambda: runtime.matmul(at, b.astype(np.int8))        # noqa: E731 - a cast and a transposed a
    elif path == "looped":
        a3 = np.ones((2, 1, m, k), np.float32)
        b3 = np.broadcast_to(np.ones((1, 2, k, n), np.float32), (2, 2, k, n))
        count = 2
        call = lambda: runtime.matmul(a3, b3)                       # noqa: E731 - one call per leading index
    elif path == "fused":
        call = lambda: runtime.matmul(a, b, activation="relu")      # noqa: E731
    else:
        call = lambda: runtime.explain(a, b)                        # noqa: E731
    op = "matmul+relu" if path == "fused" else "matmul"
    want = dispatch_key("float32", m, n, k, count, layout, 3, op=op)
    assert new_keys(fresh, call) == {want}
    assert want[6] == (1 if 2 * count * m * n * k < SMALL_FLOPS else 3)
    assert key_problem(want).key() == fresh.dispatch[want][1].problem.key()


def test_every_dispatch_entry_is_a_kernel_like():
    """The declared protocol holds for every kind of entry: compiled kernels, numpy, trials."""
    from looptune.runtime.compiler.kernel import Kernel, KernelLike
    from looptune.runtime.numpy_kernel import NumpyKernel
    from looptune.runtime.verdicts import Trial

    numpy_side = NumpyKernel("float32", "test")
    assert isinstance(numpy_side, KernelLike)
    assert isinstance(Trial(numpy_side, lambda: numpy_side, lambda verdict: None), KernelLike)
    runtime.matmul(np.ones((64, 64), np.float32), np.ones((64, 64), np.float32))
    kernels = [hit[0] for hit in current_resolver().dispatch.values()]
    assert kernels and all(isinstance(k, KernelLike) for k in kernels)
    assert any(isinstance(k, (Kernel, Trial)) for k in kernels)


def test_a_plan_holds_the_key_of_its_threads_and_threshold():
    a = np.ones((90, 92), np.float32)
    b = np.ones((92, 90), np.float32)
    small = plan_for(a, b, 3, SMALL_FLOPS)          # 1.49 MFLOP: below the threshold, one thread
    anyway = plan_for(a, b, 3, 0.0)                 # no threshold: the threads asked for
    assert type(small) is Plan and type(anyway) is Plan
    assert small.key == dispatch_key("float32", 90, 90, 92, 1, "nn", 3) and small.threads == 1
    assert anyway.key == dispatch_key("float32", 90, 90, 92, 1, "nn", 3, 0.0) and anyway.threads == 3
    assert plan_for(a, a.T, 3, SMALL_FLOPS).layout == "nt"
    assert plan_for(a, np.ones((91, 90), np.float32), 3, SMALL_FLOPS) == NumpyPlan("core dimensions differ")
