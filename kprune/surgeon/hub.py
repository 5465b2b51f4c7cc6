"""KerasHub models through the surgeon: a rebuilt backbone or task keeps its kind.

The surgeon rebuilds a model as one flat functional graph (nested models
inlined). For a KerasHub model that loses what makes it a KerasHub model:
`save_to_preset`, `task.predict` on raw data through the preprocessor, a
backbone that fits back into its task class. `repackage` restores it:

- a `keras_hub.models.Backbone` becomes a `PrunedBackbone`, a Backbone
  subclass whose config is the functional graph (the original class's
  constructor arguments cannot describe irregular pruned widths); it keeps
  the original's inputs, output structure, `pyramid_outputs`, dtype policy,
  `data_format` and `image_shape`;
- a `keras_hub.models.ImageClassifier` (any subclass, e.g.
  `ResNetImageClassifier`) becomes an instance of the same class, built on
  the pruned backbone with the original's preprocessor and config, its head
  weights copied from the rebuilt model.

keras-hub is optional (`pip install kprune[hub]`). This module never imports
it on its own: a model is recognised as a KerasHub model only when
`keras_hub` is already imported, and without it every function here leaves
models as they are.

Example:

>>> small = kprune.prune(task, ratio=0.3)   # task: a ResNetImageClassifier
>>> type(small) is type(task), type(small.backbone).__name__
(True, 'PrunedBackbone')
>>> small.predict(raw_images)               # through task.preprocessor
"""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.surgeon.rebuild import rebuilder_of

_PACKAGE = "kprune"
_REGISTERED_NAME = f"{_PACKAGE}>PrunedBackbone"
# Backbone attributes that describe the inputs' layout, which pruning never changes.
_LAYOUT_ATTRS = ("data_format", "image_shape")
_pruned_backbone_cls = None


# --------------------------------------------------------------------------
# keras_hub, only when the user imported it
# --------------------------------------------------------------------------
def _hub_if_imported():
    """The `keras_hub` module if it is already imported, else None (never imports it)."""
    return sys.modules.get("keras_hub")


def _import_hub():
    try:
        import keras_hub
    except ImportError as e:
        raise KprunError("This needs keras-hub: `pip install kprune[hub]`.") from e
    return keras_hub


def is_hub_model(model: Any) -> bool:
    """Whether `model` is a KerasHub `Backbone` or `Task` (False while keras_hub is not imported).

    Example:

    >>> is_hub_model(keras_hub.models.ResNetBackbone(...))
    True
    """
    hub = _hub_if_imported()
    if hub is None:
        return False
    return isinstance(model, (hub.models.Backbone, hub.models.Task))


# --------------------------------------------------------------------------
# Tensors of a functional model, by the node that made them
# --------------------------------------------------------------------------
def _node_key(operation, index: int) -> str:
    from keras.src.ops.function import make_node_key

    return make_node_key(operation, index)


def _own_nodes(model, operation) -> list:
    """The nodes of `operation` that belong to `model`'s graph, in creation order."""
    return [n for i, n in enumerate(operation._inbound_nodes)
            if _node_key(operation, i) in model._nodes]


def tensor_ref(model: keras.Model, tensor) -> list:
    """`[layer name, node index, tensor index]` of `tensor` in `model`, as Keras writes them.

    The node index counts only `model`'s own nodes of the layer, like
    `keras.Model.get_config`'s `output_layers`.
    """
    op, node_index, tensor_index = tensor._keras_history
    own = [i for i in range(len(op._inbound_nodes)) if _node_key(op, i) in model._nodes]
    if node_index not in own:
        raise KprunError(f"Tensor '{tensor.name}' is not computed inside model '{model.name}'.")
    return [op.name, own.index(node_index), int(tensor_index)]


def tensor_at(model: keras.Model, ref) -> keras.KerasTensor:
    """The tensor of `model` that `tensor_ref` described as `ref`."""
    name, node_index, tensor_index = ref
    ops = [op for op in model.operations if op.name == name]
    if len(ops) != 1:
        raise KprunError(f"Model '{model.name}' has {len(ops)} layers named '{name}'; expected 1.")
    nodes = _own_nodes(model, ops[0])
    if node_index >= len(nodes):
        raise KprunError(f"Layer '{name}' of model '{model.name}' has no call {node_index}.")
    return keras.tree.flatten(nodes[node_index].outputs)[tensor_index]


