"""Sensitivity analysis: every group pruned alone at every ratio, and scored.

The classic first look at a model (Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017): each prunable group (each *unit*, see
`kprune.search.core`) is pruned on its own at each ratio, the rest of the
model left whole, and the pruned model is scored with `evaluate`
(optionally after `finetune`). The table says how much each group can lose;
`ratios_for(max_drop)` turns it into per-group ratios and `config_list` into
the NNI-style list `kprune.prune` takes.

Ratios that the guards turn into the same number of channels share one
evaluation, and a ratio that removes nothing scores the baseline.

Example:

>>> sens = kprune.search.sensitivity(model, evaluate=val_accuracy, ratios=(0.25, 0.5, 0.75))
>>> print(sens)
>>> small = kprune.prune(model, config_list=sens.config_list(max_drop=0.01))
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.search.budget import Budget
from kprune.search.core import Search

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass
class SensitivityResult:
    """Scores of the model with each group pruned alone.

    Attributes:
        table: `{group id: {ratio: score}}`; groups with the same producer
            layers share one row. A search stopped early leaves rows short.
        baseline: The score of the unpruned model (None if stopped before it).
        ratios: The ratios tried, ascending.
        labels: `{group id: 'first producer (+n coupled)'}`.
        sizes: `{group id: channels}`.
        history: One `Trial` per evaluation (the baseline first).
        stopped: True when interrupted or stopped by `max_trials`/`time_limit`.
        reason: Why it stopped.
        prune_kwargs: Criterion and guards to pass to `kprune.prune` with
            `config_list(...)`.
    """

    table: dict
    baseline: float | None
    ratios: tuple
    labels: dict
    sizes: dict
    history: list
    stopped: bool = False
    reason: str = ""
    prune_kwargs: dict = dataclasses.field(default_factory=dict)
    search: Search | None = dataclasses.field(default=None, repr=False, compare=False)

    def drops(self) -> dict:
        """`{group id: {ratio: baseline - score}}`."""
        base = self._baseline()
        return {gid: {r: base - s for r, s in row.items()} for gid, row in self.table.items()}

    def _baseline(self) -> float:
        if self.baseline is None:
            raise KprunError("The sensitivity analysis stopped before scoring the unpruned model; "
                             "there is no baseline to compare with.")
        return self.baseline

    def ratios_for(self, max_drop: float) -> dict:
        """Per group, the largest ratio whose score drop is within `max_drop`.

        A ratio counts only when every smaller ratio of the row is within
        `max_drop` too, so a noisy score past the first failing ratio does
        not pick a larger ratio.

        Args:
            max_drop: Largest allowed `baseline - score`, in the evaluator's
                units (0.01 is one point of accuracy), >= 0.

        Returns:
            `{group id: ratio}`; groups that can lose nothing are left out.
        """
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float, np.number)) \
                or not max_drop >= 0:
            raise KprunError(f"`max_drop` must be a number >= 0, got {max_drop!r}.")
        base = self._baseline()
        out = {}
        for gid, row in self.table.items():
            best = 0.0
            for r in self.ratios:
                if r not in row or base - row[r] > max_drop + 1e-12:
                    break
                best = r
            if best > 0:
                out[gid] = best
        return out

    def config_list(self, max_drop: float) -> list:
        """`ratios_for(max_drop)` as an NNI-style config list for `kprune.prune`.

        Example:

        >>> small = kprune.prune(model, config_list=sens.config_list(0.01), **sens.prune_kwargs)
        """
        ratios = self.ratios_for(max_drop)
        if self.search is None:
            raise KprunError("This SensitivityResult has no search to name its layers.")
        return self.search.config_list(ratios)

    def __str__(self) -> str:
        base = "-" if self.baseline is None else f"{self.baseline:.4f}"
        head = (f"{'group':>5}  {'layer':<34}{'size':>6}"
                + "".join(f"{r:>8.2f}" for r in self.ratios))
        lines = [f"Sensitivity: score with each group pruned alone (baseline {base})", head,
                 "-" * len(head)]
        shown = set()
        for gid, row in self.table.items():
            if id(row) in shown:
                continue
            shown.add(id(row))
            cells = "".join(f"{row[r]:>8.4f}" if r in row else f"{'-':>8}" for r in self.ratios)
            lines.append(f"{gid:>5}  {self.labels[gid][:33]:<34}{self.sizes[gid]:>6}{cells}")
        if self.stopped:
            lines.append(f"(stopped: {self.reason})")
        return "\n".join(lines)


def _check_ratios(ratios) -> tuple:
    try:
        values = [r for r in ratios]
    except TypeError:
        raise KprunError(f"`ratios` must be a list of shares in (0, 1), got {ratios!r}.") from None
    if not values or any(isinstance(r, bool) or not isinstance(r, (int, float, np.number))
                         or not 0.0 < r < 1.0 for r in values):
        raise KprunError(f"`ratios` must be a non-empty list of shares in (0, 1), got {ratios!r}.")
    return tuple(sorted({float(r) for r in values}))


def sensitivity(model: keras.Model, evaluate: Callable, ratios: Sequence[float] = DEFAULT_RATIOS,
                *, finetune: Callable | None = None, budget: Budget | None = None,
                criterion="l1", exclude=(), max_ratio: float = 0.9, min_channels: int = 1,
                round_to: int = 1, data=None, loss=None, reduce: str = "mean",
                seed: int | None = None, batch_size: int = 32, max_trials: int | None = None,
                time_limit: float | None = None, verbose: int = 1,
                approximate: bool = True) -> SensitivityResult:
    """Score the model with each group pruned alone at each of `ratios`.

    Args:
        model: A functional or Sequential Keras model (left untouched).
        evaluate: `evaluate(model) -> float`, higher is better.
        ratios: Shares of each group's channels to drop, in (0, 1).
        finetune: Optional `finetune(model) -> model or None` before each evaluation.
        budget: Optional `Budget`: each trial then records its estimated and
            measured share.
        criterion: Which channels of a group go first (`kprune.criteria`).
        exclude, max_ratio, min_channels, round_to: As in `kprune.prune`.
        data, loss, reduce, seed, batch_size: As in `kprune.prune`.
        max_trials: Stop after this many evaluations (the baseline counts).
        time_limit: Start no evaluation after this many seconds.
        verbose: 1 a progress bar, 2 a line per group, 0 silent.
        approximate: As in `kprune.prune`.

    Returns:
        A `SensitivityResult`; Ctrl-C, `max_trials` and `time_limit` return
        the rows scored so far with `stopped=True`.

    Example:

    >>> sens = sensitivity(model, evaluate, ratios=(0.3, 0.6))
    >>> sens.ratios_for(max_drop=0.02)
    {1: 0.6, 2: 0.3}
    """
    ratios = _check_ratios(ratios)
    search = Search(model, evaluate, budget, finetune=finetune, criterion=criterion,
                    exclude=exclude, max_ratio=max_ratio, min_channels=min_channels,
                    round_to=round_to, data=data, loss=loss, reduce=reduce, seed=seed,
                    batch_size=batch_size, max_trials=max_trials, time_limit=time_limit,
                    verbose=verbose, approximate=approximate)
    planned = 1 + len(search.units) * len(ratios)
    search.progress(planned if max_trials is None else min(planned, max_trials))
    table: dict = {}
    baseline = None
    with search.running():
        baseline = search.trial({}, step="baseline", tune=False)[0].score
        for rep, gids in search.units.items():
            row: dict = {}
            for gid in gids:
                table[gid] = row
            seen: dict = {}
            for i, r in enumerate(ratios):
                candidate = search.with_unit({}, rep, r)
                key = tuple(sorted(search.counts(candidate).items()))
                if not key:
                    row[r] = baseline
                elif key in seen:
                    row[r] = seen[key]
                else:
                    row[r] = seen[key] = search.trial(candidate, step=i, group=rep)[0].score
            if verbose == 2:
                print(f"sensitivity: {search.label(rep)}: "
                      + ", ".join(f"{r:g}: {s:.4f}" for r, s in row.items()))
    return SensitivityResult(table=table, baseline=baseline, ratios=ratios,
                             labels={g.id: search.label(g.id) for g in search.groups},
                             sizes={g.id: g.size for g in search.groups},
                             history=list(search.history), stopped=search.stopped,
                             reason=search.reason, prune_kwargs=search.prune_kwargs,
                             search=search)


__all__ = ["DEFAULT_RATIOS", "SensitivityResult", "sensitivity"]
