"""``looptune train``: fine-tune the policy on this machine's own measurements, within a wall-clock budget.

    report = finetune(budget_s=60.0, progress=lambda fraction, note: ...)
    report.saved, report.path, report.start_score, report.best_score

**What it trains on.**  The problems this machine has recorded measurements of
(``recordings.MachineRecordings``: what ``build-db`` and ``tune`` timed here), those small enough
to measure every state of an episode (``trainset.MAX_TRAIN_FLOPS``), the most recorded first, at
most ``MAX_PROBLEMS``; topped up from the small generated mix (``trainset``) to ``MIN_PROBLEMS``.
A (problem, schedule) recorded here answers from the recording; anything else is measured live
through the same isolated runner ``tune()`` uses (``live_evaluator``), and recorded for next time.

**Held out.**  A fixed quarter of the problems (the first by the sha256 of their keys, 2 to
``MAX_HELD_OUT``) is never trained on.  A policy's score there (``heldout_score``) is the geometric
mean of its greedy rollout's end state's GFLOPS, the candidate ``tune()`` measures first (no
intermediate state is measured), over the analytic default's.  Scores compare like with like: every
end state and default is measured live in this session, never answered from the recordings (other
sessions, other loads), through one memo, so a schedule two policies both end in counts alike.

**Training.**  From the policy in use (this machine's, else the shipped one), scored first: DQN
(``dqn.train``) with little exploration, scored again every ``1 / EVALUATIONS`` of the budget and at
the end; the best-scoring weights are kept.  The best of several noisy scorings flatters, so if it
beats the start by ``MIN_GAIN`` both are measured once more, afresh and side by side
(``confirmed_scores``), and the weights are written atomically as this machine's policy
(``weights.write_weights``) only if that confirmation still beats the start by ``MIN_GAIN``;
otherwise nothing is written and the policy in use stays.  Ctrl-C stops training and keeps the best
so far the same way (a second Ctrl-C, during the confirmation, keeps nothing).

**Budget.**  The start's scoring is timed, and its cost is reserved from the first step on for the
last scoring and for the confirmation (each as dear as the start's, until scorings are seen to cost
more), so training stops in time for both; a scoring or confirmation that no longer fits is skipped.
"""
from __future__ import annotations

import datetime
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from looptune.database import MachineKey
from looptune.runtime.compiler.defaults import default_schedule
from looptune.runtime.compiler.epilogue import PLAIN
from looptune.runtime.compiler.ir import LoopNest
from looptune.runtime.compiler.schedule import canonical_key
from looptune.runtime.compiler.workload import MatmulProblem, ProblemError
from looptune.tuner.agent import dqn
from looptune.tuner.agent.nets import arrays_of, net_from_arrays
from looptune.tuner.agent.policy import Policy
from looptune.tuner.agent.trainset import MAX_TRAIN_FLOPS, generated_mix
from looptune.tuner.agent.weights import machine_policy_path, policy_identity, write_weights
from looptune.tuner.measure.evaluator import TUNE_MEASURE, Evaluator, gflops_of, recording_live_measurements
from looptune.tuner.measure.recordings import MachineRecordings
from looptune.tuner.measure.replay import ResultStore
from looptune.tuner.measure.runner import LocalRunner

MIN_PROBLEMS = 12         # recorded problems topped up from the generated mix to this many
MAX_PROBLEMS = 64
MAX_HELD_OUT = 8
EVALUATIONS = 5           # held-out scorings spread over the budget (plus one before and one at the end)
MIN_GAIN = 0.01           # a fine-tuned policy replaces the starting one only if it scores 1 % higher, confirmed
FAILED_RATIO = 0.1        # the score of an end state that fails to build, verify or run, against the default
# Training stops with room for a last scoring and the confirmation this much dearer than seen so
# far: a last scoring a little slower than the ones before still leaves time to confirm.
RESERVE_SLACK = 1.25

Progress = Callable[[float, str], None]     # (fraction of the budget spent, a short note)


