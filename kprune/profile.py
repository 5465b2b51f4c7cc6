"""Count multiply-accumulates (MACs) and parameters, and time a model.

MACs are counted as papers count them: one multiply-accumulate is 1, for one
sample.

- Conv1D/2D/3D: `prod(kernel) * Cin / groups * Cout * prod(output spatial)`.
- Conv1D/2D/3DTranspose: `prod(kernel) * Cin * Cout * prod(input spatial)`.
- DepthwiseConv1D/2D: `prod(kernel) * Cin * multiplier * prod(output spatial)`.
- SeparableConv1D/2D: the depthwise part plus a pointwise `Cin * multiplier * Cout`
  per output position.
- Dense: `inputs * units * prod(leading non-batch axes)`.
- EinsumDense, and the `keras.ops` einsum and matmul calls of inlined
  composite layers: every output element costs the product of the
  contracted axes.
- MultiHeadAttention and GroupQueryAttention: the query, key, value and
  output projections plus `QK^T` (`heads * T * S * key_dim`) and the weighted
  sum of the values (`heads * T * S * value_dim`), which grow with the
  sequence lengths `T` and `S`.
- SimpleRNN/GRU/LSTM: `gates * units * (features + units)` per time step
  (1, 3 and 4 gates); Bidirectional counts both directions, TimeDistributed
  its layer once per step.

Normalisation, activations, pooling, biases and element-wise merges count 0,
as in the tables of the pruning literature. Layer types without a counter
count 0; custom layers register theirs with `register_macs`. A layer with
weights and no counter is named in `Profile.uncounted`, so a total that
misses it does not pass unnoticed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.walk import walk
from kprune.layers.compactor import Compactor, compactor_macs
from kprune.layers.tokens import ClassToken, PositionEmbedding
from kprune.layers.learned_group_conv import (LearnedDense, LearnedGroupConv, learned_dense_macs,
                                              learned_group_conv_macs)

_COUNTERS: dict = {}


def register_macs(layer_class, fn: Callable) -> None:
    """Register `fn(layer, input_shapes, output_shapes) -> int` for `layer_class`.

    Shapes include the batch axis; counts are per sample.

    Example:

    >>> register_macs(MyPointwise, lambda layer, ins, outs: ins[0][-1] * outs[0][-1])
    """
    _COUNTERS[layer_class] = fn


def _prod(dims) -> int:
    if any(d is None for d in dims):
        raise KprunError("Cannot count MACs on unknown spatial sizes; pass `input_shape=`.")
    return int(math.prod(int(d) for d in dims))


def _spatial_and_channels(layer, shape):
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return shape[2:], shape[1]
    return shape[1:-1], shape[-1]


def _conv(layer, ins, outs):
    spatial_out, cout = _spatial_and_channels(layer, outs[0])
    _, cin = _spatial_and_channels(layer, ins[0])
    groups = int(getattr(layer, "groups", 1) or 1)
    kernel = getattr(layer, "kernel", None)
    if groups > 1 and kernel is not None and int(kernel.shape[-2]) == 1:
        groups = int(cin)  # one input channel per group: pruning removes whole groups
    return _prod(layer.kernel_size) * int(cin) // groups * int(cout) * _prod(spatial_out)


def _conv_transpose(layer, ins, outs):
    spatial_in, cin = _spatial_and_channels(layer, ins[0])
    _, cout = _spatial_and_channels(layer, outs[0])
    return _prod(layer.kernel_size) * int(cin) * int(cout) * _prod(spatial_in)


def _depthwise(layer, ins, outs):
    spatial_out, cout = _spatial_and_channels(layer, outs[0])
    return _prod(layer.kernel_size) * int(cout) * _prod(spatial_out)


def _separable(layer, ins, outs):
    spatial_out, cout = _spatial_and_channels(layer, outs[0])
    _, cin = _spatial_and_channels(layer, ins[0])
    mid = int(cin) * int(layer.depth_multiplier)
    return (_prod(layer.kernel_size) * mid + mid * int(cout)) * _prod(spatial_out)


def _dense(layer, ins, outs):
    return int(ins[0][-1]) * int(outs[0][-1]) * _prod(outs[0][1:-1])


def _contracted(equation: str, operand_shapes: list) -> int:
    """Product of the sizes of the letters that `equation` sums over."""
    lhs, out = equation.replace(" ", "").split("->")
    sizes = {}
    for spec, shape in zip(lhs.split(","), operand_shapes):
        letters = spec.replace("...", "")
        if not letters:
            continue
        for letter, dim in zip(letters, shape[len(shape) - len(letters):] if spec.startswith("...")
                               else shape):
            sizes[letter] = dim
    return _prod([sizes[c] for c in sorted(set(lhs.replace(",", "").replace(".", "")))
                  if c not in out])


def _einsum_dense(layer, ins, outs):
    return _prod(outs[0][1:]) * _contracted(layer.equation, [ins[0], tuple(layer.kernel.shape)])


def _einsum_op(op, ins, outs):
    return _prod(outs[0][1:]) * _contracted(op.subscripts, ins)


def _matmul_op(op, ins, outs):
    if len(ins) < 2 or len(ins[0]) < 2:
        return 0  # a product with a constant: the constant is not a model weight
    return _prod(outs[0][1:]) * _prod([ins[0][-1]])


def _attention(layer, ins, outs):
    query, value = ins[0], ins[1] if len(ins) > 1 else ins[0]
    heads, key_dim = int(layer.num_heads), int(layer.key_dim)
    value_dim = int(layer.value_dim or key_dim)
    tq, tv = _prod(query[1:-1]), _prod(value[1:-1])
    projections = (tq * int(query[-1]) * key_dim + tv * int(value[-1]) * (key_dim + value_dim)
                   + tq * value_dim * int(outs[0][-1])) * heads
    return projections + heads * tq * tv * (key_dim + value_dim)


def _grouped_attention(layer, ins, outs):
    query, value = ins[0], ins[1] if len(ins) > 1 else ins[0]
    q_heads, kv_heads = int(layer.num_query_heads), int(layer.num_key_value_heads)
    head_dim = int(layer.head_dim)
    tq, tv = _prod(query[1:-1]), _prod(value[1:-1])
    projections = (tq * int(query[-1]) * q_heads + 2 * tv * int(value[-1]) * kv_heads
                   + tq * q_heads * int(outs[0][-1])) * head_dim
    return projections + 2 * q_heads * tq * tv * head_dim


def _rnn(layer, ins, outs):
    steps, features = ins[0][1], ins[0][-1]
    gates = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}[type(layer).__name__]
    units = int(layer.units)
    return _prod([steps]) * gates * units * (int(features) + units)


def _bidirectional(layer, ins, outs):
    return sum(layer_macs(inner, ins, [inner.compute_output_shape(ins[0])])
               for inner in (layer.forward_layer, layer.backward_layer))


def _time_distributed(layer, ins, outs):
    step_in = (ins[0][0],) + tuple(ins[0][2:])
    step_out = (outs[0][0],) + tuple(outs[0][2:])
    return _prod([ins[0][1]]) * layer_macs(layer.layer, [step_in], [step_out])


def _register_defaults():
    L = keras.layers
    for cls in (L.Conv1D, L.Conv2D, L.Conv3D):
        register_macs(cls, _conv)
    for cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
        register_macs(cls, _conv_transpose)
    for cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
        register_macs(cls, _depthwise)
    for cls in (L.SeparableConv1D, L.SeparableConv2D):
        register_macs(cls, _separable)
    register_macs(L.Dense, _dense)
    register_macs(L.EinsumDense, _einsum_dense)
    register_macs(L.MultiHeadAttention, _attention)
    register_macs(L.GroupQueryAttention, _grouped_attention)
    register_macs(keras.src.ops.numpy.Einsum, _einsum_op)
    register_macs(keras.src.ops.numpy.Matmul, _matmul_op)
    for cls in (L.SimpleRNN, L.GRU, L.LSTM):
        register_macs(cls, _rnn)
    register_macs(L.Bidirectional, _bidirectional)
    register_macs(L.TimeDistributed, _time_distributed)
    register_macs(Compactor, compactor_macs)
    register_macs(LearnedGroupConv, learned_group_conv_macs)
    register_macs(LearnedDense, learned_dense_macs)


_register_defaults()


class _Resized:
    """A layer seen with some size attributes replaced (`num_heads` of a pruned attention)."""

    def __init__(self, layer, attrs: dict):
        self._layer, self._attrs = layer, attrs

    def __getattr__(self, name):
        attrs = self.__dict__["_attrs"]
        return attrs[name] if name in attrs else getattr(self.__dict__["_layer"], name)


def layer_macs(layer, input_shapes: Sequence, output_shapes: Sequence,
               attrs: dict | None = None) -> int:
    """MACs of one call of `layer` for one sample (0 for uncounted layer types).

    Args:
        layer: The called layer.
        input_shapes: Shapes of the call's input tensors, batch axis included.
        output_shapes: Shapes of its output tensors.
        attrs: Size attributes to read instead of the layer's own (for
            example `{"num_heads": 2}`), to count a planned, smaller layer.
    """
    fn = _COUNTERS.get(type(layer))
    if fn is None:
        return 0
    seen = _Resized(layer, attrs) if attrs else layer
    return int(fn(seen, [tuple(s) for s in input_shapes], [tuple(s) for s in output_shapes]))


@dataclasses.dataclass
class LayerProfile:
    """One row of a `Profile`."""

    name: str
    class_name: str
    output_shape: tuple
    macs: int
    params: int


@dataclasses.dataclass
class Profile:
    """MACs and parameters of a model, per layer and in total.

    Attributes:
        macs: Multiply-accumulates for one sample.
        params: Parameters (equals `model.count_params()`).
        layers: One `LayerProfile` per layer call.
        uncounted: "name (Class)" of every layer with weights that has no
            MACs counter (a composite layer kprune could not see through, a
            custom layer): `macs` leaves them out; `register_macs` adds one.
    """

    name: str
    macs: int
    params: int
    layers: list
    uncounted: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "macs": self.macs, "params": self.params,
                "layers": [dataclasses.asdict(r) for r in self.layers],
                "uncounted": list(self.uncounted)}

    def __str__(self) -> str:
        head = f"{'layer':<36}{'type':<24}{'output':<22}{'MACs':>14}{'params':>12}"
        lines = [f"Model: {self.name}", head, "-" * len(head)]
        for r in self.layers:
            shape = str(tuple(r.output_shape[1:]))
            lines.append(f"{r.name[:35]:<36}{r.class_name[:23]:<24}{shape[:21]:<22}"
                         f"{r.macs:>14,}{r.params:>12,}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<82}{self.macs:>14,}{self.params:>12,}")
        lines.append(f"{format_count(self.macs)} MACs, {format_count(self.params)} parameters")
        if self.uncounted:
            lines.append(f"MACs not counted for {len(self.uncounted)} layer(s) with no counter: "
                         + ", ".join(self.uncounted[:8]) + (", ..." if len(self.uncounted) > 8 else ""))
        return "\n".join(lines)


def format_count(n: float) -> str:
    """`1234567` -> `'1.23M'`."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def profile(model: keras.Model, input_shape: Sequence[int] | None = None) -> Profile:
    """Per-layer and total MACs and parameters of `model`.

    Args:
        model: A functional or Sequential model (nested models are inlined).
        input_shape: Input shape without the batch axis, for models built with
            unknown spatial sizes (the model is rebuilt at that shape).

    Returns:
        A `Profile`; `print()` it for a table.

    Example:

    >>> p = profile(keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3)))
    >>> p.params == 3538984
    True
    """
    if input_shape is not None:
        model = _at_shape(model, tuple(input_shape))
    flat = walk(model)
    rows, seen = [], set()
    for call in flat.calls:
        ins = [tuple(t.shape) for t in call.inputs]
        outs = [tuple(t.shape) for t in call.outputs]
        try:
            macs = layer_macs(call.layer, ins, outs)
        except KprunError as exc:
            raise KprunError(f"Layer '{call.layer.name}': {exc}") from None
        params = 0
        if isinstance(call.layer, keras.layers.Layer) and id(call.layer) not in seen:
            seen.add(id(call.layer))
            params = int(sum(math.prod(v.shape) for v in call.layer.weights))
        rows.append(LayerProfile(call.layer.name, type(call.layer).__name__, outs[0] if outs else (),
                                 macs, params))
    uncounted = list(dict.fromkeys(f"{c.layer.name} ({type(c.layer).__name__})"
                                   for c in flat.calls if not counts(c.layer)))
    return Profile(model.name, sum(r.macs for r in rows), sum(r.params for r in rows), rows,
                   uncounted)


