"""Rebuild a flat model graph call by call, with new layers where asked."""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.walk import FlatGraph, is_tensor


def weights_of(layer) -> list:
    """(name, numpy value) for every weight of `layer`, in `layer.weights` order."""
    return [(_short(v), np.asarray(keras.ops.convert_to_numpy(v.value))) for v in layer.weights]


def _short(variable) -> str:
    return variable.path.split("/")[-1] if hasattr(variable, "path") else variable.name


def assign(layer, values: dict | list) -> None:
    """Set `layer`'s weights from a name -> value dict (or a list in order)."""
    variables = layer.weights
    if isinstance(values, dict):
        names = [_short(v) for v in variables]
        if len(set(names)) != len(names):
            raise KprunError(f"Layer '{layer.name}' has repeated weight names {names}.")
        values = [values[n] for n in names]
    if len(values) != len(variables):
        raise KprunError(f"Layer '{layer.name}' expects {len(variables)} weights, got {len(values)}.")
    for var, val in zip(variables, values):
        if tuple(var.shape) != tuple(np.shape(val)):
            raise KprunError(
                f"Layer '{layer.name}': weight '{_short(var)}' has shape {tuple(var.shape)} "
                f"but the sliced value has shape {np.shape(val)}."
            )
        var.assign(val)


def clone_layer(layer, config: dict | None = None, name: str | None = None):
    """A new, unbuilt layer of `layer`'s class from `config` (default: its own)."""
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a stateless keras.ops operation: reuse it
    config = dict(config if config is not None else layer.get_config())
    if name is not None:
        config["name"] = name
    return layer.__class__.from_config(config)


class Rebuilder:
    """Calls new layers on new tensors in the order of a `FlatGraph`.

    Args:
        flat: The flat graph of the source model.
        make_call: `f(call, new_args, new_kwargs) -> new outputs (list)`; the
            default calls a copy of the layer with the same weights.

    Layers called more than once in the source (shared layers) are built once:
    `layer_for(call, factory)` caches the new layer per source layer.
    """

    def __init__(self, flat: FlatGraph, make_call: Callable | None = None):
        self.flat = flat
        self.make_call = make_call or self.copy_call
        self.tensors: dict = {}
        self.layers: dict = {}
        self.names: set = set()

    def run(self, name: str | None = None, input_shapes: list | None = None) -> keras.Model:
        """Build the new model.

        Args:
            name: Name of the new model (default: the source model's).
            input_shapes: Batch shapes of the new inputs (default: the source's).
        """
        new_inputs = []
        shapes = input_shapes or [tuple(t.shape) for t in self.flat.inputs]
        for t, shape in zip(self.flat.inputs, shapes):
            layer = t._keras_history.operation
            new = keras.Input(batch_shape=tuple(shape), dtype=t.dtype, name=layer.name,
                              sparse=getattr(t, "sparse", False))
            self.tensors[id(t)] = new
            self.names.add(layer.name)
            new_inputs.append(new)
        for call in self.flat.calls:
            args = keras.tree.map_structure(self._map, call.args)
            kwargs = keras.tree.map_structure(self._map, call.kwargs)
            outputs = self.make_call(call, args, kwargs)
            outputs = keras.tree.flatten(outputs)
            for old, new in zip(call.outputs, outputs):
                self.tensors[id(old)] = new
        outputs = keras.tree.map_structure(self._map, self.flat.output_structure)
        inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
        return keras.Model(inputs, outputs, name=name or self.flat.model.name)

    def _map(self, x):
        if is_tensor(x):
            if id(x) not in self.tensors:
                raise KprunError(f"Tensor '{x.name}' is used before it is computed.")
            return self.tensors[id(x)]
        return x

    def layer_for(self, call, factory: Callable):
        """The new layer standing for `call.layer`, made once by `factory(name)`.

        `name` is the source layer's name, made unique in the new model (nested
        models are inlined, so two of their layers may share a name).
        """
        key = id(call.layer)
        if key not in self.layers:
            self.layers[key] = factory(self.unique_name(call.layer.name))
        return self.layers[key]

    def unique_name(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def copy_call(self, call, args, kwargs):
        """Call a weight-identical copy of `call.layer`."""
        return self.call_with(call, args, kwargs)

    def call_with(self, call, args, kwargs, config: dict | None = None, weights=None):
        """Call a copy of `call.layer` made from `config`, holding `weights`.

        The copy is made and its weights set once, on the layer's first call
        (a shared layer stays shared). A stateless operation is reused as is.

        Args:
            call: The source call.
            args, kwargs: The call's arguments in the new model.
            config: The new layer's config; by default the source layer's.
            weights: A name -> value dict (or a list) for the new layer; by
                default the source layer's weights are copied.

        Returns:
            The call's outputs in the new model.
        """
        fresh = id(call.layer) not in self.layers
        layer = self.layer_for(call, lambda name: clone_layer(call.layer, config, name))
        out = layer(*args, **kwargs)
        if fresh and isinstance(layer, keras.layers.Layer):
            if weights is None:
                copy_state(call.layer, layer)
            else:
                assign(layer, weights)
        return out


def copy_state(src, dst) -> None:
    """Copy all weights of `src` into the built layer `dst` (same shapes)."""
    assign(dst, [v for _, v in weights_of(src)])
    finalize = getattr(dst, "finalize_state", None)
    if callable(finalize) and isinstance(dst, keras.layers.Normalization):
        finalize()
