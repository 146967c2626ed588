"""The schedule database on disk: one HDF5 file, columnar, checksummed, replaced atomically.

Layout (LAYOUT.md has the full table)::

    bytes 0-511       header block (an HDF5 "user block"): format name, schema version,
                      length and sha256 of the rest of the file
    /                 attrs: format, schema_version, trace_format_version, record_count
    /steps/json       unique schedule steps, one JSON object each
    /traces/offsets   trace t is steps[step_index[offsets[t]:offsets[t+1]]]
    /traces/step_index
    /machines/...     unique machine keys, one column per field
    /records/...      one row per record, one column per field; machine and trace are row
                      numbers into the tables above

Why this shape: loading 100,000 records must take well under two seconds *including*
validation.  Columns of plain numbers and fixed-width ASCII strings read in one call
each; deduplicated steps, traces and machines are validated once each instead of once
per record.

Damage is caught twice.  The header's sha256 covers every byte HDF5 will parse, and it is
checked first, on an in-memory copy that HDF5 then reads: fuzzing showed single bit flips
that send HDF5 into an endless loop, and those never reach it now.  Every dataset also
carries the sha256 of its contents as an attribute, so a file edited with plain h5py and
resealed is still checked column by column.

Loading *is* validation: nothing is returned that did not pass ``Record``'s checks, and
nothing in the file is decoded that could make HDF5 read another file, load a filter
plugin or walk its (unchecksummed) global heap.  Writes go through ``commit``/``update``:
lock, re-read, merge, write a temporary, fsync, rename.  A killed writer leaves the
previous complete database.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import h5py
import numpy as np

from looptune.database import atomic
from looptune.database.errors import CorruptDatabaseError, MissingDatabaseError, RecordError, SchemaVersionError
from looptune.database.maintenance import Rejection, merge
from looptune.database.records import MachineKey, Record, gc_paused, problem_from_columns
from looptune.runtime.compiler.trace import MAX_STEPS, TRACE_FORMAT_VERSION, Step, Trace

FORMAT_NAME = "looptune-schedule-db"
SCHEMA_VERSION = 1
_HDF5_FORMAT = ("v110", "v110")   # checksummed metadata, readable by HDF5 >= 1.10 (h5dump on any recent distro)
_MAX_STRING_BYTES = 1 << 16
_HEADER_BYTES = 512                # HDF5 "user block": our header, which HDF5 skips

# Column name -> on-disk dtype.  "S" means fixed-width ASCII, width chosen per file.
_STEP_COLUMNS = {"json": "S"}
_TRACE_COLUMNS = {"offsets": "<i8", "step_index": "<i4"}
_MACHINE_COLUMNS = {"arch": "S", "cpu_model": "S", "isa": "S", "features": "S", "cores": "<i4",
                    "compiler": "S", "codegen_version": "S"}
_RECORD_COLUMNS = {"op": "S", "dtype": "S", "layout": "S", "threads": "<i4", "batch": "<i8",
                   "m": "<i8", "n": "<i8", "k": "<i8", "machine": "<i4", "trace": "<i4",
                   "gflops_median": "<f8", "gflops_spread": "<f8", "numpy_gflops": "<f8", "verified": "u1",
                   "policy": "S", "search": "S", "budget": "<i8", "timestamp": "<f8"}
_TABLES = {"steps": _STEP_COLUMNS, "traces": _TRACE_COLUMNS, "machines": _MACHINE_COLUMNS, "records": _RECORD_COLUMNS}


@dataclass(frozen=True)
class StoreSettings:
    lock_timeout_s: float = 60.0   # how long a commit waits for another writer
    fsync: bool = True             # off only in tests that do not care about power loss


@dataclass(frozen=True)
class Database:
    """The validated content of a database file: an immutable sequence of records."""

    records: tuple[Record, ...] = ()
    path: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


@dataclass(frozen=True)
class VerifyReport:
    path: str
    valid_records: int
    rejections: tuple[Rejection, ...]

    @property
    def ok(self) -> bool:
        return not self.rejections


# ---------------------------------------------------------------- writing

def _header(schema_version: int, body_bytes: int, sha256: str) -> bytes:
    text = f"{FORMAT_NAME}\nschema_version={schema_version}\nbytes={body_bytes}\nsha256={sha256}\n"
    return text.encode("ascii").ljust(_HEADER_BYTES, b"\0")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _ascii(values: list[str]) -> np.ndarray:
    encoded = [v.encode("ascii") for v in values]
    width = max((len(v) for v in encoded), default=0)
    return np.array(encoded, dtype=f"S{max(width, 1)}")


def _trace_tables(traces: list[Trace]) -> tuple[list[int], list[Step], list[int], list[int]]:
    """Deduplicate traces and their steps: (row of each trace, unique steps, offsets, step_index).

    Records share trace objects, so each object is looked at once (by id); steps are keyed
    by plain (op, args) tuples and traces by their tuple of step rows, which hash in C.
    """
    step_row: dict[tuple, int] = {}
    row_of_id: dict[int, int] = {}           # ids are stable: ``traces`` keeps every object alive
    row_of_steps: dict[tuple[int, ...], int] = {}
    offsets, step_index, rows = [0], [], []
    for trace in traces:
        row = row_of_id.get(id(trace))
        if row is None:
            members = tuple([step_row.setdefault((s.op, s.args), len(step_row)) for s in trace.steps])
            row = row_of_steps.get(members)
            if row is None:
                row = row_of_steps[members] = len(offsets) - 1
                step_index.extend(members)
                offsets.append(len(step_index))
            row_of_id[id(trace)] = row
        rows.append(row)
    return rows, [Step(op, args) for op, args in step_row], offsets, step_index


def _columns(records: tuple[Record, ...]) -> dict[str, dict[str, np.ndarray]]:
    """Records -> deduplicated tables of numpy columns, ready to write."""
    machine_row: dict[MachineKey, int] = {}
    machine_rows = [machine_row.setdefault(r.machine, len(machine_row)) for r in records]
    machines = list(machine_row)
    trace_rows, steps, offsets, step_index = _trace_tables([r.trace for r in records])
    p = [r.problem for r in records]
    return {
        "steps": {"json": _ascii([json.dumps(s.to_dict(), sort_keys=True, separators=(",", ":")) for s in steps])},
        "traces": {"offsets": np.array(offsets, dtype="<i8"), "step_index": np.array(step_index, dtype="<i4")},
        "machines": {
            "arch": _ascii([mk.arch for mk in machines]), "cpu_model": _ascii([mk.cpu_model for mk in machines]),
            "isa": _ascii([mk.isa for mk in machines]), "features": _ascii([" ".join(mk.features) for mk in machines]),
            "cores": np.array([mk.cores for mk in machines], dtype="<i4"),
            "compiler": _ascii([mk.compiler for mk in machines]),
            "codegen_version": _ascii([mk.codegen_version for mk in machines]),
        },
        "records": {
            "op": _ascii([x.op for x in p]), "dtype": _ascii([x.dtype for x in p]),
            "layout": _ascii([x.layout for x in p]), "threads": np.array([x.threads for x in p], dtype="<i4"),
            "batch": np.array([x.batch for x in p], dtype="<i8"), "m": np.array([x.m for x in p], dtype="<i8"),
            "n": np.array([x.n for x in p], dtype="<i8"), "k": np.array([x.k for x in p], dtype="<i8"),
            "machine": np.array(machine_rows, dtype="<i4"),
            "trace": np.array(trace_rows, dtype="<i4"),
            "gflops_median": np.array([r.gflops_median for r in records], dtype="<f8"),
            "gflops_spread": np.array([r.gflops_spread for r in records], dtype="<f8"),
            "numpy_gflops": np.array([r.numpy_gflops for r in records], dtype="<f8"),
            "verified": np.array([r.verified for r in records], dtype="u1"),
            "policy": _ascii([r.policy for r in records]), "search": _ascii([r.search for r in records]),
            "budget": np.array([r.candidates for r in records], dtype="<i8"),   # persisted name of ``candidates``
            "timestamp": np.array([r.timestamp for r in records], dtype="<f8"),
        },
    }


def _file_image(records: tuple[Record, ...]) -> bytes:
    """The complete file: header block + HDF5 (which HDF5 reads as a user block + file)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=_HDF5_FORMAT, userblock_size=_HEADER_BYTES) as f:
        # Fixed-length strings only: variable-length data would live in HDF5's global heap,
        # which has no checksum of its own.
        f.attrs["format"] = np.bytes_(FORMAT_NAME)
        f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
        f.attrs["trace_format_version"] = np.int64(TRACE_FORMAT_VERSION)
        f.attrs["record_count"] = np.int64(len(records))
        for table, columns in _columns(records).items():
            group = f.create_group(table)
            for name, array in columns.items():
                dataset = group.create_dataset(name, data=array)
                dataset.attrs["sha256"] = np.bytes_(_digest(array))
    body = buffer.getbuffer()[_HEADER_BYTES:]
    return _header(SCHEMA_VERSION, len(body), hashlib.sha256(body).hexdigest()) + bytes(body)


