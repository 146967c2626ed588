"""``looptune db ...``: inspect, check, merge, prune, export and import schedule databases.

Every command takes ``--json`` for machine-readable output (one JSON object on stdout,
always with an ``ok`` field).  Exit status: 0 on success, 1 when anything was rejected
or a database could not be used (the reason is printed), 2 for usage errors.

The lead attaches this group to the top-level CLI (``main.add_command(db)``); on its own
it runs as ``python -m looptune.database.cli``.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Callable

import click

from looptune.database.atomic import same_file
from looptune.database.errors import DatabaseError
from looptune.database.maintenance import PruneRules, Rejection, export_jsonl, import_jsonl, merge, prune
from looptune.database.records import Record
from looptune.database.store import SCHEMA_VERSION, commit, load, save, update, verify

_db_path = click.Path(dir_okay=False)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def _emit(as_json: bool, payload: dict[str, Any], text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps({"ok": True, **payload}, sort_keys=True))
    elif text is not None:
        click.echo(text)


def _reject(as_json: bool, payload: dict[str, Any], rejections: list[Rejection], what: str) -> None:
    """Report rejections (stderr in text mode) and exit 1."""
    if as_json:
        click.echo(json.dumps({"ok": False, **payload, "rejected": [{"where": r.where, "reason": r.reason}
                                                                   for r in rejections]}, sort_keys=True))
    else:
        for r in rejections:
            click.echo(f"rejected {r}", err=True)
        click.echo(f"{what}: {len(rejections)} rejected", err=True)
    sys.exit(1)


def _refuse_same_file(source: str, target: str, what: str) -> None:
    """``target`` is about to be written from ``source``'s content: refuse when both names
    reach one file (same path, a symlink or a hard link), whatever its format."""
    if same_file(source, target):
        raise DatabaseError(f"{target} is the same file as {source}; {what} needs a different file")


def _errors_exit_1(command: Callable[..., None]) -> Callable[..., None]:
    """A database that cannot be used is an answer, not a crash: name it and why, exit 1."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (DatabaseError, OSError) as e:
            message = str(e) if isinstance(e, DatabaseError) else f"{getattr(e, 'filename', '')}: {e.strerror or e}"
            if kwargs.get("as_json"):
                click.echo(json.dumps({"ok": False, "error": message, "error_type": type(e).__name__}))
            else:
                click.echo(f"error: {message}", err=True)
            sys.exit(1)
    return wrapper


@click.group(name="db")
def db() -> None:
    """Inspect and maintain schedule databases (HDF5 files of tuned schedules)."""


def _summary(path: str, records: tuple[Record, ...]) -> dict[str, Any]:
    machines = Counter(r.machine for r in records)
    families = Counter(":".join(map(str, r.problem.family)) for r in records)
    return {
        "path": path, "bytes": os.path.getsize(path), "schema_version": SCHEMA_VERSION,
        "record_count": len(records), "verified_count": sum(r.verified for r in records),
        "distinct_traces": len({r.trace for r in records}),
        "machines": [{**m.to_dict(), "record_count": n} for m, n in machines.most_common()],
        "families": dict(sorted(families.items())),
    }


@db.command()
@click.argument("path", type=_db_path)
@_json_option
@_errors_exit_1
def info(path: str, as_json: bool) -> None:
    """Summarize a database: record count, machines, problem families."""
    s = _summary(path, load(path).records)
    lines = [f"{s['path']}: schema {s['schema_version']}, {s['bytes']} bytes",
             f"{s['record_count']} records ({s['verified_count']} verified), {s['distinct_traces']} distinct traces"]
    lines += [f"  machine: {m['cpu_model']} ({m['isa']}, {m['cores']} cores, {m['compiler']}, "
              f"codegen {m['codegen_version']}): {m['record_count']} records" for m in s["machines"]]
    lines += [f"  family {family}: {n} records" for family, n in s["families"].items()]
    _emit(as_json, s, "\n".join(lines))


@db.command(name="list")
@click.argument("path", type=_db_path)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Show at most this many records.")
@_json_option
@_errors_exit_1
def list_(path: str, limit: int | None, as_json: bool) -> None:
    """One line per record: problem, speed vs numpy, verification, machine, trace."""
    records = load(path).records[:limit]
    if as_json:
        _emit(True, {"records": [r.to_dict() for r in records]})
        return
    for r in records:
        click.echo(f"{r.problem.key()}  {r.gflops_median:8.1f} GFLOPS (numpy {r.numpy_gflops:.1f}, "
                   f"x{r.speedup_vs_numpy:.2f})  {'verified' if r.verified else 'UNVERIFIED'}  "
                   f"{r.machine.short()}  [{r.trace}]")


