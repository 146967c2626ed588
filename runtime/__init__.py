"""LoopTune runtime: ``matmul`` with numpy.matmul semantics, served from the schedule database.

    from looptune import runtime
    c = runtime.matmul(a, b)
    print(runtime.explain(a, b).describe())

Importing this package loads numpy and nothing heavy (no torch, no scikit-learn, no h5py):
databases are opened and kernels compiled on the first call that needs them.  The public
names load on first access (PEP 562), so importing the compiler subpackage
(``looptune.runtime.compiler``, the bottom layer that the database builds on) does not
load the runtime's upper layer.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"configure": "api", "explain": "api", "matmul": "api", "settings": "api"}

__all__ = ["matmul", "explain", "configure", "settings"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from looptune.runtime.api import configure, explain, matmul, settings
