"""AutoCompress: annealing chooses the ratios, ADMM trains toward them, then the cut.

Liu et al., "AutoCompress: An Automatic DNN Structured Pruning Framework for
Ultra-High Compression Rates", AAAI 2020, with NNI's arguments
(`num_iterations`, `admm_num_iterations`, `admm_training_epochs`, `rho`).
Each of `num_iterations` outer iterations takes the next share of the
budget (the model keeps `target ** ((i + 1) / num_iterations)` of the
original cost after iteration `i`, a geometric schedule as NNI's):

1. `kprune.search.simulated_annealing` chooses per-group ratios on the
   current model for that share (candidates pruned by `criterion`, scored
   by `evaluate`, optionally after `finetune`);
2. the current model trains `admm_num_iterations * admm_training_epochs`
   epochs on `train_data` with ADMM (`kprune.train.admm.ADMMRule` in a
   `RuleOptimizer`, `ADMMUpdate` every `admm_training_epochs` epochs):
   its weights are pulled toward the structured-sparse set of the chosen
   widths;
3. the channels outside the ADMM projection are removed for real
   (`kprune.apply_plan`), and the next iteration starts from that model.

An optional `long_finetune` tunes the final model. The result is a
`kprune.search.SearchResult` against the original model: its `ratios` and
`config_list` give the final widths (`kprune.prune(model, config_list=...)`
makes a model of the same widths, not the ADMM-chosen channels), its
`history` holds every annealing trial (step `(iteration, annealing step)`)
and one record per iteration (step `'admm i'`, the pruned model's score).

Example:

>>> result = kprune.autocompress(model, val_accuracy, kprune.search.macs(0.3),
...                              train_data=(x, y), loss="sparse_categorical_crossentropy",
...                              num_iterations=3, admm_num_iterations=5,
...                              admm_training_epochs=1, seed=0)
>>> small = result.model
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import keras

from kprune.errors import KprunError
from kprune.graph import DependencyGraph
from kprune.search.anneal import check_annealing, simulated_annealing
from kprune.search.budget import Budget, check_budget
from kprune.search.core import SearchResult, Trial, check_number, make_search
from kprune.surgeon import apply_plan, copy_model
from kprune.train.admm import ADMMRule, ADMMUpdate
from kprune.train.optimizer import RuleOptimizer


def _fresh_optimizer(optimizer):
    """A new optimizer each iteration: from a callable, a name, or a copy of an instance."""
    if callable(optimizer) and not isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer = optimizer()
    elif isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(optimizer))
    try:
        return keras.optimizers.get(optimizer)
    except (ValueError, TypeError) as exc:
        raise KprunError(f"`optimizer` must be an optimizer, its name or a function returning "
                         f"one; got {optimizer!r} ({exc}).") from None


def admm_train(model: keras.Model, keep: dict, train_data, *, loss, optimizer="sgd",
               rho: float = 1e-4, admm_num_iterations: int = 30, admm_training_epochs: int = 5,
               batch_size: int | None = 32, graph: DependencyGraph | None = None,
               verbose: int = 0) -> dict:
    """Train `model` in place with ADMM toward `keep`; return the plan that prunes it.

    Args:
        model: The model (trained in place, compiled with a `RuleOptimizer`).
        keep: `{group id: channels kept}`.
        train_data: `(x, y)` arrays or what `model.fit` takes as `x` (a dataset).
        loss: The training loss, as `model.compile` takes it.
        optimizer: An optimizer, its name, or a function returning a new one.
        rho: The ADMM penalty's strength, >= 0.
        admm_num_iterations: Z and U updates, an int >= 1.
        admm_training_epochs: Epochs between two updates, an int >= 1.
        batch_size: Batch size when `train_data` holds arrays.
        graph: `model`'s `DependencyGraph`, if already built.
        verbose: Passed to `model.fit`.

    Returns:
        `{group id: channels to remove}` (outside the final projection).

    Example:

    >>> plan = admm_train(model, {0: 4}, (x, y), loss="mse", admm_num_iterations=3)
    >>> small = kprune.apply_plan(model, plan)
    """
    check_number("admm_num_iterations", admm_num_iterations, 1, None, integer=True)
    check_number("admm_training_epochs", admm_training_epochs, 1, None, integer=True)
    rule = ADMMRule.from_plan(model, keep, rho, graph)
    model.compile(optimizer=RuleOptimizer(_fresh_optimizer(optimizer), [rule]), loss=loss)
    fit = {"epochs": admm_num_iterations * admm_training_epochs, "verbose": verbose,
           "callbacks": [ADMMUpdate(rule, admm_training_epochs)]}
    if isinstance(train_data, tuple) and len(train_data) in (2, 3):
        model.fit(*train_data, batch_size=batch_size, **fit)
    else:
        model.fit(train_data, **fit)
    return rule.plan()


def autocompress(model: keras.Model, evaluate: Callable, budget: Budget, train_data, *,
                 loss, optimizer="sgd", num_iterations: int = 3,
                 admm_num_iterations: int = 30, admm_training_epochs: int = 5,
                 rho: float = 1e-4, batch_size: int | None = 32,
                 finetune: Callable | None = None, long_finetune: Callable | None = None,
                 start_temperature: float = 100.0, stop_temperature: float = 20.0,
                 cool_down_rate: float = 0.9, perturbation_magnitude: float = 0.35,
                 seed: int | None = None, verbose: int = 1, **options) -> SearchResult:
    """AutoCompress: per iteration, annealing picks the ratios, ADMM trains, then prune.

    Args:
        model: A functional or Sequential Keras model (left untouched).
        evaluate: `evaluate(model) -> float`, higher is better.
        budget: `kprune.search.macs(t)`, `params(t)` or `latency(t, ...)`.
        train_data: `(x, y)` arrays or what `model.fit` takes as `x`.
        loss: The training loss of the ADMM phases.
        optimizer: An optimizer, its name, or a function returning a new one
            (a fresh copy each iteration).
        num_iterations: Outer iterations, an int >= 1 (NNI: 3).
        admm_num_iterations: ADMM Z/U updates per iteration, int >= 1 (NNI: 30).
        admm_training_epochs: Epochs between two updates, int >= 1 (NNI: 5).
        rho: The ADMM penalty's strength, >= 0 (NNI: 1e-4).
        batch_size: Training batch size when `train_data` holds arrays.
        finetune: Optional fine-tune of every annealing candidate.
        long_finetune: Optional fine-tune of the final model.
        start_temperature, stop_temperature, cool_down_rate,
            perturbation_magnitude: The annealing schedule
            (`kprune.search.simulated_annealing`).
        seed: Seed of the annealing walks (iteration `i` uses `seed + i`).
        verbose: 1 progress bars, 2 a line per step, 0 silent.
        **options: Other keywords of `kprune.search.core.Search` (criterion,
            exclude, max_ratio, min_channels, round_to, max_trials and
            time_limit of each annealing walk, ...). `max_ratio` (default
            0.9) bounds the total against the original: a width an
            iteration's walk chooses below `(1 - max_ratio)` of the
            original's is raised to it before ADMM trains (a later
            iteration then takes the share from other groups). The other
            guards apply to each iteration's model.

    Returns:
        A `SearchResult` against the original model. Ctrl-C inside an
        annealing walk or a training returns the model of the last finished
        iteration with `stopped=True`.

    Raises:
        KprunError: for an argument out of range (named with its range) and
            for a MACs or params budget the guards cannot reach.

    Example:

    >>> result = autocompress(model, evaluate, kprune.search.macs(0.5), (x, y),
    ...                       loss="sparse_categorical_crossentropy", num_iterations=2,
    ...                       admm_num_iterations=3, admm_training_epochs=1, seed=0)
    >>> result.budget <= 0.5
    True
    """
    check_budget(budget)
    num_iterations = check_number("num_iterations", num_iterations, 1, None, integer=True)
    check_number("admm_num_iterations", admm_num_iterations, 1, None, integer=True)
    check_number("admm_training_epochs", admm_training_epochs, 1, None, integer=True)
    check_number("rho", rho, 0, None)
    check_annealing(start_temperature, stop_temperature, cool_down_rate, perturbation_magnitude)
    if train_data is None:
        raise KprunError("`train_data` is required: ADMM trains the model ((x, y) or a dataset).")
    top = make_search(model, evaluate, budget, None, long_finetune, seed, verbose, options)
    anneal = {"start_temperature": start_temperature, "stop_temperature": stop_temperature,
              "cool_down_rate": cool_down_rate, "perturbation_magnitude": perturbation_magnitude}
    current, share, best = copy_model(model), 1.0, None
    with top.running():
        for i in range(num_iterations):
            goal = budget.target ** ((i + 1) / num_iterations)
            relative = min(1.0, goal / share)
            t0 = time.perf_counter()
            walk = simulated_annealing(
                current, evaluate, Budget(budget.kind, relative, **budget.options), finetune,
                **anneal, seed=None if seed is None else seed + i, verbose=verbose, **options)
            _absorb(top, walk, i, share)
            if walk.stopped:
                top.stopped, top.reason = True, walk.reason
                break
            graph = DependencyGraph(current, approximate=top.approximate)
            widths = DependencyGraph(walk.model, approximate=top.approximate)
            keep = _capped(top, graph, widths)
            if keep:
                work = copy_model(current)
                plan = admm_train(work, keep, train_data, loss=loss, optimizer=optimizer, rho=rho,
                                  admm_num_iterations=admm_num_iterations,
                                  admm_training_epochs=admm_training_epochs,
                                  batch_size=batch_size, verbose=int(verbose == 2))
                current = apply_plan(work, plan)
            share = top.bound.measure(current)
            ratios = _ratios(top, current)
            record = Trial(len(top.history), f"admm {i}", ratios, top.estimate(ratios), share,
                           top.score(current), time.perf_counter() - t0, accepted=True)
            top.record(record)
            best = (record, current)
            if verbose == 2:
                print(f"autocompress: iteration {i}: score {record.score:.4f}, budget "
                      f"{share:.3f} (goal {goal:.3f})")
        if best is not None and long_finetune is not None and not top.stopped:
            best = top.long_finetune(*best, long_finetune)
    if best is None:
        return top.result(copy_model(model), {}, None, 1.0, met=False)
    record, final = best
    return top.result(final, record.ratios, record.score, record.measured,
                      met=top.bound.met(record.measured),
                      reason="done" if top.bound.met(record.measured) else "budget not met")


def _capped(top, graph: DependencyGraph, widths: DependencyGraph) -> dict:
    """`{group id: width}` the walk chose, each at least `1 - max_ratio` of the original's."""
    keep = {}
    for g in graph.prunable_groups():
        if g.id >= len(widths.groups) or widths.groups[g.id].size >= g.size:
            continue
        floor = math.ceil((1.0 - top.guards["max_ratio"]) * top.graph.groups[g.id].size - 1e-9)
        width = max(widths.groups[g.id].size, min(g.size, floor))
        if width < g.size:
            keep[g.id] = width
    return keep


def _absorb(top, walk: SearchResult, iteration: int, share: float) -> None:
    """Append an annealing walk's trials to `top`'s history, steps `(iteration, step)`.

    Their budget shares are turned into shares of the original (`share`: the
    iteration model's); their ratios, of the iteration's model, are left out.
    """
    def scaled(x):
        return None if x is None else x * share

    for trial in walk.history:
        top.history.append(dataclasses.replace(
            trial, trial=len(top.history), step=(iteration, trial.step), ratios={},
            estimated=scaled(trial.estimated), measured=scaled(trial.measured)))


def _ratios(top, model: keras.Model) -> dict:
    """`{group id: ratio}` of `model`'s widths against the original's (one ratio per unit)."""
    graph = DependencyGraph(model, approximate=top.approximate)
    out = {}
    for rep, gids in top.units.items():
        size = top.graph.groups[rep].size
        ratio = round(1.0 - graph.groups[rep].size / size, 6) if rep < len(graph.groups) else 0.0
        for gid in gids:
            out[gid] = ratio
    return {gid: r for gid, r in out.items() if r > 0}


__all__ = ["admm_train", "autocompress"]
