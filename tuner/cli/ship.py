"""``looptune build-db``, ``looptune export`` and ``looptune bench``: prebuild, scale out, ship."""
from __future__ import annotations

import json
import os
import random
import sys

import click

from looptune import runtime
from looptune.database import MachineKey
from looptune.runtime.compiler.epilogue import PLAIN
from looptune.runtime.compiler.workload import MatmulProblem, ProblemError, parse_shapes
from looptune.tuner.cli.common import (BUDGET_S, COUNT, DATABASE, INTERRUPTED_EXIT, THREADS, check_writable,
                                       database_path, read_text, untunable, user_errors)
from looptune.tuner.ship.presets import PRESETS, PresetError, preset_problems

BENCH_AFTER_BUILD_MAX = 24      # build-db ends with the bench table for families this small


def _problems(shapes: str | None, preset: str | None, threads: int, required: bool = True) -> list[MatmulProblem] | None:
    if shapes and preset:
        raise click.UsageError("give --shapes or --preset, not both")
    try:
        if shapes:
            problems = list(parse_shapes(read_text(shapes).splitlines(), threads=threads))
            for p in problems:
                reason = untunable(p)
                if reason:
                    raise ProblemError(f"{p}: {reason}")
            return problems
        if preset:
            return preset_problems(preset, threads=threads)
    except ProblemError as e:
        raise click.ClickException(f"{shapes}: {e}") from None
    except PresetError as e:
        raise click.BadParameter(str(e), param_hint="--preset") from None
    if required:
        raise click.UsageError("give --shapes FILE or --preset NAME")
    return None


def _preset_choice():
    return click.Choice(list(PRESETS))


_db_option = click.option("--db", "db_path", type=DATABASE, default=None,
                          help="schedule database (HDF5); default: $LOOPTUNE_DB, else the user data directory")


