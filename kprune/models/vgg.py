"""VGG-11/13/16/19 for 32x32 inputs, as in the Network Slimming reference code."""

from __future__ import annotations

import numbers

import keras

from kprune.errors import KprunError

_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [
        64, 64, "M",
        128, 128, "M",
        256, 256, 256, 256, "M",
        512, 512, 512, 512, "M",
        512, 512, 512, 512,
    ],
}


def vgg_cfg(depth: int) -> list:
    """The layer list of VGG-`depth` for CIFAR (ImageNet VGG without its last pool).

    Ints are the filters of a 3x3 convolution, `"M"` a 2x2 max-pool.

    Args:
        depth: 11, 13, 16 or 19.

    Returns:
        A new list (safe to modify).

    Example:

    >>> vgg_cfg(11)
    [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512]
    """
    if isinstance(depth, bool) or depth not in _CFGS:
        raise KprunError(f"vgg: depth must be one of 11, 13, 16, 19, got {depth!r}.")
    return list(_CFGS[depth])


def vgg(
    depth: int = 19,
    cfg: list | None = None,
    num_classes: int = 10,
    input_shape: tuple = (32, 32, 3),
    batch_norm: bool = True,
    *,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build a CIFAR VGG as a functional model, optionally with a pruned `cfg`.

    For each int `v` of `cfg`: a 3x3 convolution with `v` filters (padding
    "same"), BatchNormalization and ReLU; for each `"M"`: a 2x2 max-pool.
    Then a 2x2 average pool, Flatten and one `Dense` layer. With the default
    cfgs (four max-pools; the ImageNet VGG's fifth is left out), a 32x32
    input reaches 2x2 after the last convolution and 1x1 after the average
    pool, so the classifier reads `cfg[-1]` features. VGG-19 has 20,035,018
    trainable parameters (20.04M, as in the Network Slimming paper).

    Initialisation follows the slimming code: convolutions normal with
    variance 2 / fan_out, BatchNormalization gamma 0.5 and beta 0 (momentum
    0.9, epsilon 1e-5), the Dense kernel normal with stddev 0.01.

    Layer names: `block{b}_conv{i}`, `block{b}_bn{i}`, `block{b}_relu{i}` and
    `block{b}_pool`, where a block is the run of convolutions before a
    max-pool; then `avg_pool`, `flatten`, `predictions`.

    Args:
        depth: 11, 13, 16 or 19; used when `cfg` is None.
        cfg: A list of positive ints and `"M"` (for example the widths a
            pruner returns); overrides `depth`.
        num_classes: Size of the classifier output.
        input_shape: Shape of one input image, channels last, with known
            height and width.
        batch_norm: If False, convolutions have a bias and no
            BatchNormalization follows them.
        classifier_activation: Activation of the last layer; None returns
            logits.

    Returns:
        A `keras.Model` named `vgg{depth}` (or `vgg` for a custom cfg).

    Example:

    >>> model = vgg(11, cfg=[8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32])
    >>> model.output_shape
    (None, 10)
    """
    if cfg is None:
        cfg = vgg_cfg(depth)
        name = f"vgg{depth}"
    else:
        name = "vgg"
    cfg = _normalise_cfg(cfg)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KprunError(f"vgg: `num_classes` must be a positive int, got {num_classes!r}.")
    _check_spatial(cfg, tuple(input_shape))

    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = inputs
    block, conv = 1, 0
    for v in cfg:
        if v == "M":
            x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
            block, conv = block + 1, 0
        else:
            conv += 1
            x = _conv_block(x, v, f"block{block}", conv, batch_norm)
    x = keras.layers.AveragePooling2D(2, name="avg_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(
        num_classes,
        activation=classifier_activation,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def _conv_block(x, filters: int, prefix: str, index: int, batch_norm: bool):
    x = keras.layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=not batch_norm,
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal"
        ),
        name=f"{prefix}_conv{index}",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(
            momentum=0.9,
            epsilon=1e-5,
            gamma_initializer=keras.initializers.Constant(0.5),
            name=f"{prefix}_bn{index}",
        )(x)
    return keras.layers.ReLU(name=f"{prefix}_relu{index}")(x)


def _normalise_cfg(cfg) -> list:
    if not isinstance(cfg, (list, tuple)):
        raise KprunError(f"vgg: `cfg` must be a list of ints and 'M', got {cfg!r}.")
    out = []
    for v in cfg:
        if isinstance(v, str) and v == "M":
            out.append("M")
        elif isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1:
            out.append(int(v))
        else:
            raise KprunError(
                f"vgg: `cfg` entries must be positive ints or 'M', got {v!r}."
            )
    if all(v == "M" for v in out):
        raise KprunError("vgg: `cfg` must hold at least one convolution width.")
    return out


def _check_spatial(cfg, input_shape: tuple) -> None:
    if len(input_shape) != 3 or any(d is None for d in input_shape[:2]):
        raise KprunError(
            f"vgg: input_shape must be (height, width, channels) with known "
            f"height and width, got {input_shape}."
        )
    pools = sum(1 for v in cfg if v == "M")
    size = min(input_shape[:2]) // 2**pools
    if size < 2:
        raise KprunError(
            f"vgg: input_shape {input_shape} is too small for {pools} max-pools "
            f"and the final 2x2 average pool (needs at least {2 ** (pools + 1)} "
            "pixels a side)."
        )
