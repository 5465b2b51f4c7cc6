"""One-shot pruning: score channels, choose the weakest, remove them for real.

Example:

>>> small = kprune.prune(model, flops_target=0.5, criterion="l1")
>>> kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
True
>>> fast = kprune.prune(model, latency_target=0.5, runtime="tflite", threads=2)
>>> light = kprune.prune(model, params_target=0.5)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Mapping, Sequence

import keras
import numpy as np

from kprune.select import criteria as _criteria
from kprune.select import pruners
from kprune.errors import KprunError, KprunWarning
from kprune.graph import DependencyGraph, get_rule
from kprune.latency import LatencyModel, _fake_weights, check_backend, check_settings
from kprune.surgeon import apply_plan, copy_model, drop_masks, hub

_SCOPES = ("local", "global")
_CONFIG_KEYS = {"op_types", "op_names", "op_partial_names", "sparsity", "sparsity_per_layer",
                "exclude"}


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


_TARGETS = ("ratio", "flops_target", "params_target", "latency_target", "config_list")
_SHARES = {"flops_target": "MACs", "params_target": "parameters",
           "latency_target": "measured latency"}


def _check_target(ratio, flops_target, config_list, params_target=None,
                  latency_target=None) -> None:
    values = dict(ratio=ratio, flops_target=flops_target, params_target=params_target,
                  latency_target=latency_target, config_list=config_list)
    given = [n for n in _TARGETS if values[n] is not None]
    if len(given) != 1:
        raise KprunError("Give exactly one of `ratio`, `flops_target`, `params_target`, "
                         "`latency_target` or `config_list`"
                         + (f"; got {', '.join(given)}." if given else "; got none."))
    if ratio is not None and not (_is_number(ratio) and 0.0 <= ratio < 1.0):
        raise KprunError(f"`ratio` is the share of channels to remove, in [0, 1); got {ratio!r}.")
    for name, what in _SHARES.items():
        value = values[name]
        if value is not None and not (_is_number(value) and 0.0 < value <= 1.0):
            raise KprunError(f"`{name}` is the share of the original {what} to keep, in (0, 1]; "
                             f"got {value!r}.")


def _check_exclude_names(model, graph, entries) -> None:
    names = {c.layer.name for c in graph.flat.calls}
    classes = {type(c.layer).__name__ for c in graph.flat.calls}
    for entry in entries:
        if isinstance(entry, str) and entry not in names and entry not in classes:
            raise KprunError(f"`exclude` entry '{entry}' is neither a layer name nor a layer "
                             f"class of model '{model.name}'.")


@dataclasses.dataclass
class _Config:
    op_types: tuple
    op_names: tuple
    op_partial_names: tuple
    sparsity: float
    exclude: bool

    def matches(self, layer) -> bool:
        checks = []
        if self.op_types:
            checks.append(any(_type_matches(layer, t) for t in self.op_types))
        if self.op_names:
            checks.append(layer.name in self.op_names)
        if self.op_partial_names:
            checks.append(any(p in layer.name for p in self.op_partial_names))
        return bool(checks) and all(checks)


def _type_matches(layer, op_type) -> bool:
    if isinstance(op_type, type):
        return isinstance(layer, op_type)
    if op_type == "default":  # NNI's default: every layer with filters
        return _criteria.has_filters(layer)
    return type(layer).__name__ == op_type


def _as_tuple(value, key, i) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise KprunError(f"config_list[{i}]['{key}'] must be a list, got {value!r}.")
    return tuple(value)


def parse_config_list(config_list: Sequence) -> list:
    """Validate an NNI-style config list.

    Each entry is a dict with `op_types` (class names or classes; 'default'
    means every layer with filters), `op_names` and/or `op_partial_names`
    selecting layers, and either `sparsity` (alias `sparsity_per_layer`, the
    share of channels to drop, in [0, 1)) or `exclude: True`.

    Raises:
        KprunError: for a malformed entry; the message names it.
    """
    if not isinstance(config_list, (list, tuple)) or not config_list:
        raise KprunError(f"`config_list` must be a non-empty list of dicts, got {config_list!r}.")
    out = []
    for i, cfg in enumerate(config_list):
        if not isinstance(cfg, Mapping):
            raise KprunError(f"config_list[{i}] must be a dict, got {cfg!r}.")
        unknown = set(cfg) - _CONFIG_KEYS
        if unknown:
            raise KprunError(f"config_list[{i}] has unknown keys {sorted(unknown)}; valid keys: "
                             f"{sorted(_CONFIG_KEYS)}.")
        sel = {k: _as_tuple(cfg.get(k), k, i) for k in ("op_types", "op_names", "op_partial_names")}
        if not any(sel.values()):
            raise KprunError(f"config_list[{i}] selects no layer: give op_types, op_names or "
                             "op_partial_names.")
        exclude = bool(cfg.get("exclude", False))
        sparsity = cfg.get("sparsity", cfg.get("sparsity_per_layer"))
        if not exclude and not (_is_number(sparsity) and 0.0 <= sparsity < 1.0):
            raise KprunError(f"config_list[{i}] needs a 'sparsity' in [0, 1) (or 'exclude': "
                             f"True); got {sparsity!r}.")
        out.append(_Config(sel["op_types"], sel["op_names"], sel["op_partial_names"],
                           float(sparsity or 0.0), exclude))
    return out


def config_ratios(groups, configs: list) -> dict:
    """`{group id: sparsity}`: each group takes the first config matching a producer.

    Groups whose first match is an `exclude` config, or that match nothing,
    are left out (not pruned).
    """
    ratios = {}
    for g in groups:
        for cfg in configs:
            if any(cfg.matches(m.layer) for m in g.producers):
                if not cfg.exclude:
                    ratios[g.id] = cfg.sparsity
                break
    return ratios


# --------------------------------------------------------------------------
# Search for a MACs, parameters or latency target
# --------------------------------------------------------------------------
def _macs(model) -> float:
    from kprune.profile import profile

    return float(profile(model).macs)


def plan_macs(graph: DependencyGraph, plan: Mapping) -> int | None:
    """MACs of `apply_plan(graph.model, plan)` computed without surgery.

    Every call is counted by `kprune.profile.layer_macs` on the shapes its
    tensors will have once the planned channels are gone.

    Args:
        graph: The model's dependency graph.
        plan: `{group id: channels to drop}`.

    Returns:
        The MACs, or None where `kprune.profile.layer_macs` is not available.

    Example:

    >>> plan_macs(graph, {graph.group_of("conv1").id: [0, 1]})
    """
    try:
        from kprune.profile import layer_macs
    except ImportError:
        return None
    drop = drop_masks(graph, plan)

    def shape(t):
        dims = list(t.shape)
        keep = graph.keep_mask(t, drop) if drop else None
        if keep is not None:
            dims[graph.specs[id(t)].axis] = int(keep.sum())
        return tuple(dims)

    def attrs(layer):
        inner = graph.inner_keep(layer, drop) if drop else {}
        return get_rule(layer).inner_attrs(layer, inner) if inner else None

    return int(sum(layer_macs(c.layer, [shape(t) for t in c.inputs],
                              [shape(t) for t in c.outputs], attrs(c.layer))
                   for c in graph.flat.calls))


def _weight_count(shapes) -> int:
    return int(sum(np.prod(tuple(s), dtype=np.int64) for s in shapes))


def plan_params(graph: DependencyGraph, plan: Mapping) -> int:
    """Parameters of `apply_plan(graph.model, plan)` (`count_params()`) computed without surgery.

    Every layer whose channels the plan changes is sliced by its rule, as
    `apply_plan` slices it, on stand-in weights that hold only their shapes;
    the other layers keep their weights.

    Args:
        graph: The model's dependency graph.
        plan: `{group id: channels to drop}`.

    Example:

    >>> plan_params(graph, {}) == model.count_params()
    True
    """
    drop = drop_masks(graph, plan)
    total, seen = 0, set()
    for call in graph.flat.calls:
        layer = call.layer
        if not isinstance(layer, keras.layers.Layer) or id(layer) in seen:
            continue
        seen.add(id(layer))  # a shared layer is sliced at its first call, as apply_plan does
        keep_in = [graph.keep_mask(t, drop) for t in call.inputs] if drop else []
        keep_out = [graph.keep_mask(t, drop) for t in call.outputs] if drop else []
        keep_inner = graph.inner_keep(layer, drop) if drop else {}
        if not (keep_inner or any(k is not None and not k.all() for k in keep_in + keep_out)):
            total += _weight_count(v.shape for v in layer.weights)
            continue
        full_in = [k if k is not None else np.ones(0, bool) for k in keep_in]
        full_out = [k if k is not None else np.ones(0, bool) for k in keep_out]
        rule = get_rule(layer)
        try:
            _, weights = rule.slice_for(call, _fake_weights(layer), full_in, full_out, keep_inner)
        except (ValueError, TypeError):  # a rule that writes into its weights: give it copies
            from kprune.surgeon.rebuild import weights_of

            _, weights = rule.slice_for(call, dict(weights_of(layer)), full_in, full_out,
                                        keep_inner)
        total += _weight_count(np.shape(w) for w in weights.values())
    return total


class _Cost:
    """What a target bounds: estimated from a plan, measured on the pruned model.

    `exact` costs (MACs, parameters) are counts: the estimate is trusted when
    it matches the original's measured count, and checked once on the chosen
    model. Latency is a prediction: the chosen model is always measured.
    """

    name = "MACs"
    exact = True

    def __init__(self, model, graph):
        self.model, self.graph = model, graph
        self.base = self.measure(model)

    def estimate(self, plan):
        return plan_macs(self.graph, plan)

    def measure(self, small):
        return _macs(small)


class _ParamsCost(_Cost):
    name = "parameters"

    def estimate(self, plan):
        return plan_params(self.graph, plan)

    def measure(self, small):
        return float(small.count_params())


class _LatencyCost(_Cost):
    exact = False

    def __init__(self, model, graph, groups, runtime, batch_size, threads, verbose):
        self.model, self.graph = model, graph
        self.name = f"latency ({runtime}, batch {batch_size})"
        self.latency = LatencyModel(model, runtime=runtime, batch_size=batch_size,
                                    threads=threads, graph=graph, groups=[g.id for g in groups],
                                    verbose=verbose)
        self.base = self.latency.base

    def estimate(self, plan):
        return self.latency.predict(plan)

    def measure(self, small):
        # Timed beside the original, so a change of load does not pass for a change of speed.
        return self.base * self.latency.compare(small)


class _Trials:
    """Plans tried during the search: estimated from the plan, or pruned and measured."""

    def __init__(self, model, graph, cost: _Cost | None = None):
        self.model, self.graph = model, graph
        self.cost = cost or _Cost(model, graph)
        self.models: dict = {}
        self.estimates: dict = {}

    @staticmethod
    def _key(plan):
        return tuple(sorted((gid, tuple(ch)) for gid, ch in plan.items()))

    def measure(self, plan: dict):
        """(the cost measured on the pruned model, the pruned model)."""
        key = self._key(plan)
        if key not in self.models:
            small = apply_plan(self.model, plan, self.graph) if plan else copy_model(self.model)
            self.models[key] = (self.cost.measure(small), small)
        return self.models[key]

    def estimate(self, plan: dict):
        key = self._key(plan)
        if key not in self.estimates:
            self.estimates[key] = self.cost.estimate(plan)
        return self.estimates[key]


def _candidates(groups, scope: str) -> list:
    """Every ratio at which the plan can change, ascending (0 first)."""
    if scope == "global":
        total = sum(g.size for g in groups)
        return [k / total for k in range(total + 1)] if total else [0.0]
    points = {0.0}
    for g in groups:
        points.update((k + 0.5) / g.size for k in range(g.size) if (k + 0.5) / g.size < 1.0)
    return sorted(points)


def _bisect(cost, n: int, budget: float, lo: int = 0) -> int:
    """Smallest index in (lo, n) with cost <= budget, given cost(n - 1) <= budget < cost(lo)."""
    hi = n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


class _SearchBar:
    """A `keras.utils.Progbar` over a target search's steps (`prune(..., verbose=1)`).

    Its length is the bisection's steps over `n` candidates plus, for a
    measured cost, the measured models; a search that needs more steps holds
    the bar one short of its end until `close`.
    """

    def __init__(self, n: int, cost):
        steps = max(1, math.ceil(math.log2(max(n, 2)))) + 1
        if not cost.exact:
            steps += _MAX_MEASURED + 2
        print(f"kprune: searching the ratio for the {cost.name} target")
        self.bar = keras.utils.Progbar(steps, unit_name="step", stateful_metrics=["ratio", "kept"])
        self.done = 0

    def step(self, values) -> None:
        if self.done + 1 < self.bar.target:
            self.done += 1
            self.bar.update(self.done, values)

    def close(self) -> None:
        self.bar.update(self.bar.target, finalize=True)


def _search(model, graph, groups, scores, target, cost, scope, guards, verbose):
    """The smallest ratio whose pruned model keeps at most `target` of `cost`.

    The search bisects over every ratio at which the plan changes, on the
    cost estimated from the plan (`plan_macs`, `plan_params`, or the
    `LatencyModel` prediction). For MACs and parameters the chosen plan is
    then pruned and counted; should the two disagree, the search is repeated
    on pruned models. For latency the chosen model is timed beside the
    original; the search then goes on on measured latency (`_settle`): if
    it is slower than the target, between it and the most pruned plan,
    otherwise between it and the original, until a measured model is within
    the target and close to it: between `_LATENCY_MARGIN +
    _LATENCY_TOLERANCE` and `_LATENCY_MARGIN` of the original's latency
    under it (when only the most pruned plan is within the target, it).
    """
    bar = _SearchBar(len(_candidates(groups, scope)), cost) if verbose == 1 else None
    try:
        return _search_steps(model, graph, groups, scores, target, cost, scope, guards,
                             verbose, bar)
    finally:
        if bar is not None:
            bar.close()


def _search_steps(model, graph, groups, scores, target, cost, scope, guards, verbose, bar):
    """`_search`'s steps; `bar` (or None) advances once per estimated or measured plan."""
    trials = _Trials(model, graph, cost)
    base = cost.base
    budget = target * base
    if base <= budget:
        return {}, copy_model(model)
    cands = _candidates(groups, scope)
    plans: dict = {}

    def plan_at(i):
        if i not in plans:
            plans[i] = pruners.make_plan(groups, scores, cands[i], scope, **guards)
        return plans[i]

    said: set = set()

    def say(i, value, how):
        if (i, how) in said:
            return
        said.add((i, how))
        if verbose >= 2:
            print(f"kprune: ratio {cands[i]:.4f} keeps {value / base:.2%} of the {cost.name}"
                  + (f" ({how})" if how else ""))
        elif bar is not None:
            bar.step([("ratio", cands[i]), ("kept", value / base)])

    def measured(i):
        value = trials.measure(plan_at(i))[0]
        say(i, value, "" if cost.exact else "measured")
        return value

    def estimated(i):
        value = trials.estimate(plan_at(i))
        say(i, value, "predicted" if not cost.exact else "estimated")
        return value

    def unreachable(value):
        blocked = graph.describe_blockers()
        return KprunError(
            f"Model '{model.name}' cannot reach {target:.1%} of its {cost.name}: "
            + (f"groups are left whole by layers kprune cannot prune through: {blocked}; "
               "with them, " if blocked else "")
            + f"the guards (max_ratio={guards['max_ratio']}, "
            f"min_channels={guards['min_channels']}, round_to={guards['round_to']}) and "
            f"exclusions leave {value / base:.1%}"
            + ("" if cost.exact else " (measured)") + ". "
            "`kprune.DependencyGraph(model).summary()` lists every group's reason.")

    last = len(cands) - 1
    if not cost.exact:
        # Aim a little under the budget, so that timing the result again stays within it.
        aim = budget - _LATENCY_MARGIN * base
        if estimated(last) > aim:
            lo, hi = 0, last  # a pessimistic prediction gets a measured second opinion
        else:
            i = _bisect(estimated, len(cands), aim)
            lo, hi = (0, i) if measured(i) <= aim else (i, last)
        if measured(hi) <= aim:
            hi = _settle(lo, hi, base, aim, estimated, measured)
        else:  # nothing measured within the aim: the least pruned within the budget, if any
            within = [k for k in (lo, hi) if k and measured(k) <= budget]
            if not within:
                raise unreachable(measured(hi))
            hi = min(within)
        return plan_at(hi), trials.measure(plan_at(hi))[1]
    exact = trials.estimate({}) == base
    first = estimated if exact else measured
    if first(last) > budget:
        raise unreachable(first(last))
    i = _bisect(first, len(cands), budget)
    if exact and measured(i) != estimated(i):
        i = _bisect(measured, len(cands), budget)  # the estimate was off: measure instead
        if measured(i) > budget:
            raise KprunError(f"Model '{model.name}' cannot reach {target:.1%} of its "
                             f"{cost.name} within the guards; the smallest is "
                             f"{measured(i) / base:.1%}.")
    return plan_at(i), trials.measure(plan_at(i))[1]


