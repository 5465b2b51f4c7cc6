"""Small models of every family the graph must handle, built at small sizes."""

import keras
from keras import layers as L


def conv_bn(x, filters, kernel=3, strides=1, act=True, name=None, **kw):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, **kw)(x)
    x = L.BatchNormalization()(x)
    return L.ReLU()(x) if act else x


def vgg():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 8)
    x = conv_bn(x, 8)
    x = L.MaxPooling2D()(x)
    x = conv_bn(x, 12)
    x = L.Flatten()(x)
    x = L.Dense(10, activation="relu")(x)
    x = L.Dropout(0.2)(x)
    return keras.Model(inp, L.Dense(3)(x), name="vgg")


def resnet_basic():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 8)
    for filters, stride in ((8, 1), (12, 2)):
        y = conv_bn(x, filters, strides=stride)
        y = conv_bn(y, filters, act=False)
        if stride != 1 or x.shape[-1] != filters:
            x = conv_bn(x, filters, kernel=1, strides=stride, act=False)
        x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="resnet_basic")


def resnet_bottleneck():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 16)
    for width, out, stride in ((4, 16, 1), (6, 24, 2)):
        y = conv_bn(x, width, kernel=1)
        y = conv_bn(y, width, strides=stride)
        y = conv_bn(y, out, kernel=1, act=False)
        if stride != 1 or x.shape[-1] != out:
            x = conv_bn(x, out, kernel=1, strides=stride, act=False)
        x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalMaxPooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="resnet_bottleneck")


def preact_resnet():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same")(inp)
    for _ in range(2):
        y = L.ReLU()(L.BatchNormalization()(x))
        y = L.Conv2D(8, 3, padding="same")(y)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.Conv2D(8, 3, padding="same")(y)
        x = L.Add()([x, y])
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="preact_resnet")


def mobilenet_v2():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 8, strides=1)
    for expand, out, stride in ((4, 8, 1), (4, 12, 2), (4, 12, 1)):
        y = conv_bn(x, x.shape[-1] * expand, kernel=1)
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(y)
        y = L.ReLU(6.0)(L.BatchNormalization()(y))
        y = conv_bn(y, out, kernel=1, act=False)
        x = L.Add()([x, y]) if stride == 1 and x.shape[-1] == out else y
    x = conv_bn(x, 16, kernel=1)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="mobilenet_v2")


def densenet():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 8)
    for _ in range(3):
        y = L.ReLU()(L.BatchNormalization()(x))
        y = L.Conv2D(8, 1, use_bias=False)(y)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.Conv2D(4, 3, padding="same", use_bias=False)(y)
        x = L.Concatenate()([x, y])
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.Conv2D(10, 1)(x)  # transition
    x = L.AveragePooling2D(2)(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="densenet")


def squeeze_excite():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 12)
    s = L.GlobalAveragePooling2D()(x)
    s = L.Reshape((1, 1, 12))(s)
    s = L.Conv2D(4, 1, activation="relu")(s)
    s = L.Conv2D(12, 1, activation="sigmoid")(s)
    x = L.Multiply()([x, s])
    e = L.GlobalAveragePooling2D(keepdims=True)(x)
    e = L.Dense(3, activation="relu")(e)
    e = L.Dense(12, activation="sigmoid")(e)
    x = L.Multiply()([e, x])
    x = conv_bn(x, 8)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="squeeze_excite")


def resnext():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 16)
    y = conv_bn(x, 16, kernel=1)
    y = conv_bn(y, 16, groups=4)  # grouped 3x3, Cin == Cout
    y = conv_bn(y, 16, kernel=1, act=False)
    x = L.ReLU()(L.Add()([x, y]))
    z = conv_bn(x, 24, groups=4)  # grouped, Cin != Cout
    x = L.GlobalAveragePooling2D()(z)
    return keras.Model(inp, L.Dense(3)(x), name="resnext")


def xception():
    inp = keras.Input((8, 8, 3))
    x = conv_bn(inp, 8)
    y = L.SeparableConv2D(12, 3, padding="same", use_bias=False)(x)
    y = L.BatchNormalization()(y)
    y = L.SeparableConv2D(12, 3, padding="same", depth_multiplier=2)(L.ReLU()(y))
    y = L.BatchNormalization()(y)
    y = L.MaxPooling2D(3, strides=2, padding="same")(y)
    s = L.Conv2D(12, 1, strides=2, use_bias=False)(x)
    s = L.BatchNormalization()(s)
    x = L.Add()([y, s])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="xception")