# Layers with weights that do no multiply-accumulates worth counting.
_NO_MACS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
            keras.layers.GroupNormalization, keras.layers.Normalization, keras.layers.PReLU,
            keras.layers.Embedding, ClassToken, PositionEmbedding)


def counts(layer) -> bool:
    """Whether `profile` accounts for `layer`: it has a MACs counter, no weights, or none needed."""
    if type(layer) in _COUNTERS or isinstance(layer, _NO_MACS):
        return True
    return not (isinstance(layer, keras.layers.Layer) and layer.weights)


def _at_shape(model, input_shape):
    """A weight-identical copy of `model` whose (single) input has `input_shape`."""
    if len(model.inputs) != 1:
        raise KprunError(f"Model '{model.name}' has several inputs; `input_shape` needs one.")
    from kprune.surgeon.rebuild import Rebuilder

    return Rebuilder(walk(model)).run(input_shapes=[(None,) + tuple(input_shape)])


def latency(model: keras.Model, batch_size: int = 1, warmup: int = 3, runs: int = 20,
            input_shape: Sequence[int] | None = None) -> float:
    """Median seconds of one inference call on a batch of random inputs.

    The model runs inside a compiled `tf.function` (as `model.predict` does)
    on TensorFlow, and through `model.predict_on_batch` on JAX (jitted) and
    PyTorch, after `warmup` untimed calls.

    Args:
        model: A single-input Keras model.
        batch_size: Batch size of the timed calls.
        warmup: Untimed calls before timing.
        runs: Timed calls; the median is returned.
        input_shape: Input shape without batch axis, if the model's is unknown.
    """
    shape = tuple(input_shape or model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise KprunError(f"Model '{model.name}' has unknown input sizes; pass `input_shape=`.")
    x = np.random.default_rng(0).normal(size=(batch_size,) + shape).astype("float32")
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        fn = tf.function(lambda t: model(t, training=False), jit_compile=False)
    else:  # JAX: the jitted predict step; torch: the eager one, without gradients
        fn = model.predict_on_batch
    for _ in range(max(1, warmup)):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn(x)
        keras.tree.map_structure(keras.ops.convert_to_numpy, out)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