def _write_image(path: str, image: bytes) -> None:
    with open(path, "wb") as f:
        f.write(image)


def save(path: str | os.PathLike, records: Iterable[Record], settings: StoreSettings = StoreSettings()) -> Database:
    """Replace the database at ``path`` with exactly ``records`` (merged per slot)."""
    return update(path, lambda _current: records, settings)


def update(path: str | os.PathLike, change: Callable[[Database], Iterable[Record]],
           settings: StoreSettings = StoreSettings()) -> Database:
    """Read-modify-write under the write lock: ``change`` sees the current content and returns
    the new records.  Concurrent writers serialize, and each re-reads what the previous wrote,
    so none loses another's records."""
    path = os.fspath(path)
    with atomic.write_lock(path, settings.lock_timeout_s), gc_paused():
        atomic.remove_stale_temporaries(path)
        current = load(path) if os.path.exists(path) else Database((), path)
        records = merge(change(current))
        if records != current.records or not os.path.exists(path):
            image = _file_image(records)
            atomic.replace_atomically(path, lambda temp: _write_image(temp, image), fsync=settings.fsync)
        return Database(records, path)


def commit(path: str | os.PathLike, records: Iterable[Record], settings: StoreSettings = StoreSettings()) -> Database:
    """Add ``records`` to the database at ``path`` (created if missing), keeping the best per
    slot.  When this returns, the records are durable.  Returns the new content."""
    new = tuple(records)
    return update(path, lambda current: current.records + new, settings)


