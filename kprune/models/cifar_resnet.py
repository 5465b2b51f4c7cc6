"""ResNet-20/32/44/56/110 for CIFAR, as in He et al., CVPR 2016 (section 4.2)."""

from __future__ import annotations

import keras

from kprune.errors import KprunError

_BN = {"momentum": 0.9, "epsilon": 1e-5}


def cifar_resnet(
    depth: int = 56,
    num_classes: int = 10,
    input_shape: tuple = (32, 32, 3),
    width: int = 16,
    *,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build a CIFAR ResNet of `depth` layers (6n + 2) as a functional model.

    A 3x3 stem convolution, three stages of `n = (depth - 2) / 6` basic blocks
    (two 3x3 convolutions each) with `width`, `2 * width` and `4 * width`
    filters, global average pooling and one `Dense` layer. The second and
    third stages start with stride 2; their first block's shortcut is a 1x1
    stride-2 convolution followed by BatchNormalization (the paper's option
    B), so every shortcut is a plain Keras layer. An `input_shape` of two
    dimensions, `(length, channels)`, builds the same network for sequences
    (Conv1D, kernel 3, GlobalAveragePooling1D), as for MNIST-1D. Convolutions use
    `he_normal` initialisation and no bias (a BatchNormalization follows
    each one, with PyTorch's defaults: momentum 0.9, epsilon 1e-5). ResNet-56
    has 855,770 trainable parameters (0.86M; the paper's option-A shortcuts
    give 0.85M).

    Layer names: `stem_conv`, `stem_bn`, `stem_relu`, then for block `b` of
    stage `s`: `stage{s}_block{b}_conv1`, `_bn1`, `_relu1`, `_conv2`, `_bn2`,
    `_proj_conv`, `_proj_bn` (first block of stages 2 and 3), `_add`, `_out`;
    finally `avg_pool` and `predictions`.

    Args:
        depth: Number of weighted layers, `6n + 2`: 20, 32, 44, 56, 110, ...
        num_classes: Size of the classifier output.
        input_shape: Shape of one input, channels last: `(height, width,
            channels)` for images, `(length, channels)` for sequences.
        width: Filters of the first stage (16 in the paper).
        classifier_activation: Activation of the last layer; None returns
            logits.

    Returns:
        A `keras.Model` named `resnet{depth}`.

    Example:

    >>> model = cifar_resnet(20)
    >>> model.output_shape
    (None, 10)
    >>> cifar_resnet(20, input_shape=(40, 1)).output_shape
    (None, 10)
    """
    _check_positive_int("depth", depth)
    if depth < 8 or (depth - 2) % 6:
        raise KprunError(
            f"cifar_resnet: depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, "
            f"110, ...), got {depth}."
        )
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("width", width)
    try:
        shape = tuple(input_shape)
    except TypeError:  # an int or None: not a shape
        shape = ()
    if len(shape) not in (2, 3):
        raise KprunError(
            f"cifar_resnet: `input_shape` must be (height, width, channels) or "
            f"(length, channels), got {input_shape!r}."
        )
    blocks = (depth - 2) // 6
    rank = len(shape) - 1

    inputs = keras.Input(shape=shape, name="input")
    x = _conv_bn(inputs, width, 3, 1, "stem", rank=rank)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            name = f"stage{stage + 1}_block{block + 1}"
            x = _basic_block(x, filters, strides, name, rank)
    pool = keras.layers.GlobalAveragePooling1D if rank == 1 else keras.layers.GlobalAveragePooling2D
    x = pool(name="avg_pool")(x)
    outputs = keras.layers.Dense(
        num_classes, activation=classifier_activation, name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def _basic_block(x, filters: int, strides: int, name: str, rank: int):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, f"{name}_proj", suffix="", rank=rank)
    y = _conv_bn(x, filters, 3, strides, name, suffix="1", rank=rank)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv_bn(y, filters, 3, 1, name, suffix="2", rank=rank)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _conv_bn(x, filters: int, kernel_size: int, strides: int, name: str, suffix: str = "",
             rank: int = 2):
    conv = keras.layers.Conv1D if rank == 1 else keras.layers.Conv2D
    x = conv(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv{suffix}",
    )(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn{suffix}", **_BN)(x)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KprunError(f"cifar_resnet: `{name}` must be a positive int, got {value!r}.")
