"""ADMM toward a structured-sparse set: an update rule and the callback that moves Z and U.

The alternating direction method of multipliers for pruning (Zhang et al.,
ECCV 2018; structured, as AutoCompress uses it, Liu et al., AAAI 2020):
training minimises `loss(W) + rho / 2 * ||W - Z + U||^2`, where `Z` is the
projection of `W + U` onto the structured-sparse set and `U` the scaled dual
variable. Here the set is the one of a channel plan: in each dependency
group (`kprune.graph.Group`), only `keep` channels may be non-zero. The
projection keeps the `keep` channels with the largest L2 norm of `W + U`
over all the group's producer weights (kernel output columns and biases)
and zeroes the others.

* `ADMMRule` adds the penalty's gradient `rho * (W - Z + U)` to the
  gradients of the producer weights (a `kprune.rules.Rule`, so it works in
  `model.fit` through `kprune.train.RuleOptimizer` and in `kprune.Trainer`);
* `ADMMRule.update()` is the dual step: `Z = project(W + U)`, then
  `U += W - Z`; `ADMMUpdate` calls it every `every` epochs;
* `ADMMRule.plan()` is the plan that prunes for real: every group's
  channels outside the projection of the current `W`.

At the start `Z = project(W)` and `U = 0`. The rule keeps `Z` and `U` in
memory (the penalty reads `Z - U` from a variable of its own), so it cannot
be saved in a model's optimizer config.

Example:

>>> rule = ADMMRule.from_plan(model, {graph.group_of("conv1").id: 8}, rho=1e-3)
>>> model.compile(kprune.train.RuleOptimizer("sgd", [rule]), loss=...)
>>> model.fit(x, y, epochs=10, callbacks=[ADMMUpdate(rule, every=2)])
>>> small = kprune.apply_plan(model, rule.plan())
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
from keras import ops

from kprune.errors import KprunError
from kprune.graph import DependencyGraph
from kprune.search.core import check_number
from kprune.train.masking import producer_variables
from kprune.train.rules import Rule


def channel_norms(values: list, size: int) -> np.ndarray:
    """The L2 norm of each of a group's `size` channels over `(array, axis, index)` entries.

    `index[p]` is the group channel of position `p` along `axis` (-1: none).

    Example:

    >>> channel_norms([(np.array([[3.0, 0.0], [4.0, 1.0]]), 1, np.array([0, 1]))], 2)
    array([5., 1.])
    """
    squares = np.zeros(size)
    for array, axis, index in values:
        moved = np.moveaxis(np.asarray(array, dtype=float), axis, -1)
        per_position = np.sum(moved.reshape(-1, moved.shape[-1]) ** 2, axis=0)
        own = index >= 0
        np.add.at(squares, index[own], per_position[own])
    return np.sqrt(squares)


def top_channels(norms: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` channels of largest norm, ascending (ties: the lower channel first).

    Example:

    >>> top_channels(np.array([1.0, 5.0, 1.0, 3.0]), 3)
    array([0, 1, 3])
    """
    order = np.lexsort((np.arange(len(norms)), -np.asarray(norms)))
    return np.sort(order[:keep])


