"""The ``looptune`` command line."""
from __future__ import annotations

import json
import sys

import click

from looptune.runtime.compiler.ir import ScheduleError
from looptune.runtime.compiler.machine import detect_cpu
from looptune.tuner.cli.common import INTERRUPTED_EXIT, make_problem, problem_options, read_text
from looptune.tuner.cli.ship import bench, build_db, export


class _Group(click.Group):
    """Ctrl-C (SIGINT) ends every command the same way: a short line on stderr and exit 130,
    the shell's code for "ended by SIGINT" (click's default is "Aborted!" and exit 1).
    ``build-db`` handles it itself first: it commits what finished and reports, then exits 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(INTERRUPTED_EXIT)


@click.group(cls=_Group)
@click.version_option(package_name="looptune")
def main() -> None:
    """LoopTune: tune, store and run fast CPU matmul kernels."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def info(as_json: bool) -> None:
    """Show the detected CPU, vector ISA, compiler, cache directory and the policy in use."""
    # deferred: the code generator loads only for the commands that use it, not for --help or the others
    from looptune.runtime.compiler.build import BuildSettings, compiler_identity
    from looptune.runtime.compiler.codegen import CODEGEN_VERSION     # (as above)
    from looptune.tuner.agent.policy import Policy, PolicyError       # (as above: the agent, for its policy line)

    cpu = detect_cpu()
    settings = BuildSettings.from_env()
    data = {
        "cpu": cpu.model_name, "arch": cpu.arch, "vector_isa": cpu.vector_isa, "features": list(cpu.features),
        "cores": cpu.cores, "l1d_bytes": cpu.l1d_bytes, "l2_bytes": cpu.l2_bytes, "l3_bytes": cpu.l3_bytes,
        "compiler": compiler_identity(settings.compiler), "codegen_version": CODEGEN_VERSION,
        "kernel_cache": str(settings.resolved_cache_dir()),
    }
    try:
        policy = Policy.in_use()       # this machine's (looptune train), else the shipped one
        data.update(policy=policy.describe(), policy_source=policy.source, policy_path=policy.path)
    except PolicyError as e:
        data.update(policy=f"none ({e})", policy_source="none", policy_path=None)
    if as_json:
        click.echo(json.dumps(data))
    else:
        for key, value in data.items():
            click.echo(f"{key:16} {value}")


@main.command()
@problem_options
@click.option("--trace", "trace_file", type=click.Path(exists=True, dir_okay=False),
              help="a schedule trace (JSON); default: the analytic default schedule")
@click.option("--c", "show_c", is_flag=True, help="print the generated C instead of the loop nest")
@click.option("--json", "as_json", is_flag=True, help="print the trace as JSON")
def schedule(m, n, k, dtype, batch, layout, threads, epilogue, trace_file, show_c, as_json) -> None:
    """Show a schedule for a problem: its loop nest, trace or generated C."""
    # deferred: the code generator loads only for the commands that use it, not for --help or the others
    from looptune.runtime.compiler.codegen import render
    from looptune.runtime.compiler.defaults import default_schedule     # (as above)
    from looptune.runtime.compiler.schedule import Schedule             # (as above)

    problem = make_problem(m, n, k, dtype, batch, layout, threads, epilogue)
    try:
        sched = Schedule.from_json(read_text(trace_file)) if trace_file else default_schedule(problem)
    except ScheduleError as e:
        raise click.ClickException(f"illegal schedule: {e}") from None
    if show_c:
        click.echo(render(sched, problem.dtype, op=problem.op).text)
    elif as_json:
        click.echo(sched.to_json())
    else:
        click.echo(f"# {problem}")
        click.echo(f"# trace: {sched.trace}")
        click.echo(sched.nest.pretty(dict(b=batch, m=m, n=n, k=k)))


def _attach_optional_commands() -> None:
    # here, not at the top: a package-level ``tune`` would shadow the submodule looptune.tuner.cli.tune
    from looptune.tuner.cli.tune import tune
    from looptune.tuner.cli.train import train     # (as above: a package-level ``train`` would shadow its module)

    main.add_command(tune)
    main.add_command(train)
    for command in (build_db, export, bench):
        main.add_command(command)
    try:
        from looptune.database.cli import db     # in the try: it loads h5py; without h5py the other commands still run
    except ImportError:  # h5py missing or broken: `looptune db` is left out, the rest still works
        return
    main.add_command(db)


_attach_optional_commands()

if __name__ == "__main__":
    sys.exit(main())