@dataclass
class TrainReport:
    path: str                 # this machine's policy file (written only if ``saved``)
    start: str                # the policy training started from (``Policy.describe``)
    start_score: float        # held-out score of the starting policy
    best_score: float         # the best held-out score reached (the start's if nothing beat it)
    confirmed_start_score: Optional[float]     # both measured again side by side (None: not confirmed)
    confirmed_score: Optional[float]
    saved: bool
    interrupted: bool
    seconds: float
    steps: int                # environment steps trained
    evaluations: int
    problems: int             # training problems
    recorded_problems: int    # of which this machine had recordings of
    held_out: int
    measured: int             # live measurements taken

    def summary(self) -> str:
        best = self.best_score / self.start_score - 1 if self.start_score > 0 else 0.0
        confirmed = self.confirmed_score / self.confirmed_start_score - 1 if self.confirmed_start_score else None
        if self.saved:
            what = f"saved this machine's policy to {self.path} ({confirmed:+.1%} on the held-out problems)"
        elif confirmed is not None:
            what = f"kept {self.start}: its best ({best:+.1%}) did not hold up measured again ({confirmed:+.1%})"
        elif self.best_score > self.start_score * (1 + MIN_GAIN):
            what = f"kept {self.start}: no time was left to confirm its best ({best:+.1%})"
        else:
            what = f"kept {self.start}: nothing beat it on the held-out problems"
        return (f"{what}; {self.steps} steps on {self.problems} problems ({self.recorded_problems} recorded here, "
                f"{self.held_out} held out), {self.measured} new measurements in {self.seconds:.0f} s"
                + ("; interrupted" if self.interrupted else ""))


def live_evaluator(store: ResultStore) -> Evaluator:
    """Measurements for training: ``store`` answers what it holds, the isolated runner the rest."""
    return Evaluator(LocalRunner(TUNE_MEASURE), store)


def choose_problems(recorded: Sequence, seed: int = 0) -> tuple[list[MatmulProblem], int]:
    """(training problems, how many of them have recordings): the recorded problems small enough to
    train on, most recorded first, topped up from the small generated mix to ``MIN_PROBLEMS``."""
    counts = Counter(r.problem_key for r in recorded if r.ok)
    problems = []
    for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        try:
            p = MatmulProblem.from_key(key)
        except (ProblemError, ValueError, KeyError, TypeError):
            continue
        if p.op == PLAIN and p.flops <= MAX_TRAIN_FLOPS:
            problems.append(p)
    problems = problems[:MAX_PROBLEMS]
    count = len(problems)
    if count < MIN_PROBLEMS:
        problems += generated_mix(MIN_PROBLEMS - count, seed=seed, exclude=problems, mix="small")
    return problems, count


