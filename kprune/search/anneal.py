"""Simulated annealing over per-group sparsity distributions that meet a budget.

As NNI 2.x's `SimulatedAnnealingPruner` (after Kirkpatrick et al., 1983, used
by AutoCompress, Liu et al., AAAI 2020), on the search core
(`kprune.search.core.Search`): groups are the core's *units* (groups with
the same producer layers move together).

1. Start: random ratios, sorted so that units with more weights (their
   producers' parameters) take the larger ones, then scaled by one factor
   until the budget's estimate is met (the smallest factor that meets it,
   each ratio capped at `max_ratio`).
2. Each temperature `T` (from `start_temperature`, times `cool_down_rate`
   each step, while above `stop_temperature`): perturb the current ratios by
   uniform noise of `perturbation_magnitude * T / start_temperature`, sort
   and scale them to the budget again, prune (lowest `criterion` scores
   first), fine-tune (optional `finetune`), score with `evaluate`.
3. Accept the candidate as the new current one if it scores higher, else with
   probability `exp(delta / T)` (`delta` = candidate score - current score,
   negative): `acceptance_probability`.

The best candidate within the budget is returned (optionally after
`long_finetune`). Temperatures are in units of the score: with NNI's
defaults (100 to 20) and an accuracy in [0, 1] nearly every candidate is
accepted and the walk is close to random; start near the score differences
you expect (0.05 for accuracy) to make it selective.

A latency budget is met on estimates from per-layer tables; later
candidates aim at the target divided by how far the measurements of the
trials so far exceeded their estimates (`Search.calibrated`). After the
walk, `refine` trials give back what the best candidate left of the budget
(`Search.refine`), so the result lands close under the target.

Example:

>>> result = kprune.search.simulated_annealing(model, val_accuracy, kprune.search.macs(0.5),
...                                            start_temperature=0.05, stop_temperature=0.005,
...                                            seed=0)
>>> again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import keras
import numpy as np

from kprune.errors import KprunWarning
from kprune.search.budget import Budget, check_budget
from kprune.search.core import Search, SearchResult, check_number, make_search
from kprune.surgeon import copy_model


def acceptance_probability(delta: float, temperature: float) -> float:
    """The annealing rule: 1 when the candidate is not worse, else `exp(delta / temperature)`.

    Args:
        delta: Candidate score minus the current score (higher is better).
        temperature: The current temperature, > 0.

    Example:

    >>> acceptance_probability(-0.1, 0.2)  # exp(-0.5)
    0.6065...
    """
    check_number("temperature", temperature, 0, None, low_open=True)
    return 1.0 if delta >= 0 else math.exp(delta / temperature)


def check_annealing(start_temperature, stop_temperature, cool_down_rate,
                    perturbation_magnitude) -> None:
    """Raise a `KprunError` naming the first annealing argument out of its range.

    Example:

    >>> check_annealing(100.0, 20.0, 1.5, 0.35)
    Traceback (most recent call last):
    KprunError: `cool_down_rate` must be a number in (0, 1); got 1.5.
    """
    check_number("start_temperature", start_temperature, 0, None, low_open=True)
    check_number("stop_temperature", stop_temperature, 0, start_temperature, low_open=True,
                 high_open=True, what="below start_temperature")
    check_number("cool_down_rate", cool_down_rate, 0, 1, low_open=True, high_open=True)
    check_number("perturbation_magnitude", perturbation_magnitude, 0, 1, low_open=True)


def unit_weights(search: Search) -> dict:
    """`{unit: weights}`: parameters of the producer layers of every group of a unit.

    Example:

    >>> unit_weights(Search(model, evaluate, kprune.search.macs(0.5), verbose=0))
    {1: 216, 2: 864, 3: 1728}
    """
    out = {}
    for rep, gids in search.units.items():
        layers = {id(m.layer): m.layer for gid in gids for m in search.graph.groups[gid].producers}
        out[rep] = sum(layer.count_params() for layer in layers.values())
    return out


class Distribution:
    """Ratios of a search's units, ordered by weights and scaled to a budget goal.

    Args:
        search: The `Search`.

    Example:

    >>> dist = Distribution(search)
    >>> values = dist.scaled(dist.sorted(np.random.default_rng(0).uniform(size=3)), 0.5)
    >>> search.estimate(dist.ratios(values)) <= 0.5
    True
    """

    def __init__(self, search: Search):
        self.search = search
        self.reps = list(search.units)
        weights = unit_weights(search)
        self.order = sorted(self.reps, key=lambda rep: (weights[rep], rep))  # fewest first
        guard = search.guards["max_ratio"]
        self.cap = np.array([min(guard, r) for r in
                             (search.max_ratios()[rep] for rep in self.reps)])

    def ratios(self, values) -> dict:
        """`{group id: ratio}` of per-unit `values` (in `self.reps` order)."""
        out: dict = {}
        for rep, value in zip(self.reps, values):
            for gid in self.search.units[rep]:
                out[gid] = float(value)
        return {gid: r for gid, r in out.items() if r > 0}

    def sorted(self, values) -> np.ndarray:
        """`values` rearranged so that units with more weights take the larger ones."""
        ranked = np.sort(np.asarray(values, dtype=float))
        out = np.zeros(len(self.reps))
        for value, rep in zip(ranked, self.order):
            out[self.reps.index(rep)] = value
        return out

    def scaled(self, values, goal: float, steps: int = 40) -> np.ndarray:
        """The smallest scaling of `values` (capped) whose estimate is within `goal`.

        Values all zero are replaced by ones (a uniform distribution). When
        even the caps keep more than `goal`, the caps are returned. The
        bisection runs between 0 and the factor that brings the last unit
        with a positive value to its cap (units at zero stay whole at any
        factor), so its `steps` halvings resolve the factor finely.
        """
        values = np.maximum(np.asarray(values, dtype=float), 0.0)
        if not values.any():
            values = np.ones(len(values))

        def at(s):
            return np.minimum(s * values, self.cap)

        def est(s):
            return self.search.estimate(self.ratios(np.round(at(s), 6)))

        if est(0.0) <= goal + 1e-12:
            return at(0.0)
        moving = values > 0
        hi = float(np.max(self.cap[moving] / values[moving]))
        if est(hi) > goal + 1e-12:
            return at(hi)
        lo = 0.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            if est(mid) <= goal + 1e-12:
                hi = mid
            else:
                lo = mid
        return np.round(at(hi), 6)


class _Annealing:
    def __init__(self, search: Search, start_temperature, stop_temperature, cool_down_rate,
                 perturbation_magnitude, long_finetune, rng, refine=2):
        self.search, self.rng, self.refine = search, rng, refine
        self.t0, self.t_stop = float(start_temperature), float(stop_temperature)
        self.rate, self.magnitude = float(cool_down_rate), float(perturbation_magnitude)
        self.long_finetune = long_finetune
        self.dist = Distribution(search)
        self.goal = search.bound.target
        self.best = None
        self.current = None  # (values, score)

    def steps(self) -> int:
        """How many temperatures the schedule visits after the start."""
        n, t = 0, self.t0
        while t > self.t_stop:
            n, t = n + 1, t * self.rate
        return n

    def evaluate(self, values, step, temperature) -> tuple:
        s = self.search
        values = self.dist.scaled(self.dist.sorted(values), self.goal)
        record, model = s.trial(self.dist.ratios(values), step=step)
        self.goal = s.calibrated()
        self.best = s.best([p for p in (self.best, (record, model)) if p is not None])
        if s.verbose == 2:
            print(f"annealing: step {step}, T {temperature:.4g}: score {record.score:.4f}, "
                  f"budget {record.measured:.3f}")
        return values, record

    def loop(self) -> None:
        s = self.search
        values, record = self.evaluate(self.rng.uniform(0.0, 1.0, len(self.dist.reps)), 0,
                                       self.t0)
        record.accepted = True
        self.current = (values, record.score)
        t, step = self.t0, 1
        while t > self.t_stop:
            magnitude = self.magnitude * t / self.t0
            noise = self.rng.uniform(-magnitude, magnitude, len(values))
            candidate, record = self.evaluate(np.clip(self.current[0] + noise, 0.0, None),
                                              step, t)
            p = acceptance_probability(record.score - self.current[1], t)
            if p >= 1.0 or self.rng.uniform() < p:
                record.accepted = True
                self.current = (candidate, record.score)
            t, step = t * self.rate, step + 1
        self.best = s.refine(self.best, self.refine)
        if self.long_finetune is not None and s.bound.met(self.best[0].measured):
            self.best = s.long_finetune(*self.best, self.long_finetune)

    def run(self) -> SearchResult:
        s = self.search
        s.progress(self.steps() + 1 + self.refine + (self.long_finetune is not None))
        with s.running():
            self.loop()
        return finish(s, self.best, "annealing")


def finish(search: Search, best, name: str) -> SearchResult:
    """The `SearchResult` of a strategy whose best `(Trial, model)` is `best` (or None)."""
    if best is None:  # stopped before any trial finished
        return search.result(copy_model(search.model), {}, None, search.bound.measure(search.model),
                             met=False)
    record, model = best
    met = search.bound.met(record.measured)
    reason = "done" if met else (f"kprune: {name} found no candidate within "
                                 f"{search.budget.describe()} (the best kept "
                                 f"{record.measured:.1%})")
    if not met and not search.stopped:
        warnings.warn(reason, KprunWarning, stacklevel=3)
    return search.result(model, record.ratios, record.score, record.measured, met=met,
                         reason=reason)


def simulated_annealing(model: keras.Model, evaluate: Callable, budget: Budget,
                        finetune: Callable | None = None, *, start_temperature: float = 100.0,
                        stop_temperature: float = 20.0, cool_down_rate: float = 0.9,
                        perturbation_magnitude: float = 0.35,
                        long_finetune: Callable | None = None, refine: int = 2,
                        seed: int | None = None, verbose: int = 1, **options) -> SearchResult:
    """Per-group ratios for `budget`, chosen by simulated annealing (NNI 2.x's rule).

    Args:
        model: A functional or Sequential Keras model (left untouched).
        evaluate: `evaluate(model) -> float`, higher is better.
        budget: `kprune.search.macs(t)`, `params(t)` or `latency(t, ...)`.
        finetune: Optional fine-tune of every candidate, `finetune(model) ->
            model or None` (None: tuned in place).
        start_temperature: First temperature, > 0 (in units of the score).
        stop_temperature: The walk ends once the temperature is at or below
            it, in (0, start_temperature).
        cool_down_rate: The temperature is multiplied by it each step, in (0, 1).
        perturbation_magnitude: Largest change of one ratio at the start
            temperature (it shrinks with the temperature), in (0, 1].
        long_finetune: Optional fine-tune of the best candidate at the end.
        refine: Most trials spent after the walk giving back what the best
            candidate left of the budget (`Search.refine`; 0: none).
        seed: Seed of the random ratios, perturbations and acceptances (and
            of data criteria); the same seed gives the same search.
        verbose: 1 a progress bar, 2 a line per step, 0 silent.
        **options: Other keywords of `kprune.search.core.Search`: criterion,
            exclude, max_ratio, min_channels, round_to, data, loss, reduce,
            batch_size, max_trials, time_limit, approximate.

    Returns:
        A `SearchResult`: the best candidate within the budget. Ctrl-C,
        `max_trials` and `time_limit` return the best so far with
        `stopped=True`.

    Raises:
        KprunError: for an argument out of range (the message names it and
            the range), and for a MACs or params budget the guards cannot reach.

    Example:

    >>> result = simulated_annealing(model, evaluate, kprune.search.macs(0.5),
    ...                              start_temperature=0.05, stop_temperature=0.01, seed=0)
    >>> result.budget <= 0.5
    True
    """
    check_budget(budget)
    check_annealing(start_temperature, stop_temperature, cool_down_rate, perturbation_magnitude)
    refine = check_number("refine", refine, 0, None, integer=True)
    search = make_search(model, evaluate, budget, finetune, long_finetune, seed, verbose, options)
    return _Annealing(search, start_temperature, stop_temperature, cool_down_rate,
                      perturbation_magnitude, long_finetune, np.random.default_rng(seed),
                      refine).run()


__all__ = ["Distribution", "acceptance_probability", "check_annealing", "finish",
           "simulated_annealing", "unit_weights"]