# Measured latency aims this share of the original's latency under the budget (a second
# timing of the same model differs by about as much), and is settled once it is within
# `_LATENCY_TOLERANCE` under that aim, or after `_MAX_MEASURED` more measured models.
_LATENCY_MARGIN = 0.01
_LATENCY_TOLERANCE = 0.03
_MAX_MEASURED = 5


def _settle(lo: int, hi: int, base: float, budget: float, estimated, measured) -> int:
    """The least pruned candidate in (lo, hi] measured within `budget`, found on measurements.

    `lo` is known too slow (0, the original, always is) and `hi` measured
    within budget. Each step measures one candidate in between and keeps the
    bracket: a secant step on the prediction mapped through the two measured
    ends (the prediction's error at them), held a quarter of the bracket
    away from either end so the bracket always shrinks. It stops when `hi`
    is within `_LATENCY_TOLERANCE` of the budget, when the corrected
    prediction finds nothing between, or after `_MAX_MEASURED` steps.
    """

    def point(k):
        return (base, base) if k == 0 else (estimated(k), measured(k))

    for _ in range(_MAX_MEASURED):
        if hi - lo <= 1 or measured(hi) >= budget - _LATENCY_TOLERANCE * base:
            break
        (p_lo, m_lo), (p_hi, m_hi) = point(lo), point(hi)
        j = (lo + hi) // 2
        if m_lo != m_hi and p_lo != p_hi:
            goal = p_hi + (budget - m_hi) * (p_lo - p_hi) / (m_lo - m_hi)  # predicted at budget
            a, b = lo, hi
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (a, mid) if estimated(mid) <= goal else (mid, b)
            if b == hi:
                break  # the corrected prediction sees nothing less pruned within budget
            j = b
        step = max(1, (hi - lo) // 4)
        j = min(max(j, lo + step), hi - step)
        lo, hi = (lo, j) if measured(j) <= budget else (j, hi)
    return hi


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------
def _prepare(model, ratio, flops_target, criterion, scope, data, exclude, round_to, max_ratio,
             min_channels, reduce, config_list, approximate=True, params_target=None,
             latency_target=None, runtime="keras", batch_size=None, threads=None):
    _check_target(ratio, flops_target, config_list, params_target, latency_target)
    check_settings(runtime, 1 if batch_size is None else batch_size, threads)
    if latency_target is not None:
        check_backend("`latency_target`")
    crit = _criteria.get_criterion(criterion)
    if scope not in _SCOPES:
        raise KprunError(f"Unknown scope {scope!r}; valid scopes: 'local', 'global'.")
    if config_list is not None and scope != "local":
        raise KprunError("`config_list` sets a sparsity per layer; use it with scope='local'.")
    if reduce not in _criteria.REDUCERS:
        raise KprunError(f"Unknown reduce {reduce!r}; valid: {', '.join(_criteria.REDUCERS)}.")
    if crit.needs_data and data is None:
        raise KprunError(f"Criterion '{crit.name}' scores activations: pass `data` "
                         "(inputs, (x, y) or batches).")
    if round_to == "latency":
        if latency_target is None:
            raise KprunError("round_to='latency' widens groups to the top of their measured "
                             "latency steps: use it with `latency_target`.")
        round_to = 1
    pruners.check_guards(max_ratio, min_channels, round_to)
    entries = pruners.check_exclude(exclude)
    configs = parse_config_list(config_list) if config_list is not None else None
    graph = DependencyGraph(model, approximate=approximate)
    _check_exclude_names(model, graph, entries)
    groups = [g for g in graph.prunable_groups() if not pruners.is_excluded(g, entries)]
    return crit, graph, groups, configs


def _report(model, graph, plan, verbose) -> None:
    if not verbose:
        return
    print(f"kprune: pruning model '{model.name}'")
    for gid, channels in sorted(plan.items()):
        g = graph.groups[gid]
        names = g.layer_names()
        print(f"  {names[0]}{f' (+{len(names) - 1} coupled)' if len(names) > 1 else ''}: "
              f"{g.size} -> {g.size - len(channels)} channels")


def prune_plan(model: keras.Model, **kwargs) -> dict:
    """The plan `prune` would apply, `{group id: channels to drop}`.

    Takes the same keyword arguments as `prune`. Use it to inspect a plan, or
    to build the reference `kprune.surgeon.zero_plan(model, plan)`.

    Example:

    >>> plan = prune_plan(model, ratio=0.5)
    >>> masked = kprune.surgeon.zero_plan(model, plan)
    """
    return _run(model, **kwargs)[0]


def prune(model: keras.Model, *, ratio: float | None = None, flops_target: float | None = None,
          params_target: float | None = None, latency_target: float | None = None,
          criterion="l1", scope: str = "local", data=None, loss=None, exclude=(),
          round_to: int | str = 1, max_ratio: float = 0.9, min_channels: int = 1,
          reduce: str = "mean", seed: int | None = None, config_list: Sequence | None = None,
          verbose: int = 0, batch_size: int | None = None, approximate: bool = True,
          runtime: str = "keras", threads: int | None = None) -> keras.Model:
    """Remove the least important channels and return a new, smaller model.

    Channels are scored once on `model` with `criterion`, reduced over the
    members of each dependency group, then removed for real by
    `kprune.surgeon.apply_plan`. The caller's model is not changed. Give
    exactly one of `ratio`, `flops_target`, `params_target`,
    `latency_target` or `config_list`.

    Args:
        model: A functional or Sequential Keras model.
        ratio: Share of channels to remove, in [0, 1): from every group
            (`scope='local'`) or from all prunable channels together
            (`scope='global'`).
        flops_target: Share of the original MACs (`kprune.profile`) the result
            may keep, in (0, 1]: the smallest ratio reaching it is searched, so
            the result is at or just under the target.
        params_target: Share of the original parameters (`count_params()`)
            the result may keep, in (0, 1]; searched as `flops_target` is, on
            counts computed from the plan (`plan_params`).
        latency_target: Share of the original's measured latency on
            `runtime` the result may keep, in (0, 1]. The search bisects on
            latency predicted by a `kprune.latency.LatencyModel` (per-layer
            tables measured once per machine and cached, see
            `kprune.latency.LatencyTable`), then times the chosen model end
            to end beside the original and goes on on measured latency
            (more pruning if it is too slow, less if well under) until a
            measured model meets the target closely. Timings are noisy: the
            result meets the target as measured during the search.
        criterion: A name from `kprune.criteria.available_criteria()`.
        scope: 'local' (same share per group) or 'global' (one ranking over
            groups, scores divided by their group's mean).
        data: Inputs for data criteria ('taylor' needs `(x, y)`).
        loss: Loss for 'taylor' (default: the compiled model's).
        exclude: Layer names, class names or classes: every group touching one
            of them is left whole.
        round_to: Keep a multiple of this many channels per group when possible.
            With `latency_target`, `"latency"` measures the steps instead: the
            found plan's groups are widened to the widest width that single-
            layer timings show costs no more (`LatencyModel.snap`: widths
            that are multiples of 8 up to the next multiple of 32), and the
            wider model is kept when it still meets the target end to end.
        max_ratio: Never remove more than this share of a group.
        min_channels: Never keep fewer channels in a group (>= 1).
        reduce: How member scores combine: 'mean', 'sum', 'max', 'min', 'prod'.
        seed: Seed of the 'random' criterion.
        config_list: NNI-style per-layer sparsities instead of `ratio`, e.g.
            `[{"op_types": ["Conv2D"], "sparsity": 0.5}, {"op_names": ["fc"],
            "exclude": True}]`; a group takes the first config matching one of
            its producers.
        verbose: 0 is quiet; 1 prints the plan and, for a target, a progress
            bar over the search's steps (and, for `latency_target`, one
            while the tables are measured); 2 prints every step instead.
        batch_size: The batch the model runs at: of the timed calls for
            `latency_target` (default 1), and of data criteria given arrays
            (default 32).
        approximate: Also prune groups whose removal changes what the kept
            channels compute: residual streams through LayerNorm/RMSNorm,
            whose statistics are then taken over the kept channels (default
            True). With False the result equals the masked original exactly.
        runtime: Where `latency_target` is timed: `"keras"` (a `tf.function`)
            or `"tflite"` (float32, the `ai_edge_litert` interpreter).
        threads: Threads of that runtime (None: its default).

    Returns:
        A new Keras model of plain layers, with the original's input and
        output structure; a KerasHub backbone or image classifier comes back
        as the same kind of KerasHub model (`kprune.surgeon.hub`).

    Raises:
        KprunError: for any invalid argument (two targets, a target outside
            (0, 1], an unknown runtime...), a model kprune cannot read, or a
            target the guards make unreachable (the message names the layers
            that keep groups whole).

    Example:

    >>> small = prune(model, flops_target=0.5, criterion="fpgm", round_to=8)
    >>> small = prune(model, ratio=0.3, scope="global", exclude=["Dense"])
    >>> small = prune(model, latency_target=0.5, runtime="tflite", threads=2)
    >>> small = prune(model, params_target=0.25)
    """
    small = _run(model, ratio=ratio, flops_target=flops_target, params_target=params_target,
                 latency_target=latency_target, criterion=criterion, scope=scope, data=data,
                 loss=loss, exclude=exclude, round_to=round_to, max_ratio=max_ratio,
                 min_channels=min_channels, reduce=reduce, seed=seed, config_list=config_list,
                 verbose=verbose, batch_size=batch_size, approximate=approximate,
                 runtime=runtime, threads=threads)[1]
    return hub.repackage(model, small)


def _run(model, *, ratio=None, flops_target=None, params_target=None, latency_target=None,
         criterion="l1", scope="local", data=None, loss=None, exclude=(), round_to=1,
         max_ratio=0.9, min_channels=1, reduce="mean", seed=None, config_list=None, verbose=0,
         batch_size=None, approximate=True, runtime="keras", threads=None):
    crit, graph, groups, configs = _prepare(model, ratio, flops_target, criterion, scope, data,
                                            exclude, round_to, max_ratio, min_channels, reduce,
                                            config_list, approximate, params_target,
                                            latency_target, runtime, batch_size, threads)
    snap = round_to == "latency"
    guards = dict(max_ratio=max_ratio, min_channels=min_channels, round_to=1 if snap else round_to)
    if configs is not None:
        sparsity = config_ratios(groups, configs)
        groups = [g for g in groups if g.id in sparsity]
    scores = _criteria.score_groups(model, groups, crit, reduce, data, loss, seed, graph,
                                    32 if batch_size is None else batch_size,
                                    verbose=1 if verbose == 1 else 0) if groups else {}
    if verbose and len(scores) < len(groups):
        print(f"kprune: criterion '{crit.name}' has nothing to score in "
              f"{len(groups) - len(scores)} group(s); they are left whole")
    groups = [g for g in groups if g.id in scores]
    searched = {"flops_target": flops_target, "params_target": params_target,
                "latency_target": latency_target}
    target = next((v for v in searched.values() if v is not None), None)
    if target is not None:
        if latency_target is not None:
            cost = _LatencyCost(model, graph, groups, runtime,
                                1 if batch_size is None else batch_size, threads, verbose)
        else:
            cost = (_ParamsCost if params_target is not None else _Cost)(model, graph)
        plan, small = _search(model, graph, groups, scores, target, cost, scope, guards, verbose)
        if snap and plan:
            plan, small = _snap(model, graph, cost, plan, small, scores, target, verbose)
    else:
        plan = pruners.make_plan(groups, scores, sparsity if configs is not None else ratio,
                                 scope, **guards)
        small = apply_plan(model, plan, graph) if plan else copy_model(model)
        _warn_shortfall(model, graph, groups, plan, ratio if configs is None else None)
    _report(model, graph, plan, verbose)
    return plan, small


def _snap(model, graph, cost, plan, small, scores, target, verbose):
    """`round_to="latency"`: widen the found plan's groups to the top of their latency steps.

    The wider model is timed beside the original; should it miss the target
    (the steps seen on single layers need not add up), the found plan stays.
    """
    wider = cost.latency.snap(plan, scores, verbose=verbose)
    if wider == plan:
        return plan, small
    candidate = apply_plan(model, wider, graph) if wider else copy_model(model)
    measured = cost.measure(candidate)
    if verbose:
        kept = sum(len(plan[g]) - len(wider.get(g, ())) for g in plan)
        print(f"kprune: latency steps give back {kept} channels; the wider model keeps "
              f"{measured / cost.base:.2%} of the {cost.name}"
              + ("" if measured <= target * cost.base else " (over the target: not taken)"))
    if measured <= target * cost.base:
        return wider, candidate
    return plan, small


def _warn_shortfall(model, graph, groups, plan, ratio) -> None:
    """Warn when asked to prune and nothing is removed, or blocked groups hold back half or more.

    The channels asked for are `ratio` times those of the groups in play:
    the prunable ones not excluded, and those a layer blocks.
    """
    if ratio == 0:
        return
    removed = sum(len(channels) for channels in plan.values())
    blocked = [g for g in graph.groups if g.blocker is not None and g.producers]
    asked = (ratio or 0.0) * (sum(g.size for g in groups) + sum(g.size for g in blocked))
    if removed and (not blocked or removed >= 0.5 * asked):
        return
    what = ("removed no channel" if not removed
            else f"removed {removed} of the ~{asked:.0f} channels asked for")
    if blocked:
        why = (f"{len(blocked)} group(s) are left whole by layers it cannot prune through: "
               f"{graph.describe_blockers()}")
    elif not groups:
        why = "no group is prunable (every group reaches a model input or output, or is excluded)"
    else:
        why = "the ratio and the guards (max_ratio, min_channels, round_to) leave every group whole"
    warnings.warn(f"kprune: model '{model.name}': {what}; {why}. "
                  "`kprune.DependencyGraph(model).summary()` lists every group's reason.",
                  KprunWarning, stacklevel=4)


__all__ = ["config_ratios", "parse_config_list", "plan_macs", "plan_params", "prune",
           "prune_plan"]
