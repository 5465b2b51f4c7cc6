"""NetAdapt: shrink the model step by step against a budget, one group per step.

Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications", ECCV 2018. Each iteration `i` lowers the budget by a step of
the original cost, `step * decay**i`:

1. for every group (every *unit*: groups with the same producer layers move
   together, see `kprune.search.core`), the smallest additional removal in
   that group alone whose estimated cost (`budget`'s estimate, no surgery) is
   within the iteration's goal; groups that cannot reach the goal alone make
   no proposal, as in the paper, and when no group can, the iteration's step
   is halved until one can;
2. every proposal is pruned (lowest `criterion` scores first), fine-tuned
   briefly (`finetune`) and scored (`evaluate`);
3. the best-scoring proposal is kept, and the next iteration starts from it:
   from its fine-tuned weights when there is a `finetune`, so short
   fine-tunes add up as in the paper;

until the measured cost of the kept model is within the budget (a measured
latency above the target while the estimate is within it is timed twice
more, and the smallest time kept: noise only adds time). An optional
`long_finetune` then tunes the result.

Unreachable budgets: for MACs and parameters, whose estimates are exact,
when even every group at the most the guards allow (`max_ratio`,
`min_channels`, `round_to`, `exclude`, groups blocked by layers kprune
cannot prune through) keeps more than the target, `netadapt` raises a
`KprunError` naming why, before any evaluation. A latency estimate is a
prediction from per-layer tables and may be off either way, so a latency
budget is judged on measurements only: once no group can give more
channels while the measured latency is still above the target, the search
stops with a `KprunWarning` and returns the smallest model it reached, with
`met=False`.

Example:

>>> result = kprune.search.netadapt(model, evaluate=val_accuracy,
...                                 budget=kprune.search.latency(0.5),
...                                 finetune=short_finetune)
>>> small = result.model
>>> same_widths = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
"""

from __future__ import annotations

import warnings
from typing import Callable

import keras
import numpy as np

from kprune.errors import KprunError, KprunWarning
from kprune.search.budget import Budget, check_budget
from kprune.search.core import Search, SearchResult, make_search
from kprune.surgeon import copy_model


def _check_step(step, decay) -> None:
    if isinstance(step, bool) or not isinstance(step, (int, float, np.number)) \
            or not 0.0 < step < 1.0:
        raise KprunError(f"`step` is the share of the original budget removed per iteration, "
                         f"in (0, 1); got {step!r}.")
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.number)) \
            or not 0.0 < decay <= 1.0:
        raise KprunError(f"`decay` multiplies the step after every iteration, in (0, 1]; "
                         f"got {decay!r}.")


class _NetAdapt:
    def __init__(self, search: Search, step: float, decay: float, long_finetune):
        self.search, self.step, self.decay = search, float(step), float(decay)
        self.long_finetune = long_finetune
        self.target = search.bound.target
        self.ratios: dict = {}
        self.state = search.origin
        self.best = None  # (Trial, model) of the last accepted candidate
        self.pending: list = []
        self.met, self.warning = False, ""

    # Proposals ------------------------------------------------------------------------
    def _points(self, rep: int) -> list:
        now = self.ratios.get(rep, 0.0)
        return [p for p in self.search.points(rep) if p > now]

    def _estimate(self, rep: int, ratio: float) -> float:
        s = self.search
        return s.estimate(s.with_unit(self.ratios, rep, ratio))

    def _proposal(self, rep: int, goal: float) -> dict:
        """Unit `rep`'s smallest removal whose estimate is within `goal` (it has one)."""
        s = self.search
        pts = self._points(rep)
        lo, hi = -1, len(pts) - 1  # est(lo) > goal (lo = -1: the current plan), est(hi) <= goal
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._estimate(rep, pts[mid]) <= goal:
                hi = mid
            else:
                lo = mid
        counts = s.counts(s.with_unit(self.ratios, rep, pts[hi]))
        while hi > 0 and s.counts(s.with_unit(self.ratios, rep, pts[hi - 1])) == counts:
            hi -= 1  # the smallest ratio of these widths, for a readable config list
        return s.with_unit(self.ratios, rep, pts[hi])

    def proposals(self, goal: float, current: float) -> tuple:
        """`([(ratios, unit)], goal)`: a proposal of every unit that can reach `goal` alone.

        When none can, the step is halved until one can; no proposal at all
        means no unit can lower the estimate any more.
        """
        reach = {}
        for rep in self.search.units:
            pts = self._points(rep)
            if pts:
                lowest = self._estimate(rep, pts[-1])
                if lowest < current - 1e-12:
                    reach[rep] = lowest
        if not reach:
            return [], goal
        while goal < min(reach.values()) - 1e-12:
            goal = current - (current - goal) / 2
        return [(self._proposal(rep, goal), rep) for rep, low in reach.items()
                if low <= goal + 1e-12], goal

    # The loop ---------------------------------------------------------------------------
    def accept(self, pair) -> None:
        record, model = pair
        record.accepted = True
        self.best, self.ratios = pair, dict(record.ratios)
        if self.search.finetune_fn is not None:
            self.state = self.search.state_of(model, self.ratios)

    def loop(self) -> None:
        s = self.search
        if s.bound.met(s.bound.measure(s.model)):
            self.accept(s.trial({}, step=0, tune=False))
            self.met = True
            return
        i = 0
        while True:
            current = s.estimate(self.ratios)
            goal = current - self.step * self.decay ** i
            if current > self.target:
                goal = max(goal, self.target)
            self.pending = []
            candidates, goal = self.proposals(goal, current)
            if not candidates:
                measured = self.best[0].measured if self.best else 1.0
                self.warning = (f"kprune: netadapt stopped at {measured:.1%} of the "
                                f"{s.budget.kind} (target {self.target:.1%}): the guards let no "
                                "group give more channels.")
                return
            if s.verbose == 2:
                print(f"netadapt: iteration {i}, estimated {current:.3f} -> goal {goal:.3f}, "
                      f"{len(candidates)} proposals")
            s.run_trials(candidates, self.state, step=i, done=self.pending)
            self.accept(max(self.pending, key=lambda p: (p[0].score, -(p[0].measured or 0.0))))
            self.pending = []
            if s.verbose == 2:
                rec = self.best[0]
                print(f"netadapt: kept group {rec.group} ({s.label(rec.group)}): score "
                      f"{rec.score:.4f}, budget {rec.measured:.3f}")
            self._confirm()
            if s.bound.met(self.best[0].measured):
                self.met = True
                return
            i += 1

    def _confirm(self, repeats: int = 2) -> None:
        """A measured latency above the target while the estimate is within it: time it again.

        Timing noise only adds time, so the smallest of the measurements is kept.
        """
        s = self.search
        record, model = self.best
        if s.budget.kind != "latency" or s.bound.met(record.measured) \
                or not s.bound.met(record.estimated):
            return
        record.measured = min([record.measured] + [s.bound.measure(model) for _ in range(repeats)])

    def final(self) -> None:
        if self.long_finetune is None or self.best is None or not self.met:
            return
        self.best = self.search.long_finetune(*self.best, self.long_finetune)

    def run(self) -> SearchResult:
        s = self.search
        with s.running():
            self.loop()
        if s.stopped and self.pending:  # stopped inside an iteration: keep its best so far
            self.accept(max(self.pending, key=lambda p: (p[0].score, -(p[0].measured or 0.0))))
            self.met = s.bound.met(self.best[0].measured)
        if self.warning:
            warnings.warn(self.warning, KprunWarning, stacklevel=3)
        if not s.stopped:
            with s.running():
                self.final()
        if self.best is None:  # stopped before any trial finished
            return s.result(copy_model(s.model), {}, None, s.bound.measure(s.model),
                            met=False)
        record, model = self.best
        return s.result(model, self.ratios, record.score, record.measured,
                        met=s.bound.met(record.measured),
                        reason="budget met" if self.met else self.warning)