@click.command("build-db")
@click.option("--shapes", type=click.Path(exists=True, dir_okay=False), help="shape file: 'M N K [key=value ...]' per line")
@click.option("--preset", type=_preset_choice(), help="a built-in family instead of a shape file")
@_db_option
@click.option("--threads", type=THREADS, default=1, show_default=True, help="threads each problem is tuned for")
@click.option("--budget", "budget_s", type=BUDGET_S, default=2.0, show_default=True,
              help="seconds of tuning per problem, compiles and measurements included")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="problems tuned at once on this machine, each pinned to its own cores")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler (tcp://HOST:PORT) whose workers tune, or 'local' for a LocalCluster of --workers")
@click.option("--tuner", "tuner_spec", default="auto", show_default=True,
              help="auto, agent (the policy in use, as `looptune info` names it), search (random blocking search) "
                   "or module:callable")
@click.option("--limit", type=COUNT, default=None, help="tune at most this many of the remaining problems")
@click.option("--shuffle", is_flag=True, help="tune in a random (seeded) order: a partial build covers the family evenly")
@click.option("--bench/--no-bench", "do_bench", default=None,
              help=f"end with the bench table (default: for families of at most {BENCH_AFTER_BUILD_MAX} problems)")
@click.option("--json", "as_json", is_flag=True, help="print the final report as JSON")
@click.option("--quiet", is_flag=True, help="no progress bar")
def build_db(shapes, preset, db_path, threads, budget_s, workers, scheduler, tuner_spec, limit, shuffle, do_bench,
             as_json, quiet) -> None:
    """Tune every problem of a family into the schedule database.

    Resumable: problems that already have a record for this machine are skipped, so rerun
    the same command after Ctrl-C, a kill or a crash.  Workers return records; this
    process alone commits them, each within about a second of finishing.
    """
    # deferred: the tuner loads only when this command runs, not for --help or the other commands
    from looptune.tuner.agent.policy import PolicyError
    from looptune.tuner.search.budget import MAX_BUDGET_S     # (as above)
    from looptune.tuner.ship.builddb import build_db as run_build, plan      # (as above)
    from looptune.tuner.ship.executors import SerialExecutor                # (as above)
    from looptune.tuner.measure.evaluator import recording_live_measurements     # (as above)
    from looptune.tuner.measure.recordings import MachineRecordings              # (as above)

    shown_budget_s, budget_s = budget_s, min(budget_s, MAX_BUDGET_S)   # any finite budget: "no limit" beyond
    problems = _problems(shapes, preset, threads)
    db_path = database_path(db_path)
    check_writable(db_path)
    machine = MachineKey.current()
    cores = max(p.threads for p in problems) if problems else 1
    with user_errors():     # a corrupt or newer-schema database stops the build before any tuning
        todo, done = plan(problems, db_path, machine)
    if limit is not None:
        if shuffle:
            random.Random(0).shuffle(todo)
        problems = done + todo[:limit]
    executor = None
    try:
        if scheduler:
            from looptune.tuner.ship.distributed import DaskExecutor     # deferred: only --scheduler uses it

            executor = DaskExecutor(scheduler, budget_s=budget_s, machine=machine, workers=workers, tuner=tuner_spec,
                                    cores_per_worker=cores)
            where = f"Dask workers of {executor.address} ({executor.slots} now)"
        elif workers > 1:
            from looptune.tuner.ship.distributed import PoolExecutor     # deferred: only --workers > 1 uses it

            executor = PoolExecutor(workers, budget_s=budget_s, machine=machine, tuner=tuner_spec, cores_per_worker=cores)
            where = f"{workers} pinned local workers"
        else:
            executor = SerialExecutor(budget_s, machine, tuner_spec)     # a bad --tuner fails here, in one line
            where = "this process"
    except (ImportError, ValueError, OSError, AttributeError, PolicyError) as e:
        raise click.ClickException(str(e)) from None
    if not quiet and not as_json:
        click.echo(f"building {db_path} for {machine.short()}", err=True)
        click.echo(f"{len(set(problems))} problems, {shown_budget_s:g} s budget each, tuned in {where}", err=True)
    # what is measured is kept for `looptune train`: here as it is timed, from workers with their replies
    recordings = MachineRecordings.current(machine)
    with user_errors(), recording_live_measurements(recordings):
        report = run_build(problems, db_path, budget_s=budget_s, executor=executor, tuner=tuner_spec, machine=machine,
                           progress=not quiet and not as_json, order_seed=0 if shuffle else None,
                           on_reply=lambda problem, reply: recordings.append_json(reply.get("measurements") or ()))
    if as_json:
        click.echo(json.dumps({
            "db": db_path, "machine": machine.to_dict(), "total": report.total, "skipped": report.skipped,
            "done": report.done, "failed": report.failed, "refused": report.refused,
            "interrupted": report.interrupted, "seconds": report.seconds,
            "seconds_per_problem": (sum(report.tune_seconds) / len(report.tune_seconds)) if report.tune_seconds else None,
            "geomean_vs_numpy": report.geomean_speedup,
            "workers": report.workers, "failures": report.failures[:100]}))
    else:
        click.echo(report.summary())
        for key, error in report.failures[:10]:
            click.echo(f"  failed: {key}: {error.splitlines()[0] if error else ''}")
        if len(report.failures) > 10:
            click.echo(f"  ... and {len(report.failures) - 10} more")
    if report.interrupted:
        raise SystemExit(INTERRUPTED_EXIT)
    if do_bench is None:
        do_bench = report.total <= BENCH_AFTER_BUILD_MAX
    if do_bench and not as_json and any(p.op == PLAIN for p in report.problems):
        click.echo("")
        _bench_and_print(report.problems, db_path, threads, as_json=False, plot_path=None)
    if report.failed or report.refused:
        raise SystemExit(1)


@click.command("export")
@_db_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="directory for looptune.c, looptune.h, Makefile and manifest.json")
@click.option("--shapes", type=click.Path(exists=True, dir_okay=False),
              help="export exactly these shapes (own record, else the nearest record's kernel); default: every record")
