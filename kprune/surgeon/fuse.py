"""Fold per-channel and pointwise layers into the producer before them.

Two fusions that keep a model's inference outputs and make it smaller:

* `fuse_batchnorm`: a BatchNormalization right after a convolution or a
  `Dense` layer is an affine map per output channel; it becomes part of
  that layer's kernel and bias.
* `fold_compactors`: a ResRep `Compactor` right after a convolution or a
  `Dense` layer is a linear map over the output channels (masked); it
  becomes part of that layer's kernel and bias too.

Both return a new model built with the `Rebuilder`; the given model is not
changed.
"""

from __future__ import annotations

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.rules import channel_axis, norm_axis
from kprune.graph.walk import walk
from kprune.layers.compactor import Compactor
from kprune.surgeon.rebuild import Rebuilder, weights_of

L = keras.layers
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
_TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
PRODUCERS = _CONV + _TRANSPOSE + _DEPTHWISE + _SEPARABLE + (L.Dense,)


def is_linear(layer) -> bool:
    """Whether `layer` has no activation of its own (or a linear one)."""
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def output_axis(layer, rank: int) -> int:
    """The channel axis (with batch axis) of `layer`'s output of rank `rank`."""
    if isinstance(layer, L.Dense):
        return rank - 1
    return channel_axis(layer, rank)


def can_mix(layer) -> bool:
    """Whether a full (C, C) map on `layer`'s outputs folds into it (not only a scale)."""
    if isinstance(layer, _DEPTHWISE):
        return False
    return int(getattr(layer, "groups", 1) or 1) == 1


def map_outputs(layer, weights: dict, matrix, shift=None) -> dict:
    """Weights of `layer` followed by `y -> y @ matrix + shift` on its output channels.

    Args:
        layer: A producer (see `PRODUCERS`) with a linear activation.
        weights: Its weights by name (`weights_of`).
        matrix: A `(C,)` per-channel scale, or a `(C, C')` map when
            `can_mix(layer)`.
        shift: A `(C',)` vector added after the map (default none).

    Returns:
        New weights by name, always with a `bias`.
    """
    matrix = np.asarray(matrix, dtype="float64")
    w = dict(weights)
    key = "pointwise_kernel" if isinstance(layer, _SEPARABLE) else "kernel"
    kernel = np.asarray(w[key], dtype="float64")
    if isinstance(layer, _TRANSPOSE):
        kernel = np.moveaxis(kernel, -2, -1)
    shape = kernel.shape
    if isinstance(layer, _DEPTHWISE):  # outputs are (Cin, multiplier) flattened
        kernel = kernel.reshape(shape[:-2] + (-1,))
    if matrix.ndim == 1:
        kernel = kernel * matrix
    else:
        kernel = kernel @ matrix
    if isinstance(layer, _DEPTHWISE):
        kernel = kernel.reshape(shape)
    if isinstance(layer, _TRANSPOSE):
        kernel = np.moveaxis(kernel, -1, -2)
    bias = np.asarray(w.get("bias", np.zeros(len(matrix))), dtype="float64")
    bias = bias * matrix if matrix.ndim == 1 else bias @ matrix
    if shift is not None:
        bias = bias + np.asarray(shift, dtype="float64")
    dtype = np.asarray(weights[key]).dtype
    w[key] = kernel.astype(dtype)
    w["bias"] = bias.astype(dtype)
    return w


def batchnorm_affine(layer) -> tuple:
    """`(scale, shift)` of an inference-mode BatchNormalization: `y = x * scale + shift`."""
    w = dict(weights_of(layer))
    variance = np.asarray(w["moving_variance"], dtype="float64")
    scale = 1.0 / np.sqrt(variance + float(layer.epsilon))
    if "gamma" in w:
        scale = scale * np.asarray(w["gamma"], dtype="float64")
    shift = -np.asarray(w["moving_mean"], dtype="float64") * scale
    if "beta" in w:
        shift = shift + np.asarray(w["beta"], dtype="float64")
    return scale, shift


def _producer_of(flat, call, counts):
    """The call producing `call`'s input if `call` is its sole reader, with why not."""
    if len(call.inputs) != 1:
        return None, "it has several inputs"
    tensor = call.inputs[0]
    before = flat.producer(tensor)
    if before is None:
        return None, "it reads a model input"
    layer = before.layer
    if not isinstance(layer, PRODUCERS):
        return None, f"'{layer.name}' ({type(layer).__name__}) is not a convolution or Dense layer"
    if counts[id(layer)] > 1:
        return None, f"'{layer.name}' is called more than once"
    if not is_linear(layer):
        return None, f"'{layer.name}' has its own activation"
    if len(flat.consumers(tensor)) != 1 or any(tensor is t for t in flat.outputs):
        return None, f"the output of '{layer.name}' is read by other layers too"
    return before, None


def _call_counts(flat) -> dict:
    counts: dict = {}
    for call in flat.calls:
        counts[id(call.layer)] = counts.get(id(call.layer), 0) + 1
    return counts


