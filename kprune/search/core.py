"""The one core every search strategy shares.

A strategy proposes per-group pruning ratios `{group id: ratio}` (the share of
the group's channels to drop, of the *original* model's group); the core
turns them into a plan (`kprune.pruners.make_plan` with the guards), prunes
with the surgeon, fine-tunes (optional) and scores the pruned model with the
user's `evaluate`, and keeps a history and the best so far. Strategies differ
only in how they propose (`kprune.search.sensitivity`,
`kprune.search.netadapt`, `kprune.search.simulated_annealing`,
`kprune.search.amc`).

Proposing is kept apart from evaluating: `Search.trial(ratios, start)` is the
whole evaluation of one candidate, a pure function of its arguments and the
search's fixed setup, so the candidates of one step can be sent to an
existing engine (KerasTuner's distributed oracle, Ray) instead of the default
loop (`Search.run_trials`).

Groups whose producer layers are the same (the heads, key and value widths
of one `MultiHeadAttention`) cannot be told apart by an NNI-style config list,
which selects layers by name: the core ties them into one *unit* and gives
every group of a unit the same ratio, so that `SearchResult.config_list`
always reproduces the searched plan with `kprune.prune(model,
config_list=...)`.

Example:

>>> search = Search(model, evaluate=val_accuracy, budget=kprune.search.macs(0.5))
>>> record, small = search.trial({search.groups[0].id: 0.5})
>>> record.score, record.measured
(0.91, 0.87)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
import warnings
from typing import Callable, Mapping

import keras
import numpy as np

from kprune.errors import KprunError, KprunWarning
from kprune.graph import DependencyGraph
from kprune.pruning import _check_exclude_names, config_ratios, parse_config_list
from kprune.search.budget import Budget, check_budget
from kprune.select import criteria as _criteria
from kprune.select import pruners
from kprune.surgeon import apply_plan, copy_model


# --------------------------------------------------------------------------
# Records and results
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Trial:
    """One evaluated candidate.

    Attributes:
        trial: Its index in the history (0 first).
        step: The strategy's step: NetAdapt's iteration, the index of a
            sensitivity ratio, or a name ('baseline', 'long_finetune').
        ratios: `{group id: ratio}` of the candidate (groups at 0 omitted).
        estimated: Budget share the plan was estimated to keep (None without budget).
        measured: Budget share measured on the pruned model (None without budget).
        score: What `evaluate` returned (higher is better).
        seconds: Wall time of the trial: pruning, fine-tuning, evaluation, measurement.
        group: The group whose ratio the candidate changed, if one did.
        accepted: Whether the strategy kept this candidate (NetAdapt's choice).
    """

    trial: int
    step: object
    ratios: dict
    estimated: float | None
    measured: float | None
    score: float
    seconds: float
    group: int | None = None
    accepted: bool = False

    def __str__(self):
        cost = "" if self.measured is None else f", budget {self.measured:.3f}"
        return (f"trial {self.trial} (step {self.step}): score {self.score:.4f}{cost}, "
                f"{len(self.ratios)} group(s) pruned, {self.seconds:.1f}s")


@dataclasses.dataclass
class SearchResult:
    """What a search returns.

    Attributes:
        model: The chosen pruned (and fine-tuned) model.
        ratios: `{group id: ratio}` of the chosen model, relative to the
            original model's groups (groups left whole omitted).
        config_list: NNI-style list that `kprune.prune(model,
            config_list=..., **prune_kwargs)` accepts and that gives the same
            layer widths (`[{"op_names": [layer], "sparsity": r}, ...]`).
        score: The chosen model's score (after the long fine-tune, if any);
            None when stopped before any trial finished.
        budget: The budget share measured on the chosen model (None without budget).
        history: One `Trial` per evaluation, in order.
        stopped: True when interrupted (Ctrl-C) or stopped by `max_trials`
            or `time_limit` before the strategy finished.
        met: Whether `budget` is within the target.
        reason: Why the search stopped, in words.
        prune_kwargs: The criterion, guards and scoring settings the search
            used, to pass to `kprune.prune` with `config_list` (data criteria
            also need `data`).
    """

    model: keras.Model
    ratios: dict
    config_list: list
    score: float | None
    budget: float | None
    history: list
    stopped: bool = False
    met: bool = True
    reason: str = ""
    prune_kwargs: dict = dataclasses.field(default_factory=dict)

    def __str__(self):
        score = "-" if self.score is None else f"{self.score:.4f}"
        budget = "" if self.budget is None else f", budget {self.budget:.3f}"
        state = " (stopped: " + self.reason + ")" if self.stopped else ""
        return (f"SearchResult: score {score}{budget}, {len(self.ratios)} group(s) pruned, "
                f"{len(self.history)} trial(s){state}")


class Stop(Exception):
    """Raised inside a search when `max_trials` or `time_limit` is reached."""


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def check_score(value, what: str = "evaluate") -> float:
    """`value` as a float, or a `KprunError` naming what `what` returned instead."""
    bad = value is None or isinstance(value, (bool, np.bool_, str, bytes))
    if not bad:
        try:
            arr = np.asarray(value)
            bad = arr.ndim != 0 or arr.dtype.kind not in "iuf"
        except Exception:  # noqa: BLE001 - anything numpy cannot read is not a number
            bad = True
    if bad:
        raise KprunError(f"`{what}` must return a real number (higher is better); got "
                         f"{value!r} ({type(value).__name__}).")
    score = float(arr)
    if not math.isfinite(score):
        raise KprunError(f"`{what}` returned {score}; it must return a finite number "
                         "(higher is better).")
    return score


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 what: str = "") -> float:
    """`value` as a float (an int with `integer`), or a `KprunError` naming `name` and the range.

    Args:
        name: The argument's name, shown in the message.
        value: What was given.
        low, high: The bounds (None: unbounded).
        low_open, high_open: Whether a bound itself is outside the range.
        integer: Require an int.
        what: What the argument means, put before the range in the message.
    """
    kinds = (int, np.integer) if integer else (int, float, np.number)
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, kinds) \
        and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            span = f"{'<' if high_open else '<='} {high:g}"
        else:
            span = "finite"
        kind = "an int" if integer else "a number"
        raise KprunError(f"`{name}` must be {kind} {span}" + (f" ({what})" if what else "")
                         + f"; got {value!r}.")
    return int(value) if integer else float(value)


def _check_callable(fn, name: str, optional: bool = False) -> None:
    if fn is None and optional:
        return
    if not callable(fn):
        raise KprunError(f"`{name}` must be a function of the model"
                         + (" (or None)" if optional else "") + f"; got {fn!r}.")


def _check_limits(max_trials, time_limit) -> None:
    if max_trials is not None and (isinstance(max_trials, bool)
                                   or not isinstance(max_trials, (int, np.integer))
                                   or max_trials < 1):
        raise KprunError(f"`max_trials` must be None or an int >= 1, got {max_trials!r}.")
    if time_limit is not None and (isinstance(time_limit, bool)
                                   or not isinstance(time_limit, (int, float, np.number))
                                   or not time_limit > 0):
        raise KprunError(f"`time_limit` must be None or seconds > 0, got {time_limit!r}.")


# --------------------------------------------------------------------------
# The core
# --------------------------------------------------------------------------
@dataclasses.dataclass
class State:
    """A model that candidates are pruned from: the original, or an accepted, tuned one.

    Attributes:
        model: The model.
        graph: Its `DependencyGraph` (group ids equal the original's).
        scores: `{group id: channel scores}` on this model.
        counts: `{group id: channels already dropped}`, relative to the original.
    """

    model: keras.Model
    graph: DependencyGraph
    scores: dict
    counts: dict


class Search:
    """Setup, bookkeeping and evaluation shared by the search strategies.

    Args:
        model: A functional or Sequential Keras model (left untouched).
        evaluate: `evaluate(model) -> float`, higher is better (validation
            accuracy, minus a loss).
        budget: A `Budget` (`kprune.search.macs`, `params`, `latency`), or
            None for strategies that need none.
        finetune: Optional `finetune(model) -> model or None` run on every
            pruned candidate before `evaluate` (None: tuned in place).
        criterion: Channel criterion (`kprune.criteria.available_criteria()`).
        exclude: Layer names, class names or classes whose groups stay whole.
        max_ratio, min_channels, round_to: The guards of `kprune.prune`.
        data, loss, reduce, seed, batch_size: As in `kprune.prune` (data
            criteria need `data`).
        max_trials: Stop after this many evaluations (None: no limit).
        time_limit: Start no trial after this many seconds (None: no limit).
        verbose: 1 shows a progress bar (`keras.utils.Progbar`), 2 prints a
            line per step instead, 0 is silent.
        approximate: As in `kprune.prune`: also prune normalised streams.

    Raises:
        KprunError: for any invalid argument.
    """

    def __init__(self, model: keras.Model, evaluate: Callable, budget: Budget | None = None, *,
                 finetune: Callable | None = None, criterion="l1", exclude=(),
                 max_ratio: float = 0.9, min_channels: int = 1, round_to: int = 1, data=None,
                 loss=None, reduce: str = "mean", seed: int | None = None, batch_size: int = 32,
                 max_trials: int | None = None, time_limit: float | None = None,
                 verbose: int = 1, approximate: bool = True):
        if not isinstance(model, keras.Model):
            raise KprunError(f"`model` must be a keras.Model, got {type(model).__name__}.")
        _check_callable(evaluate, "evaluate")
        _check_callable(finetune, "finetune", optional=True)
        if budget is not None:
            check_budget(budget)
        _check_limits(max_trials, time_limit)
        pruners.check_guards(max_ratio, min_channels, round_to)
        self.criterion = _criteria.get_criterion(criterion)
        if self.criterion.needs_data and data is None:
            raise KprunError(f"Criterion '{self.criterion.name}' scores activations: pass `data` "
                             "(inputs, (x, y) or batches).")
        if reduce not in _criteria.REDUCERS:
            raise KprunError(f"Unknown reduce {reduce!r}; valid: {', '.join(_criteria.REDUCERS)}.")
        entries = pruners.check_exclude(exclude)
        self.model, self.evaluate_fn, self.finetune_fn = model, evaluate, finetune
        self.guards = dict(max_ratio=max_ratio, min_channels=min_channels, round_to=round_to)
        self._score_args = dict(reduce=reduce, data=data, loss=loss, seed=seed,
                                batch_size=batch_size)
        self.approximate = approximate
        self.graph = DependencyGraph(model, approximate=approximate)
        _check_exclude_names(model, self.graph, entries)
        groups = [g for g in self.graph.prunable_groups() if not pruners.is_excluded(g, entries)]
        scores = self._scores(model, self.graph, groups)
        self.groups = [g for g in groups if g.id in scores]
        self.origin = State(model, self.graph, scores, {})
        self.units = self._units(self.groups)
        self.unit_of = {gid: rep for rep, gids in self.units.items() for gid in gids}
        self.budget = budget
        self.bound = (budget.bind(model, self.graph, [g.id for g in self.groups], verbose)
                      if budget is not None else None)
        self.max_trials, self.time_limit, self.verbose = max_trials, time_limit, verbose
        self.history: list = []
        self.stopped, self.reason = False, ""
        self._start = time.perf_counter()
        self._bar = None
        self.progress(max_trials)

    # Setup ------------------------------------------------------------------------
    def progress(self, target: int | None = None) -> None:
        """(Re)start the progress bar for `target` trials (None: unknown); verbose=1 only."""
        if self.verbose == 1:
            self._bar = keras.utils.Progbar(target, stateful_metrics=["score", "budget"],
                                            unit_name="trial")

    def _scores(self, model, graph, groups) -> dict:
        if not groups:
            return {}
        a = self._score_args
        return _criteria.score_groups(model, groups, self.criterion, a["reduce"], a["data"],
                                      a["loss"], a["seed"], graph, a["batch_size"])

    @staticmethod
    def _units(groups) -> dict:
        """`{first group id: [group ids]}`: groups with the same producer layers, tied."""
        by_names: dict = {}
        for g in groups:
            key = frozenset(m.name for m in g.producers)
            by_names.setdefault(key, []).append(g.id)
        return {gids[0]: gids for gids in by_names.values()}

    def label(self, gid: int) -> str:
        """`'conv1 (+2 coupled)'`: the first producer of a group (or unit) and how many others."""
        group = self.graph.groups[gid]
        names = list(dict.fromkeys(m.name for m in group.producers))
        more = len(names) - 1
        tied = len(self.units.get(self.unit_of.get(gid, gid), [gid])) - 1
        text = names[0] + (f" (+{more} coupled)" if more else "")
        return text + (f" [{tied + 1} groups]" if tied else "")

    @property
    def prune_kwargs(self) -> dict:
        """The criterion, guards and scoring settings, as `kprune.prune` keywords.

        Data criteria also need the same `data` (and `loss`), which is not
        repeated here.
        """
        out = dict(criterion=self.criterion.name, **self.guards,
                   reduce=self._score_args["reduce"], approximate=self.approximate)
        if self._score_args["seed"] is not None:
            out["seed"] = self._score_args["seed"]
        return out

    # Ratios and plans -------------------------------------------------------------
    def check_ratios(self, ratios: Mapping) -> dict:
        """`ratios` with every group of a unit at its unit's ratio; 0s dropped.

        Raises:
            KprunError: for a group that is not searched or a ratio outside [0, 1).
        """
        out = {}
        for key, r in ratios.items():
            gid = int(getattr(key, "id", key))
            if gid not in self.unit_of:
                raise KprunError(f"Group {gid} is not one of the searched groups "
                                 f"({sorted(self.unit_of)}).")
            if isinstance(r, bool) or not isinstance(r, (int, float, np.number)) \
                    or not 0.0 <= r < 1.0:
                raise KprunError(f"The ratio of group {gid} must be in [0, 1), got {r!r}.")
            for other in self.units[self.unit_of[gid]]:
                if other in out and out[other] != float(r):
                    raise KprunError(f"Groups {gid} and {other} share their producer layers "
                                     f"({self.label(gid)}) and take one ratio; got "
                                     f"{out[other]} and {r}.")
                out[other] = float(r)
        return {gid: r for gid, r in out.items() if r > 0}

    def with_unit(self, ratios: Mapping, rep: int, ratio: float) -> dict:
        """`ratios` with every group of `rep`'s unit at `ratio`."""
        out = dict(self.check_ratios(ratios))
        for gid in self.units[self.unit_of[rep]]:
            out[gid] = ratio
        return {gid: r for gid, r in out.items() if r > 0}

    def plan(self, ratios: Mapping) -> dict:
        """The plan `{group id: channels}` of `ratios` on the original model."""
        ratios = self.check_ratios(ratios)
        return pruners.make_plan(self.groups, self.origin.scores, ratios, "local", **self.guards)

    def drop_count(self, gid: int, ratio: float) -> int:
        """Channels the guards let `ratio` drop from group `gid` (as `make_plan` counts)."""
        group = self.graph.groups[gid]
        desired = int(math.floor(ratio * group.size + 0.5 + 1e-9))
        return pruners.drop_count(group, desired, **self.guards)

    def counts(self, ratios: Mapping) -> dict:
        """`{group id: channels dropped}` of `ratios` (groups losing nothing omitted)."""
        ratios = self.check_ratios(ratios)
        out = {gid: self.drop_count(gid, r) for gid, r in ratios.items()}
        return {gid: n for gid, n in out.items() if n}

    def points(self, rep: int) -> list:
        """Every ratio at which unit `rep`'s plan can change, ascending (k / size)."""
        pts = {round(k / self.graph.groups[gid].size, 6)
               for gid in self.units[rep] for k in range(1, self.graph.groups[gid].size)}
        return sorted(pts)

    def max_ratios(self) -> dict:
        """Every searched group at the largest ratio (the guards then cap it)."""
        return {rep: round(1.0 - 0.5 / max(self.graph.groups[gid].size for gid in gids), 6)
                for rep, gids in self.units.items()}

    def estimate(self, ratios: Mapping) -> float | None:
        """Budget share of `ratios`, estimated from the plan (None without budget)."""
        if self.bound is None:
            return None
        return self.bound.estimate(self.plan(ratios))

    # Pruning ------------------------------------------------------------------------
    def realize(self, ratios: Mapping, start: State | None = None) -> keras.Model:
        """The pruned model of `ratios`, cut from `start` (default: the original).

        From the original, the plan is `plan(ratios)`. From an accepted state,
        each group loses the channels `ratios` asks for beyond those already
        gone, lowest scores on the state's own (tuned) weights first.
        """
        if start is None or start is self.origin:
            plan = self.plan(ratios)
            return apply_plan(self.model, plan, self.graph) if plan else copy_model(self.model)
        plan = {}
        for gid, n in self.counts(ratios).items():
            extra = n - start.counts.get(gid, 0)
            if extra < 0:
                raise KprunError(f"Group {gid} ({self.label(gid)}) already lost "
                                 f"{start.counts[gid]} channels; ratios can only grow from a "
                                 "pruned start.")
            if extra:
                plan[gid] = pruners.lowest(start.graph.groups[gid], start.scores[gid], extra)
        return apply_plan(start.model, plan, start.graph) if plan else copy_model(start.model)

    def state_of(self, model: keras.Model, ratios: Mapping) -> State:
        """An accepted model as a start for later candidates (its groups rescored)."""
        graph = DependencyGraph(model, approximate=self.approximate)
        counts = self.counts(ratios)
        for g in self.groups:
            ok = g.id < len(graph.groups)
            if ok:
                mine = graph.groups[g.id]
                ok = ([m.name for m in mine.producers] == [m.name for m in g.producers]
                      and mine.size == g.size - counts.get(g.id, 0) and mine.prunable)
            if not ok:
                raise KprunError(f"The pruned model '{model.name}' no longer has group {g.id} "
                                 f"({self.label(g.id)}) where the original has it; `finetune` "
                                 "must keep the model's layers.")
        scores = self._scores(model, graph, [graph.groups[g.id] for g in self.groups])
        return State(model, graph, scores, counts)

    # Trials -------------------------------------------------------------------------
    def check_limits(self) -> None:
        """Raise `Stop` when `max_trials` or `time_limit` is reached."""
        if self.max_trials is not None and len(self.history) >= self.max_trials:
            raise Stop(f"max_trials={self.max_trials} reached")
        if self.time_limit is not None and self.elapsed() >= self.time_limit:
            raise Stop(f"time_limit={self.time_limit:g}s reached")

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def finetune(self, model: keras.Model, fn: Callable | None = None,
                 what: str = "finetune") -> keras.Model:
        """`fn(model)` (default: the search's `finetune`), or `model` tuned in place."""
        fn = self.finetune_fn if fn is None else fn
        if fn is None:
            return model
        out = fn(model)
        if out is None:
            return model
        if not isinstance(out, keras.Model):
            raise KprunError(f"`{what}` must return a keras.Model or None (tuned in place); "
                             f"got {out!r} ({type(out).__name__}).")
        return out

    def score(self, model: keras.Model) -> float:
        """`evaluate(model)`, checked to be a real number."""
        return check_score(self.evaluate_fn(model))

    def trial(self, ratios: Mapping, start: State | None = None, *, step=None,
              group: int | None = None, tune: bool = True) -> tuple:
        """Prune `ratios` from `start`, fine-tune, evaluate, measure: one record.

        Args:
            ratios: `{group id: ratio}` relative to the original groups.
            start: The state to cut from (default: the original model).
            step: The strategy's step, kept in the record.
            group: The group this candidate changed, kept in the record.
            tune: Run `finetune` (False for a baseline).

        Returns:
            `(Trial, model)`; the record is appended to `history`.

        Raises:
            Stop: when `max_trials` or `time_limit` is reached (before pruning).
        """
        self.check_limits()
        ratios = self.check_ratios(ratios)
        t0 = time.perf_counter()
        model = self.realize(ratios, start)
        if tune:
            model = self.finetune(model)
        score = self.score(model)
        estimated = self.estimate(ratios)
        measured = self.bound.measure(model) if self.bound is not None else None
        record = Trial(len(self.history), step, dict(sorted(ratios.items())), estimated,
                       measured, score, time.perf_counter() - t0, group)
        self.record(record)
        return record, model

    def record(self, record: Trial) -> None:
        """Append `record` to the history and move the progress bar."""
        self.history.append(record)
        if self._bar is not None:
            values = [("score", record.score)]
            if record.measured is not None:
                values.append(("budget", record.measured))
            self._bar.update(len(self.history), values=values)

    def run_trials(self, candidates: list, start: State | None = None, *, step=None,
                   done: list | None = None) -> list:
        """Evaluate `candidates` (`(ratios, group)` pairs) one after another.

        The one place the evaluations of a step run; replace it to send them
        to another engine. Each `(Trial, model)` is appended to `done` as it
        finishes, so a strategy still has the finished ones when the loop is
        stopped.
        """
        done = [] if done is None else done
        for ratios, group in candidates:
            done.append(self.trial(ratios, start, step=step, group=group))
        return done

    @contextlib.contextmanager
    def running(self):
        """Run a strategy's loop: Ctrl-C, `max_trials` and `time_limit` stop it cleanly."""
        try:
            yield
        except KeyboardInterrupt:
            self.stopped, self.reason = True, "interrupted"
        except Stop as stop:
            self.stopped, self.reason = True, str(stop)
        finally:
            if self._bar is not None and self.stopped:
                print()

    def long_finetune(self, record: Trial, model: keras.Model, fn: Callable) -> tuple:
        """`fn` run on a copy of the chosen `model`, scored and recorded: `(Trial, model)`.

        The record's step is 'long_finetune'; a model tuned in place keeps
        the chosen one's measured budget (its widths are those measured).
        """
        t0 = time.perf_counter()
        start = copy_model(model)
        tuned = self.finetune(start, fn, "long_finetune")
        score = self.score(tuned)
        measured = record.measured if tuned is start or self.bound is None \
            else self.bound.measure(tuned)
        final = Trial(len(self.history), "long_finetune", dict(record.ratios), record.estimated,
                      measured, score, time.perf_counter() - t0, accepted=True)
        self.record(final)
        return final, tuned

    def calibrated(self, quantile: float = 0.75) -> float | None:
        """The goal for estimates: the target over how far measurements exceed estimates.

        MACs and parameter estimates are exact: the target. For latency, the
        ratio measured / estimated of every trial so far, at `quantile` (a
        high one, so that most candidates measure within the target), divides
        the target; the target itself before any trial. None without budget.
        """
        if self.bound is None:
            return None
        target = self.bound.target
        if self.budget.kind != "latency":
            return target
        ratios = [r.measured / r.estimated for r in self.history
                  if r.measured is not None and r.estimated and r.measured > 0]
        if not ratios:
            return target
        return target / float(np.quantile(ratios, quantile))

    def scaled_down(self, ratios: Mapping, goal: float, steps: int = 50) -> dict:
        """`ratios` times the factor in [0, 1] whose estimate is the largest within `goal`.

        Every ratio is multiplied by the same factor, tried on a grid of
        `steps + 1` points (estimates need not fall steadily with the factor:
        a latency table has steps), so the result keeps the most of the model
        that `goal` allows; `ratios` itself when no factor is within `goal`.
        """
        ratios = self.check_ratios(ratios)
        chosen, kept = ratios, -1.0
        for factor in np.linspace(0.0, 1.0, steps + 1):
            candidate = {gid: round(r * float(factor), 6) for gid, r in ratios.items()}
            estimate = self.estimate(candidate)
            if kept < estimate <= goal + 1e-12:
                chosen, kept = candidate, estimate
        return {gid: r for gid, r in chosen.items() if r > 0}

    def refine(self, best: tuple | None, rounds: int = 2, slack: float = 0.02) -> tuple | None:
        """Give back what the best candidate left of the budget: `rounds` trials at most.

        A strategy's best `(Trial, model)` can keep well under the target:
        random starts, clipped actions and a latency goal lowered by the
        calibration all prune more than asked. While the best measures more
        than `slack` under the target, its ratios are scaled down
        (`scaled_down`) to the estimate that its own measured / estimated
        ratio puts `slack / 2` under the target, and that candidate is tried
        (step 'refine'). It replaces the best when it is within the budget and
        scores at least as high (a tie goes to the wider model: evaluators
        on a small held-out set score many candidates alike, and `best`
        would keep the more pruned one); one over the target teaches the
        next round a lower goal. Returns the (new) best.

        Args:
            best: The strategy's best `(Trial, model)` (None: returned as is).
            rounds: Most trials to spend (0: none).
            slack: How far under the target (a share of the original) is
                close enough.

        Example:

        >>> search = Search(model, evaluate, kprune.search.macs(0.5), verbose=0)
        >>> first = search.trial({gid: 0.8 for gid in search.unit_of})
        >>> search.refine(first)[0].measured >= first[0].measured
        True
        """
        if best is None or self.bound is None or rounds < 1:
            return best
        target, reference = self.bound.target, best[0]
        for _ in range(rounds):
            record = best[0]
            if not self.bound.met(record.measured) or record.measured >= target - slack:
                break
            factor = reference.measured / reference.estimated if reference.estimated else 1.0
            ratios = self.scaled_down(record.ratios, (target - slack / 2) / max(factor, 1e-9))
            if self.estimate(ratios) <= record.estimated + 1e-12:
                break  # no width to give back within the goal
            candidate = self.trial(ratios, step="refine")
            reference = candidate[0]
            if not self.bound.met(candidate[0].measured):
                continue
            if candidate[0].score < best[0].score:
                break
            best = candidate  # as good and wider: a tie goes to the one that uses the budget
        return best

    def best(self, pairs: list) -> tuple | None:
        """The best `(Trial, model)` of `pairs`: highest score within the budget.

        When none is within the budget (a measured latency), the one that
        keeps the least; None when `pairs` is empty.
        """
        if not pairs:
            return None
        within = [p for p in pairs if self.bound is None or self.bound.met(p[0].measured)]
        if within:
            return max(within, key=lambda p: (p[0].score, -(p[0].measured or 0.0)))
        return min(pairs, key=lambda p: (p[0].measured, -p[0].score))

    # Results ------------------------------------------------------------------------
    def config_list(self, ratios: Mapping) -> list:
        """An NNI-style config list that makes `kprune.prune` drop the counts of `ratios`.

        Entries are `{"op_names": [producer], "sparsity": r}`, one per unit,
        ordered so that every group is matched first by its own entry (a
        group takes the first entry naming one of its producers); where a
        group left whole shares a producer with a pruned one, an
        `{"op_names": [...], "exclude": True}` entry shields it.

        Warns (KprunWarning) if the plan cannot be written that way, which
        needs groups sharing producer layers with different ratios.
        """
        ratios = self.check_ratios(ratios)
        every = self.graph.prunable_groups()
        want = {g.id: self.drop_count(g.id, ratios.get(g.id, 0.0)) for g in every}
        names = {g.id: list(dict.fromkeys(m.name for m in g.producers)) for g in every}
        uncovered = set(want)
        need = sorted(gid for gid, n in want.items() if n)
        entries = []

        def fits(name, ratio):
            touched = [h for h in uncovered if name in names[h]]
            if all(self.drop_count(h, ratio) == want[h] for h in touched):
                return touched
            return None

        while any(gid in uncovered for gid in need):
            pick = None
            for gid in (g for g in need if g in uncovered):
                for name in names[gid]:
                    touched = fits(name, ratios[gid])
                    if touched is not None:
                        pick = ({"op_names": [name], "sparsity": ratios[gid]}, touched)
                        break
                if pick:
                    break
            if pick is None:  # shield a group left whole so that a pruned one can be named
                for gid in sorted(g for g in uncovered if not want[g]):
                    for name in names[gid]:
                        touched = [h for h in uncovered if name in names[h]]
                        if all(not want[h] for h in touched):
                            pick = ({"op_names": [name], "exclude": True}, touched)
                            break
                    if pick:
                        break
            if pick is None:
                left = [g for g in need if g in uncovered]
                warnings.warn(f"kprune: the ratios of groups {left} cannot be written as a "
                              "config list: they share producer layers with groups of other "
                              "ratios; `kprune.prune(config_list=...)` will not reproduce them.",
                              KprunWarning, stacklevel=3)
                break
            entries.append(pick[0])
            uncovered.difference_update(pick[1])
        if entries:
            got = config_ratios(every, parse_config_list(entries))
            wrong = [g.id for g in every
                     if self.drop_count(g.id, got.get(g.id, 0.0)) != want[g.id]]
            if wrong:
                warnings.warn(f"kprune: the config list does not reproduce groups {wrong}.",
                              KprunWarning, stacklevel=3)
        return entries

    def result(self, model, ratios, score, measured, *, met=True, reason="") -> SearchResult:
        """A `SearchResult` with the history and the stop flag of this search."""
        ratios = self.check_ratios(ratios)
        return SearchResult(model=model, ratios=dict(sorted(ratios.items())),
                            config_list=self.config_list(ratios), score=score, budget=measured,
                            history=list(self.history), stopped=self.stopped, met=met,
                            reason=self.reason or reason, prune_kwargs=self.prune_kwargs)


def check_reachable(search: Search) -> None:
    """Raise a `KprunError` naming why, when `search`'s budget cannot be reached.

    For MACs and parameters, whose estimates are exact: when every group at
    the most the guards allow still keeps more than the target. A latency
    estimate is a prediction, so only a search without any prunable group
    is refused for it.
    """
    bound = search.bound
    if not search.units:
        raise KprunError(unreachable(search, "no group can be pruned (every group reaches a "
                                             "model input or output, or is excluded)"))
    if search.budget.kind == "latency":
        return  # a prediction, not the cost: only the measured latency can say it is out of reach
    smallest = search.estimate(search.max_ratios())
    if not bound.met(smallest):
        raise KprunError(unreachable(search, f"with every group at the most the guards allow, "
                                             f"the model keeps {smallest:.1%}"))


def unreachable(search: Search, why: str) -> str:
    """The message of an unreachable budget: `why`, the blocked groups and the guards."""
    guards = search.guards
    blocked = search.graph.describe_blockers()
    return (f"Model '{search.model.name}' cannot reach {search.budget.describe()}: {why}; "
            + (f"groups are left whole by layers kprune cannot prune through: {blocked}; "
               if blocked else "")
            + f"guards: max_ratio={guards['max_ratio']}, min_channels={guards['min_channels']}, "
            f"round_to={guards['round_to']}. `kprune.DependencyGraph(model).summary()` lists "
            "every group's reason.")


def make_search(model: keras.Model, evaluate: Callable, budget: Budget, finetune, long_finetune,
                seed, verbose: int, options: dict) -> Search:
    """The `Search` of a strategy, checked: the seed, `long_finetune`, options, the budget.

    Raises:
        KprunError: for a negative or non-int seed, a `long_finetune` that is
            not callable, an option `Search` does not take, or a MACs or
            params budget the guards cannot reach (`check_reachable`).
    """
    if seed is not None:
        check_number("seed", seed, 0, None, integer=True)
    if long_finetune is not None and not callable(long_finetune):
        raise KprunError(f"`long_finetune` must be a function of the model (or None); "
                         f"got {long_finetune!r}.")
    known = set(inspect.signature(Search).parameters) - {"model", "evaluate", "budget",
                                                          "finetune", "seed", "verbose"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise KprunError(f"Unknown search option(s) {unknown}; valid: {sorted(known)}.")
    search = Search(model, evaluate, budget, finetune=finetune, seed=seed, verbose=verbose,
                    **options)
    check_reachable(search)
    return search


__all__ = ["Search", "SearchResult", "State", "Stop", "Trial", "check_number", "check_reachable",
           "check_score", "make_search", "unreachable"]