@click.option("--threads", type=THREADS, default=1, show_default=True, help="thread count whose records are exported")
@click.option("--targets", default=None, metavar="LEVEL,...",
              help="kernel levels inside, each built for its own instructions and picked by CPUID at run time "
                   "(portable, neon, avx2, avx512); default: the records' level, plus avx2 under avx512. "
                   "Portable general kernels are always inside")
@click.option("--build/--no-build", "do_build", default=True, show_default=True,
              help="compile the library once to check it (needs the C compiler)")
def export(db_path, out_dir, shapes, threads, targets, do_build) -> None:
    """Write the tuned kernels as a standalone C library (no Python at run time).

    looptune_sgemm / looptune_dgemm (and looptune_bgemm for bfloat16 records, looptune_hgemm for
    float16 ones) compute C = A B
    (row-major) with a kernel chosen by shape, falling back to the nearest tuned kernel or a
    general one for other shapes, at the highest kernel level the CPU runs
    (LOOPTUNE_CPU_LEVEL=avx2, for instance, caps it; looptune_cpu_level() says which serves).
    """
    # deferred: the C library exporter loads only when this command runs
    from looptune.tuner.ship.export import ExportError, export_library

    db_path = database_path(db_path)
    if not os.path.exists(db_path):
        raise click.ClickException(f"no database at {db_path}: run `looptune build-db` first")
    problems = _problems(shapes, None, threads, required=False)
    try:
        with user_errors():     # a database that cannot be read, an output folder that cannot be written
            files = export_library(db_path, out_dir, threads=threads, shapes=problems, targets=targets)
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    plan = files.plan
    kernels = sum(1 for k in plan.kernels if k.tuned)
    general = sum(1 for k in plan.kernels if k.general and not k.tuned)
    defaults = len(plan.kernels) - kernels - general
    click.echo(f"exported {len(plan.entries)} shapes ({kernels} tuned kernels + {defaults} default + {general} general) "
               f"for {plan.machine.short()} to {files.out_dir}/")
    click.echo(f"  kernel levels: {plan.describe_levels()}")
    click.echo(f"  {files.c_file.name}, {files.h_file.name}, {files.makefile.name}, {files.manifest.name}")
    click.echo(f"  build: (cd {files.out_dir} && make)   or   {files.build_line()}")
    if do_build:
        errors = files.compile_errors()
        if errors is not None:
            raise click.ClickException(f"the exported library does not compile:\n{errors[-3000:]}")
        click.echo("  compiled cleanly")


