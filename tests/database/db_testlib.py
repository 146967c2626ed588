"""Helpers shared by the database tests: machines, a trace, a record factory, file surgery.

(A uniquely named module rather than conftest.py, so other test folders cannot shadow it.)
"""
from __future__ import annotations

import hashlib

import h5py
import numpy as np

from looptune.database import MachineKey, MatmulProblem, Record
from looptune.runtime.compiler.trace import Step, Trace

LOCAL = MachineKey("x86_64", "Test CPU 9000", "avx2", ("avx", "avx2", "fma"), 8, "gcc 12.2.0", "1")
FOREIGN = MachineKey("aarch64", "Other CPU", "neon", ("asimd",), 4, "clang 17.0.6", "1")
TRACE = Trace((Step.make("split", loop="m", factor=8), Step.make("split", loop="n", factor=16),
               Step.make("reorder", order=["m.o", "n.o", "k", "m.i", "n.i"]), Step.make("vectorize", loop="n.i"),
               Step.make("unroll", loop="m.i", factor=4), Step.make("pack", operand="B", at="n.o")))


def make_record(m: int = 64, n: int = 64, k: int = 64, *, machine: MachineKey = LOCAL, gflops: float = 100.0,
                trace: Trace = TRACE, verified: bool = True, **problem) -> Record:
    return Record(MatmulProblem(m, n, k, **problem), machine, trace, gflops, gflops * 0.01, 50.0, verified,
                  "dqn-v1", "beam", 200, 1.7e9)


def reseal(path, schema_version: int = 1) -> None:
    """Rewrite the 512-byte header block (LAYOUT.md) to match the file's current HDF5 bytes,
    as anyone editing a database with plain h5py, or crafting one, would."""
    with open(path, "r+b") as f:
        body = f.read()[512:]
        header = (f"looptune-schedule-db\nschema_version={schema_version}\nbytes={len(body)}\n"
                  f"sha256={hashlib.sha256(body).hexdigest()}\n").encode()
        f.seek(0)
        f.write(header.ljust(512, b"\0"))


def replace_dataset(path, where: str, data: np.ndarray, *, checksum: bool = True) -> None:
    """Swap one dataset for ``data`` with a *valid* dataset checksum (unless told otherwise)
    and reseal the file: this is how an attacker would craft a file, as opposed to damage."""
    with h5py.File(path, "r+") as f:
        del f[where]
        ds = f.create_dataset(where, data=data)
        digest = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() if checksum else "0" * 64
        ds.attrs["sha256"] = np.bytes_(digest)
    reseal(path)


def record_strategy():
    """Hypothesis strategy for valid records over a small domain, so slots collide often."""
    from hypothesis import strategies as st

    problems = st.builds(MatmulProblem, m=st.sampled_from([1, 7, 64, 1000]), n=st.sampled_from([16, 4096]),
                         k=st.sampled_from([3, 256]), batch=st.sampled_from([1, 2]),
                         dtype=st.sampled_from(["float32", "float64", "bfloat16", "float16"]), layout=st.sampled_from(["nn", "tt"]),
                         threads=st.sampled_from([1, 4]))
    traces = st.sampled_from([TRACE, Trace(), Trace((Step.make("split", loop="k", factor=4),))])
    gflops = st.floats(0, 1000, allow_nan=False)
    return st.builds(Record, problem=problems, machine=st.sampled_from([LOCAL, FOREIGN]), trace=traces,
                     gflops_median=gflops, gflops_spread=st.sampled_from([0.0, 1.5]), numpy_gflops=gflops,
                     verified=st.booleans(), policy=st.sampled_from(["", "dqn-v1"]),
                     search=st.sampled_from(["beam", "random"]), candidates=st.integers(0, 10**6),
                     timestamp=st.sampled_from([0.0, 1.7e9, 1.8e9]))
