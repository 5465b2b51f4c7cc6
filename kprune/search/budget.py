"""Budgets: how much of the original model's cost a searched model may keep.

One type for three costs. A `Budget` is a kind and a target share of the
original model's cost, in (0, 1]:

* `macs(t)`: multiply-accumulates (`kprune.profile`);
* `params(t)`: parameters (`model.count_params()`; plans counted by
  `kprune.pruning.plan_params`);
* `latency(t, runtime="keras", batch_size=1, threads=None)`: latency measured
  on the deployed runtime, predicted for a plan from per-layer tables
  (`kprune.latency.LatencyModel`); a pruned model is timed in alternating
  rounds with the original, so its share is a ratio of times taken under
  the same machine load.

A search binds a budget to the model once (`budget.bind(model, graph)`); the
bound budget estimates the share a plan keeps without surgery (`estimate`)
and measures the share a pruned model keeps (`measure`). For MACs and
parameters the two agree exactly; for latency `estimate` is the table's
prediction and `measure` a timing.

Example:

>>> bound = kprune.search.macs(0.5).bind(model, graph)
>>> bound.estimate({graph.group_of("conv1").id: [0, 1]})
0.93...
>>> bound.measure(kprune.prune(model, flops_target=0.5)) <= 0.5
True
"""

from __future__ import annotations

import inspect
import math
from typing import Mapping

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph import DependencyGraph

KINDS = ("macs", "params", "latency")
_WHAT = {"macs": "MACs", "params": "parameters", "latency": "latency"}


def _is_number(x) -> bool:
    return (isinstance(x, (int, float, np.integer, np.floating))
            and not isinstance(x, (bool, np.bool_)))


class Budget:
    """A cost target for a search: keep at most `target` of the original `kind`.

    Build one with `macs`, `params` or `latency` rather than directly.

    Args:
        kind: 'macs', 'params' or 'latency'.
        target: Share of the original model's cost the result may keep, in (0, 1].
        **options: For 'latency' only: `runtime`, `batch_size`, `threads` and any
            other keyword of `kprune.latency.LatencyModel` (`grid`,
            `cache_dir`, `table`).

    Raises:
        KprunError: for an unknown kind, a target outside (0, 1] or options
            given to a kind that takes none.
    """

    def __init__(self, kind: str, target: float, **options):
        if kind not in KINDS:
            raise KprunError(f"Unknown budget kind {kind!r}; valid kinds: "
                             + ", ".join(repr(k) for k in KINDS) + ".")
        if not (_is_number(target) and math.isfinite(float(target)) and 0.0 < target <= 1.0):
            raise KprunError(f"A {kind} budget is the share of the original model's {_WHAT[kind]} "
                             f"to keep, in (0, 1]; got {target!r}.")
        if options and kind != "latency":
            raise KprunError(f"A {kind} budget takes no options; got {sorted(options)}.")
        self.kind, self.target, self.options = kind, float(target), dict(options)

    def describe(self) -> str:
        """`'50% of the MACs'`."""
        extra = ""
        if self.kind == "latency":
            opts = self.options
            extra = (f" ({opts.get('runtime', 'keras')}, batch {opts.get('batch_size', 1)}"
                     + (f", {opts['threads']} threads" if opts.get("threads") else "") + ")")
        return f"{self.target:.0%} of the {_WHAT[self.kind]}{extra}"

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"kprune.search.{self.kind}({self.target!r}{opts})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Budget) and (self.kind, self.target, self.options) == \
            (other.kind, other.target, other.options)

    def bind(self, model: keras.Model, graph: DependencyGraph | None = None,
             groups=None, verbose: int = 0) -> "BoundBudget":
        """This budget measured against `model`: its base cost, plan estimates, measurements.

        Args:
            model: The original model (the budget's shares are of its cost).
            graph: Its `DependencyGraph`, if already built; plans given to
                `estimate` are group ids of this graph.
            groups: Ids of the groups plans may touch (default: every
                prunable group); a latency budget times only those.
            verbose: A latency budget shows a progress bar while it fills
                its table when 1.

        Returns:
            A `BoundBudget`.
        """
        graph = graph or DependencyGraph(model)
        cls = {"macs": _MacsBound, "params": _ParamsBound, "latency": _LatencyBound}[self.kind]
        return cls(self, model, graph, groups, verbose)


def macs(target: float) -> Budget:
    """Keep at most `target` of the original MACs (`kprune.profile(model).macs`).

    Example:

    >>> result = kprune.search.netadapt(model, evaluate, budget=kprune.search.macs(0.5))
    """
    return Budget("macs", target)


def params(target: float) -> Budget:
    """Keep at most `target` of the original parameters (`model.count_params()`).

    Example:

    >>> budget = kprune.search.params(0.3)
    """
    return Budget("params", target)