# --------------------------------------------------------------------------
# PrunedBackbone
# --------------------------------------------------------------------------
def pruned_backbone_class() -> type:
    """The `PrunedBackbone` class (imports keras_hub and registers it on first use).

    `PrunedBackbone` is a `keras_hub.models.Backbone` whose config is its
    functional graph, registered as 'kprune>PrunedBackbone'. Build one with
    `pruned_backbone`; `kprune.surgeon.hub.PrunedBackbone` names the same class.

    Raises:
        KprunError: if keras-hub is not installed.
    """
    global _pruned_backbone_cls
    if _pruned_backbone_cls is None:
        _pruned_backbone_cls = _define_pruned_backbone(_import_hub())
    return _pruned_backbone_cls


def _define_pruned_backbone(hub):
    from keras.src.models.functional import Functional, functional_from_config

    class PrunedBackbone(hub.models.Backbone):
        """A pruned KerasHub backbone: a Backbone whose config is its functional graph.

        Args:
            inputs, outputs: The functional graph, as for `keras.Model`.
            dtype: The backbone's dtype policy (the layers keep their own).
            pyramid_outputs: Level name -> a tensor of the graph (or its
                `tensor_ref`), as KerasHub's feature-pyramid backbones have.
            original_class: Registered name of the backbone class that was
                pruned (for information).
            data_format, image_shape: Copied from the original backbone, when
                it had them (tasks read `backbone.data_format`).
            **kwargs: `name`, `trainable`, as for `keras.Model`.

        Example:

        >>> small = kprune.prune(keras_hub.models.ResNetBackbone(...), ratio=0.3)
        >>> small.original_class, sorted(small.pyramid_outputs)
        ('keras_hub>ResNetBackbone', ['P2', 'P3'])
        """

        def __init__(self, *args, dtype=None, pyramid_outputs=None, original_class=None,
                     data_format=None, image_shape=None, **kwargs):
            super().__init__(*args, dtype=dtype, **kwargs)
            self.original_class = original_class
            if data_format is not None:
                self.data_format = data_format
            if image_shape is not None:
                self.image_shape = tuple(image_shape)
            if pyramid_outputs is not None:
                self.pyramid_outputs = {
                    level: t if isinstance(t, keras.KerasTensor) else tensor_at(self, t)
                    for level, t in pyramid_outputs.items()}

        def get_config(self) -> dict:
            config = Functional.get_config(self)
            by_name = {layer.name: layer for layer in self.layers}
            for entry in config.get("layers", ()):
                layer = by_name.get(entry.get("name"))
                if layer is not None and isinstance(entry.get("config"), dict):
                    entry["config"] = loadable_config(type(layer), entry["config"])
            config["dtype"] = keras.dtype_policies.serialize(self.dtype_policy)
            config["original_class"] = self.original_class
            for attr in _LAYOUT_ATTRS:
                value = getattr(self, attr, None)
                if value is not None:
                    config[attr] = list(value) if isinstance(value, tuple) else value
            pyramid = getattr(self, "pyramid_outputs", None)
            if pyramid is not None:
                config["pyramid_outputs"] = {level: tensor_ref(self, t)
                                             for level, t in pyramid.items()}
            return config

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            if isinstance(config.get("dtype"), dict):
                config["dtype"] = keras.dtype_policies.get(config["dtype"])
            return functional_from_config(cls, config, custom_objects=custom_objects)

    PrunedBackbone.__module__ = __name__
    PrunedBackbone.__qualname__ = "PrunedBackbone"
    return keras.saving.register_keras_serializable(package=_PACKAGE)(PrunedBackbone)


