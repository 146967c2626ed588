"""Options, parameter types and error handling shared by the ``looptune`` commands (a module of
its own so that the command modules and the group can import it without importing each other).

Every user error ends as one line on stderr: bad values fail at parse time through the
parameter types below (exit 2), a database or file that cannot be used through
``user_errors`` (exit 1); tracebacks are left for bugs.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from typing import Iterator

import click

from looptune.database.errors import DatabaseError
from looptune.runtime.compiler import environment
from looptune.runtime.compiler.epilogue import PLAIN, Epilogue
from looptune.runtime.compiler.workload import DTYPES, LAYOUTS, MAX_THREADS, MatmulProblem, ProblemError
from looptune.runtime.configuration import not_a_database_file

INTERRUPTED_EXIT = 130                       # exit code after Ctrl-C (SIGINT), as a shell reports it
THREADS = click.IntRange(1, MAX_THREADS)     # --threads of every command
COUNT = click.IntRange(min=0)                # --limit and other "at most this many"


class PositiveSeconds(click.ParamType):
    """A finite, positive number of seconds (every ``--budget``): ``nan``, ``inf``, 0 and
    negatives fail at parse time instead of failing every problem later."""

    name = "seconds"

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of {self.name}", param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"must be a finite positive number of {self.name}, got {value!r}", param, ctx)
        return number


class PositiveMinutes(PositiveSeconds):
    """A finite, positive number of minutes (``train --minutes``), refused as ``PositiveSeconds`` are."""

    name = "minutes"


class DatabasePath(click.Path):
    """A schedule database path (every ``--db``): a regular file, or nothing yet.  A FIFO, device
    or directory fails at parse time; it is looked at with ``stat``, never opened (opening a
    FIFO blocks until someone writes to it)."""

    name = "database"

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value, param, ctx) -> str:
        path = super().convert(value, param, ctx)
        reason = not_a_database_file(path)
        if reason is not None:
            self.fail(reason, param, ctx)
        return path


class EpilogueOption(click.ParamType):
    """A fused epilogue (``--epilogue bias,gelu_tanh``, as a shape file's ``epilogue=``), given as
    the problem's op (``"matmul+bias+gelu_tanh"``); bad parts fail at parse time, named."""

    name = "parts"

    def convert(self, value, param, ctx) -> str:
        try:
            return Epilogue.parse(value).op
        except ValueError as e:
            self.fail(str(e), param, ctx)


BUDGET_S = PositiveSeconds()
MINUTES = PositiveMinutes()
DATABASE = DatabasePath()
EPILOGUE = EpilogueOption()


def database_path(db_path: str | None) -> str:
    """``--db``, else ``$LOOPTUNE_DB``, else the user data directory's database; one from the
    environment that is not a regular file is refused here (the option's type checks ``--db``)."""
    if db_path:
        return db_path
    path = environment.user_db_path() or environment.default_user_db_path()
    reason = not_a_database_file(path)
    if reason is not None:
        raise click.ClickException(f"LOOPTUNE_DB: {reason}")
    return str(path)


def os_error_text(e: OSError) -> str:
    """``path: reason`` for an OSError, without its ``[Errno n]`` noise."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A database or file that cannot be used (corrupt, newer schema, unwritable, missing) is an
    answer, not a crash: one line on stderr, exit 1."""
    try:
        yield
    except DatabaseError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(os_error_text(e)) from None


def read_text(path: str) -> str:
    """A text file given on the command line (UTF-8); unreadable or not text is one clean error."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise click.ClickException(os_error_text(e)) from None


def check_writable(db_path: str) -> None:
    """Create the database's directory and make sure a file can be written there, before hours
    of tuning depend on it (commits write a temporary next to the database and rename it)."""
    folder = os.path.dirname(os.path.abspath(db_path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".looptune-probe-"):
            pass
    except OSError as e:
        why = "not a directory" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or str(e)
        raise click.ClickException(f"cannot write the database {db_path}: {folder}: {why}") from None


def problem_options(f):
    """Shared options that, with M N K arguments, describe one problem."""
    f = click.option("--epilogue", type=EPILOGUE, default=PLAIN,
                     help="fused epilogue, activation(A @ B + bias) + residual: comma-separated parts from "
                          "bias, residual and one of relu, gelu, gelu_tanh, silu (e.g. bias,gelu_tanh)")(f)
    f = click.option("--threads", type=THREADS, default=1, show_default=True, help="threads the kernel runs on")(f)
    f = click.option("--layout", type=click.Choice(LAYOUTS), default="nn", show_default=True,
                     help="t marks a transposed operand view (A first)")(f)
    f = click.option("--batch", type=int, default=1, show_default=True)(f)
    f = click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)(f)
    f = click.argument("k", type=int)(f)
    f = click.argument("n", type=int)(f)
    f = click.argument("m", type=int)(f)
    return f


def make_problem(m, n, k, dtype, batch, layout, threads, op: str = PLAIN) -> MatmulProblem:
    try:
        problem = MatmulProblem(m, n, k, batch=batch, dtype=dtype, layout=layout, threads=threads, op=op)
    except ProblemError as e:
        raise click.BadParameter(str(e)) from None
    reason = untunable(problem)
    if reason:
        raise click.BadParameter(reason, param_hint="'--epilogue'")
    return problem


def untunable(problem: MatmulProblem) -> str | None:
    """Why no kernel can be tuned for ``problem`` (None: one can): float16 kernels have no fused
    epilogue (``codegen.render``; the runtime composes float16 with numpy's element-wise operations)."""
    if problem.op != PLAIN and problem.dtype == "float16":
        return f"float16 kernels have no fused epilogue ({problem.op})"
    return None