def latency(target: float, runtime: str = "keras", batch_size: int = 1, threads: int | None = None,
            **options) -> Budget:
    """Keep at most `target` of the original latency, measured on `runtime`.

    Plans are estimated with `kprune.latency.LatencyModel(model, runtime=...,
    batch_size=..., threads=..., **options)` (per-layer latency tables measured
    on this machine, cached) and pruned models are timed with its `measure`.

    Args:
        target: Share of the original latency to keep, in (0, 1].
        runtime: 'keras' (a `tf.function`) or 'tflite', as `LatencyModel` takes.
        batch_size: Batch size of the timed calls.
        threads: Threads of the runtime (None: its default).
        **options: Other `LatencyModel` keywords (`grid`, `cache_dir`, `table`).

    Example:

    >>> budget = kprune.search.latency(0.5, runtime="tflite", threads=1)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise KprunError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if threads is not None and (isinstance(threads, bool)
                                or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise KprunError(f"`threads` must be None or an int >= 1, got {threads!r}.")
    return Budget("latency", target, runtime=runtime, batch_size=int(batch_size), threads=threads,
                  **options)


def check_budget(budget) -> Budget:
    """`budget` if it is a `Budget`; a clear `KprunError` naming what it got otherwise."""
    if not isinstance(budget, Budget):
        raise KprunError("`budget` must be kprune.search.macs(t), kprune.search.params(t) or "
                         f"kprune.search.latency(t); got {budget!r}.")
    return budget


# --------------------------------------------------------------------------
# Bound budgets
# --------------------------------------------------------------------------
def _plan_key(plan: Mapping) -> tuple:
    return tuple(sorted((int(getattr(g, "id", g)), tuple(int(c) for c in ch))
                        for g, ch in plan.items() if len(ch)))


class BoundBudget:
    """A `Budget` against one model.

    Attributes:
        budget: The `Budget`.
        target: Its target share.
        base: The original model's cost (MACs, parameters or seconds).
        model, graph: The original model and its `DependencyGraph`.
    """

    def __init__(self, budget: Budget, model, graph, groups=None, verbose: int = 0):
        self.budget, self.target, self.verbose = budget, budget.target, verbose
        self.model, self.graph = model, graph
        self.groups = None if groups is None else [int(getattr(g, "id", g)) for g in groups]
        self._cache: dict = {}
        self.base = float(self._base())
        if not self.base > 0:
            raise KprunError(f"Model '{model.name}' has no {_WHAT[budget.kind]} to budget "
                             f"(its cost is {self.base}).")

    def estimate(self, plan: Mapping) -> float:
        """Share of `base` that `apply_plan(model, plan)` would keep, computed without surgery.

        Args:
            plan: `{group id: channels to drop}` on `graph`.
        """
        key = _plan_key(plan)
        if key not in self._cache:
            self._cache[key] = float(self._cost(plan)) / self.base
        return self._cache[key]

    def measure(self, model: keras.Model) -> float:
        """Share of `base` a pruned `model` keeps, measured on the model itself."""
        return float(self._measure(model)) / self.base

    def met(self, share: float) -> bool:
        """Whether `share` is within the target (to rounding)."""
        return share <= self.target + 1e-9

    def __repr__(self):
        return f"<{self.budget!r} of model '{self.model.name}', base {self.base:g}>"


class _MacsBound(BoundBudget):
    def _base(self):
        from kprune.profile import profile

        return profile(self.model).macs

    def _cost(self, plan):
        from kprune.pruning import plan_macs

        macs = plan_macs(self.graph, plan)
        if macs is None:  # no layer counter: prune and count
            from kprune.surgeon import apply_plan

            return self._measure(apply_plan(self.model, plan, self.graph))
        return macs

    def _measure(self, model):
        from kprune.profile import profile

        return profile(model).macs


class _ParamsBound(BoundBudget):
    def _base(self):
        return self.model.count_params()

    def _cost(self, plan):
        try:
            from kprune.pruning import plan_params
        except ImportError:  # no plan-based count: prune and count
            from kprune.surgeon import apply_plan

            return self._measure(apply_plan(self.model, plan, self.graph))
        return plan_params(self.graph, plan)

    def _measure(self, model):
        return model.count_params()


def _latency_model_class():
    """`kprune.latency.LatencyModel`, imported when a latency budget is bound."""
    try:
        from kprune.latency import LatencyModel
    except ImportError as exc:
        raise KprunError("A latency budget needs `kprune.latency.LatencyModel`, which this "
                         f"installation of kprune lacks ({exc}); use kprune.search.macs or "
                         "kprune.search.params instead.") from None
    return LatencyModel


class _LatencyBound(BoundBudget):
    def _base(self):
        cls = _latency_model_class()
        options = dict(self.budget.options)
        try:
            accepted = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            accepted = {}
        if "graph" in accepted:  # the same graph: plans are its group ids
            options.setdefault("graph", self.graph)
        if "groups" in accepted and self.groups is not None:
            options.setdefault("groups", self.groups)
        if "verbose" in accepted:
            options.setdefault("verbose", int(self.verbose == 1))
        self.latency_model = cls(self.model, **options)
        self._interleaved = _measure_interleaved() if cls.__module__ == "kprune.latency" else None
        self._runners: dict = {}
        return self.latency_model.base

    def _cost(self, plan):
        return self.latency_model.predict(dict(plan))

    def _measure(self, model):
        return self.latency_model.measure(model)

    def measure(self, model: keras.Model) -> float:
        """Measured seconds of `model` over the original's, timed in alternating rounds.

        Both are timed in the same rounds (`kprune.latency.measure_interleaved`),
        so a change of machine load touches both alike; without it,
        `LatencyModel.measure(model) / base`.
        """
        if self._interleaved is None:
            return super().measure(model)
        lm = self.latency_model
        if model is self.model:
            return 1.0
        original, small = self._interleaved(
            [self.model, model], lm.runtime, lm.batch_size, lm.threads,
            getattr(lm, "warmup", 3), getattr(lm, "runs", 20), prepared=self._runners)
        self._runners = {k: v for k, v in self._runners.items() if k == id(self.model)}
        return small / original


def _measure_interleaved():
    try:
        from kprune.latency import measure_interleaved
    except ImportError:
        return None
    return measure_interleaved


__all__ = ["Budget", "BoundBudget", "check_budget", "latency", "macs", "params"]