def _constructor_keys(cls) -> set | None:
    """The keyword arguments `cls(**config)` takes, or None if that cannot be told.

    The named parameters of every `__init__` up the class's MRO, as long as
    each hands `**kwargs` on, down to `keras.layers.Layer` (which refuses
    any other).
    """
    keys: set = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        keys |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if klass is keras.layers.Layer:
            return (keys - {"self"}) | {"input_dim", "input_shape"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys - {"self"}
    return None


def _default_from_config(cls) -> bool:
    """Whether `cls.from_config` is Keras's own (`cls(**config)`)."""
    for klass in cls.__mro__:
        if "from_config" in klass.__dict__:
            return klass.__module__.split(".")[0] == "keras"
    return False


def loadable_config(cls, config: dict) -> dict:
    """`config` without the keys that `cls.from_config(config)` would refuse.

    Some KerasHub layers write keys their constructor does not take
    (`ViTPatchingAndEmbedding` and `DeiTEmbeddings` write `num_patches` and
    `num_positions`), so a model holding them saves but does not load. A
    pruned backbone saves its layers' configs through this; a class with a
    `from_config` of its own, or a constructor whose arguments cannot be
    read, keeps its config as it is.

    Example:

    >>> loadable_config(ViTPatchingAndEmbedding, layer.get_config())   # no num_patches
    """
    if not _default_from_config(cls):
        return config
    keys = _constructor_keys(cls)
    if keys is None or set(config) <= keys:
        return config
    return {k: v for k, v in config.items() if k in keys}


class _PrunedBackboneStandIn:
    """Holds 'kprune>PrunedBackbone' in Keras's registry until keras_hub is imported.

    A `.keras` file holding a pruned backbone then loads after a plain
    `import kprune`: deserializing it defines the real class.
    """

    def get_config(self) -> dict:  # required by register_keras_serializable
        return {}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return pruned_backbone_class().from_config(config, custom_objects)


def _register() -> None:
    if _hub_if_imported() is not None:
        pruned_backbone_class()
    elif _REGISTERED_NAME not in keras.saving.get_custom_objects():
        keras.saving.register_keras_serializable(package=_PACKAGE, name="PrunedBackbone")(
            _PrunedBackboneStandIn)


def __getattr__(name):
    if name == "PrunedBackbone":
        return pruned_backbone_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------
# From the original's tensors to the rebuilt model's
# --------------------------------------------------------------------------
class _TensorMap:
    """Finds, in the rebuilt model, the layer or tensor standing for one of the original's.

    It reads the maps of the surgeon's `Rebuilder` that made `rebuilt`
    (`kprune.surgeon.rebuild.rebuilder_of`), so it is exact for any model
    kprune rebuilt from `original`.

    Raises:
        KprunError: if kprune's surgeon did not make `rebuilt` from `original`.
    """

    def __init__(self, original: keras.Model, rebuilt: keras.Model):
        source = rebuilder_of(rebuilt)
        if source is None or source.flat.model is not original:
            raise KprunError(f"Model '{rebuilt.name}' was not rebuilt by kprune's surgeon from "
                             f"'{original.name}'.")
        self.source = source
        self.inputs = {id(t) for t in source.flat.inputs}

    def layer(self, layer):
        """The rebuilt model's layer standing for the original's `layer`."""
        new = self.source.layers.get(id(layer))
        if new is None:
            raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}) is not called in "
                             "the rebuilt model.")
        return new

    def tensor(self, t):
        """The rebuilt model's tensor standing for the original's tensor `t`."""
        return self.source.new_tensor(t)


def _class_name(obj) -> str:
    return keras.saving.get_registered_name(type(obj))


def pruned_backbone(original: keras.Model, rebuilt: keras.Model, *, backbone=None,
                    tensors: _TensorMap | None = None):
    """A `PrunedBackbone` over the rebuilt graph of `original`'s backbone.

    Args:
        original: The model the surgeon rebuilt: a KerasHub Backbone, or a
            Task holding one (`backbone`, default `original.backbone`).
        rebuilt: The surgeon's flat rebuild of `original`.
        backbone: The backbone of `original` to extract (default: `original`
            itself if it is a Backbone, else `original.backbone`).
        tensors: The original -> rebuilt tensor map, if already built.

    Returns:
        A `PrunedBackbone` whose layers are the rebuilt model's layers that
        stand for the backbone's, with the backbone's inputs and output
        structure, `pyramid_outputs`, dtype policy and layout attributes.

    Raises:
        KprunError: when the backbone's part cannot be found in `rebuilt` (it
            is called more than once, or on tensors that are not the task's
            inputs).

    Example:

    >>> bb = pruned_backbone(task, kprune.surgeon.copy_model(task))
    >>> keras_hub.models.ResNetImageClassifier(backbone=bb, num_classes=3)
    """
    cls = pruned_backbone_class()
    hub = _import_hub()
    tensors = tensors or _TensorMap(original, rebuilt)
    if backbone is None:
        backbone = original if isinstance(original, hub.models.Backbone) else original.backbone
    if backbone is original:
        inputs, outputs = rebuilt.input, rebuilt.output
    else:
        nodes = _own_nodes(original, backbone)
        if len(nodes) != 1:
            raise KprunError(f"Backbone '{backbone.name}' is called {len(nodes)} times in "
                             f"'{original.name}'; kprune repackages a backbone called once.")
        from kprune.graph.walk import _flat_tensors

        node = nodes[0]
        given = _flat_tensors(node.arguments.args) + _flat_tensors(node.arguments.kwargs)
        outer = dict(zip((id(t) for t in backbone.inputs), given))
        if any(id(t) not in tensors.inputs for t in given):
            raise KprunError(f"Backbone '{backbone.name}' is not called on the inputs of "
                             f"'{original.name}'.")
        inputs = keras.tree.map_structure(lambda t: tensors.tensor(outer[id(t)]),
                                          backbone.input)
        outputs = keras.tree.map_structure(tensors.tensor, backbone.output)
    pyramid = getattr(backbone, "pyramid_outputs", None)
    if pyramid is not None:
        pyramid = {level: tensors.tensor(t) for level, t in pyramid.items()}
    layout = {a: getattr(backbone, a) for a in _LAYOUT_ATTRS
              if getattr(backbone, a, None) is not None}
    source = getattr(backbone, "original_class", None) or _class_name(backbone)
    small = cls(inputs=inputs, outputs=outputs, name=backbone.name, dtype=backbone.dtype_policy,
                pyramid_outputs=pyramid, original_class=source, **layout)
    if not backbone.trainable:
        small.trainable = False
    return small


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------
def _head_calls(model, backbone) -> list:
    """The calls of `model`'s own graph after its backbone (the task's head), in order.

    Only the task's top-level nodes count: the backbone is one node of them,
    so what happens inside it (composite layers traced, operations named
    afresh) does not make two heads differ.
    """
    from kprune.graph.walk import _ordered_nodes

    return [_HeadCall(node.operation) for node in _ordered_nodes(model)
            if node.operation is not backbone
            and not isinstance(node.operation, keras.layers.InputLayer)]


