"""LoopTune runtime: ``matmul`` with numpy.matmul semantics, served from the schedule database.

    from looptune import runtime
    c = runtime.matmul(a, b)
    print(runtime.explain(a, b).describe())

Importing this package loads numpy and nothing heavy (no torch, no scikit-learn, no h5py):
databases are opened and kernels compiled on the first call that needs them.
"""
from .api import configure, explain, matmul, settings

__all__ = ["matmul", "explain", "configure", "settings"]
