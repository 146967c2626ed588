"""Options and helpers shared by the ``looptune`` commands (a module of its own so that the
command modules and the group can import it without importing each other)."""
from __future__ import annotations

import click

from looptune.runtime.compiler.workload import DTYPES, LAYOUTS, MatmulProblem, ProblemError


def problem_options(f):
    """Shared options that, with M N K arguments, describe one problem."""
    f = click.option("--threads", type=int, default=1, show_default=True, help="threads the kernel runs on")(f)
    f = click.option("--layout", type=click.Choice(LAYOUTS), default="nn", show_default=True,
                     help="t marks a transposed operand view (A first)")(f)
    f = click.option("--batch", type=int, default=1, show_default=True)(f)
    f = click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)(f)
    f = click.argument("k", type=int)(f)
    f = click.argument("n", type=int)(f)
    f = click.argument("m", type=int)(f)
    return f


def make_problem(m, n, k, dtype, batch, layout, threads) -> MatmulProblem:
    try:
        return MatmulProblem(m, n, k, batch=batch, dtype=dtype, layout=layout, threads=threads)
    except ProblemError as e:
        raise click.BadParameter(str(e)) from None
