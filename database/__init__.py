"""The schedule database: tuned results on disk, and the lookup the runtime consults.

    from looptune.database import MachineKey, MatmulProblem, Record, ScheduleIndex, commit, load

    machine = MachineKey.current(compiler="gcc 12.2.0", codegen_version="1")
    commit(path, [Record(MatmulProblem(512, 512, 512), machine, trace, 95.0, 1.2, 60.0, True, "dqn-v1", "beam", 200)])
    index = ScheduleIndex(load(path), machine)
    match = index.best("matmul:float32:nn:t1:b1:500x512x512")   # Match(record, distance, local, exact) or None

Problems are ``MatmulProblem`` (from ``looptune.runtime.compiler.workload``, re-exported
here); ``ProblemKey`` remains as an alias of it for code written before the two merged.

Importing this package is cheap: h5py loads with the store, scikit-learn only when a
lookup first needs a tree.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Attribute -> submodule of this package, or a full module name for what the compiler layer
# defines; "module:name" when exported under another name.  Loaded on first access
# (PEP 562), so importing one submodule does not drag h5py into the process.
_WORKLOAD, _TRACE = "looptune.runtime.compiler.workload", "looptune.runtime.compiler.trace"
_EXPORTS = {
    "CorruptDatabaseError": "errors", "DatabaseError": "errors", "LockTimeoutError": "errors",
    "MissingDatabaseError": "errors", "RecordError": "errors", "SchemaVersionError": "errors",
    "LookupSettings": "lookup", "Match": "lookup", "ScheduleIndex": "lookup",
    "PruneRules": "maintenance", "Rejection": "maintenance", "export_jsonl": "maintenance",
    "import_jsonl": "maintenance", "merge": "maintenance", "prune": "maintenance", "read_jsonl": "maintenance",
    "MachineKey": "records", "Record": "records", "better": "records",
    "MatmulProblem": _WORKLOAD,
    "ProblemKey": f"{_WORKLOAD}:MatmulProblem",   # backward-compatible alias: ProblemKey was merged into MatmulProblem
    "SCHEMA_VERSION": "store", "Database": "store", "StoreSettings": "store", "VerifyReport": "store",
    "commit": "store", "load": "store", "save": "store", "update": "store", "verify": "store",
    "Step": _TRACE, "Trace": _TRACE, "TraceFormatError": _TRACE,
}


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(module if "." in module else f".{module}", __name__), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from looptune.database.errors import (CorruptDatabaseError, DatabaseError, LockTimeoutError, MissingDatabaseError, RecordError,
                         SchemaVersionError)
    from looptune.database.lookup import LookupSettings, Match, ScheduleIndex
    from looptune.database.maintenance import PruneRules, Rejection, export_jsonl, import_jsonl, merge, prune, read_jsonl
    from looptune.database.records import MachineKey, Record, better
    from looptune.runtime.compiler.workload import MatmulProblem, MatmulProblem as ProblemKey
    from looptune.database.store import SCHEMA_VERSION, Database, StoreSettings, VerifyReport, commit, load, save, update, verify
    from looptune.runtime.compiler.trace import Step, Trace, TraceFormatError

__all__ = [
    "CorruptDatabaseError", "Database", "DatabaseError", "LockTimeoutError", "LookupSettings", "MachineKey", "Match",
    "MatmulProblem", "MissingDatabaseError", "ProblemKey", "PruneRules", "Record", "RecordError", "Rejection", "SCHEMA_VERSION",
    "ScheduleIndex", "SchemaVersionError", "Step", "StoreSettings", "Trace", "TraceFormatError", "VerifyReport",
    "better", "commit", "export_jsonl", "import_jsonl", "load", "merge", "prune", "read_jsonl", "save", "update",
    "verify",
]