def conv1d_net():
    inp = keras.Input((16, 4))
    x = L.Conv1D(8, 3, padding="same")(inp)
    x = L.BatchNormalization()(x)
    x = L.PReLU(shared_axes=[1])(x)
    x = L.SeparableConv1D(8, 3, padding="same")(x)
    x = L.DepthwiseConv1D(3, padding="same", depth_multiplier=2)(x)
    x = L.MaxPooling1D()(x)
    x = L.Conv1DTranspose(6, 3, strides=2, padding="same")(x)
    x = L.UpSampling1D()(x)
    x = L.ZeroPadding1D(1)(x)
    x = L.Cropping1D(1)(x)
    x = L.GRU(5)(x)
    return keras.Model(inp, L.Dense(3)(x), name="conv1d_net")


def conv3d_net():
    inp = keras.Input((4, 4, 4, 2))
    x = L.Conv3D(6, 3, padding="same")(inp)
    x = L.GroupNormalization(groups=3)(x)
    x = L.ReLU()(x)
    x = L.Conv3D(6, 1)(x)
    x = L.SpatialDropout3D(0.1)(x)
    x = L.MaxPooling3D()(x)
    x = L.Conv3DTranspose(4, 2, strides=2)(x)
    x = L.GlobalAveragePooling3D()(x)
    return keras.Model(inp, L.Dense(3)(x), name="conv3d_net")


def misc_2d():
    """Conv2DTranspose, UpSampling, padding, cropping, LSTM after reshape, Normalization."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same")(inp)
    x = L.LeakyReLU()(x)
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same")(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.Cropping2D(1)(x)
    x = L.AveragePooling2D(2)(x)
    x = L.UpSampling2D()(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Conv2D(8, 3, padding="same", activation="elu")(x)
    x = L.Reshape((64, 8))(x)
    x = L.LSTM(4)(x)
    return keras.Model(inp, L.Dense(3)(x), name="misc_2d")


def channels_first_depthwise():
    """Runs on CPU: channels_first depthwise, BN(axis=1) and pooling before a Dense."""
    inp = keras.Input((4, 6, 6))
    x = L.DepthwiseConv2D(3, padding="same", data_format="channels_first", depth_multiplier=2)(inp)
    x = L.BatchNormalization(axis=1)(x)
    x = L.GlobalAveragePooling2D(data_format="channels_first")(x)
    x = L.Dense(6)(x)
    x = L.Dense(3)(x)
    return keras.Model(inp, x, name="channels_first_depthwise")


def channels_first_convnet():
    """Needs a GPU to run (CPU TF has no NCHW conv); checked at the weight level."""
    inp = keras.Input((3, 8, 8))
    x = L.Conv2D(8, 3, padding="same", data_format="channels_first")(inp)
    x = L.BatchNormalization(axis=1)(x)
    x = L.ReLU()(x)
    y = L.Conv2D(8, 3, padding="same", data_format="channels_first")(x)
    x = L.Add()([x, y])
    x = L.MaxPooling2D(data_format="channels_first")(x)
    x = L.Flatten(data_format="channels_first")(x)
    return keras.Model(inp, L.Dense(3)(x), name="channels_first_convnet")


def sequential():
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        L.Conv2D(8, 3, padding="same"),
        L.BatchNormalization(),
        L.ReLU(),
        L.Conv2D(8, 3, padding="same", activation="relu"),
        L.GlobalAveragePooling2D(),
        L.Dense(8, activation="relu"),
        L.Dense(3),
    ], name="sequential")


def nested():
    block = keras.Sequential([
        keras.Input((8, 8, 8)),
        L.Conv2D(8, 3, padding="same"),
        L.BatchNormalization(),
        L.ReLU(),
    ], name="inner_block")
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inp)
    y = block(x)
    x = L.Add()([x, y])
    inner_in = keras.Input((8, 8, 8))
    head_out = L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(6, 1)(inner_in)))
    head = keras.Model(inner_in, head_out, name="head")
    return keras.Model(inp, head(x), name="nested")


def elementwise_ops():
    """keras.ops arithmetic on tensors (hard-swish), an adapted Normalization, PReLU."""
    import numpy as np

    inp = keras.Input((8, 8, 3))
    norm = L.Normalization()
    norm.adapt(np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32"))
    x = L.Conv2D(6, 3, padding="same")(norm(inp))
    x = x * (L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0))
    x = L.PReLU()(x)
    x = L.Conv2D(4, 1)(x)
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)), name="elementwise_ops")


FAMILIES = {
    f.__name__: f for f in (
        vgg, resnet_basic, resnet_bottleneck, preact_resnet, mobilenet_v2, densenet,
        squeeze_excite, resnext, xception, conv1d_net, conv3d_net, misc_2d,
        channels_first_depthwise, sequential, nested, elementwise_ops,
    )
}
