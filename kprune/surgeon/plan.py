"""Apply a pruning plan (group -> channels to drop) in one rebuild."""

from __future__ import annotations

from typing import Mapping

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.dependency import DependencyGraph
from kprune.graph.ops import OpCall
from kprune.graph.rules import get_rule
from kprune.surgeon.rebuild import Rebuilder, assign, copy_state, weights_of


def _group_id(group) -> int:
    return int(getattr(group, "id", group))


def drop_masks(graph: DependencyGraph, plan: Mapping) -> dict:
    """Validate `plan` and turn it into group id -> boolean drop mask.

    Raises:
        KprunError: unknown or blocked group, index out of range or repeated,
            every channel of a group removed, uneven removal in a grouped conv.
    """
    masks = {}
    for key, channels in plan.items():
        gid = _group_id(key)
        if not 0 <= gid < len(graph.groups):
            raise KprunError(f"Group {gid} does not exist (the model has {len(graph.groups)}).")
        group = graph.groups[gid]
        where = _describe(group)
        if not group.prunable:
            raise KprunError(f"Group {gid} ({where}) cannot be pruned: {group.reason}.")
        idx = np.asarray(list(channels), dtype=np.int64)
        if len(idx) == 0:
            continue
        if idx.min() < 0 or idx.max() >= group.size:
            raise KprunError(f"Channel index out of range for {where}: valid indices are "
                             f"0..{group.size - 1}, got {sorted(idx.tolist())}.")
        if len(np.unique(idx)) != len(idx):
            raise KprunError(f"Repeated channel indices for {where}: {sorted(idx.tolist())}.")
        if len(idx) >= group.size:
            raise KprunError(f"Cannot remove every channel ({group.size}) of {where}.")
        mask = np.zeros(group.size, dtype=bool)
        mask[idx] = True
        _check_even(group, mask, where)
        masks[gid] = mask
    return masks


def _describe(group) -> str:
    names = [m.name for m in group.producers] or group.layer_names()[:3]
    return f"layer '{names[0]}'" + (f" and {len(names) - 1} coupled layers" if len(names) > 1 else "")


def _check_producers(group, mask):
    for member in group.producers:
        own = member.index[member.index >= 0]
        if len(own) and mask[own].all():
            raise KprunError(f"The plan removes every output channel of '{member.name}' "
                             f"(channels {sorted(set(own.tolist()))} of its group): keep at "
                             "least one of them.")


def _check_even(group, mask, where):
    for part in group.partitions:
        counts = {int(p): int(mask[part == p].sum()) for p in np.unique(part[part >= 0])}
        if len(set(counts.values())) > 1:
            raise KprunError(
                f"Channels of {where} feed a grouped convolution: remove the same number from "
                f"each of its {len(counts)} groups (got {sorted(counts.values())})."
            )


def _masks_for(graph, tensors, drop):
    return [graph.keep_mask(t, drop) for t in tensors]


def _axes_for(graph, tensors):
    specs = [graph.specs.get(id(t)) for t in tensors]
    return [s.axis if s is not None else None for s in specs]


def _op_call(graph, rebuilder, call, args, kwargs, keep_in, keep_out) -> OpCall:
    """What an operation's rule needs to call it again on pruned tensors."""
    return OpCall(
        op=call.layer, source=call, args=tuple(args), kwargs=dict(kwargs),
        keep_in=keep_in, keep_out=keep_out,
        axes_in=_axes_for(graph, call.inputs), axes_out=_axes_for(graph, call.outputs),
        name=rebuilder.unique_name(call.layer.name),
    )


def apply_plan(model: keras.Model, plan: Mapping, graph: DependencyGraph | None = None) -> keras.Model:
    """Remove the planned channels and return a new, smaller model.

    Args:
        model: A functional or Sequential Keras model (left untouched).
        plan: Group (or group id) -> indices of the group's channels to remove.
        graph: The model's `DependencyGraph`, if already built.

    Returns:
        A new model of plain Keras layers with exactly sliced weights.

    Example:

    >>> g = DependencyGraph(model)
    >>> group = g.group_of("conv1")
    >>> small = apply_plan(model, {group.id: [0, 3]})
    """
    graph = graph or DependencyGraph(model)
    drop = drop_masks(graph, plan)
    for gid, mask in drop.items():
        _check_producers(graph.groups[gid], mask)

    def make_call(call, args, kwargs):
        keep_in = _masks_for(graph, call.inputs, drop)
        keep_out = _masks_for(graph, call.outputs, drop)
        keep_inner = graph.inner_keep(call.layer, drop)
        changed = keep_inner or any(k is not None and not k.all() for k in keep_in + keep_out)
        if not changed:
            return rebuilder.copy_call(call, args, kwargs)
        rule = get_rule(call.layer)
        if not isinstance(call.layer, keras.layers.Layer):  # a stateless keras.ops operation
            op_call = _op_call(graph, rebuilder, call, args, kwargs, keep_in, keep_out)
            return rule.slice_call(op_call)
        if id(call.layer) in rebuilder.layers:  # a shared layer, sliced at its first call
            return rebuilder.call_with(call, args, kwargs)
        full_in = [k if k is not None else np.ones(0, bool) for k in keep_in]
        full_out = [k if k is not None else np.ones(0, bool) for k in keep_out]
        config, weights = rule.slice_for(call, dict(weights_of(call.layer)), full_in, full_out,
                                         keep_inner)
        return rebuilder.call_with(call, args, kwargs, config, weights)

    rebuilder = Rebuilder(graph.flat, make_call)
    return rebuilder.run()


def zero_plan(model: keras.Model, plan: Mapping, graph: DependencyGraph | None = None) -> keras.Model:
    """A copy of `model` whose consumers read the planned channels with zero weights.

    The pruned model from `apply_plan(model, plan)` must compute exactly what this
    model computes: it is the reference that tests and users compare against.

    Args:
        model: A functional or Sequential Keras model (left untouched).
        plan: Group (or group id) -> indices of channels to silence.
        graph: The model's `DependencyGraph`, if already built.

    Returns:
        A new model of the same architecture.
    """
    graph = graph or DependencyGraph(model)
    drop = drop_masks(graph, plan)

    def make_call(call, args, kwargs):
        fresh = id(call.layer) not in rebuilder.layers and isinstance(call.layer, keras.layers.Layer)
        out = rebuilder.copy_call(call, args, kwargs)
        keep_in = _masks_for(graph, call.inputs, drop)
        keep_inner = graph.inner_keep(call.layer, drop) if fresh else {}
        if fresh and (keep_inner or any(k is not None and not k.all() for k in keep_in)):
            drop_in = [~k if k is not None else np.zeros(0, bool) for k in keep_in]
            drop_inner = {slot: ~keep for slot, keep in keep_inner.items()}
            weights = get_rule(call.layer).zero_for(call, dict(weights_of(call.layer)), drop_in,
                                                    drop_inner)
            assign(rebuilder.layers[id(call.layer)], weights)
        return out

    rebuilder = Rebuilder(graph.flat, make_call)
    return rebuilder.run()


def copy_model(model: keras.Model) -> keras.Model:
    """A weight-identical copy of `model` built from plain calls (nested models inlined)."""
    from kprune.graph.walk import walk

    return Rebuilder(walk(model)).run()


__all__ = ["apply_plan", "zero_plan", "drop_masks", "copy_model", "copy_state"]
