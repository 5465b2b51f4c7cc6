"""Network Slimming: L1 on BatchNorm scales, one global threshold, a narrower model.

Network Slimming (Liu et al., "Learning Efficient Convolutional Networks
through Network Slimming", ICCV 2017) trains with an L1 penalty on the
BatchNormalization scales (`grad(gamma) += s * sign(gamma)`, `rule`), ranks
every channel of the network by |gamma| against one global threshold, and
removes the channels below it (`prune`). Fine-tuning the narrower model
recovers the accuracy.

Channels that must be removed together (a residual stream joined by `Add`,
the slices of a `Concatenate`) form one dependency group
(`kprune.graph.Group`); such a channel is scored by the mean |gamma| of the
group's BatchNormalization layers.

The workflow:

    model = kprune.models.vgg(19)
    model.compile(optimizer=kprune.train.RuleOptimizer(sgd, [kprune.slimming.rule(model)]), ...)
    model.fit(...)
    small, cfg = kprune.slimming.prune(model, percent=0.7)
    small.compile(...); small.fit(...)        # fine-tune
    kprune.models.vgg(19, cfg=cfg)           # the same narrow architecture, fresh weights
"""

from __future__ import annotations

import math

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.dependency import DependencyGraph
from kprune.graph.walk import walk
from kprune.train.masking import lowest_global
from kprune.surgeon.plan import apply_plan, copy_model

_L = keras.layers


def _scaled_norms(group) -> list:
    """The BatchNormalization members of `group` that have a gamma."""
    out, seen = [], set()
    for member in group.params:
        layer = member.layer
        if isinstance(layer, _L.BatchNormalization) and getattr(layer, "gamma", None) is not None:
            if id(layer) not in seen:
                seen.add(id(layer))
                out.append(member)
    return out


def scores(model: keras.Model, graph: DependencyGraph | None = None) -> dict:
    """Mean |gamma| per channel of every prunable group that has BatchNormalization.

    Scores are raw (not normalised per layer), so one threshold applies to
    the whole network, as in the paper.

    Args:
        model: The model.
        graph: The model's `DependencyGraph`, if already built.

    Returns:
        `{group id: array of group.size scores}`.

    Example:

    >>> scores(model)[graph.group_of("block1_conv1").id][:3]
    array([0.49, 0.51, 0.50])
    """
    graph = graph or DependencyGraph(model)
    out = {}
    for group in graph.prunable_groups():
        members = _scaled_norms(group)
        if not members:
            continue
        sums, counts = np.zeros(group.size), np.zeros(group.size)
        for member in members:
            gamma = np.abs(np.asarray(member.layer.gamma.numpy(), np.float64))
            index = np.asarray(member.index)
            hit = index >= 0
            np.add.at(sums, index[hit], gamma.reshape(-1)[hit])
            np.add.at(counts, index[hit], 1.0)
        out[group.id] = np.where(counts > 0, sums / np.maximum(counts, 1.0), 0.0)
    return out


def norm_layers(model: keras.Model, graph: DependencyGraph | None = None) -> list:
    """The BatchNormalization layers (with a gamma) on prunable channels, in model order.

    Args:
        model: The model.
        graph: The model's `DependencyGraph`, if already built.

    Returns:
        A list of layers, each once.
    """
    graph = graph or DependencyGraph(model)
    found = {}
    for group in graph.prunable_groups():
        for member in _scaled_norms(group):
            found.setdefault(id(member.layer), member.layer)
    order = {id(c.layer): i for i, c in enumerate(graph.flat.calls)}
    return sorted(found.values(), key=lambda layer: order[id(layer)])


def gammas(model: keras.Model, graph: DependencyGraph | None = None) -> list:
    """The gamma variables of `norm_layers(model)`: what the slimming rule penalises.

    Args:
        model: The model.
        graph: The model's `DependencyGraph`, if already built.

    Returns:
        A list of variables, each once, in model order.
    """
    return [layer.gamma for layer in norm_layers(model, graph)]


def rule(model: keras.Model, s: float = 1e-4):
    """The slimming update rule for `model`: `grad(gamma) += s * sign(gamma)`.

    It covers the gammas of the BatchNormalization layers in prunable groups
    (`gammas`); BatchNormalization on channels that cannot be removed (for
    example before the model's output) is left alone.

    Args:
        model: The model to train.
        s: Strength of the L1 penalty (the paper uses 1e-4 for VGG on CIFAR).

    Returns:
        A `kprune.rules.SlimmingRule`, for `kprune.Trainer(rules=[...])` or
        `kprune.train.RuleOptimizer`.

    Raises:
        KprunError: if `s` is not a non-negative number or the model has no
            such BatchNormalization.

    Example:

    >>> slim = kprune.slimming.rule(model, s=1e-4)
    >>> kprune.Trainer(model, "sgd", "sparse_categorical_crossentropy", rules=[slim]).fit(ds)
    """
    from kprune.train.rules import SlimmingRule

    if isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0:
        raise KprunError(f"slimming.rule: `s` must be a number >= 0, got {s!r}.")
    layers = norm_layers(model)
    if not layers:
        raise KprunError(f"Model '{model.name}' has no BatchNormalization with a gamma on "
                         "channels that can be pruned: nothing for Network Slimming to do.")
    return SlimmingRule.from_layers(layers, s=s)


