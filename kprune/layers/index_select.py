"""The IndexSelect layer: gather chosen channels, in a chosen order."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

from kprune.errors import KprunError


@keras.saving.register_keras_serializable(package="kprune")
class IndexSelect(keras.layers.Layer):
    """Gather the channels `indices` of the input along the channel axis.

    `out[..., j] = in[..., indices[j]]`. Indices may repeat and come in any
    order, so one input channel can feed several groups of a grouped
    convolution: this is how a converted CondenseNet layer reads the input
    channels each of its groups kept.

    The layer has no weights; `indices` is part of its config.

    Args:
        indices: Non-empty sequence of channel indices (ints >= 0).
        axis: The channel axis (-1 for channels_last data).
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> import numpy as np
    >>> x = np.array([[10.0, 11.0, 12.0]], dtype="float32")
    >>> keras.ops.convert_to_numpy(IndexSelect([2, 0, 2])(x)).tolist()
    [[12.0, 10.0, 12.0]]
    """

    def __init__(self, indices: Sequence[int], axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        values = np.asarray(indices)
        if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer) \
                or np.any(values < 0):
            raise KprunError(
                f"IndexSelect '{self.name}': `indices` must be a non-empty 1-D sequence of "
                f"ints >= 0, got {indices!r}."
            )
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise KprunError(f"IndexSelect '{self.name}': `axis` must be an int, got {axis!r}.")
        self.indices = [int(i) for i in values]
        self.axis = int(axis)

    def build(self, input_shape):
        axis = self._resolve_axis(len(input_shape))
        channels = input_shape[axis]
        if channels is not None and max(self.indices) >= channels:
            raise KprunError(
                f"IndexSelect '{self.name}': index {max(self.indices)} is out of range for "
                f"{channels} input channels."
            )
        self.built = True

    def call(self, inputs):
        axis = self._resolve_axis(len(inputs.shape))
        return ops.take(inputs, np.asarray(self.indices, dtype="int32"), axis=axis)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        shape[self._resolve_axis(len(shape))] = len(self.indices)
        return tuple(shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"indices": list(self.indices), "axis": self.axis})
        return config

    def _resolve_axis(self, rank: int) -> int:
        if rank < 2 or not -rank <= self.axis < rank or self.axis % rank == 0:
            raise KprunError(
                f"IndexSelect '{self.name}': axis {self.axis} is not a channel axis "
                f"of a rank-{rank} input (the batch axis 0 is not allowed)."
            )
        return self.axis % rank
