"""Structured weight regularizers."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kprune.errors import KprunError


@keras.saving.register_keras_serializable(package="kprune")
class GroupLasso(keras.regularizers.Regularizer):
    """Group lasso over output channels: `l * sum_j ||K[..., j]||_2`.

    Each output channel `j` of a kernel (the slice at index `j` of `axis`) is
    one group; its L2 norm is taken over all the other axes. The penalty
    drives whole output channels to zero, which makes them free to remove.
    This is the "Lasso" penalty ResRep applies to its compactor kernels, and
    it works as an ordinary Keras regularizer on any layer.

    The gradient of a channel whose weights are all zero is taken as zero
    (a subgradient), never NaN.

    Args:
        l: The penalty strength, a finite number >= 0.
        axis: The output-channel axis of the kernel. -1 fits Keras `Dense`
            and `ConvND` kernels.

    Example:

    >>> import numpy as np
    >>> reg = GroupLasso(l=0.5)
    >>> kernel = np.array([[3.0, 0.0], [4.0, 1.0]], dtype="float32")
    >>> float(reg(kernel))
    3.0
    >>> layer = keras.layers.Dense(4, kernel_regularizer=GroupLasso(1e-4))
    """

    def __init__(self, l: float = 1e-4, axis: int = -1):
        if isinstance(l, bool) or not isinstance(l, (int, float, np.number)):
            raise KprunError(f"GroupLasso: `l` must be a number, got {l!r}.")
        if not math.isfinite(float(l)) or l < 0:
            raise KprunError(f"GroupLasso: `l` must be finite and >= 0, got {l!r}.")
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise KprunError(f"GroupLasso: `axis` must be an int, got {axis!r}.")
        self.l = float(l)
        self.axis = int(axis)

    def __call__(self, x):
        return self.l * ops.sum(channel_norms(x, self.axis))

    def get_config(self) -> dict:
        return {"l": self.l, "axis": self.axis}


def channel_norms(x, axis: int = -1):
    """L2 norm of every slice of `x` along `axis`, with a zero gradient at zero.

    Args:
        x: A tensor of rank 1 or more.
        axis: The axis whose slices are measured.

    Returns:
        A 1-D tensor with one norm per index of `axis`.

    Example:

    >>> import numpy as np
    >>> norms = channel_norms(np.array([[3.0, 0.0], [4.0, 0.0]]))
    >>> keras.ops.convert_to_numpy(norms).tolist()
    [5.0, 0.0]
    """
    x = ops.convert_to_tensor(x)
    rank = len(x.shape)
    if not -rank <= axis < rank:
        raise KprunError(
            f"GroupLasso: axis {axis} is out of range for a kernel of shape "
            f"{tuple(x.shape)}."
        )
    other = tuple(i for i in range(rank) if i != axis % rank)
    squares = ops.sum(ops.square(x), axis=other)
    positive = squares > 0
    safe = ops.where(positive, squares, ops.ones_like(squares))
    return ops.where(positive, ops.sqrt(safe), ops.zeros_like(squares))