# ---------------------------------------------------------------- reading

def _read_image(path: str) -> bytes:
    """The whole file, after checking the header's length and sha256.  HDF5 never parses a
    byte that failed this check: a damaged file is an error here, not a hang in HDF5."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingDatabaseError(f"{path}: no such database file") from None
    if not stat.S_ISREG(st.st_mode):     # a FIFO would block open() forever; a device is never a database
        raise CorruptDatabaseError(f"{path}: not a regular file, so not a LoopTune schedule database")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise MissingDatabaseError(f"{path}: no such database file") from None
    with f:
        head = f.read(_HEADER_BYTES)
        lines = head.rstrip(b"\0").decode("ascii", "replace").split("\n")
        fields = {key: value for key, _, value in (line.partition("=") for line in lines[1:] if line)}
        if len(head) < _HEADER_BYTES or lines[0] != FORMAT_NAME or set(fields) != {"schema_version", "bytes", "sha256"}:
            raise CorruptDatabaseError(f"{path}: not a LoopTune schedule database (no valid header block)")
        try:
            version, body_bytes = int(fields["schema_version"]), int(fields["bytes"])
        except ValueError:
            raise CorruptDatabaseError(f"{path}: damaged header block") from None
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(path, version, SCHEMA_VERSION)
        size = os.fstat(f.fileno()).st_size
        if size != _HEADER_BYTES + body_bytes:
            raise CorruptDatabaseError(f"{path}: file is {size} bytes but its header says "
                                       f"{_HEADER_BYTES + body_bytes}: truncated or appended to")
        body = f.read(body_bytes)
    if hashlib.sha256(body).hexdigest() != fields["sha256"]:
        raise CorruptDatabaseError(f"{path}: file checksum mismatch: the file is damaged")
    return head + body


def _read_column(f: h5py.File, table: str, name: str, kind: str, file_size: int) -> np.ndarray:
    where = f"/{table}/{name}"
    link = f.get(where, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise CorruptDatabaseError(f"dataset {where} is missing" if link is None else f"{where} is not a plain dataset")
    dataset = f[where]
    if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1:
        raise CorruptDatabaseError(f"{where} is not a one-dimensional dataset")
    # Never let a file make HDF5 read other files or load filter plugins.
    plist = dataset.id.get_create_plist()
    if dataset.is_virtual or plist.get_external_count() or plist.get_nfilters():
        raise CorruptDatabaseError(f"{where} uses external storage or filters, which this schema does not allow")
    dtype = dataset.dtype
    if (dtype.kind != "S" or not 1 <= dtype.itemsize <= _MAX_STRING_BYTES) if kind == "S" else dtype != np.dtype(kind):
        raise CorruptDatabaseError(f"{where} has type {dtype}, expected {kind}")
    if dataset.shape[0] * dtype.itemsize > file_size:
        raise CorruptDatabaseError(f"{where} claims more data than the file holds")
    data = dataset[()]
    if _attr(dataset, "sha256") != _digest(data):
        raise CorruptDatabaseError(f"checksum mismatch in {where}: the file is damaged")
    return data


def _strings(column: np.ndarray) -> list[str]:
    # Non-ASCII bytes become U+FFFD, which every string check then rejects with a clear message.
    return [b.decode("ascii", "replace") for b in column.tolist()]


def _attr(obj: h5py.HLObject, name: str) -> str | int | None:
    """A scalar integer or fixed-length string attribute, checked by type before its value
    is read.  Anything else (notably variable-length strings, whose bytes sit in HDF5's
    unchecksummed global heap) is refused rather than handed to HDF5 to decode."""
    if name not in obj.attrs:
        return None
    attr = obj.attrs.get_id(name)
    if attr.shape not in ((), (1,)) or attr.dtype.kind not in "iuS" or attr.dtype.itemsize > 256:
        raise CorruptDatabaseError(f"attribute {name!r} of {obj.name} has unexpected type {attr.dtype}")
    value = obj.attrs[name]
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("ascii", "replace") if isinstance(value, bytes) else int(value)


def _check_header(f: h5py.File, path: str) -> int:
    found = _attr(f, "format")
    if found != FORMAT_NAME:
        raise CorruptDatabaseError(f"not a LoopTune schedule database (format attribute is {found!r}, "
                                   f"expected {FORMAT_NAME!r})")
    version = _attr(f, "schema_version")
    if not isinstance(version, int) or version < 1:
        raise CorruptDatabaseError(f"bad schema_version attribute {version!r}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(path, version, SCHEMA_VERSION)
    if _attr(f, "trace_format_version") != TRACE_FORMAT_VERSION:
        raise CorruptDatabaseError(f"trace_format_version {_attr(f, 'trace_format_version')!r} "
                                   f"is not {TRACE_FORMAT_VERSION}")
    count = _attr(f, "record_count")
    if not isinstance(count, int) or count < 0:
        raise CorruptDatabaseError(f"bad record_count attribute {count!r}")
    for table in _TABLES:
        if not isinstance(f.get(table, getlink=True), h5py.HardLink) or not isinstance(f[table], h5py.Group):
            raise CorruptDatabaseError(f"group /{table} is missing or not a plain group")
    return int(count)


def _read_tables(path: str) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    image = _read_image(path)
    try:
        with h5py.File(io.BytesIO(image), "r") as f:   # exactly the bytes that were checked
            count = _check_header(f, path)
            tables = {table: {name: _read_column(f, table, name, kind, len(image)) for name, kind in columns.items()}
                      for table, columns in _TABLES.items()}
    except SchemaVersionError:
        raise
    except CorruptDatabaseError as e:
        raise CorruptDatabaseError(f"{path}: {e}") from None
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        # h5py's words for inconsistent HDF5 structures.
        raise CorruptDatabaseError(f"{path}: not a readable LoopTune database: {e}") from None
    lengths = {len(column) for column in tables["records"].values()}
    if lengths != {count}:
        raise CorruptDatabaseError(f"{path}: record columns have lengths {sorted(lengths)}, "
                                   f"record_count says {count}")
    if len({len(c) for c in tables["machines"].values()}) > 1:
        raise CorruptDatabaseError(f"{path}: machine columns have different lengths")
    return tables, count


def _decode_traces(path: str, steps_json: np.ndarray, offsets: np.ndarray, step_index: np.ndarray
                   ) -> list[Trace | str]:
    """Validate each unique step once, then assemble traces.  Invalid ones become error text."""
    steps: list[Step | str] = []
    for i, text in enumerate(_strings(steps_json)):
        try:
            steps.append(Step.from_dict(json.loads(text)))
        except (ValueError, TypeError, RecursionError) as e:
            steps.append(f"step {i}: {str(e)[:300]}")
    if (len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(step_index)
            or np.any(np.diff(offsets) < 0) or np.any(np.diff(offsets) > MAX_STEPS)
            or (len(step_index) and (step_index.min() < 0 or step_index.max() >= len(steps)))):
        raise CorruptDatabaseError(f"{path}: /traces/offsets and /traces/step_index are inconsistent")
    bounds = offsets.tolist()
    members = step_index.tolist()
    traces: list[Trace | str] = []
    for t in range(len(bounds) - 1):
        trace_steps = [steps[j] for j in members[bounds[t]:bounds[t + 1]]]
        bad = next((s for s in trace_steps if isinstance(s, str)), None)
        traces.append(f"trace: {bad}" if bad else Trace(tuple(trace_steps)))
    return traces


def _decode_machines(columns: dict[str, np.ndarray]) -> list[MachineKey | str]:
    text = {name: _strings(c) for name, c in columns.items() if c.dtype.kind == "S"}
    machines: list[MachineKey | str] = []
    for i, cores in enumerate(columns["cores"].tolist()):
        try:
            machines.append(MachineKey(arch=text["arch"][i], cpu_model=text["cpu_model"][i], isa=text["isa"][i],
                                       features=tuple(text["features"][i].split()), cores=cores,
                                       compiler=text["compiler"][i], codegen_version=text["codegen_version"][i]))
        except RecordError as e:
            machines.append(f"machine {i}: {e}")
    return machines


def _decode(path: str, strict: bool) -> tuple[tuple[Record, ...], list[Rejection]]:
    with gc_paused():
        return _decode_records(path, strict)


def _decode_records(path: str, strict: bool) -> tuple[tuple[Record, ...], list[Rejection]]:
    tables, count = _read_tables(path)
    traces = _decode_traces(path, tables["steps"]["json"], tables["traces"]["offsets"], tables["traces"]["step_index"])
    machines = _decode_machines(tables["machines"])
    col = tables["records"]
    if count and (col["machine"].min() < 0 or col["machine"].max() >= len(machines)
                  or col["trace"].min() < 0 or col["trace"].max() >= len(traces)):
        raise CorruptDatabaseError(f"{path}: a record refers to a machine or trace that does not exist")
    ops, dtypes, layouts = _strings(col["op"]), _strings(col["dtype"]), _strings(col["layout"])
    policies, searches = _strings(col["policy"]), _strings(col["search"])
    ms, ns, ks, batches, threads = (col[c].tolist() for c in ("m", "n", "k", "batch", "threads"))
    medians, spreads, numpys, stamps = (col[c].tolist() for c in ("gflops_median", "gflops_spread",
                                                                   "numpy_gflops", "timestamp"))
    verified = [v == 1 if v < 2 else v for v in col["verified"].tolist()]   # 2..255 stay ints and are rejected
    candidates = col["budget"].tolist()   # persisted name of ``Record.candidates``
    machine_of, trace_of = col["machine"].tolist(), col["trace"].tolist()

    records: list[Record] = []
    rejections: list[Rejection] = []
    for i in range(count):
        try:
            machine, trace = machines[machine_of[i]], traces[trace_of[i]]
            if isinstance(machine, str) or isinstance(trace, str):
                raise RecordError(machine if isinstance(machine, str) else trace)
            problem = problem_from_columns(ms[i], ns[i], ks[i], batches[i], dtypes[i], layouts[i], threads[i], ops[i])
            records.append(Record(problem, machine, trace, medians[i], spreads[i], numpys[i], verified[i],
                                  policies[i], searches[i], candidates[i], stamps[i]))
        except RecordError as e:
            if strict:
                raise RecordError(f"{path}: record {i} is invalid: {e}") from None
            rejections.append(Rejection(f"record {i}", str(e)))
    return tuple(records), rejections


def load(path: str | os.PathLike) -> Database:
    """Open, checksum and validate the whole database.  Any problem raises a ``DatabaseError``
    naming the file and the reason; nothing partially valid is returned."""
    path = os.fspath(path)
    records, _ = _decode(path, strict=True)
    return Database(records, path)


def verify(path: str | os.PathLike) -> VerifyReport:
    """Like ``load`` but reports every invalid record instead of stopping at the first.
    File-level damage (checksums, layout, newer schema) still raises."""
    path = os.fspath(path)
    records, rejections = _decode(path, strict=False)
    return VerifyReport(path, len(records), tuple(rejections))
