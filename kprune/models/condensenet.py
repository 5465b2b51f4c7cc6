"""CondenseNet (Huang et al., CVPR 2018) for CIFAR and ImageNet."""

from __future__ import annotations

from typing import Sequence

import keras

from kprune.errors import KprunError
from kprune.layers.learned_group_conv import LearnedDense, LearnedGroupConv

_BN = {"momentum": 0.9, "epsilon": 1e-5}
_VARIANTS = {
    "cifar": {"stages": (14, 14, 14), "growth": (8, 16, 32), "input_shape": (32, 32, 3),
              "num_classes": 10, "stem_strides": 1},
    "imagenet": {"stages": (4, 6, 8, 10, 8), "growth": (8, 16, 32, 64, 128),
                 "input_shape": (224, 224, 3), "num_classes": 1000, "stem_strides": 2},
}


def _conv_initializer():
    # N(0, 2 / (k * k * filters)), the initialisation of the paper's code.
    return keras.initializers.VarianceScaling(2.0, mode="fan_out",
                                              distribution="untruncated_normal")


def condensenet(
    variant: str = "cifar",
    *,
    stages: Sequence[int] | None = None,
    growth: Sequence[int] | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    bottleneck: int = 4,
    groups: int = 4,
    condense_factor: int | None = None,
    groups_3x3: int | None = None,
    dropout_rate: float = 0.0,
    group_lasso: float = 0.0,
    keep_ratio: float = 0.5,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build a trainable CondenseNet as a functional model.

    A 3x3 stem convolution with `2 * growth[0]` filters (stride 1 for
    CIFAR, 2 for ImageNet), then one dense block per entry of `stages`.
    Every dense layer is a `LearnedGroupConv` (`bottleneck * growth` filters,
    `groups` groups, `condense_factor` stages) followed by BN -> ReLU ->
    3x3 grouped `Conv2D` (`groups_3x3` groups, `growth` filters), and its
    output is concatenated to its input. Between blocks a 2x2 average pool
    carries *all* features so far to the next resolution (full dense
    connectivity, no compression), and the growth rate changes per block
    (exponentially increasing: 8-16-32...). The head is BN -> ReLU -> global
    average pooling -> `LearnedDense`, which keeps the `keep_ratio` share of
    the features with the largest weight mass once condensed.

    `variant="cifar"` is CondenseNet-86 (stages 14-14-14, growth 8-16-32,
    32x32 inputs, 10 classes); `variant="imagenet"` is CondenseNet-74
    (stages 4-6-8-10-8, growth 8-16-32-64-128, 224x224 inputs, 1000 classes).
    Train it with `kprune.condense.CondenseScheduler` and shrink it with
    `kprune.condense.convert`.

    Layer names: `stem_conv`; for layer `l` of block `b`: `block{b}_layer{l}_lgc`,
    `_bn`, `_relu`, `_conv`, `_concat`; `transition{b}_pool`; then `final_bn`,
    `final_relu`, `avg_pool`, `predictions`.

    Args:
        variant: "cifar" or "imagenet": the defaults of the arguments below.
        stages: Dense layers per block.
        growth: Growth rate per block (same length as `stages`).
        num_classes: Classifier outputs.
        input_shape: Shape of one image, channels last (small shapes run
            fast in tests: the head pools globally).
        bottleneck: The learned group convolution has `bottleneck * growth`
            filters.
        groups: Groups G of the learned group convolutions.
        condense_factor: Condensation factor C (None: `groups`).
        groups_3x3: Groups of the 3x3 convolutions (None: `groups`).
        dropout_rate: Dropout inside every learned group convolution.
        group_lasso: Group-lasso weight of every learned group convolution.
        keep_ratio: Share of the classifier's input features kept.
        classifier_activation: Activation of the classifier; None gives logits.

    Returns:
        A `keras.Model` named `condensenet{depth}`.

    Example:

    >>> model = condensenet("cifar", input_shape=(16, 16, 3))
    >>> model.name, model.output_shape
    ('condensenet86', (None, 10))
    """
    if variant not in _VARIANTS:
        raise KprunError(f"condensenet: `variant` must be one of {sorted(_VARIANTS)}, "
                         f"got {variant!r}.")
    spec = _VARIANTS[variant]
    stages = tuple(spec["stages"] if stages is None else stages)
    growth = tuple(spec["growth"] if growth is None else growth)
    num_classes = spec["num_classes"] if num_classes is None else num_classes
    input_shape = tuple(spec["input_shape"] if input_shape is None else input_shape)
    groups_3x3 = groups if groups_3x3 is None else groups_3x3
    _check_ints(stages=stages, growth=growth, num_classes=(num_classes,),
                bottleneck=(bottleneck,), groups=(groups,), groups_3x3=(groups_3x3,))
    if len(stages) != len(growth) or not stages:
        raise KprunError(f"condensenet: `stages` {stages} and `growth` {growth} must be "
                         "non-empty and of the same length.")

    inputs = keras.Input(shape=input_shape, name="input")
    x = keras.layers.Conv2D(2 * growth[0], 3, strides=spec["stem_strides"], padding="same",
                            use_bias=False, kernel_initializer=_conv_initializer(),
                            name="stem_conv")(inputs)
    for b, (layers, rate) in enumerate(zip(stages, growth), start=1):
        if b > 1:
            x = keras.layers.AveragePooling2D(2, name=f"transition{b - 1}_pool")(x)
        for i in range(1, layers + 1):
            name = f"block{b}_layer{i}"
            y = LearnedGroupConv(bottleneck * rate, groups=groups,
                                 condense_factor=condense_factor, dropout_rate=dropout_rate,
                                 group_lasso=group_lasso, kernel_initializer=_conv_initializer(),
                                 name=f"{name}_lgc")(x)
            y = keras.layers.BatchNormalization(name=f"{name}_bn", **_BN)(y)
            y = keras.layers.ReLU(name=f"{name}_relu")(y)
            y = keras.layers.Conv2D(rate, 3, padding="same", groups=groups_3x3, use_bias=False,
                                    kernel_initializer=_conv_initializer(),
                                    name=f"{name}_conv")(y)
            x = keras.layers.Concatenate(name=f"{name}_concat")([x, y])
    x = keras.layers.BatchNormalization(name="final_bn", **_BN)(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = LearnedDense(num_classes, keep_ratio=keep_ratio,
                           activation=classifier_activation, name="predictions")(x)
    depth = 2 * sum(stages) + 2
    return keras.Model(inputs, outputs, name=f"condensenet{depth}")


def _check_ints(**values) -> None:
    for name, items in values.items():
        for value in items:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KprunError(f"condensenet: `{name}` must hold positive ints, "
                                 f"got {value!r}.")
