"""Rebuild a flat model graph call by call, with new layers where asked."""

from __future__ import annotations

import inspect
import weakref
from typing import Callable

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.walk import FlatGraph, is_tensor


def weights_of(layer) -> list:
    """(name, numpy value) for every weight of `layer`, in `layer.weights` order.

    Names are the variables' own ('kernel'), or, where those repeat inside
    the layer (MultiHeadAttention's four projections), the sub-layer and the
    variable ('query/kernel').
    """
    names = _names(layer.weights)
    return [(n, np.asarray(keras.ops.convert_to_numpy(v.value)))
            for n, v in zip(names, layer.weights)]


def _short(variable, parts: int = 1) -> str:
    path = variable.path if hasattr(variable, "path") else variable.name
    return "/".join(path.split("/")[-parts:])


def _names(variables) -> list:
    names = [_short(v) for v in variables]
    if len(set(names)) != len(names):
        names = [_short(v, 2) for v in variables]
    return names


def assign(layer, values: dict | list) -> None:
    """Set `layer`'s weights from a name -> value dict (or a list in order)."""
    variables = layer.weights
    if isinstance(values, dict):
        names = _names(variables)
        if len(set(names)) != len(names):
            raise KprunError(f"Layer '{layer.name}' has repeated weight names {names}.")
        if set(names) == set(values):
            values = [values[n] for n in names]
        else:  # unnamed variables ('variable_3') get new names in a new layer: go by order
            values = list(values.values())
    if len(values) != len(variables):
        raise KprunError(f"Layer '{layer.name}' expects {len(variables)} weights, got {len(values)}.")
    for var, val in zip(variables, values):
        if tuple(var.shape) != tuple(np.shape(val)):
            raise KprunError(
                f"Layer '{layer.name}': weight '{_short(var)}' has shape {tuple(var.shape)} "
                f"but the sliced value has shape {np.shape(val)}."
            )
        var.assign(_on_device(val, var.dtype))


def _on_device(value, dtype):
    """A NumPy value as the backend's array: on JAX by `device_put`, which compiles nothing.

    `jnp.asarray` of a NumPy array compiles a conversion once per shape (tens of
    milliseconds each), most of a JAX rebuild's time.
    """
    if keras.backend.backend() != "jax" or not isinstance(value, (np.ndarray, np.generic)):
        return value
    import jax

    return jax.device_put(np.asarray(value, dtype=keras.backend.standardize_dtype(dtype)))


def clone_layer(layer, config: dict | None = None, name: str | None = None):
    """A new, unbuilt layer of `layer`'s class from `config` (default: a copy of its own).

    With no `config`, the copy does not hinge on the layer's own
    `get_config`/`from_config` round trip alone (some third-party layers
    write configs their constructor refuses). Tried in order: the layer's
    `get_config()`; the same without the keys its constructor does not take;
    the constructor arguments Keras recorded when the layer was made.

    Raises:
        KprunError: naming the layer and the reason, when no copy can be made.
    """
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a stateless keras.ops operation: reuse it
    cls = type(layer)
    attempts = [("the new config", lambda: config)] if config is not None else _copy_configs(layer)
    tried = []
    for i, (how, make) in enumerate(attempts):
        try:
            new = dict(make())
            if name is not None:
                new["name"] = name
            copy = cls.from_config(new)
        except Exception as exc:
            tried.append(f"{how} fails ({_first_line(exc)})")
            continue
        if i > 0:
            # The layer's own get_config does not round-trip: the copy saves the
            # config it was made from, so the rebuilt model saves and reloads.
            copy.get_config = lambda config=new: dict(config)
        return copy
    if config is None and not layer.variables and not _has_sublayers(layer):
        return layer  # stateless and uncopyable: the rebuilt model calls the same layer
    raise KprunError(f"Layer '{layer.name}' ({cls.__name__}) cannot be copied: "
                     + "; ".join(tried))


def _has_sublayers(layer) -> bool:
    return bool(list(layer._flatten_layers(include_self=False, recursive=False)))


_LAYER_KEYS = ("name", "trainable", "dtype")