def _fold(flat, pairs: dict) -> keras.Model:
    """Rebuild `flat`, folding each follower call into its producer call.

    Args:
        flat: The flat graph.
        pairs: id(producer call) -> (follower call, fn(producer, weights) -> weights).
    """
    followers = {id(follower) for follower, _ in pairs.values()}

    def make_call(call, args, kwargs):
        if id(call) in followers:
            return [rebuilder.tensors[id(call.inputs[0])]]
        if id(call) not in pairs:
            return rebuilder.copy_call(call, args, kwargs)
        _, compose = pairs[id(call)]
        weights = compose(call.layer, dict(weights_of(call.layer)))
        config = call.layer.get_config()
        config["use_bias"] = True
        return rebuilder.call_with(call, args, kwargs, config, weights)

    rebuilder = Rebuilder(flat, make_call)
    return rebuilder.run()


def fuse_batchnorm(model: keras.Model) -> keras.Model:
    """Fold every BatchNormalization that follows a conv or Dense into its weights.

    A BatchNormalization is fused when it normalises the channel axis of the
    output of a Conv*, Conv*Transpose, DepthwiseConv*, SeparableConv* or
    `Dense` layer that has no activation, is called once, and whose output
    only this BatchNormalization reads. Other BatchNormalizations are kept.
    The result computes what `model` computes in inference mode.

    Args:
        model: A functional or Sequential model (left untouched).

    Returns:
        A new model in which the fused BatchNormalizations are gone and their
        producers have a bias.

    Example:

    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    >>> model = keras.Model(inputs, keras.layers.BatchNormalization()(x))
    >>> fused = fuse_batchnorm(model)
    >>> [type(layer).__name__ for layer in fused.layers]
    ['InputLayer', 'Conv2D']
    """
    flat = walk(model)
    counts = _call_counts(flat)
    pairs = {}
    for call in flat.calls:
        if not isinstance(call.layer, L.BatchNormalization) or counts[id(call.layer)] > 1:
            continue
        producer, _ = _producer_of(flat, call, counts)
        if producer is None:
            continue
        rank = len(call.inputs[0].shape)
        if norm_axis(int(call.layer.axis), rank) != output_axis(producer.layer, rank):
            continue
        scale, shift = batchnorm_affine(call.layer)
        pairs[id(producer)] = (call, _affine(scale, shift))
    return _fold(flat, pairs)


def _affine(scale, shift):
    return lambda layer, weights: map_outputs(layer, weights, scale, shift)


def _mixing(matrix):
    return lambda layer, weights: map_outputs(layer, weights, matrix)


def compactor_matrix(layer: Compactor) -> np.ndarray:
    """The masked kernel `K * mask` of a compactor: `y = x @ matrix`."""
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype="float64")
    mask = np.asarray(keras.ops.convert_to_numpy(layer.mask), dtype="float64")
    return kernel * mask[None, :]


def fold_compactors(model: keras.Model) -> keras.Model:
    """Fold every Compactor into the convolution or Dense layer before it.

    The producer's kernel is contracted with the compactor's masked kernel on
    its output axis (`kernel' = kernel @ (K * mask)`, `bias' = bias @ (K *
    mask)`), so masked channels of the result are exactly zero. Fuse
    BatchNormalization first (`fuse_batchnorm`) when one sits between them.

    Args:
        model: A functional or Sequential model with Compactor layers (left
            untouched).

    Returns:
        A new model without Compactor layers, computing what `model` computes.

    Raises:
        KprunError: if a compactor does not directly follow a convolution or
            Dense layer that only it reads, with no activation and no groups.

    Example:

    >>> attached = kprune.resrep.attach(model)
    >>> plain = fold_compactors(fuse_batchnorm(attached))
    """
    flat = walk(model)
    counts = _call_counts(flat)
    pairs = {}
    for call in flat.calls:
        if not isinstance(call.layer, Compactor):
            continue
        name = call.layer.name
        if counts[id(call.layer)] > 1:
            raise KprunError(f"Cannot fold Compactor '{name}': it is called more than once.")
        producer, why = _producer_of(flat, call, counts)
        if producer is None:
            raise KprunError(f"Cannot fold Compactor '{name}' into the layer before it: {why}.")
        rank = len(call.inputs[0].shape)
        if norm_axis(int(call.layer.axis), rank) != output_axis(producer.layer, rank):
            raise KprunError(f"Cannot fold Compactor '{name}': its axis is not the channel axis "
                             f"of '{producer.layer.name}'.")
        if not can_mix(producer.layer):
            raise KprunError(f"Cannot fold Compactor '{name}' into '{producer.layer.name}': a "
                             "grouped or depthwise convolution cannot mix its output channels.")
        pairs[id(producer)] = (call, _mixing(compactor_matrix(call.layer)))
    return _fold(flat, pairs)


__all__ = ["fuse_batchnorm", "fold_compactors", "map_outputs", "batchnorm_affine",
           "compactor_matrix"]