def plan(model: keras.Model, percent: float = 0.7, min_channels: int = 1,
         graph: DependencyGraph | None = None) -> tuple:
    """Which channels the global |gamma| threshold removes.

    The `floor(percent * N)` lowest-scoring of the N scored channels (see
    `scores`) are removed, except that a group never loses more than
    `size - min_channels` channels: a channel of a full group is kept and
    the next lowest is taken instead.

    Args:
        model: The trained model.
        percent: Share of the scored channels to remove, in [0, 1).
        min_channels: Channels every group keeps.
        graph: The model's `DependencyGraph`, if already built.

    Returns:
        `(plan, threshold)`: the plan `{group id: channel indices}` for
        `kprune.surgeon.apply_plan`, and the largest removed score (the
        threshold; -inf when nothing is removed).

    Raises:
        KprunError: bad `percent` or `min_channels`, or nothing to score.
    """
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) \
            or not 0 <= percent < 1:
        raise KprunError(f"slimming: `percent` must be in [0, 1), got {percent!r}.")
    graph = graph or DependencyGraph(model)
    table = scores(model, graph)
    if not table:
        raise KprunError(f"Model '{model.name}' has no BatchNormalization on channels that "
                         "can be pruned: nothing for Network Slimming to score.")
    groups = [graph.groups[gid] for gid in table]
    total = sum(g.size for g in groups)
    count = int(math.floor(percent * total + 1e-9))
    chosen = lowest_global(groups, table, count, min_channels)
    removed = [table[gid][ch] for gid, ch in chosen.items()]
    threshold = float(max(np.max(r) for r in removed)) if removed else -math.inf
    return chosen, threshold


def prune(model: keras.Model, percent: float = 0.7, min_channels: int = 1) -> tuple:
    """Remove the channels with the smallest |gamma| across the network.

    Args:
        model: A trained model (left untouched).
        percent: Share of the BatchNormalization channels to remove, in [0, 1)
            (the paper prunes 70% of VGG-19 on CIFAR-10).
        min_channels: Channels every layer (group) keeps.

    Returns:
        `(new_model, cfg)`: the narrower model, with exactly sliced weights,
        and its widths (`widths(new_model)`): for a VGG of
        `kprune.models.vgg`, a list like its `cfg` (ints and "M"), so
        `kprune.models.vgg(cfg=cfg)` builds the same architecture; for other
        models a dict layer name -> output channels.

    Raises:
        KprunError: bad arguments, or a model without prunable
            BatchNormalization.

    Example:

    >>> small, cfg = kprune.slimming.prune(model, percent=0.7)
    >>> kprune.models.vgg(cfg=cfg).count_params() == small.count_params()
    True
    """
    graph = DependencyGraph(model)
    chosen, _ = plan(model, percent, min_channels, graph)
    small = apply_plan(model, chosen, graph) if chosen else copy_model(model)
    return small, widths(small)


def widths(model: keras.Model):
    """The layer widths of `model`, the slimming reference code's `cfg`.

    Args:
        model: A model.

    Returns:
        For a plain chain of Conv2D (with BatchNormalization and activations)
        and MaxPooling2D layers followed by a pooling/Flatten/Dense head (the
        shape of `kprune.models.vgg`): a list of filter counts with "M" for
        each max-pool. Otherwise a dict `{layer name: output channels}` for
        every convolution and Dense layer.

    Example:

    >>> widths(kprune.models.vgg(11))
    [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512]
    """
    flat = walk(model)
    cfg = _vgg_cfg(flat)
    if cfg is not None:
        return cfg
    out = {}
    for call in flat.calls:
        layer = call.layer
        if isinstance(layer, (_L.Dense,)):
            out[layer.name] = int(layer.units)
        elif getattr(layer, "filters", None) is not None:
            out[layer.name] = int(layer.filters)
    return out


_BODY = (_L.Conv2D, _L.BatchNormalization, _L.ReLU, _L.Activation, _L.MaxPooling2D)
_HEAD = (_L.AveragePooling2D, _L.GlobalAveragePooling2D, _L.Flatten, _L.Dropout, _L.Dense,
         _L.ReLU, _L.Activation, _L.BatchNormalization)


def _vgg_cfg(flat) -> list | None:
    """The VGG cfg of a chain model, or None if it is not shaped like one."""
    if len(flat.inputs) != 1 or len(flat.outputs) != 1:
        return None
    cfg, previous, in_head = [], flat.inputs[0], False
    for call in flat.calls:
        layer = call.layer
        if len(call.inputs) != 1 or call.inputs[0] is not previous or len(call.outputs) != 1:
            return None
        previous = call.outputs[0]
        if not in_head and isinstance(layer, _BODY):
            if isinstance(layer, _L.Conv2D):
                if type(layer) is not _L.Conv2D or int(layer.groups) != 1:
                    return None
                cfg.append(int(layer.filters))
            elif isinstance(layer, _L.MaxPooling2D):
                cfg.append("M")
            continue
        if not isinstance(layer, _HEAD):
            return None
        in_head = True
    if not any(v != "M" for v in cfg) or not in_head:
        return None
    return cfg


__all__ = ["gammas", "norm_layers", "plan", "prune", "rule", "scores", "widths"]
