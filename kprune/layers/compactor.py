"""The Compactor layer of ResRep: a masked pointwise linear map over channels."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kprune.errors import KprunError


@keras.saving.register_keras_serializable(package="kprune")
class Compactor(keras.layers.Layer):
    """A bias-free pointwise (1x1) linear map over the channel axis, with a mask.

    ResRep (Ding et al., ICCV 2021) inserts a compactor after the
    normalisation that follows a convolution. Its kernel `K` has shape
    `(C, C)` (input channel, output channel) and starts as the identity, so
    inserting a compactor does not change a model's outputs. A non-trainable
    per-output-channel `mask` (ones at start) switches output channels off:

        y[..., j] = mask[j] * sum_i K[i, j] * x[..., i]

    where `...` runs over every axis but the channel axis. The mask is a
    layer weight, so it is saved and restored with the model. Masked output
    channels are removed for real when the compactor is folded into the
    layer before it (`kprune.resrep.convert`).

    The layer works on any input of rank 2 or more: after `Dense` (rank 2),
    `Conv1D` (rank 3), `Conv2D` (rank 4) and `Conv3D` (rank 5).

    Args:
        axis: The channel axis: -1 for channels_last data (the default),
            1 for channels_first data. Must not be the batch axis.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Example:

    >>> import numpy as np
    >>> layer = Compactor()
    >>> x = np.random.rand(2, 4, 4, 3).astype("float32")
    >>> bool(np.allclose(layer(x), x))
    True
    >>> layer.set_mask([1.0, 0.0, 1.0])
    >>> layer.active_channels().tolist()
    [0, 2]
    """

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise KprunError(
                f"Compactor '{self.name}': `axis` must be an int, got {axis!r}."
            )
        self.axis = int(axis)
        self.kernel = None
        self.mask = None

    def build(self, input_shape):
        rank = len(input_shape)
        axis = self._resolve_axis(rank)
        channels = input_shape[axis]
        if channels is None:
            raise KprunError(
                f"Compactor '{self.name}': the channel axis {self.axis} of input "
                f"shape {tuple(input_shape)} has unknown size."
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(channels, channels),
            initializer="identity",
            trainable=True,
        )
        self.mask = self.add_weight(
            name="mask",
            shape=(channels,),
            initializer="ones",
            trainable=False,
        )
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={axis: channels})

    def call(self, inputs):
        kernel = self.kernel * ops.expand_dims(self.mask, 0)
        axis = self._resolve_axis(len(inputs.shape))
        last = len(inputs.shape) - 1
        if axis == last:
            return ops.matmul(inputs, kernel)
        moved = ops.moveaxis(inputs, axis, -1)
        return ops.moveaxis(ops.matmul(moved, kernel), -1, axis)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    @property
    def channels(self) -> int:
        """The number of channels (the kernel's size); the layer must be built."""
        self._check_built()
        return int(self.kernel.shape[-1])

    def set_mask(self, mask) -> None:
        """Set the per-output-channel mask.

        Args:
            mask: Array-like of shape `(C,)`, one finite value per output
                channel: 1 keeps a channel, 0 switches it off.

        Example:

        >>> layer = Compactor()
        >>> layer.build((None, 4))
        >>> layer.set_mask([1, 1, 0, 1])
        >>> layer.active_channels().tolist()
        [0, 1, 3]
        """
        self._check_built()
        values = np.asarray(mask, dtype="float64")
        if values.shape != (self.channels,):
            raise KprunError(
                f"Compactor '{self.name}': mask must have shape ({self.channels},), "
                f"got {values.shape}."
            )
        if not np.all(np.isfinite(values)):
            raise KprunError(
                f"Compactor '{self.name}': mask values must be finite."
            )
        self.mask.assign(values.astype(self.mask.dtype))

    def active_channels(self) -> np.ndarray:
        """Indices of the output channels whose mask is not zero.

        Returns:
            A sorted 1-D int64 numpy array.
        """
        self._check_built()
        return np.flatnonzero(ops.convert_to_numpy(self.mask)).astype("int64")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"axis": self.axis})
        return config

    def _resolve_axis(self, rank: int) -> int:
        if rank < 2:
            raise KprunError(
                f"Compactor '{self.name}': input must have rank 2 or more "
                f"(batch and channels), got rank {rank}."
            )
        if not -rank <= self.axis < rank or self.axis % rank == 0:
            raise KprunError(
                f"Compactor '{self.name}': axis {self.axis} is not a channel axis "
                f"of a rank-{rank} input (the batch axis 0 is not allowed)."
            )
        return self.axis % rank

    def _check_built(self) -> None:
        if self.kernel is None:
            raise KprunError(
                f"Compactor '{self.name}' is not built yet: call it on an input "
                "or call `build(input_shape)` first."
            )


def compactor_macs(layer: Compactor, input_shape, output_shape) -> int:
    """Multiply-accumulates of one call of a compactor, batch excluded.

    Every output position along the non-channel axes costs `C * C` MACs
    (all channels are counted, masked or not: the mask only switches
    channels off until they are removed).

    Args:
        layer: The (built) compactor.
        input_shape: Its input shape, batch axis first.
        output_shape: Its output shape (equal to `input_shape`).

    Returns:
        The MACs as an int.

    Example:

    >>> layer = Compactor()
    >>> layer.build((None, 8, 8, 4))
    >>> compactor_macs(layer, (None, 8, 8, 4), (None, 8, 8, 4))
    1024
    """
    del output_shape
    axis = layer.axis % len(input_shape)
    sizes = [d for i, d in enumerate(input_shape) if i not in (0, axis)]
    if any(d is None for d in sizes):
        raise KprunError(
            f"Compactor '{layer.name}': cannot count MACs for input shape "
            f"{tuple(input_shape)} with unknown sizes."
        )
    positions = math.prod(int(d) for d in sizes)
    return positions * layer.channels * layer.channels