@click.command("bench")
@_db_option
@click.option("--shapes", type=click.Path(exists=True, dir_okay=False), help="shape file; default: the database's shapes")
@click.option("--preset", type=_preset_choice(), help="a built-in family instead of a shape file")
@click.option("--threads", type=THREADS, default=1, show_default=True, help="threads on every side")
@click.option("--limit", type=COUNT, default=None, help="at most this many problems (the first ones)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="also draw speedups over numpy as a bar chart (PNG; needs matplotlib)")
@click.option("--no-torch", is_flag=True, help="leave torch out even if it is installed")
@click.option("--no-handoff", is_flag=True,
              help="serve generated kernels even where the record says numpy was faster (LOOPTUNE_NO_NUMPY_HANDOFF=1)")
@click.option("--numpy-core", default="auto", show_default=True, metavar="auto|off|CORE",
              help="also time numpy with OPENBLAS_CORETYPE=CORE in a child process; auto: the core that fits "
                   "this CPU when numpy's OpenBLAS runs one below it")
def bench(db_path, shapes, preset, threads, limit, as_json, plot_path, no_torch, no_handoff, numpy_core) -> None:
    """runtime.matmul against numpy (and torch), side by side: GFLOPS and ratios.

    The header names numpy's BLAS core; the ratio column is against the best library per
    problem (numpy, numpy on the core that fits this CPU when its OpenBLAS runs one below it,
    torch).  For problems with an exact record, also the GFLOPS the record stored next to what
    runtime.matmul serves now (fresh output and out=), their ratio (! below 0.9) and the
    geomean of each.  The source column says what serves: exact, nearest, default, numpy.
    """
    if plot_path:
        try:
            import matplotlib  # noqa: F401  (find out before minutes of benchmarking)
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib (LoopTune's [plot] extra)") from None
    problems = _problems(shapes, preset, threads, required=False)
    db_path = database_path(db_path)
    if problems is None:
        with user_errors():
            problems = _database_problems(db_path, threads)
        if not problems:
            problems = preset_problems("quick", threads=threads)
    if limit is not None:
        problems = problems[:limit]
    _bench_and_print(problems, db_path, threads, as_json=as_json, plot_path=plot_path, with_torch=not no_torch,
                     numpy_handoff=False if no_handoff else None, numpy_core=numpy_core)


def _database_problems(db_path: str, threads: int) -> list[MatmulProblem]:
    """The plain products this machine has records for at this thread count, in size order."""
    if not os.path.exists(db_path):
        return []
    from looptune.database import load     # lazily: h5py loads with the store

    machine = MachineKey.current()
    keys = sorted({r.problem for r in load(db_path)
                   if r.machine == machine and r.problem.threads == threads and r.problem.op == PLAIN})
    return [MatmulProblem(p.m, p.n, p.k, batch=p.batch, dtype=p.dtype, layout=p.layout, threads=p.threads) for p in keys]


def _bench_and_print(problems, db_path, threads, *, as_json: bool, plot_path, with_torch: bool = True,
                     numpy_handoff: bool | None = None, numpy_core: str = "auto") -> None:
    """Bench ``problems`` and print the table (or JSON); ``numpy_handoff`` None keeps the runtime's
    setting; ``numpy_core``: ``baselines.baseline_core``'s choice (auto, off or a core)."""
    # deferred: the bench and the tuner load only when a bench runs, not for --help or the other commands
    from looptune.tuner.ship.baselines import ChildError, baseline_core, blas_info
    from looptune.tuner.ship.bench import baselines_line, plot, run_bench, table, to_json     # (as above)

    if db_path and os.path.exists(db_path):
        runtime.configure(user_db=db_path)
    if numpy_handoff is not None:
        runtime.configure(numpy_handoff=numpy_handoff)
    handoff = runtime.settings().numpy_handoff
    # the plain products: a fused problem's measurement (against numpy's unfused composition and
    # torch) is tools/bench_fused.py's
    problems = list(dict.fromkeys(p for p in problems if p.op == PLAIN))
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm     # lazily: the progress bar is drawn only on a terminal

        bar = tqdm(total=len(problems), unit="problem", desc="bench", file=sys.stderr, leave=False)
    try:
        tick = (lambda _row: bar.update(1)) if bar is not None else None
        blas = blas_info()
        core = baseline_core(blas, numpy_core)
        rows = run_bench(problems, threads=threads, with_torch=with_torch, on_row=tick, numpy_core=core)
    except ChildError as e:
        raise click.ClickException(f"{e} (--numpy-core off leaves that baseline out)") from None
    finally:
        if bar is not None:
            bar.close()
    machine = MachineKey.current()
    if as_json:
        click.echo(json.dumps(to_json(rows, threads=threads, machine=machine.short(), numpy_handoff=handoff, blas=blas,
                                      numpy_core=core)))
    else:
        click.echo(f"# GFLOPS of runtime.matmul (served: fresh output, out=) vs the record (stored) and numpy"
                   f"{' and torch' if any(r.torch_gflops for r in rows) else ''}"
                   f" on {threads} thread{'s' if threads > 1 else ''}, {machine.short()}"
                   f"{'' if handoff else '; numpy hand-off off'}")
        click.echo(baselines_line(blas, rows, core))
        click.echo(table(rows))
    if plot_path:
        try:
            plot(rows, plot_path, title=f"{machine.cpu_model}, {threads} thread{'s' if threads > 1 else ''}")
        except ImportError as e:
            raise click.ClickException(str(e)) from None
        if not as_json:
            click.echo(f"plot written to {plot_path}")
    if not all(r.correct for r in rows):
        raise SystemExit(1)
