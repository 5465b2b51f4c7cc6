"""Flatten a Keras functional or Sequential model into a list of layer calls.

Nested models (a Sequential inside a Functional, a Functional inside another)
are inlined, so every later stage of kprune sees one flat, topologically
ordered list of `Call` records over plain layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from kprune.errors import KprunError


@dataclasses.dataclass
class Call:
    """One call of a layer inside a (flattened) model graph.

    Attributes:
        layer: The called layer (never a model: nested models are inlined).
        args: Positional call arguments; KerasTensors are kept as they are.
        kwargs: Keyword call arguments.
        inputs: The flat list of KerasTensors among `args` and `kwargs`.
        outputs: The flat list of KerasTensors the call produced.
    """

    layer: keras.layers.Layer
    args: tuple
    kwargs: dict
    inputs: list
    outputs: list


@dataclasses.dataclass
class FlatGraph:
    """A model as a flat list of calls, with its input and output tensors."""

    model: keras.Model
    inputs: list
    outputs: list
    calls: list
    output_structure: Any = None

    def producer(self, tensor) -> Call | None:
        """The call that produced `tensor`, or None for a model input."""
        return self._producers.get(id(tensor))

    def consumers(self, tensor) -> list:
        """Calls that read `tensor`."""
        return self._consumers.get(id(tensor), [])

    def __post_init__(self):
        self._producers = {}
        self._consumers = {}
        for call in self.calls:
            for t in call.outputs:
                self._producers[id(t)] = call
            for t in call.inputs:
                self._consumers.setdefault(id(t), []).append(call)


def is_tensor(x) -> bool:
    return isinstance(x, keras.KerasTensor)


def check_model(model) -> None:
    """Raise a clear error unless `model` is a functional or Sequential model."""
    if not isinstance(model, keras.Model):
        raise KprunError(
            f"Expected a keras.Model, got {type(model).__name__}."
        )
    if isinstance(model, keras.Sequential):
        if not model.built or _sequential_graph(model) is None:
            raise KprunError(
                f"Sequential model '{model.name}' has no defined input shape; "
                "start it with keras.Input(shape) or build it first."
            )
        return
    if not _is_functional(model):
        raise KprunError(
            f"Model '{model.name}' ({type(model).__name__}) is a subclassed model; "
            "kprune needs a functional or Sequential model whose graph it can read."
        )


def _is_functional(model) -> bool:
    return bool(getattr(model, "_nodes_by_depth", None)) and hasattr(model, "_run_through_graph")


def _sequential_graph(model):
    return getattr(model, "_functional", None)


def _graph_of(model):
    """The functional graph object that holds `model`'s nodes."""
    if isinstance(model, keras.Sequential):
        return _sequential_graph(model)
    return model


def _ordered_nodes(graph) -> list:
    depths = sorted(graph._nodes_by_depth.keys(), reverse=True)
    nodes = []
    for d in depths:
        nodes.extend(graph._nodes_by_depth[d])
    return nodes


def _flat_tensors(structure) -> list:
    return [t for t in keras.tree.flatten(structure) if is_tensor(t)]


def walk(model: keras.Model) -> FlatGraph:
    """Flatten `model` into a `FlatGraph` of plain-layer calls.

    Args:
        model: A built functional or Sequential Keras model.

    Returns:
        A `FlatGraph` whose `calls` are in topological order.

    Example:

    >>> g = walk(keras.applications.MobileNetV2(weights=None))
    >>> len(g.calls) > 100
    True
    """
    check_model(model)
    graph = _graph_of(model)
    calls: list = []
    alias: dict = {}
    _walk_into(graph, alias, calls)

    def resolve(x):
        return alias.get(id(x), x) if is_tensor(x) else x

    outputs = keras.tree.map_structure(resolve, graph.outputs)
    return FlatGraph(
        model=model,
        inputs=list(graph.inputs),
        outputs=_flat_tensors(outputs),
        calls=calls,
        output_structure=outputs,
    )


def _walk_into(graph, alias: dict, calls: list) -> None:
    """Append the calls of `graph` to `calls`.

    `alias` maps id(inner tensor) -> outer tensor, so the calls of a nested model
    read and write the tensors of the enclosing graph.
    """

    def resolve(x):
        return alias.get(id(x), x) if is_tensor(x) else x

    for node in _ordered_nodes(graph):
        op = node.operation
        if isinstance(op, keras.layers.InputLayer):
            continue
        args = keras.tree.map_structure(resolve, node.arguments.args)
        kwargs = keras.tree.map_structure(resolve, node.arguments.kwargs)
        outputs = list(node.outputs)
        if isinstance(op, keras.Model):
            check_model(op)
            inner = _graph_of(op)
            inner_inputs = list(inner.inputs)
            given = _flat_tensors(args) + _flat_tensors(kwargs)
            if len(given) != len(inner_inputs):
                raise KprunError(
                    f"Nested model '{op.name}' was called with {len(given)} tensors "
                    f"but has {len(inner_inputs)} inputs."
                )
            inner_alias = dict(alias)
            for t_in, t_out in zip(inner_inputs, given):
                inner_alias[id(t_in)] = t_out
            _walk_into(inner, inner_alias, calls)
            inner_outputs = _flat_tensors(inner.outputs)
            for t_inner, t_outer in zip(inner_outputs, outputs):
                alias[id(t_outer)] = inner_alias.get(id(t_inner), t_inner)
            continue
        calls.append(
            Call(
                layer=op,
                args=args,
                kwargs=kwargs,
                inputs=_flat_tensors(args) + _flat_tensors(kwargs),
                outputs=outputs,
            )
        )