def netadapt(model: keras.Model, evaluate: Callable, budget: Budget,
             finetune: Callable | None = None, *, step: float = 0.05, decay: float = 1.0,
             long_finetune: Callable | None = None, criterion="l1", exclude=(),
             max_ratio: float = 0.9, min_channels: int = 1, round_to: int = 1, data=None,
             loss=None, reduce: str = "mean", seed: int | None = None, batch_size: int = 32,
             max_trials: int | None = None, time_limit: float | None = None,
             verbose: int = 1, approximate: bool = True) -> SearchResult:
    """Per-group ratios for `budget`, one group a step, as NetAdapt chooses them.

    Args:
        model: A functional or Sequential Keras model (left untouched).
        evaluate: `evaluate(model) -> float`, higher is better.
        budget: `kprune.search.macs(t)`, `params(t)` or `latency(t, ...)`.
        finetune: Optional short fine-tune of every proposal,
            `finetune(model) -> model or None` (None: tuned in place). With it,
            each iteration starts from the previous one's tuned model.
        step: Share of the original cost removed per iteration, in (0, 1).
        decay: The step is multiplied by `decay` after every iteration
            (NetAdapt's shrinking resource schedule; 1: a constant step).
        long_finetune: Optional fine-tune of the final model (same contract
            as `finetune`); skipped when the search is stopped.
        criterion: Which channels of a group go first (`kprune.criteria`).
        exclude, max_ratio, min_channels, round_to: Groups to keep whole and
            the guards, as in `kprune.prune`.
        data, loss, reduce, seed, batch_size: As in `kprune.prune`.
        max_trials: Stop after this many evaluations.
        time_limit: Start no evaluation after this many seconds.
        verbose: 1 a progress bar, 2 a line per iteration, 0 silent.
        approximate: As in `kprune.prune`.

    Returns:
        A `SearchResult`. Ctrl-C, `max_trials` and `time_limit` return the
        best so far (the last kept proposal, or the best of the unfinished
        iteration) with `stopped=True`.

    Raises:
        KprunError: for invalid arguments, and when the guards and blocked
            groups make a MACs or params budget unreachable (the message says
            which). A latency budget out of reach ends with a `KprunWarning`.

    Example:

    >>> result = netadapt(model, evaluate, kprune.search.macs(0.5), step=0.1)
    >>> result.budget <= 0.5
    True
    """
    check_budget(budget)
    _check_step(step, decay)
    search = make_search(model, evaluate, budget, finetune, long_finetune, seed, verbose,
                         {"criterion": criterion, "exclude": exclude, "max_ratio": max_ratio,
                          "min_channels": min_channels, "round_to": round_to, "data": data,
                          "loss": loss, "reduce": reduce, "batch_size": batch_size,
                          "max_trials": max_trials, "time_limit": time_limit,
                          "approximate": approximate})
    return _NetAdapt(search, step, decay, long_finetune).run()


__all__ = ["netadapt"]