@db.command(name="verify")
@click.argument("path", type=_db_path)
@_json_option
@_errors_exit_1
def verify_(path: str, as_json: bool) -> None:
    """Check checksums, schema and every record; exit 1 naming anything rejected."""
    report = verify(path)
    payload = {"path": path, "valid_records": report.valid_records}
    if not report.ok:
        _reject(as_json, payload, list(report.rejections), f"{path}: {report.valid_records} valid")
    _emit(as_json, payload, f"{path}: OK, {report.valid_records} records")


@db.command(name="merge")
@click.argument("path", type=_db_path)
@click.argument("others", nargs=-1, required=True, type=_db_path)
@click.option("--out", type=_db_path, default=None, help="Write the merge here (default: merge into PATH).")
@_json_option
@_errors_exit_1
def merge_(path: str, others: tuple[str, ...], out: str | None, as_json: bool) -> None:
    """Merge databases, keeping the best record per (problem, machine)."""
    sources = [load(p).records for p in (path, *others)]
    merged = save(out, merge(*sources)) if out else commit(path, merge(*sources[1:]))
    target = out or path
    _emit(as_json, {"out": target, "inputs": [len(s) for s in sources], "record_count": len(merged)},
          f"{target}: {len(merged)} records (from {' + '.join(str(len(s)) for s in sources)})")


@db.command(name="prune")
@click.argument("path", type=_db_path)
@click.option("--unverified", is_flag=True, help="Drop records whose output was not verified.")
@click.option("--slower-than-numpy", is_flag=True, help="Drop records that numpy beat in the same run.")
@click.option("--older-than-days", type=click.FloatRange(min=0), default=None, help="Drop records older than this.")
@click.option("--codegen-version", default=None, help="Drop records from any other code-generator version.")
@click.option("--dry-run", is_flag=True, help="Only report what would be dropped.")
@_json_option
@_errors_exit_1
def prune_(path: str, unverified: bool, slower_than_numpy: bool, older_than_days: float | None,
           codegen_version: str | None, dry_run: bool, as_json: bool) -> None:
    """Drop records by rule (give at least one rule)."""
    older_than = None if older_than_days is None else time.time() - older_than_days * 86400
    rules = PruneRules(unverified, slower_than_numpy, older_than, codegen_version)
    if rules == PruneRules():
        raise click.UsageError("give at least one rule, e.g. --unverified")
    dropped: list[Record] = []

    def change(current):
        kept, gone = prune(current.records, rules)
        dropped[:] = gone
        return kept

    kept = change(load(path)) if dry_run else update(path, change).records
    _emit(as_json, {"path": path, "kept": len(kept), "dropped": len(dropped), "dry_run": dry_run},
          f"{path}: kept {len(kept)}, {'would drop' if dry_run else 'dropped'} {len(dropped)}")


@db.command(name="export")
@click.argument("path", type=_db_path)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON-lines file to write.")
@_json_option
@_errors_exit_1
def export_(path: str, out: str, as_json: bool) -> None:
    """Write every record as one JSON object per line (never over an HDF5 database)."""
    _refuse_same_file(path, out, "the export")
    count = export_jsonl(load(path).records, out)
    _emit(as_json, {"path": path, "out": out, "record_count": count}, f"{out}: {count} records")


@db.command(name="import")
@click.argument("path", type=_db_path)
@click.argument("jsonl", type=click.Path(exists=True, dir_okay=False))
@_json_option
@_errors_exit_1
def import_(path: str, jsonl: str, as_json: bool) -> None:
    """Validate a JSON-lines file and merge its good records into PATH (created if missing).
    Exits 1 if any line was rejected; the valid lines are still imported."""
    _refuse_same_file(jsonl, path, "the import")
    records, rejections = import_jsonl(jsonl)
    total = len(commit(path, records)) if records or not os.path.exists(path) else len(load(path))
    payload = {"path": path, "imported": len(records), "record_count": total}
    if rejections:
        _reject(as_json, payload, rejections, f"{path}: imported {len(records)} records from {jsonl}, now {total}")
    _emit(as_json, payload, f"{path}: imported {len(records)} records, now {total}")


if __name__ == "__main__":
    db()
