"""Model surgery with kerassurgeon's signatures, for Keras 3.

`delete_channels`, `delete_layer`, `insert_layer`, `replace_layer` and `Surgeon`
take the same arguments as kerassurgeon's functions, so code written for it moves
over by changing the import. Every function returns a new model; the given model
and its weights are never changed. `copy` is accepted for compatibility: the
result never shares layers with the input.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.dependency import DependencyGraph
from kprune.graph.walk import walk
from kprune.surgeon.plan import apply_plan
from kprune.surgeon.rebuild import Rebuilder

_LAYER_JOBS = ("delete_layer", "insert_layer", "replace_layer")


def _name(layer) -> str:
    return layer if isinstance(layer, str) else layer.name


def channel_plan(graph: DependencyGraph, layer, channels: Sequence[int]) -> dict:
    """The plan that removes output `channels` of `layer` from its whole group.

    Args:
        graph: The model's dependency graph.
        layer: A layer or layer name whose output channels are indexed.
        channels: Output channel indices of that layer.

    Returns:
        `{group.id: group channel indices}`; coupled layers lose the same channels.
    """
    group, channel_of = graph.output_channels(layer)
    idx = np.asarray(list(channels), dtype=np.int64)
    name = _name(layer)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(channel_of)):
        raise KprunError(f"Channel index out of range for layer '{name}': it has "
                         f"{len(channel_of)} output channels, got {sorted(idx.tolist())}.")
    if len(np.unique(idx)) != len(idx):
        raise KprunError(f"Repeated channel indices for layer '{name}': {sorted(idx.tolist())}.")
    if not group.prunable:
        raise KprunError(f"Channels of layer '{name}' cannot be pruned: {group.reason}.")
    return {group.id: sorted(set(channel_of[idx].tolist()))}


def delete_channels(model: keras.Model, layer, channels: Sequence[int], *,
                    node_indices=None, copy=None) -> keras.Model:
    """Remove output `channels` of `layer`, and the same channels everywhere they go.

    Every coupled layer loses them too: the BatchNormalization after the layer,
    the other branches of an `Add`, the slice of a `Concatenate`, the input
    weights of every consumer, the rows of a `Dense` after `Flatten`.

    Args:
        model: A functional or Sequential model (left untouched).
        layer: The layer (or its name) whose output channels are removed.
        channels: Indices of its output channels.
        node_indices: Accepted for kerassurgeon compatibility; a channel group is
            the same at every call of a layer.
        copy: Accepted for kerassurgeon compatibility; the result is always new.

    Returns:
        A new model.

    Example:

    >>> small = delete_channels(model, model.get_layer("conv1"), [0, 4, 5])
    """
    graph = DependencyGraph(model)
    return apply_plan(model, channel_plan(graph, layer, channels), graph)


def delete_layer(model: keras.Model, layer, *, node_indices=None, copy=True) -> keras.Model:
    """Remove `layer`, connecting its input straight to its consumers.

    Args:
        model: A functional or Sequential model (left untouched).
        layer: The layer (or name) to remove; it must have one input and one
            output of the same shape.
        node_indices: Calls of a shared layer to act on (default: all).
        copy: Accepted for kerassurgeon compatibility.

    Returns:
        A new model.
    """
    return Surgeon(model).add_job("delete_layer", layer, node_indices=node_indices).operate()


def insert_layer(model: keras.Model, layer, new_layer, *, node_indices=None, copy=True) -> keras.Model:
    """Insert `new_layer` before `layer` (on each of its inputs).

    Args:
        model: A functional or Sequential model (left untouched).
        layer: The layer (or name) before which `new_layer` is called.
        new_layer: An unbuilt Keras layer.
        node_indices: Calls of a shared layer to act on (default: all).
        copy: Accepted for kerassurgeon compatibility.

    Returns:
        A new model.
    """
    return Surgeon(model).add_job("insert_layer", layer, new_layer=new_layer,
                                  node_indices=node_indices).operate()


def replace_layer(model: keras.Model, layer, new_layer, *, node_indices=None, copy=True) -> keras.Model:
    """Call `new_layer` where `layer` was called.

    Args:
        model: A functional or Sequential model (left untouched).
        layer: The layer (or name) to replace.
        new_layer: An unbuilt Keras layer taking the same inputs.
        node_indices: Calls of a shared layer to act on (default: all).
        copy: Accepted for kerassurgeon compatibility.

    Returns:
        A new model.
    """
    return Surgeon(model).add_job("replace_layer", layer, new_layer=new_layer,
                                  node_indices=node_indices).operate()


class Surgeon:
    """Collect several surgery jobs and apply them together.

    Args:
        model: A functional or Sequential model (left untouched).
        copy: Accepted for kerassurgeon compatibility.

    Example:

    >>> surgeon = Surgeon(model)
    >>> surgeon.add_job("delete_channels", model.get_layer("conv1"), channels=[0, 1])
    >>> surgeon.add_job("insert_layer", model.get_layer("dense"), new_layer=keras.layers.Dropout(0.1))
    >>> new_model = surgeon.operate()
    """

    JOBS = ("delete_channels",) + _LAYER_JOBS

    def __init__(self, model: keras.Model, copy=None):
        self.model = model
        self.flat = walk(model)
        self._layer_jobs: dict = {}
        self._channel_jobs: list = []

    def add_job(self, job: str, layer, *, channels=None, new_layer=None, node_indices=None) -> "Surgeon":
        """Queue `job` ('delete_channels', 'delete_layer', 'insert_layer', 'replace_layer')."""
        if job not in self.JOBS:
            raise KprunError(f"Unknown job '{job}'; choose one of {', '.join(self.JOBS)}.")
        name = _name(layer)
        calls = [c for c in self.flat.calls if c.layer.name == name]
        if not calls:
            raise KprunError(f"Layer '{name}' is not a layer of model '{self.model.name}'.")
        if job == "delete_channels":
            if channels is None:
                raise KprunError(f"Job 'delete_channels' on layer '{name}' needs `channels`.")
            self._channel_jobs.append((name, list(channels)))
            return self
        if job != "delete_layer" and not isinstance(new_layer, keras.layers.Layer):
            raise KprunError(f"Job '{job}' on layer '{name}' needs `new_layer`, a Keras layer.")
        chosen = range(len(calls)) if node_indices is None else node_indices
        for i in chosen:
            if not 0 <= i < len(calls):
                raise KprunError(f"Layer '{name}' has {len(calls)} calls; node index {i} is out of range.")
            if id(calls[i]) in self._layer_jobs:
                raise KprunError(f"Layer '{name}' already has a job for call {i}.")
            self._layer_jobs[id(calls[i])] = (job, new_layer)
        return self

    def operate(self) -> keras.Model:
        """Apply every queued job and return the new model."""
        model = self._apply_layer_jobs() if self._layer_jobs else self.model
        if not self._channel_jobs:
            return model if model is not self.model else Rebuilder(self.flat).run()
        graph = DependencyGraph(model)
        plan: dict = {}
        for name, channels in self._channel_jobs:
            for gid, chans in channel_plan(graph, name, channels).items():
                plan[gid] = sorted(set(plan.get(gid, [])) | set(chans))
        return apply_plan(model, plan, graph)

    def _apply_layer_jobs(self) -> keras.Model:
        jobs = self._layer_jobs

        def make_call(call, args, kwargs):
            job = jobs.get(id(call))
            if job is None:
                return rebuilder.copy_call(call, args, kwargs)
            kind, new_layer = job
            if kind == "delete_layer":
                return _bypass(call, args)
            if kind == "replace_layer":
                return new_layer(*args, **kwargs)
            inserted = keras.tree.map_structure(
                lambda x: new_layer(x) if isinstance(x, keras.KerasTensor) else x, args)
            return rebuilder.copy_call(call, inserted, kwargs)

        rebuilder = Rebuilder(self.flat, make_call)
        return rebuilder.run()


def _bypass(call, args):
    tensors = [x for x in keras.tree.flatten(args) if isinstance(x, keras.KerasTensor)]
    name = call.layer.name
    if len(tensors) != 1 or len(call.outputs) != 1:
        raise KprunError(f"Cannot delete layer '{name}': it must have exactly one input and one output.")
    if tuple(call.inputs[0].shape) != tuple(call.outputs[0].shape):
        raise KprunError(f"Cannot delete layer '{name}': its input shape {tuple(call.inputs[0].shape)} "
                         f"differs from its output shape {tuple(call.outputs[0].shape)}.")
    return [tensors[0]]
