"""The ChannelShuffle layer: interleave the channels of `groups` groups."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kprune.errors import KprunError


@keras.saving.register_keras_serializable(package="kprune")
class ChannelShuffle(keras.layers.Layer):
    """Interleave channels: `groups` blocks of `n` channels become `n` blocks of `groups`.

    Channel `g * n + k` of the input (channel `k` of block `g`, with
    `n = channels / groups`) becomes channel `k * groups + g` of the output,
    as in ShuffleNet and CondenseNet. After a grouped convolution whose
    group `g` computes the filters `g, g + groups, g + 2 * groups, ...` of
    a learned group convolution, this restores the filters' original order.

    The layer has no weights and works on inputs of any rank >= 2.

    Args:
        groups: Number of channel groups; must divide the channel count.
        axis: The channel axis (-1 for channels_last data).
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> import numpy as np
    >>> x = np.arange(6, dtype="float32").reshape(1, 6)
    >>> keras.ops.convert_to_numpy(ChannelShuffle(2)(x)).tolist()
    [[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]]
    """

    def __init__(self, groups: int, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise KprunError(
                f"ChannelShuffle '{self.name}': `groups` must be a positive int, got {groups!r}."
            )
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise KprunError(f"ChannelShuffle '{self.name}': `axis` must be an int, got {axis!r}.")
        self.groups = int(groups)
        self.axis = int(axis)

    def build(self, input_shape):
        axis = self._resolve_axis(len(input_shape))
        channels = input_shape[axis]
        if channels is None or channels % self.groups:
            raise KprunError(
                f"ChannelShuffle '{self.name}': {channels} channels do not split into "
                f"{self.groups} equal groups."
            )
        self.built = True

    def call(self, inputs):
        axis = self._resolve_axis(len(inputs.shape))
        x = ops.moveaxis(inputs, axis, -1) if axis != len(inputs.shape) - 1 else inputs
        channels = x.shape[-1]
        lead = ops.shape(x)[:-1]
        x = ops.reshape(x, (*lead, self.groups, channels // self.groups))
        x = ops.swapaxes(x, -1, -2)
        x = ops.reshape(x, (*lead, channels))
        return ops.moveaxis(x, -1, axis) if axis != len(inputs.shape) - 1 else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def permutation(self, channels: int) -> np.ndarray:
        """Input channel read by every output channel: `out[..., j] = in[..., perm[j]]`.

        Args:
            channels: The channel count.

        Returns:
            A 1-D int64 array of length `channels`.

        Example:

        >>> ChannelShuffle(2).permutation(6).tolist()
        [0, 3, 1, 4, 2, 5]
        """
        if channels % self.groups:
            raise KprunError(
                f"ChannelShuffle '{self.name}': {channels} channels do not split into "
                f"{self.groups} equal groups."
            )
        return np.arange(channels).reshape(self.groups, -1).T.reshape(-1).astype("int64")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"groups": self.groups, "axis": self.axis})
        return config

    def _resolve_axis(self, rank: int) -> int:
        if rank < 2 or not -rank <= self.axis < rank or self.axis % rank == 0:
            raise KprunError(
                f"ChannelShuffle '{self.name}': axis {self.axis} is not a channel axis "
                f"of a rank-{rank} input (the batch axis 0 is not allowed)."
            )
        return self.axis % rank