class _HeadCall:
    def __init__(self, layer):
        self.layer = layer


def _config_without_name(layer) -> dict:
    config = dict(layer.get_config())
    config.pop("name", None)
    return config


def _task_kwargs(original) -> dict:
    config = dict(original.get_config())
    config.pop("backbone", None)
    config.pop("preprocessor", None)
    params = inspect.signature(type(original).__init__).parameters
    head = getattr(original, "output_dense", None)
    if "head_dtype" in params and "head_dtype" not in config and head is not None:
        config["head_dtype"] = head.dtype_policy  # not in ImageClassifier.get_config
    return config


def _head_key(layer) -> str:
    """What must match between two heads: the class of each call (names are made
    afresh, `flatten` then `flatten_1`, each time a task is built)."""
    return type(layer).__name__


def _rebuild_task(original, rebuilt, tensors: _TensorMap):
    """The same task class on the pruned backbone, head weights from `rebuilt`."""
    backbone = pruned_backbone(original, rebuilt, tensors=tensors)
    task = type(original)(backbone=backbone, preprocessor=original.preprocessor,
                          **_task_kwargs(original))
    old_head = _head_calls(original, original.backbone)
    new_head = _head_calls(task, task.backbone)
    old_names = [_head_key(c.layer) for c in old_head]
    new_names = [_head_key(c.layer) for c in new_head]
    if old_names != new_names:
        raise KprunError(f"the rebuilt head is {new_names}, the original's {old_names}")
    from kprune.surgeon.rebuild import copy_state

    done = set()
    for old, new in zip(old_head, new_head):
        if id(new.layer) in done or not isinstance(new.layer, keras.layers.Layer):
            continue
        done.add(id(new.layer))
        source = tensors.layer(old.layer)
        if _config_without_name(source) != _config_without_name(new.layer):
            raise KprunError(f"head layer '{new.layer.name}' is configured differently once "
                             f"rebuilt: it was pruned, and {type(original).__name__} builds its "
                             f"head at full width; prune with exclude=['{new.layer.name}'] to "
                             "keep it whole")
        copy_state(source, new.layer)
    return task


def _probe_inputs(model: keras.Model, batch: int = 2):
    rng = np.random.default_rng(0)

    def make(t):
        shape = [batch] + [d if d is not None else 32 for d in t.shape[1:]]
        dtype = keras.backend.standardize_dtype(t.dtype)
        if "float" in dtype:
            return rng.normal(size=shape).astype(dtype)
        if dtype == "bool":
            return np.ones(shape, dtype=bool)
        return np.zeros(shape, dtype=dtype)

    return keras.tree.map_structure(make, model.input)


