"""Flatten a Keras functional or Sequential model into a list of layer calls.

Nested models (a Sequential inside a Functional, a Functional inside another)
are inlined, and so are composite layers: a subclassed layer that holds its
own sub-layers (a KerasHub block, a user's residual block) is traced by
calling its `call` on symbolic inputs, and its sub-layers and `keras.ops`
calls become ordinary calls of the flat graph, recursively. Every later stage
of kprune sees one flat, topologically ordered list of `Call` records.

A composite that cannot be traced (value-dependent Python control flow,
weights of its own used directly in `call`, a call that fails on symbolic
inputs) stays one call, and `Call.opaque` says why. A composite whose `call`
fails on symbolic inputs only as written (a sub-layer that returns None
beside its tensors) can be given a tracing function with `register_trace`.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import warnings
import weakref
from typing import Any

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.rules import has_rule


@dataclasses.dataclass
class Call:
    """One call of a layer inside a (flattened) model graph.

    Attributes:
        layer: The called layer (never a model: nested models are inlined).
        args: Positional call arguments; KerasTensors are kept as they are.
        kwargs: Keyword call arguments.
        inputs: The flat list of KerasTensors among `args` and `kwargs`.
        outputs: The flat list of KerasTensors the call produced.
        opaque: For a composite layer kept whole, why it could not be
            inlined; None otherwise.
    """

    layer: keras.layers.Layer
    args: tuple
    kwargs: dict
    inputs: list
    outputs: list
    opaque: str | None = None


@dataclasses.dataclass
class FlatGraph:
    """A model as a flat list of calls, with its input and output tensors.

    `inputs` and `outputs` are flat lists; `input_structure` and
    `output_structure` hold the same tensors in the model's own nesting (a
    single tensor, a list, a dict), so a rebuilt model returns what the
    original returns.
    """

    model: keras.Model
    inputs: list
    outputs: list
    calls: list
    output_structure: Any = None
    input_structure: Any = None
    aliases: dict = dataclasses.field(default_factory=dict)

    def resolve(self, tensor):
        """The flat graph's tensor for a tensor of the model (or of a model nested in it).

        The output of a nested model or of an inlined composite layer is
        computed, in the flat graph, by the last of its inner calls.
        """
        return self.aliases.get(id(tensor), tensor)

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
    aliases: dict = {}
    _walk_into(graph, alias, calls, aliases)

    def resolve(x):
        return alias.get(id(x), x) if is_tensor(x) else x

    outputs = keras.tree.map_structure(resolve, getattr(graph, "_outputs_struct", graph.outputs))
    return FlatGraph(
        model=model,
        inputs=list(graph.inputs),
        outputs=_flat_tensors(outputs),
        calls=calls,
        output_structure=outputs,
        # A Sequential model takes one tensor, whatever its inner graph holds.
        input_structure=None if isinstance(model, keras.Sequential)
        else getattr(graph, "_inputs_struct", None),
        aliases=aliases,
    )


def _walk_into(graph, alias: dict, calls: list, aliases: dict) -> None:
    """Append the calls of `graph` to `calls`.

    `alias` maps id(inner tensor) -> outer tensor, so the calls of a nested model
    (or of a traced composite layer) read and write the tensors of the
    enclosing graph. `aliases` collects every such mapping, at every depth.
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
        opaque = None
        if isinstance(op, keras.Model):
            check_model(op)
            _inline(_graph_of(op), op.name, args, kwargs, outputs, alias, calls, aliases)
            continue
        if is_composite(op):
            opaque = unsavable_sublayer(op)
            inner, opaque = (None, opaque) if opaque else trace(op, node.arguments.args,
                                                                node.arguments.kwargs)
            n_leaves, kept = getattr(inner, "_kprune_kept", (len(outputs), None))
            if inner is not None and n_leaves != len(outputs):
                inner, opaque = None, (f"its trace returns {n_leaves} outputs, its call "
                                       f"{len(outputs)}")
            elif inner is not None and kept is not None:
                left_out = [t for i, t in enumerate(outputs) if i not in kept]
                if _reads(graph, left_out):
                    inner, opaque = None, ("its trace leaves out outputs the model reads "
                                           "(they are not symbolic tensors in the trace)")
            if inner is not None:
                inner_outputs = outputs if kept is None else [outputs[i] for i in kept]
                _inline(inner, op.name, args, kwargs, inner_outputs, alias, calls, aliases)
                continue
        calls.append(
            Call(
                layer=op,
                args=args,
                kwargs=kwargs,
                inputs=_flat_tensors(args) + _flat_tensors(kwargs),
                outputs=outputs,
                opaque=opaque,
            )
        )


