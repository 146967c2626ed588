"""``looptune train --minutes M``: fine-tune the policy on this machine's own measurements
(``looptune.tuner.agent.finetune``) and save it where ``tune``, ``build-db`` and live tuning find it.
torch (the ``[train]`` extra) is loaded by this command only."""
from __future__ import annotations

import json
import sys

import click

from looptune.runtime.compiler.errors import LoopTuneError
from looptune.tuner.cli.common import INTERRUPTED_EXIT, MINUTES, os_error_text

BAR_STEPS = 1000          # the progress bar's resolution: fractions of the budget


@click.command()
@click.option("--minutes", type=MINUTES, required=True,
              help="wall-clock budget, measurements and evaluations included")
@click.option("--seed", type=int, default=0, show_default=True, help="exploration and the top-up problems")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def train(minutes: float, seed: int, as_json: bool) -> None:
    """Fine-tune the policy on this machine's measurements; save it as this machine's policy.

    Trains on what build-db and tune recorded here (measuring the rest live) for MINUTES of wall
    time, keeps the best policy by a held-out evaluation, and writes it atomically next to your
    schedule database, where tune, build-db and live tuning use it (`looptune info` says which
    policy is in use).  Nothing is written unless it beats the policy it started from, still,
    when both are measured again side by side.  Ctrl-C keeps the best so far.
    """
    try:
        # deferred: torch loads only for this command, never for the runtime or the other commands
        from looptune.tuner.agent.finetune import finetune
    except ImportError as e:
        if (e.name or "").split(".")[0] != "torch":
            raise
        raise click.ClickException("looptune train needs torch, which is not installed: "
                                   "pip install \"looptune[train]\"") from None
    from looptune.tuner.search.budget import MAX_BUDGET_S     # deferred: (as above) the tuner loads with the command

    budget_s = min(minutes * 60.0, MAX_BUDGET_S)
    with click.progressbar(length=BAR_STEPS, label="train", file=sys.stderr, show_eta=False,
                           item_show_func=lambda note: note) as bar:
        def progress(fraction: float, note: str) -> None:
            target = min(BAR_STEPS, max(0, int(fraction * BAR_STEPS)))
            bar.update(max(0, target - bar.pos), current_item=note)

        try:
            report = finetune(budget_s, progress=progress, seed=seed)
        except OSError as e:              # the policy or the recordings cannot be written: one line, exit 1
            raise click.ClickException(f"training stopped, the policy in use is unchanged: {os_error_text(e)}") from None
        except LoopTuneError as e:        # no C compiler to measure or name this machine with
            raise click.ClickException(str(e)) from None
        bar.update(BAR_STEPS - bar.pos)
    if as_json:
        click.echo(json.dumps(vars(report)))
    else:
        click.echo(report.summary())
    if report.interrupted:
        raise SystemExit(INTERRUPTED_EXIT)