def _check_same(task, rebuilt) -> None:
    """Raise KprunError unless `task` computes what `rebuilt` computes on a probe input."""
    x = _probe_inputs(rebuilt)
    try:
        want = rebuilt(x, training=False)
    except Exception:  # inputs kprune cannot invent (a shape or a value range): no probe
        return
    got = task(x, training=False)
    want_flat, got_flat = keras.tree.flatten(want), keras.tree.flatten(got)
    if len(want_flat) != len(got_flat):
        raise KprunError(f"it returns {len(got_flat)} outputs instead of {len(want_flat)}")
    for w, g in zip(want_flat, got_flat):
        w, g = keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(g)
        if w.shape != g.shape or not np.allclose(w, g, rtol=1e-5, atol=1e-6):
            raise KprunError("its outputs differ from the rebuilt model's")


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------
def repackage(original: keras.Model, rebuilt: keras.Model, *, check: bool = True) -> keras.Model:
    """`rebuilt` (the surgeon's flat functional copy of `original`) as the same kind of model.

    - not a KerasHub model (or keras_hub not imported): `rebuilt`, unchanged;
    - a `keras_hub.models.Backbone`: a `PrunedBackbone` over `rebuilt`'s
      layers, with the original's output structure, `pyramid_outputs` (the
      tensors made by the same layers), dtype policy and layout attributes;
    - a `keras_hub.models.ImageClassifier` (or subclass): an instance of the
      same class built with the pruned backbone, the original's preprocessor
      (the same object) and config, its head weights copied from `rebuilt`
      (by layer name); it is compiled with the class's defaults, like a newly
      built task;
    - any other Task, or a structure kprune cannot follow: `rebuilt`, with a
      warning naming the class and the reason.

    `original` is only read. The repackaged task is checked against `rebuilt`
    on a random input (`check`), so the repackaging never changes numbers.

    Args:
        original: The model given to the surgeon.
        rebuilt: `apply_plan(original, plan)` or `copy_model(original)`.
        check: Compare the repackaged task's outputs with `rebuilt`'s on a
            random input (one forward pass of each).

    Returns:
        A `PrunedBackbone`, a task of `original`'s class, or `rebuilt`.

    Example:

    >>> small = repackage(task, kprune.surgeon.apply_plan(task, plan))
    >>> type(small) is type(task)
    True
    """
    hub = _hub_if_imported()
    if hub is None or not isinstance(original, (hub.models.Backbone, hub.models.Task)):
        return rebuilt
    kind = type(original).__name__
    try:
        tensors = _TensorMap(original, rebuilt)
        if isinstance(original, hub.models.Backbone):
            return pruned_backbone(original, rebuilt, tensors=tensors)
        if not isinstance(original, hub.models.ImageClassifier):
            raise KprunError("kprune repackages ImageClassifier tasks only")
        if not isinstance(original.backbone, hub.models.Backbone):
            raise KprunError("its backbone is not a keras_hub Backbone")
        task = _rebuild_task(original, rebuilt, tensors)
        if check:
            _check_same(task, rebuilt)
        return task
    except Exception as e:  # noqa: BLE001 - the rebuilt model is right; only its wrapping failed
        warnings.warn(f"kprune could not repackage {kind} '{original.name}' as a KerasHub "
                      f"model ({e}); returning a plain keras.Model with the same inputs, "
                      "outputs and numbers.", stacklevel=3)
        return rebuilt


def from_preset(preset: str, load_weights: bool = True, **kwargs):
    """Load a pruned task or backbone saved with `save_to_preset(preset)`.

    `keras_hub.models.ImageClassifier.from_preset(preset)` (and its
    subclasses) refuse a pruned task: KerasHub looks for a task class whose
    `backbone_cls` is the saved backbone's class, and no task class names
    `PrunedBackbone`. `keras_hub.models.Backbone.from_preset(preset)` loads a
    pruned backbone only once `PrunedBackbone` is defined (keras_hub imported
    before kprune, or any earlier use of this module's KerasHub side): until
    then Keras's registry holds a stand-in that only `.keras` loading can use.
    This function reads the saved classes and loads either, always.

    Args:
        preset: A local preset directory (or any handle KerasHub reads).
        load_weights: Load the saved weights (else random ones).
        **kwargs: Passed on to KerasHub's loader (e.g. `dtype`).

    Returns:
        The task of the class saved in `task.json`, or else the backbone.

    Raises:
        KprunError: if keras-hub is not installed.

    Example:

    >>> task.save_to_preset("pruned_resnet")
    >>> task = kprune.surgeon.hub.from_preset("pruned_resnet")
    """
    _import_hub()
    pruned_backbone_class()
    from keras_hub.src.utils import preset_utils as pu

    loader = pu.get_preset_loader(preset)
    if pu.check_file_exists(preset, pu.TASK_CONFIG_FILE):
        task_cls = pu.check_config_class(pu.load_json(preset, pu.TASK_CONFIG_FILE))
        return loader.load_task(task_cls, load_weights, "num_classes" not in kwargs, **kwargs)
    return loader.load_backbone(loader.check_backbone_class(), load_weights, **kwargs)


_register()

__all__ = ["from_preset", "is_hub_model", "loadable_config", "pruned_backbone",
           "pruned_backbone_class", "repackage", "tensor_at", "tensor_ref"]
