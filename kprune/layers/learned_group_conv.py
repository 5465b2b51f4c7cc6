"""CondenseNet's learned layers: a learned group convolution and a learned classifier.

Both layers train dense and prune themselves in stages: a non-trainable
mask multiplies the kernel, and `condense_step()` switches off the inputs
with the smallest weight mass. `kprune.condense.CondenseScheduler` calls it
as training progresses; `kprune.condense.convert` then turns each layer
into a smaller plain form (an `IndexSelect` followed by a grouped
convolution or a `Dense`).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kprune.errors import KprunError
from kprune.layers.regularizers import channel_norms


def _check_int(layer: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise KprunError(f"{layer}: `{name}` must be an int >= {low}, got {value!r}.")
    return int(value)


def _check_rate(layer: str, name: str, value, low_open: bool) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))
    if not ok or not (0 < value <= 1 if low_open else 0 <= value < 1):
        interval = "(0, 1]" if low_open else "[0, 1)"
        raise KprunError(f"{layer}: `{name}` must be a number in {interval}, got {value!r}.")
    return float(value)


@keras.saving.register_keras_serializable(package="kprune")
class LearnedGroupConv(keras.layers.Layer):
    """BN -> ReLU -> (dropout) -> 1x1 convolution that learns its groups.

    The learned group convolution of CondenseNet (Huang et al., CVPR 2018).
    The 1x1 convolution has `filters` output channels split into `groups`
    groups in interleaved order: filter `o` belongs to group `o % groups`.
    A non-trainable `mask` of shape `(in_channels, groups)` says which input
    channels each group reads; the kernel is multiplied by it (expanded to
    the kernel's shape) before the convolution.

    Training runs in `condense_factor` stages (C). Stage 0 is dense. Each
    `condense_step()` moves one stage on and, in every group, switches off
    another `in_channels / C` input channels: those with the smallest L1
    mass `sum_o |K[i, o]|` over the group's filters. After stage `k`, every
    group reads exactly `in_channels * (1 - k / C)` input channels; the last
    stage, `C - 1`, leaves `in_channels / C`. The mask and the stage are
    layer weights, so a saved model resumes where it stopped.

    With `group_lasso > 0` the layer adds `group_lasso * lasso_penalty()`
    to the model's losses until it reaches its last stage: the group lasso
    over the (masked) kernel columns of each group, which pushes whole
    input channels of a group towards zero before they are dropped.

    Inputs are channels_last 4-D tensors; `in_channels` must be divisible by
    `condense_factor` and `filters` by `groups`.

    Args:
        filters: Output channels of the convolution.
        groups: Number of groups G (the grouped convolution it becomes).
        condense_factor: Number of stages C; each group finally keeps
            `1 / C` of the input channels. None means `groups`.
        dropout_rate: Dropout between the ReLU and the convolution.
        group_lasso: Weight of the group-lasso penalty (0 turns it off).
        kernel_initializer: Initializer of the `(1, 1, in, filters)` kernel.
        norm_momentum: Momentum of the BatchNormalization.
        norm_epsilon: Epsilon of the BatchNormalization.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> import numpy as np
    >>> layer = LearnedGroupConv(8, groups=2, condense_factor=2)
    >>> y = layer(np.random.rand(1, 4, 4, 6).astype("float32"))
    >>> tuple(y.shape)
    (1, 4, 4, 8)
    >>> layer.condense_step()
    >>> [len(c) for c in layer.kept_inputs()]
    [3, 3]
    """

    def __init__(
        self,
        filters: int,
        groups: int = 4,
        condense_factor: int | None = None,
        dropout_rate: float = 0.0,
        group_lasso: float = 0.0,
        kernel_initializer="he_normal",
        norm_momentum: float = 0.9,
        norm_epsilon: float = 1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        where = f"LearnedGroupConv '{self.name}'"
        self.filters = _check_int(where, "filters", filters)
        self.groups = _check_int(where, "groups", groups)
        if condense_factor is None:
            condense_factor = self.groups
        self.condense_factor = _check_int(where, "condense_factor", condense_factor)
        if self.filters % self.groups:
            raise KprunError(
                f"{where}: filters ({self.filters}) must be divisible by groups ({self.groups})."
            )
        self.dropout_rate = _check_rate(where, "dropout_rate", dropout_rate, low_open=False)
        if isinstance(group_lasso, bool) or not isinstance(group_lasso, (int, float)) \
                or not math.isfinite(group_lasso) or group_lasso < 0:
            raise KprunError(f"{where}: `group_lasso` must be a finite number >= 0, "
                             f"got {group_lasso!r}.")
        self.group_lasso = float(group_lasso)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self.norm = keras.layers.BatchNormalization(
            momentum=self.norm_momentum, epsilon=self.norm_epsilon, name="norm"
        )
        self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout") \
            if self.dropout_rate > 0 else None
        self.kernel = None
        self.mask = None
        self.stage_variable = None

    @property
    def final_stage(self) -> int:
        """The last stage, `condense_factor - 1`."""
        return self.condense_factor - 1

    @property
    def in_channels(self) -> int:
        """Input channels (the layer must be built)."""
        self._check_built()
        return int(self.kernel.shape[2])

    @property
    def stage(self) -> int:
        """The current stage, 0 (dense) to `final_stage`."""
        self._check_built()
        return int(self.stage_variable.numpy())

    def build(self, input_shape):
        where = f"LearnedGroupConv '{self.name}'"
        if len(input_shape) != 4:
            raise KprunError(f"{where}: expects a 4-D channels_last input, got shape "
                             f"{tuple(input_shape)}.")
        channels = input_shape[-1]
        if channels is None:
            raise KprunError(f"{where}: the channel axis of input shape {tuple(input_shape)} "
                             "has unknown size.")
        if channels % self.condense_factor:
            raise KprunError(
                f"{where}: input channels ({channels}) must be divisible by condense_factor "
                f"({self.condense_factor})."
            )
        self.norm.build(input_shape)
        self.kernel = self.add_weight(
            name="kernel", shape=(1, 1, channels, self.filters),
            initializer=self.kernel_initializer, trainable=True,
        )
        self.mask = self.add_weight(
            name="mask", shape=(channels, self.groups), initializer="ones", trainable=False,
        )
        self.stage_variable = self.add_weight(
            name="stage", shape=(), dtype="int32", initializer="zeros", trainable=False,
        )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def call(self, inputs, training=None):
        x = self.norm(inputs, training=training)
        x = ops.relu(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        y = ops.conv(x, self.masked_kernel(), strides=1, padding="valid")
        if self.group_lasso > 0:
            self.add_loss(self.group_lasso * self.lasso_penalty())
        return y

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def kernel_mask(self):
        """The mask expanded to the kernel's shape `(1, 1, in, filters)`."""
        self._check_built()
        full = ops.tile(self.mask, (1, self.filters // self.groups))
        return ops.reshape(full, (1, 1, -1, self.filters))

    def masked_kernel(self):
        """The kernel times the mask: the weights the convolution applies."""
        return self.kernel * ops.cast(self.kernel_mask(), self.kernel.dtype)

    def lasso_penalty(self):
        """Group lasso over each group's input columns, 0 once at the last stage.

        For every group `g` and input channel `i`, the L2 norm of the masked
        kernel entries `K[i, o]` over the group's filters `o`; the penalty is
        the sum of these norms. Its gradient at an all-zero column is zero.

        Returns:
            A scalar tensor.
        """
        kernel = ops.reshape(self.masked_kernel(), (self.in_channels, -1, self.groups))
        columns = ops.reshape(ops.swapaxes(kernel, 0, 1), (self.filters // self.groups, -1))
        active = ops.cast(self.stage_variable < self.final_stage, kernel.dtype)
        return active * ops.sum(channel_norms(columns, axis=-1))

    def importance(self) -> np.ndarray:
        """L1 mass of every input channel in every group: array `(in_channels, groups)`.

        Entry `[i, g]` is `sum |K[i, o]|` over the filters `o` of group `g`
        (masked entries count zero).
        """
        kernel = np.abs(ops.convert_to_numpy(self.masked_kernel()))[0, 0]
        return kernel.reshape(self.in_channels, -1, self.groups).sum(axis=1)

    def condense_step(self) -> None:
        """Go to the next stage: every group drops its `in_channels / C` weakest inputs.

        Raises:
            KprunError: The layer is already at its last stage.
        """
        stage = self.stage
        if stage >= self.final_stage:
            raise KprunError(
                f"LearnedGroupConv '{self.name}' is already at its last stage ({stage})."
            )
        delta = self.in_channels // self.condense_factor
        mask = np.array(self.mask.numpy())
        scores = self.importance()
        for g in range(self.groups):
            alive = np.flatnonzero(mask[:, g])
            order = alive[np.argsort(scores[alive, g], kind="stable")]
            mask[order[:delta], g] = 0
        self.mask.assign(mask)
        self.stage_variable.assign(stage + 1)

    def kept_inputs(self) -> list:
        """For every group, the sorted input channels it reads (a list of int64 arrays)."""
        mask = self.mask.numpy()
        return [np.flatnonzero(mask[:, g]).astype("int64") for g in range(self.groups)]

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "groups": self.groups,
            "condense_factor": self.condense_factor,
            "dropout_rate": self.dropout_rate,
            "group_lasso": self.group_lasso,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "norm_momentum": self.norm_momentum,
            "norm_epsilon": self.norm_epsilon,
        })
        return config

    def _check_built(self) -> None:
        if self.kernel is None:
            raise KprunError(f"LearnedGroupConv '{self.name}' is not built yet: call it on an "
                             "input or call `build(input_shape)` first.")


@keras.saving.register_keras_serializable(package="kprune")
class LearnedDense(keras.layers.Layer):
    """A `Dense` layer that keeps only its heaviest input features after one stage.

    CondenseNet drops half of the classifier's input features, those with
    the smallest weight mass `sum_j |W[i, j]|`. This layer does it during
    training, so the remaining weights can adapt and conversion is exact: it
    starts dense (stage 0); `condense_step()` (stage 1) switches off all but
    the `keep_ratio` share of input features with the largest L1 mass, with
    a non-trainable `mask` of shape `(in_features,)`. The mask and the stage
    are layer weights, saved with the model.

    Args:
        units: Output features.
        keep_ratio: Share of input features kept at stage 1 (at least one).
        activation: Activation of the output (e.g. "softmax"), or None.
        use_bias: Whether to add a bias.
        kernel_initializer: Initializer of the `(in, units)` kernel.
        bias_initializer: Initializer of the bias.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> import numpy as np
    >>> layer = LearnedDense(3, keep_ratio=0.5)
    >>> y = layer(np.random.rand(2, 8).astype("float32"))
    >>> layer.condense_step()
    >>> len(layer.kept_inputs())
    4
    """

    final_stage = 1

    def __init__(
        self,
        units: int,
        keep_ratio: float = 0.5,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        where = f"LearnedDense '{self.name}'"
        self.units = _check_int(where, "units", units)
        self.keep_ratio = _check_rate(where, "keep_ratio", keep_ratio, low_open=True)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel = None
        self.bias = None
        self.mask = None
        self.stage_variable = None

    @property
    def in_features(self) -> int:
        """Input features (the layer must be built)."""
        self._check_built()
        return int(self.kernel.shape[0])

    @property
    def stage(self) -> int:
        """0 while dense, 1 once condensed."""
        self._check_built()
        return int(self.stage_variable.numpy())

    def build(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise KprunError(f"LearnedDense '{self.name}': expects a 2-D input with a known "
                             f"feature size, got shape {tuple(input_shape)}.")
        features = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(features, self.units),
                                      initializer=self.kernel_initializer, trainable=True)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,),
                                        initializer=self.bias_initializer, trainable=True)
        self.mask = self.add_weight(name="mask", shape=(features,), initializer="ones",
                                    trainable=False)
        self.stage_variable = self.add_weight(name="stage", shape=(), dtype="int32",
                                              initializer="zeros", trainable=False)
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: features})

    def call(self, inputs):
        kernel = self.kernel * ops.expand_dims(ops.cast(self.mask, self.kernel.dtype), -1)
        y = ops.matmul(inputs, kernel)
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def condense_step(self) -> None:
        """Keep the `keep_ratio` share of input features with the largest L1 mass.

        Raises:
            KprunError: The layer is already condensed.
        """
        if self.stage >= self.final_stage:
            raise KprunError(f"LearnedDense '{self.name}' is already condensed.")
        kernel = np.abs(self.kernel.numpy())
        mask = self.mask.numpy()
        scores = np.where(mask > 0, kernel.sum(axis=1), -np.inf)
        keep = max(1, int(self.in_features * self.keep_ratio))
        order = np.argsort(-scores, kind="stable")
        new = np.zeros_like(mask)
        new[order[:keep]] = mask[order[:keep]] > 0
        self.mask.assign(new)
        self.stage_variable.assign(self.final_stage)

    def kept_inputs(self) -> np.ndarray:
        """Sorted indices of the input features the layer reads (int64)."""
        return np.flatnonzero(self.mask.numpy()).astype("int64")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({
            "units": self.units,
            "keep_ratio": self.keep_ratio,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config

    def _check_built(self) -> None:
        if self.kernel is None:
            raise KprunError(f"LearnedDense '{self.name}' is not built yet: call it on an "
                             "input or call `build(input_shape)` first.")


def learned_group_conv_macs(layer: LearnedGroupConv, input_shapes, output_shapes) -> int:
    """MACs of one call of a `LearnedGroupConv` in its training (dense, masked) form.

    Every kernel entry is applied, masked or not: `H * W * in * filters`.
    The converted model's MACs (`kprune.profile(kprune.condense.convert(m))`)
    are `1 / C` of this at the last stage.

    Args:
        layer: The built layer.
        input_shapes: Input shapes, batch axis first.
        output_shapes: Output shapes.

    Returns:
        The MACs as an int.

    Example:

    >>> layer = LearnedGroupConv(8, groups=2)
    >>> layer.build((None, 4, 4, 6))
    >>> learned_group_conv_macs(layer, [(None, 4, 4, 6)], [(None, 4, 4, 8)])
    768
    """
    height, width = output_shapes[0][1:3]
    if height is None or width is None:
        raise KprunError(f"LearnedGroupConv '{layer.name}': cannot count MACs for unknown "
                         f"spatial sizes {tuple(output_shapes[0])}.")
    return int(height) * int(width) * int(input_shapes[0][-1]) * layer.filters


def learned_dense_macs(layer: LearnedDense, input_shapes, output_shapes) -> int:
    """MACs of one call of a `LearnedDense`: `in_features * units` (masked inputs included)."""
    del output_shapes
    return int(input_shapes[0][-1]) * layer.units