def _reads(graph, tensors: list) -> bool:
    """Whether a node of `graph`, or its outputs, read one of `tensors`."""
    ids = {id(t) for t in tensors}
    if not ids:
        return False
    if any(id(t) in ids for t in _flat_tensors(graph.outputs)):
        return True
    for node in _ordered_nodes(graph):
        given = _flat_tensors(node.arguments.args) + _flat_tensors(node.arguments.kwargs)
        if any(id(t) in ids for t in given):
            return True
    return False


def _inline(inner, name: str, args, kwargs, outputs: list, alias: dict, calls: list,
            aliases: dict) -> None:
    """Walk the graph `inner` (a nested model or a traced layer) in place of its call."""
    inner_inputs = list(inner.inputs)
    given = _flat_tensors(args) + _flat_tensors(kwargs)
    if len(given) != len(inner_inputs):
        raise KprunError(
            f"Nested model '{name}' was called with {len(given)} tensors "
            f"but has {len(inner_inputs)} inputs."
        )
    inner_alias = dict(alias)
    for t_in, t_out in zip(inner_inputs, given):
        inner_alias[id(t_in)] = t_out
    _walk_into(inner, inner_alias, calls, aliases)
    for t_inner, t_outer in zip(_flat_tensors(inner.outputs), outputs):
        alias[id(t_outer)] = aliases[id(t_outer)] = inner_alias.get(id(t_inner), t_inner)
    for t_in, t_out in zip(inner_inputs, given):
        aliases.setdefault(id(t_in), t_out)


