"""Within one ``tune()``: do the policy's proposals win, or does the rest of the search?

``tune()`` spends its budget on two kinds of candidates: the policy's (its greedy rollout and
beam, and the hill-climb's neighbours taken in the policy's Q-value order) and the search's
(the analytic default, templates, database seeds and the hill-climb's one-factor mutations).
On a machine unlike the one the policy was trained on, the policy's candidates can keep losing;
then the rest of the budget should go to what wins.  The rule, deterministic for a given
sequence of measured batches (as a replay of recorded timings gives):

* a measured batch that holds candidates of both kinds is a *contest*: the kind whose best
  candidate measured the higher GFLOPS wins it (a failed candidate counts as 0 GFLOPS; equal
  bests, failures on both sides included, are no contest);
* once the policy has lost ``LOSSES_TO_YIELD`` contests and won fewer than a third of those
  held (``wins * 3 < contests``), it is *set aside* for the rest of the run: ``tune()`` goes on
  as ``--policy none`` does (neighbours in a seeded random order, the whole neighbourhood, no
  beam widening), so every later batch is the search's.

    contest = PolicyContest()
    contest.score(["policy", "search", "search"], [41.0, 55.0, None])
    contest.set_aside, contest.wins, contest.losses
"""
from __future__ import annotations

from typing import Optional, Sequence

POLICY = "policy"           # a candidate the policy proposed (rollout, beam, Q-ranked neighbour)
SEARCH = "search"           # anything else tune() proposed (default, template, database, mutation)
LOSSES_TO_YIELD = 3         # contests the policy must lose before it can be set aside


class PolicyContest:
    """The running score of the policy's candidates against the search's, batch by batch."""

    def __init__(self, losses_to_yield: int = LOSSES_TO_YIELD) -> None:
        self.losses_to_yield = losses_to_yield
        self.wins = 0
        self.losses = 0
        self.batches = 0                       # measured batches scored (contested or not)
        self.set_aside_at: Optional[int] = None   # the batch (1-based) after which the policy yielded

    @property
    def contests(self) -> int:
        return self.wins + self.losses

    @property
    def set_aside(self) -> bool:
        return self.set_aside_at is not None

    def score(self, kinds: Sequence[str], gflops: Sequence[Optional[float]]) -> None:
        """Score one measured batch: ``kinds[i]`` (POLICY or SEARCH) proposed the candidate that
        measured ``gflops[i]`` (None: it failed)."""
        self.batches += 1
        if self.set_aside:
            return
        best = {POLICY: None, SEARCH: None}
        for kind, g in zip(kinds, gflops):
            value = g or 0.0
            if best[kind] is None or value > best[kind]:
                best[kind] = value
        if best[POLICY] is None or best[SEARCH] is None or best[POLICY] == best[SEARCH]:
            return
        if best[POLICY] > best[SEARCH]:
            self.wins += 1
        else:
            self.losses += 1
        if self.losses >= self.losses_to_yield and self.wins * 3 < self.contests:
            self.set_aside_at = self.batches

    def describe(self) -> str:
        """One line for reports: the score, and whether the policy was set aside."""
        text = f"policy won {self.wins} of {self.contests} contested batches"
        if self.set_aside:
            text += f"; set aside after batch {self.set_aside_at}"
        return text
