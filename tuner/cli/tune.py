"""``looptune tune M N K``: tune one problem with the policy in use (or other weights, or none) and
store the result.  ``--policy none`` runs the ablation baseline: tune() without the policy.
``--epilogue bias,gelu_tanh`` tunes the fused problem (its op is in the record's key)."""
from __future__ import annotations

import json

import click

from looptune.tuner.cli.common import BUDGET_S, DATABASE, make_problem, os_error_text, problem_options, user_errors


@click.command()
@problem_options
@click.option("--budget", type=BUDGET_S, default=2.0, show_default=True, help="seconds, compiles and measurements included")
@click.option("--db", "db_path", type=DATABASE, default=None,
              help="schedule database (HDF5) to store the result in")
@click.option("--policy", "policy_path", metavar="PATH|none", default=None,
              help="policy weights (npz); 'none': no policy (analytic default, templates and a "
                   "random-order hill-climb: the ablation baseline); default: the policy in use "
                   "(this machine's from `looptune train`, else the shipped one; `looptune info` names it)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def tune(m, n, k, dtype, batch, layout, threads, epilogue, budget, db_path, policy_path, as_json) -> None:
    """Tune one matmul problem: policy rollout plus a few measurements, keeping the best."""
    # imported here, not at the top: ``looptune --help`` and the other commands do not load the tuner
    from looptune.tuner.agent.policy import Policy, PolicyError
    from looptune.tuner.search.tune import NO_POLICY, tune as run_tune     # (as above)
    from looptune.tuner.ship.records_from_results import store_result     # (as above)
    from looptune.tuner.measure.evaluator import recording_live_measurements     # (as above)
    from looptune.tuner.measure.recordings import MachineRecordings               # (as above)

    problem = make_problem(m, n, k, dtype, batch, layout, threads, epilogue)
    policy = NO_POLICY
    if policy_path != NO_POLICY:
        try:
            policy = Policy.load(policy_path) if policy_path else Policy.in_use()
        except (PolicyError, OSError) as e:       # OSError: a directory or an unreadable file
            if policy_path:                       # one line naming the file and the cause, exit 2
                raise click.BadParameter(str(e) if isinstance(e, PolicyError) else os_error_text(e),
                                         param_hint="'--policy'") from None
            click.echo(f"warning: {e}; tuning without a policy (default, templates, hill-climb)", err=True)
    with recording_live_measurements(MachineRecordings.of_this_machine()):     # kept for `looptune train`
        res = run_tune(problem, budget_s=budget, policy=policy)
    stored = None
    if db_path and res.ok:
        with user_errors():
            store_result(res, db_path)
        stored = db_path
    r = res.result
    if as_json:
        click.echo(json.dumps({
            "problem": problem.key(), "ok": res.ok, "gflops": r.gflops, "numpy_gflops": r.numpy_gflops,
            "speedup_vs_numpy": r.speedup_vs_numpy, "seconds": res.seconds, "candidates": res.candidates,
            "found_by": res.found_by, "policy": res.policy, "policy_set_aside": res.policy_set_aside,
            "trace": json.loads(res.schedule.to_json()), "status": r.status.value, "error": r.error, "stored": stored}))
    else:
        click.echo(f"# {problem}")
        click.echo(f"# trace: {res.schedule.trace}")
        click.echo(res.schedule.nest.pretty(dict(b=batch, m=m, n=n, k=k)))
        if res.ok:
            ratio = f" ({r.speedup_vs_numpy:.2f}x numpy)" if r.speedup_vs_numpy else ""
            click.echo(f"{r.gflops:.1f} GFLOPS, numpy {r.numpy_gflops or float('nan'):.1f} GFLOPS{ratio}; "
                       f"{res.candidates} candidates in {res.seconds:.2f} s, found by {res.found_by}")
            if res.policy_set_aside:
                click.echo("# the policy's candidates kept losing: the rest of the budget went to the search")
            if res.searched_on is not None:
                click.echo(f"# searched on {res.searched_on.m}x{res.searched_on.n}x{res.searched_on.k} "
                           f"(batch {res.searched_on.batch}), the best timed again on the real size")
        else:
            click.echo(f"no candidate could be measured: {r.status.value}: {r.error}")
        if stored:
            click.echo(f"stored in {stored}")
    if not res.ok:
        raise SystemExit(1)
