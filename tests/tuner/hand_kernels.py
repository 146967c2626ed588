"""Hand-written C kernels for the measurement worker's verification tests (test_bf16_tuning.py,
test_f16_tuning.py): one library of several kernels, and a fast local runner to time them."""
from __future__ import annotations

import subprocess

import pytest

from looptune.tuner.measure.protocol import Artifact, MeasureConfig
from looptune.tuner.measure.runner import LocalRunner

FAST = MeasureConfig(warmup=1, min_repeats=3, max_repeats=20, min_total_seconds=0.005, timeout_seconds=5.0)


def build_kernels(directory, prelude: str, signature: str, kernels: dict[str, str]) -> dict[str, Artifact]:
    """``kernels`` (name -> C body after ``signature.format(name=...)``) compiled into one library."""
    src = directory / "kernels.c"
    src.write_text(prelude + "\n".join(signature.format(name=f"k_{n}") + body for n, body in kernels.items()))
    so = directory / "kernels.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    return {name: Artifact(str(so), f"k_{name}") for name in kernels}


@pytest.fixture(scope="module")
def runner():
    with LocalRunner(FAST) as r:
        yield r