# --------------------------------------------------------------------------
# Composite layers
# --------------------------------------------------------------------------
def sublayers(layer) -> list:
    """The layers `layer` holds directly (not recursively)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def is_composite(layer) -> bool:
    """Whether `layer` is a subclassed layer, outside Keras itself, made of sub-layers.

    Keras's own layers are never inlined (they are handled, or blocked, by
    their rules); a layer with a registered channel rule is not inlined either.
    """
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
        return False
    if type(layer).__module__.split(".")[0] == "keras" or has_rule(layer):
        return False
    return bool(sublayers(layer))


def unsavable_sublayer(layer) -> str | None:
    """Why inlining `layer` would give a model that does not reload, or None.

    A composite's own config may name a function (`act_layer="gelu"`) that a
    sub-layer holds as a Python function or lambda. Inlined, that sub-layer is
    saved with its own config, which `keras.saving.load_model(safe_mode=True)`
    refuses (a lambda) or cannot find (an unregistered function) in a fresh
    process; kept whole, the composite saves as the original does.
    """
    for sub in sublayers(layer):
        for key, value in _function_arguments(sub):
            if not _reloads(value):
                return (f"its sub-layer '{sub.name}' ({type(sub).__name__}) holds the Python "
                        f"function '{value.__qualname__}' as `{key.lstrip('_')}`, which a "
                        "`.keras` file cannot hold (`load_model(safe_mode=True)` refuses it)")
    return None


def _function_arguments(layer) -> list:
    """(name, function) for the attributes of `layer` that hold a constructor argument."""
    try:
        params = set(inspect.signature(type(layer).__init__).parameters)
    except (TypeError, ValueError):
        return []
    return [(key, value) for key, value in vars(layer).items()
            if isinstance(value, types.FunctionType) and key.lstrip("_") in params]


_RELOADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reloads(fn) -> bool:
    """Whether Keras serializes `fn` to a config that safe-mode deserialization gives back."""
    if fn not in _RELOADS:
        _RELOADS[fn] = fn.__name__ != "<lambda>" and _round_trips(fn)
    return _RELOADS[fn]


def _round_trips(fn) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = keras.saving.serialize_keras_object(fn)
            return keras.saving.deserialize_keras_object(config, safe_mode=True) is fn
    except Exception:  # any failure to round-trip means: it does not reload
        return False


_TRACERS: dict = {}


def register_trace(layer_class, fn) -> None:
    """Trace composite layers of exactly `layer_class` with `fn` instead of their `call`.

    For a composite layer whose `call` does not trace on symbolic inputs as
    written, though its computation does: a sub-layer that returns None beside
    its tensors (a functional call refuses it), arguments that select a
    branch. `fn(layer, *args, **kwargs)` receives the symbolic arguments of
    one call and computes the layer's outputs from its sub-layers and
    `keras.ops`, in the structure `layer.call` returns; a leaf the model never
    reads may be None (it is left out of the flat graph). The trace is then
    handled as any other: checked against the layer on a random batch, and
    whatever `fn` raises keeps the layer whole, the message as the reason.

    Args:
        layer_class: A composite layer class (exact class, not subclasses).
        fn: `fn(layer, *args, **kwargs) -> outputs`.

    Example:

    >>> def trace_encoder(layer, x, output_hidden_states=False):
    ...     for block in layer.blocks:
    ...         x = block.mlp(block.norm(x)) + x
    ...     return x, None
    >>> register_trace(MyEncoder, trace_encoder)
    """
    _TRACERS[layer_class] = fn


def own_variables(layer) -> list:
    """Variables `layer` created itself, not those of its sub-layers."""
    inner = {id(v) for sub in sublayers(layer) for v in sub.variables}
    return [v for v in layer.variables if id(v) not in inner]


def trace(layer, args, kwargs):
    """`layer.call` traced on symbolic inputs: `(functional graph, None)` or `(None, why)`.

    Args:
        layer: A composite layer (see `is_composite`).
        args, kwargs: The arguments of one of its calls (KerasTensors inside).

    Returns:
        A functional model of the layer's sub-layers and `keras.ops` calls
        with one input per tensor argument, or None and the reason it could
        not be made. The caller's layers are left as they were.
    """
    own = own_variables(layer)
    if own:
        names = ", ".join(v.path.split("/")[-1] for v in own[:3])
        return None, f"it uses weights of its own ({names}) besides its sub-layers"
    fresh = {}

    def placeholder(x):
        if not is_tensor(x):
            return x
        fresh[id(x)] = keras.Input(batch_shape=tuple(x.shape), dtype=x.dtype,
                                   sparse=getattr(x, "sparse", False))
        return fresh[id(x)]

    new_args = keras.tree.map_structure(placeholder, args)
    new_kwargs = keras.tree.map_structure(placeholder, kwargs)
    inputs = _flat_tensors(new_args) + _flat_tensors(new_kwargs)
    saved = _node_lists(layer)
    tracer = _TRACERS.get(type(layer))
    kept = None
    try:
        if tracer is not None:
            outputs = tracer(layer, *new_args, **new_kwargs)
        else:
            outputs = layer.call(*new_args, **new_kwargs)
        leaves = keras.tree.flatten(outputs)
        if not _flat_tensors(leaves):
            return None, "its call returned no symbolic tensor"
        if len(_flat_tensors(leaves)) < len(leaves):
            # Constants (an empty tensor made from static sizes) and None
            # outputs: only the symbolic ones enter the flat graph.
            kept = [i for i, leaf in enumerate(leaves) if is_tensor(leaf)]
            outputs = [leaves[i] for i in kept]
        inner = keras.Model(inputs, outputs, name=f"{layer.name}_traced")
    except Exception as exc:  # any failure means: keep the layer whole, say why
        message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return None, f"its call does not trace on symbolic inputs ({type(exc).__name__}: {message})"
    finally:
        _restore_node_lists(saved)
    why = _lost_shapes(inputs, inner) or _check_trace(layer, inner, args, kwargs, kept)
    if why:
        return None, why
    if kept is not None:
        # How many outputs the call has, and which of them the trace computes.
        inner._kprune_kept = (len(leaves), tuple(kept))
    return inner, None


def _lost_shapes(inputs: list, inner) -> str | None:
    """Why the trace is refused if it leaves sizes unknown that its inputs fixed."""
    if any(d is None for t in inputs for d in t.shape[1:]):
        return None
    for node in _ordered_nodes(inner):
        for t in node.outputs:
            if is_tensor(t) and any(d is None for d in t.shape[1:]):
                return (f"its trace loses static sizes (the output of "
                        f"'{node.operation.name}' has shape {tuple(t.shape)})")
    return None


def _check_trace(layer, inner, args, kwargs, kept=None) -> str | None:
    """Run `layer` and its trace on one random batch; why they differ, or None.

    A trace can be wrong where the layer reads shapes at run time (a
    `keras.ops.shape(x)[0]` batch size becomes a fixed None) or loses
    static shapes; those traces are refused. Unknown sizes are taken as 2
    (batch) and 16; if the layer itself cannot run on such a batch, the trace
    is kept unchecked. `kept`: positions of the traced outputs among the
    layer's flat outputs, when the trace leaves some out.
    """
    rng = np.random.default_rng(0)

    def sample(x):
        if not is_tensor(x):
            return x
        shape = tuple((2 if i == 0 else 16) if d is None else int(d) for i, d in enumerate(x.shape))
        if "float" in str(x.dtype):
            return rng.normal(size=shape).astype(x.dtype)
        return np.zeros(shape, dtype=x.dtype)

    real_args = keras.tree.map_structure(sample, args)
    real_kwargs = keras.tree.map_structure(sample, kwargs)
    try:
        want = layer(*real_args, **real_kwargs)
    except Exception:  # the layer needs other sizes: nothing to compare against
        return None
    try:
        got = inner(_flat_tensors_or_arrays(real_args) + _flat_tensors_or_arrays(real_kwargs))
        if kept is not None:
            got, want = keras.tree.flatten(got), [keras.tree.flatten(want)[i] for i in kept]
        keras.tree.assert_same_structure(got, want)
        for g, w in zip(keras.tree.flatten(got), keras.tree.flatten(want)):
            g, w = keras.ops.convert_to_numpy(g), keras.ops.convert_to_numpy(w)
            scale = float(np.max(np.abs(w))) if w.size else 0.0
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, scale))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return ("its traced graph does not compute what the layer computes "
                f"({type(exc).__name__}: {text[0][:120] if text else ''})")
    return None


def _flat_tensors_or_arrays(structure) -> list:
    return [x for x in keras.tree.flatten(structure) if isinstance(x, np.ndarray)]


def _node_lists(layer) -> list:
    """(layer, inbound count, outbound count) for `layer` and every layer inside it."""
    found = layer._flatten_layers(include_self=True, recursive=True)
    return [(sub, len(sub._inbound_nodes), len(sub._outbound_nodes)) for sub in found]


def _restore_node_lists(saved: list) -> None:
    """Forget the nodes a trace added to the caller's layers."""
    for sub, n_in, n_out in saved:
        del sub._inbound_nodes[n_in:]
        del sub._outbound_nodes[n_out:]
