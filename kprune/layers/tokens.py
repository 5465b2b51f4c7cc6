"""Token layers of vision transformers: a learned class token and position embeddings."""

from __future__ import annotations

import keras
from keras import ops

from kprune.errors import KprunError


def _check_sequence(layer, input_shape, need_length: bool) -> tuple:
    """`(length, channels)` of a `(batch, length, channels)` input shape, checked."""
    shape = tuple(input_shape)
    kind = type(layer).__name__
    if len(shape) != 3:
        raise KprunError(
            f"{kind} '{layer.name}': input must have shape (batch, tokens, channels), "
            f"got {shape}."
        )
    if shape[-1] is None:
        raise KprunError(
            f"{kind} '{layer.name}': the channel axis of input shape {shape} has unknown size."
        )
    if need_length and shape[1] is None:
        raise KprunError(
            f"{kind} '{layer.name}': the token axis of input shape {shape} has unknown size; "
            "a position embedding needs a fixed number of tokens."
        )
    return shape[1], int(shape[-1])


@keras.saving.register_keras_serializable(package="kprune")
class ClassToken(keras.layers.Layer):
    """Prepend a learned class token to a sequence of tokens.

    A vision transformer (Dosovitskiy et al., ICLR 2021) classifies from an
    extra token placed before the patch tokens. The layer holds one learned
    vector of `D` entries (the weight `token`, shape `(1, 1, D)`) and puts it
    in front of every sequence of the batch:

        (B, T, D) -> (B, T + 1, D),   y[:, 0] = token,   y[:, 1:] = x

    Every channel is handled on its own, so pruning channel `d` of the
    sequence removes entry `d` of the token (kprune's graph treats the token
    as a per-channel parameter, like a bias).

    Args:
        initializer: Initializer of the token (default zeros, as in ViT).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Example:

    >>> import numpy as np
    >>> layer = ClassToken()
    >>> x = np.ones((2, 4, 3), dtype="float32")
    >>> tuple(layer(x).shape)
    (2, 5, 3)
    >>> keras.ops.convert_to_numpy(layer(x))[:, 0].tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """

    def __init__(self, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)
        self.token = None

    def build(self, input_shape):
        _, channels = _check_sequence(self, input_shape, need_length=False)
        self.token = self.add_weight(
            name="token",
            shape=(1, 1, channels),
            initializer=self.initializer,
            trainable=True,
        )
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={-1: channels})

    def call(self, inputs):
        token = ops.cast(self.token, inputs.dtype)
        batch = ops.shape(inputs)[0]
        token = ops.broadcast_to(token, (batch, 1, token.shape[-1]))
        return ops.concatenate([token, inputs], axis=1)

    def compute_output_shape(self, input_shape):
        batch, length, channels = tuple(input_shape)
        return (batch, None if length is None else length + 1, channels)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"initializer": keras.initializers.serialize(self.initializer)})
        return config


@keras.saving.register_keras_serializable(package="kprune")
class PositionEmbedding(keras.layers.Layer):
    """Add a learned position embedding to a sequence of tokens.

    The layer holds one learned vector per token position (the weight
    `embedding`, shape `(1, T, D)`, sized from the first input it sees) and
    adds it to every sequence of the batch:

        (B, T, D) -> (B, T, D),   y = x + embedding

    The number of tokens `T` is fixed once the layer is built. Every channel
    is handled on its own, so pruning channel `d` of the sequence removes
    column `d` of the embedding (a per-channel parameter for kprune's graph).

    Args:
        initializer: Initializer of the embedding (default a normal
            distribution of standard deviation 0.02, as in ViT).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Example:

    >>> import numpy as np
    >>> layer = PositionEmbedding(initializer="ones")
    >>> y = layer(np.zeros((2, 4, 3), dtype="float32"))
    >>> tuple(layer.embedding.shape)
    (1, 4, 3)
    >>> float(keras.ops.convert_to_numpy(y).min())
    1.0
    """

    def __init__(self, initializer=None, **kwargs):
        super().__init__(**kwargs)
        if initializer is None:
            initializer = keras.initializers.RandomNormal(stddev=0.02)
        self.initializer = keras.initializers.get(initializer)
        self.embedding = None

    def build(self, input_shape):
        length, channels = _check_sequence(self, input_shape, need_length=True)
        self.embedding = self.add_weight(
            name="embedding",
            shape=(1, int(length), channels),
            initializer=self.initializer,
            trainable=True,
        )
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={1: int(length), -1: channels})

    def call(self, inputs):
        return inputs + ops.cast(self.embedding, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"initializer": keras.initializers.serialize(self.initializer)})
        return config