class ADMMRule(Rule):
    """Add `rho * (W - Z + U)` to the gradients of the producer weights of planned groups.

    Args:
        rho: The penalty's strength, a finite number >= 0 (NNI's default: 1e-4).
        blocks: `[(group id, keep, [(variable, axis, index), ...]), ...]`:
            per group, how many channels may stay non-zero and where its
            channels lie in each variable (`index[p]`: the channel of
            position `p` along `axis`, -1 for a position of another group).
            `from_plan` builds them from a model.

    Example:

    >>> rule = ADMMRule.from_plan(model, {0: 4}, rho=1e-3)
    >>> grads = rule(grads, model.trainable_variables)
    """

    slot_names = ("variable", "target")

    def __init__(self, rho: float, blocks: list):
        self.rho = check_number("rho", rho, 0, None, what="the ADMM penalty's strength")
        self.blocks, entries = [], {}
        for gid, keep, places in blocks:
            places = [(v, int(axis), np.asarray(index, dtype=int)) for v, axis, index in places]
            size = 1 + max((int(index.max()) for _, _, index in places if index.size), default=-1)
            keep = check_number("keep", keep, 1, max(size, 1), integer=True,
                                what=f"channels group {gid} keeps, at most its {size}")
            for variable, axis, index in places:
                if variable.shape[axis] != len(index):
                    raise KprunError(f"ADMMRule: '{variable.path}' has {variable.shape[axis]} "
                                     f"positions on axis {axis}, the index of group {gid} "
                                     f"{len(index)}.")
                entries.setdefault(id(variable), (variable, axis))
            self.blocks.append((int(gid), keep, size, places))
        self._variables = list(entries.values())
        self._u = {key: np.zeros(v.shape, dtype="float32") for key, (v, _) in entries.items()}
        self._z = self.project({key: self._value(v) for key, (v, _) in entries.items()})
        self._target = {key: keras.Variable(self._z[key], trainable=False,
                                            name=f"admm_target_{i}")
                        for i, key in enumerate(entries)}
        super().__init__([(v, self._target[id(v)]) for v, _ in self._variables])

    @classmethod
    def from_plan(cls, model: keras.Model, keep: Mapping, rho: float = 1e-4,
                  graph: DependencyGraph | None = None) -> ADMMRule:
        """The rule for `model`'s groups `{group id: channels to keep}`.

        Args:
            model: The model (its producer kernels and biases are penalised).
            keep: `{group id (or Group): channels kept}`; groups not named are free.
            rho: The penalty's strength.
            graph: `model`'s `DependencyGraph`, if already built.

        Raises:
            KprunError: for a group that is not prunable, a producer kprune
                cannot mask, or a `keep` outside [1, group size].
        """
        graph = graph or DependencyGraph(model)
        blocks = []
        for key, n in keep.items():
            gid = int(getattr(key, "id", key))
            if not 0 <= gid < len(graph.groups) or not graph.groups[gid].prunable:
                raise KprunError(f"ADMMRule: group {gid} is not a prunable group of model "
                                 f"'{model.name}'.")
            group = graph.groups[gid]
            places = []
            for member in group.producers:
                pairs = producer_variables(member.layer)
                if pairs is None:
                    raise KprunError(f"ADMMRule: kprune cannot mask producer '{member.name}' "
                                     f"({type(member.layer).__name__}) of group {gid}.")
                places.extend((v, axis % len(v.shape), member.index) for v, axis in pairs
                              if v.trainable and v.shape[axis] == len(member.index))
            blocks.append((gid, n, places))
        return cls(rho, blocks)

    @staticmethod
    def _value(variable) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(variable), dtype="float32")

    # The ADMM steps ---------------------------------------------------------------
    def kept(self, values: Mapping) -> dict:
        """`{group id: kept channels}` of the projection of `values` (`{id(variable): array}`)."""
        axes = {id(v): axis for v, axis in self._variables}
        return {gid: top_channels(channel_norms([(values[id(v)], axes[id(v)], index)
                                                 for v, _, index in places], size), keep)
                for gid, keep, size, places in self.blocks}

    def project(self, values: Mapping) -> dict:
        """`{id(variable): Z}`: `values` with every group's channels outside its top `keep` zeroed."""
        out = {key: np.array(value, dtype="float32", copy=True) for key, value in values.items()}
        for (gid, kept), (_, _, _, places) in zip(self.kept(values).items(), self.blocks):
            for variable, axis, index in places:
                drop = (index >= 0) & ~np.isin(index, kept)
                moved = np.moveaxis(out[id(variable)], axis, 0)
                moved[drop] = 0.0
        return out

    def update(self) -> None:
        """The dual step on the current weights: `Z = project(W + U)`, then `U += W - Z`."""
        w = {id(v): self._value(v) for v, _ in self._variables}
        self._z = self.project({key: w[key] + self._u[key] for key in w})
        for key, value in w.items():
            self._u[key] = self._u[key] + value - self._z[key]
            self._target[key].assign(self._z[key] - self._u[key])

    def z(self, variable) -> np.ndarray:
        """The current `Z` of `variable`."""
        return self._z[id(variable)]

    def u(self, variable) -> np.ndarray:
        """The current `U` of `variable`."""
        return self._u[id(variable)]

    def plan(self) -> dict:
        """`{group id: channels to remove}`: those outside the projection of the current `W`."""
        w = {id(v): self._value(v) for v, _ in self._variables}
        return {gid: sorted(set(range(size)) - set(kept.tolist()))
                for (gid, kept), (_, _, size, _) in zip(self.kept(w).items(), self.blocks)}

    # The rule ---------------------------------------------------------------------
    def penalty(self, variable, target):
        return self.rho * (ops.convert_to_tensor(variable) - ops.convert_to_tensor(target))

    def get_config(self) -> dict:
        raise KprunError("ADMMRule keeps Z and U in memory and cannot be saved; compile the "
                         "model with another optimizer before saving it.")


class ADMMUpdate(keras.callbacks.Callback):
    """Call `rule.update()` (ADMM's Z and U step) at the end of every `every` epochs.

    Args:
        rule: An `ADMMRule`.
        every: Epochs between two updates, an int >= 1 (NNI's `epochs` per
            ADMM iteration).

    Example:

    >>> model.fit(x, y, epochs=30 * 5, callbacks=[ADMMUpdate(rule, every=5)])
    """

    def __init__(self, rule: ADMMRule, every: int = 1):
        super().__init__()
        if not isinstance(rule, ADMMRule):
            raise KprunError(f"ADMMUpdate: `rule` must be an ADMMRule, got {rule!r}.")
        self.rule = rule
        self.every = check_number("every", every, 1, None, integer=True)
        self.updates = 0

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self.rule.update()
            self.updates += 1


__all__ = ["ADMMRule", "ADMMUpdate", "channel_norms", "top_channels"]