def split_held_out(problems: Sequence[MatmulProblem]) -> tuple[list[MatmulProblem], list[MatmulProblem]]:
    """(train, held out): a quarter (2 to ``MAX_HELD_OUT``) held out, chosen by key hash, so a
    problem stays on its side from one run to the next."""
    order = sorted(problems, key=lambda p: hashlib.sha256(p.key().encode()).hexdigest())
    count = min(MAX_HELD_OUT, max(2, len(problems) // 4))
    held = order[:count]
    return [p for p in problems if p not in held], held


def heldout_pairs(policy: Policy, problems: Sequence[MatmulProblem]) -> list[tuple[MatmulProblem, LoopNest]]:
    """Each problem with ``policy``'s greedy rollout's end state, then with the analytic default."""
    pairs = []
    for p in problems:
        pairs += [(p, policy.rollout(p)[-1].nest), (p, default_schedule(p).nest)]
    return pairs


def score_of(results: Sequence) -> float:
    """The geometric mean of end state over default for results in ``heldout_pairs``' order (a
    failed end state: ``FAILED_RATIO``; a problem whose default failed does not count)."""
    logs = []
    for i in range(0, len(results), 2):
        end, default = gflops_of(results[i]), gflops_of(results[i + 1])
        if default is None:
            continue                 # nothing to compare against: the problem does not count
        logs.append(math.log(end / default if end is not None else FAILED_RATIO))
    return math.exp(sum(logs) / len(logs)) if logs else 0.0


def heldout_score(policy: Policy, problems: Sequence[MatmulProblem], evaluator: Evaluator) -> float:
    """Geometric mean over ``problems`` of the GFLOPS of ``policy``'s greedy rollout's end state over
    the analytic default's (``score_of``), measured in one batch through ``evaluator``'s memo."""
    return score_of(evaluator.evaluate(heldout_pairs(policy, problems)))


def confirmed_scores(start: Policy, winner: Policy, problems: Sequence[MatmulProblem],
                     evaluator: Evaluator) -> tuple[float, float]:
    """(start's, winner's) held-out scores measured once more, now and in one batch, past the memo
    (``Evaluator.remeasure``): every end state and default timed afresh, a schedule both policies
    end in timed once, so the problems where they agree count alike and only their differences,
    measured side by side, decide."""
    ends = {"start": heldout_pairs(start, problems), "winner": heldout_pairs(winner, problems)}
    unique: dict[tuple[str, str], tuple[MatmulProblem, LoopNest]] = {}
    for p, nest in ends["start"] + ends["winner"]:
        unique.setdefault((p.key(), canonical_key(nest)), (p, nest))
    measured = dict(zip(unique, evaluator.remeasure(list(unique.values()))))
    start_score, winner_score = (score_of([measured[(p.key(), canonical_key(nest))] for p, nest in ends[who]])
                                 for who in ("start", "winner"))
    return start_score, winner_score


def fine_tune_args(policy: Policy, budget_s: float, seed: int) -> dqn.Args:
    """DQN settings for fine-tuning ``policy``: its network and horizon, small exploration, a
    small replay buffer; ``total_steps`` only paces exploration (``dqn.train`` with a control, here
    ``BudgetControl``, trains until the control stops it, past ``total_steps`` if need be)."""
    config = policy.config
    return replace(dqn.Args(), seed=seed, total_steps=max(256, int(budget_s * 400)), max_steps=policy.max_steps,
                   arch=config["arch"], hidden=int(config["hidden"]), layers=int(config["layers"]),
                   buffer_size=4096, batch_size=32, gamma=float(policy.meta.get("gamma", 0.9)), lr=1e-4,
                   learning_starts=64, target_update=100, eps_start=0.2, eps_end=0.05)


class BudgetControl:
    """``dqn.TrainControl`` for a wall-clock budget: stops when what is left would not pay for
    another step, a last evaluation and the confirmation (a step at the longest seen so far, an
    evaluation at the longest seen or the start's scoring ``start_cost_s``, the confirmation at the
    start's; those two with ``RESERVE_SLACK``), scores the network every ``1 / EVALUATIONS`` of the
    budget, keeps the best."""

    def __init__(self, start: Policy, start_score: float, held_out: Sequence[MatmulProblem], evaluator: Evaluator,
                 deadline: float, budget_s: float, progress: Progress, clock: Callable[[], float],
                 start_cost_s: float = 0.0) -> None:
        self.start, self.held_out, self.evaluator = start, held_out, evaluator
        self.deadline, self.budget_s, self.progress, self.clock = deadline, budget_s, progress, clock
        self.start_score = start_score
        self.best_score, self.best_params = start_score, None
        self.interval_s = budget_s / EVALUATIONS
        self.next_eval = deadline - budget_s + self.interval_s
        self.eval_cost_s = start_cost_s          # a scoring costs what the start's did, until one is seen to cost more
        self.confirm_cost_s = start_cost_s       # as many timings, of kernels already built
        self.step_cost_s = 0.0
        self.evaluations = 0
        self.steps = 0
        self.last_step_end: Optional[float] = None
        self.evaluated_s = 0.0           # evaluation time since the last step ended

    def keep_going(self, step: int) -> bool:
        now = self.clock()
        if self.last_step_end is not None:
            self.step_cost_s = max(self.step_cost_s, now - self.last_step_end - self.evaluated_s)
        self.last_step_end, self.evaluated_s, self.steps = now, 0.0, step
        self.progress(1 - (self.deadline - now) / self.budget_s, f"best {self.best_score:.3f}")
        return self.can_train()

    def can_train(self) -> bool:
        """Whether what is left pays for another step, a last scoring and the confirmation."""
        return self.fits(self.step_cost_s + RESERVE_SLACK * (self.eval_cost_s + self.confirm_cost_s))

    def fits(self, seconds: float) -> bool:
        return self.clock() + seconds < self.deadline

    def evaluate_now(self, step: int) -> bool:
        if self.clock() < self.next_eval:
            return False
        self.next_eval = self.clock() + self.interval_s
        return True

    def evaluate(self, qnet, step: int) -> dict:
        if not self.fits(self.eval_cost_s + self.confirm_cost_s):     # the start's scoring ate the budget
            return {"kind": "eval", "skipped": "no time left", "best": self.best_score}
        t0 = self.clock()
        params = arrays_of(qnet)
        score = heldout_score(Policy(params, self.start.meta), self.held_out, self.evaluator)
        self.eval_cost_s = max(self.eval_cost_s, self.clock() - t0)
        self.evaluated_s += self.clock() - t0
        self.evaluations += 1
        if score > self.best_score:
            self.best_score, self.best_params = score, params
        return {"kind": "eval", "heldout_score": score, "best": self.best_score}

    def confirm(self) -> Optional[tuple[float, float]]:
        """The start's and the best's scores measured again (``confirmed_scores``), if the best beat
        the start by ``MIN_GAIN`` and the confirmation fits in the budget; else None."""
        if self.best_params is None or self.best_score <= self.start_score * (1 + MIN_GAIN) \
                or not self.fits(self.confirm_cost_s):
            return None
        self.progress(1 - (self.deadline - self.clock()) / self.budget_s, "measuring the best again")
        return confirmed_scores(self.start, Policy(self.best_params, self.start.meta), self.held_out, self.evaluator)


def finetune(budget_s: float, *, progress: Optional[Progress] = None, seed: int = 0,
             clock: Callable[[], float] = time.monotonic) -> TrainReport:
    """Fine-tune the policy in use on this machine's measurements for about ``budget_s`` seconds
    and save the result as this machine's policy if it beats the start (module docstring)."""
    t0 = clock()
    deadline = t0 + budget_s
    progress = progress or (lambda fraction, note: None)
    machine = MachineKey.current()
    path = machine_policy_path(machine)
    start = Policy.in_use()
    recordings = MachineRecordings.current(machine)
    recorded = recordings.results()
    problems, recorded_count = choose_problems(recorded, seed)
    train_set, held_out = split_held_out(problems)
    recorded_keys = {p.key() for p in problems[:recorded_count]}
    recorded_in_training = sum(p.key() in recorded_keys for p in train_set)
    evaluator = live_evaluator(ResultStore(recorded))      # training: the recordings answer, the rest is measured
    scoring = Evaluator(evaluator.runner, ResultStore())   # held out: measured here and now, never the recordings
    control: Optional[BudgetControl] = None
    confirmed: Optional[tuple[float, float]] = None
    interrupted = False
    try:
        with recording_live_measurements(recordings):
            try:
                progress(0.0, f"scoring {start.describe()}")
                scored_at = clock()
                start_score = heldout_score(start, held_out, scoring)
                control = BudgetControl(start, start_score, held_out, scoring, deadline, budget_s, progress, clock,
                                        start_cost_s=clock() - scored_at)
                if control.can_train():        # else scoring the start left too little to train and score again
                    net = net_from_arrays(start.p, start.config)
                    dqn.train(fine_tune_args(start, budget_s, seed), evaluator, train_set, start=net, control=control)
            except KeyboardInterrupt:
                interrupted = True
            if control is not None:
                confirmed = control.confirm()
    except KeyboardInterrupt:          # a second Ctrl-C, during the confirmation: nothing is saved
        interrupted = True
    finally:
        evaluator.close()
    measured = evaluator.stats.measured + scoring.stats.measured
    if control is None:            # interrupted before the starting policy was scored: nothing to keep
        return TrainReport(str(path), start.describe(), 0.0, 0.0, None, None, False, interrupted, clock() - t0, 0, 0,
                           len(train_set), recorded_in_training, len(held_out), measured)
    saved = confirmed is not None and confirmed[1] > confirmed[0] * (1 + MIN_GAIN)
    if saved:
        write_weights(path, control.best_params, machine_meta(start, machine, control, confirmed, clock() - t0))
    return TrainReport(str(path), start.describe(), control.start_score, control.best_score,
                       *(confirmed or (None, None)), saved, interrupted, clock() - t0, control.steps,
                       control.evaluations, len(train_set), recorded_in_training, len(held_out), measured)


def machine_meta(start: Policy, machine: MachineKey, control: BudgetControl, confirmed: tuple[float, float],
                 seconds: float) -> dict:
    """The saved policy's metadata: the start's (network, versions), the machine, how it was trained
    (``heldout_score`` and ``start_score``: the confirmation's, measured side by side)."""
    base = str(start.meta.get("base", start.name))      # a machine policy trained again keeps its base's name
    return {**start.meta, "name": f"{base}+{machine.isa}-{datetime.date.today():%Y%m%d}",
            "machine": policy_identity(machine), "base": base,
            "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "heldout_score": confirmed[1], "start_score": confirmed[0], "best_scored": control.best_score,
            "finetune": {"seconds": round(seconds, 1), "steps": control.steps, "evaluations": control.evaluations}}