def _copy_configs(layer) -> list:
    """(description, config factory) pairs for copying `layer`, best first."""

    def known_keys():
        accepted = _init_parameters(type(layer))
        if accepted is None:
            raise KprunError("the constructor's signature cannot be read")
        config = layer.get_config()
        known = {k: v for k, v in config.items() if k in accepted or k in _LAYER_KEYS}
        if len(known) == len(config):
            raise KprunError("no key to leave out")
        return known

    def recorded():
        auto = getattr(layer, "_auto_config", None)
        if auto is None:
            raise KprunError("Keras recorded no constructor arguments")
        return {**dict(auto.config), "name": layer.name}

    def base_only():
        if layer.weights or _init_parameters(type(layer)) != {"self"}:
            raise KprunError("the layer has weights or constructor arguments of its own")
        return {"name": layer.name, "trainable": layer.trainable, "dtype": layer.dtype_policy}

    return [("from_config(get_config())", layer.get_config),
            ("get_config() without the keys __init__ does not take", known_keys),
            ("the recorded constructor arguments", recorded),
            ("the bare constructor of a layer without arguments or weights", base_only)]


def _init_parameters(cls) -> set | None:
    """Names `cls.__init__` takes explicitly, or None if they cannot be read."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.startswith("Exception encountered:"):
            text = line[len("Exception encountered:"):].strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


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
        if self.flat.input_structure is not None:
            inputs = keras.tree.map_structure(self._map, self.flat.input_structure)
        model = keras.Model(inputs, outputs, name=name or self.flat.model.name)
        _SOURCES[model] = self
        return model

    def new_tensor(self, tensor):
        """The rebuilt model's tensor for a tensor of the source model (nested ones too)."""
        new = self.tensors.get(id(self.flat.resolve(tensor)))
        if new is None:
            raise KprunError(f"Tensor '{tensor.name}' is not computed in model "
                             f"'{self.flat.model.name}'.")
        return new

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
        initializers = {}

        def make(name):
            layer = clone_layer(call.layer, config, name)
            initializers.update(_placeholder_initializers(layer))
            return layer

        layer = self.layer_for(call, make)
        try:
            out = layer(*args, **kwargs)
        except Exception as exc:
            raise KprunError(f"Layer '{call.layer.name}' ({type(call.layer).__name__}) fails when "
                             f"called in the rebuilt model: {_first_line(exc)}") from None
        if fresh and isinstance(layer, keras.layers.Layer):
            for key, initializer in initializers.items():
                setattr(layer, key, initializer)
            if weights is None:
                copy_state(call.layer, layer)
            else:
                assign(layer, weights)
                if isinstance(layer, keras.layers.Normalization):
                    layer.finalize_state()
        return out


def _placeholder_initializers(layer) -> dict:
    """Give the unbuilt `layer` zeros initializers; return the real ones to put back.

    The rebuilt layer's weights are overwritten right after it is built, so
    drawing random initial values (most of a rebuild's time) is wasted. Only
    initializers held as attributes named like their config key are swapped,
    so `get_config()` of the finished layer is unchanged.
    """
    originals = {}
    for key in getattr(layer, "__dict__", {}):
        value = getattr(layer, key, None)
        if key.endswith("_initializer") and isinstance(value, keras.initializers.Initializer):
            originals[key] = value
    for key in originals:
        setattr(layer, key, _ZEROS)
    return originals


class _HostZeros(keras.initializers.Initializer):
    """Zeros made by NumPy: JAX's own `zeros` compiles once per shape (seconds per rebuild)."""

    def __call__(self, shape, dtype=None):
        dtype = keras.backend.standardize_dtype(dtype or "float32")
        return _on_device(np.zeros(tuple(shape), dtype=dtype), dtype)


_ZEROS = _HostZeros()


_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def rebuilder_of(model) -> "Rebuilder | None":
    """The `Rebuilder` that made `model` (its tensor and layer maps), or None."""
    try:
        return _SOURCES.get(model)
    except TypeError:
        return None


def copy_state(src, dst) -> None:
    """Copy all weights of `src` into the built layer `dst` (same shapes)."""
    assign(dst, [v for _, v in weights_of(src)])
    finalize = getattr(dst, "finalize_state", None)
    if callable(finalize) and isinstance(dst, keras.layers.Normalization):
        finalize()
