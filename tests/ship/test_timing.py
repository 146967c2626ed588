"""The shared timer and pinning of ``looptune bench`` and ``tools/`` (``tuner/ship/timing.py``)."""
from __future__ import annotations

import subprocess
import sys

from looptune.tuner.ship.timing import LocalSampler, call_seconds, pinned_threads, time_interleaved


def test_a_fixed_number_of_calls_per_sample_after_the_warm_up_calls():
    calls = []
    sampler = LocalSampler(lambda: calls.append(1), warmup_calls=5, calls_per_sample=50)
    seconds = time_interleaved({"f": sampler}, min_repeats=3, max_repeats=3, min_time_s=0.0)
    assert len(calls) == 5 + 3 * 50 and sampler.number == 50 and seconds["f"] > 0


def test_without_a_fixed_count_a_sample_is_as_many_calls_as_last_min_sample_s():
    sampler = LocalSampler(lambda: None)
    sampler.prepare(1e-3)
    per_call, spent = sampler.sample()
    assert sampler.number > 1 and per_call == spent / sampler.number


def test_call_seconds_times_each_call_right_after_the_other_one():
    order = []
    seconds = call_seconds(lambda: order.append("fn"), 3, before=lambda: order.append("before"))
    assert len(seconds) == 3 and order == ["before", "fn"] * 3


def test_pinning_restores_torch_threads():
    class FakeTorch:
        threads = 4

        def get_num_threads(self):
            return self.threads

        def set_num_threads(self, n):
            self.threads = n

    torch = FakeTorch()
    with pinned_threads(1, torch):
        assert torch.threads == 1
    assert torch.threads == 4


def test_the_timer_loads_neither_numpy_nor_the_runtime():
    code = ("import sys; import looptune.tuner.ship.timing; "
            "print(any(m == 'numpy' or m.startswith('looptune.runtime') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
