import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
from keras import layers as L

import archs
from kprune.errors import KprunError
from kprune.layers import Compactor
from kprune.surgeon.fuse import fold_compactors, fuse_batchnorm
from kprune.tools.verify import randomize

RNG = np.random.default_rng(0)
FAMILIES = [n for n in archs.FAMILIES if n not in ("channels_first_convnet", "elementwise_ops")]


def _x(model, n=3):
    return RNG.normal(size=(n,) + tuple(model.input_shape[1:])).astype("float32")


def _count(model, cls):
    return sum(isinstance(layer, cls) for layer in model._flatten_layers(include_self=False))


def _assert_same(a, b, x):
    np.testing.assert_allclose(np.asarray(b(x, training=False)), np.asarray(a(x, training=False)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_fuse_batchnorm_keeps_outputs(name):
    model = archs.FAMILIES[name]()
    randomize(model, seed=3)
    before = [np.array(w) for w in model.get_weights()]
    fused = fuse_batchnorm(model)
    _assert_same(model, fused, _x(model))
    for w, v in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w, v)  # the caller's model is untouched


def _single(producer, x_shape, **bn):
    inputs = keras.Input(x_shape)
    y = L.BatchNormalization(**bn)(producer(inputs))
    model = keras.Model(inputs, L.Activation("relu")(y))
    randomize(model, seed=1)
    return model


@pytest.mark.parametrize("producer, shape, bn", [
    (lambda: L.Conv2D(5, 3, padding="same", use_bias=False), (6, 6, 3), {}),
    (lambda: L.Conv2D(6, 3, groups=3), (6, 6, 3), {}),
    (lambda: L.Conv1D(4, 3), (8, 2), {"center": False}),
    (lambda: L.Conv3D(4, 2), (4, 4, 4, 2), {"scale": False}),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (6, 6, 3), {}),
    (lambda: L.SeparableConv2D(4, 3, depth_multiplier=2), (6, 6, 3), {}),
    (lambda: L.Conv2DTranspose(4, 3, strides=2), (4, 4, 3), {}),
    (lambda: L.Dense(7), (5,), {}),
    (lambda: L.Dense(7), (3, 5), {}),
])
def test_each_producer_absorbs_its_batchnorm(producer, shape, bn):
    model = _single(producer(), shape, **bn)
    fused = fuse_batchnorm(model)
    assert _count(fused, L.BatchNormalization) == 0
    _assert_same(model, fused, _x(model))


@pytest.mark.parametrize("build", [
    # the producer has its own activation before the BN
    lambda x: L.BatchNormalization()(L.Conv2D(4, 3, activation="relu")(x)),
    # the producer's output is read by the BN and by another layer
    lambda x: (lambda c: L.Add()([L.BatchNormalization()(c), c]))(L.Conv2D(4, 3)(x)),
    # the BN normalises another axis than the channels
    lambda x: L.BatchNormalization(axis=1)(L.Conv2D(4, 3)(x)),
])
def test_batchnorm_that_cannot_fold_is_kept(build):
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, build(inputs))
    randomize(model, seed=2)
    fused = fuse_batchnorm(model)
    assert _count(fused, L.BatchNormalization) == 1
    _assert_same(model, fused, _x(model))


def _with_compactor(producer, shape, mask_out=(1,)):
    inputs = keras.Input(shape)
    compactor = Compactor(name="compactor")
    y = compactor(producer(inputs))
    model = keras.Model(inputs, L.Activation("tanh")(y))
    randomize(model, seed=4)
    mask = np.ones(compactor.channels)
    mask[list(mask_out)] = 0
    compactor.set_mask(mask)
    return model


@pytest.mark.parametrize("producer, shape", [
    (lambda: L.Conv2D(5, 3, padding="same"), (6, 6, 3)),
    (lambda: L.Conv2D(5, 3, use_bias=False), (6, 6, 3)),
    (lambda: L.Conv1D(4, 3), (8, 2)),
    (lambda: L.SeparableConv2D(4, 3), (6, 6, 3)),
    (lambda: L.Conv2DTranspose(4, 3), (4, 4, 3)),
    (lambda: L.Dense(6), (5,)),
])
def test_fold_compactor_into_producer(producer, shape):
    model = _with_compactor(producer(), shape, mask_out=(0, 2))
    folded = fold_compactors(model)
    assert _count(folded, Compactor) == 0
    x = _x(model)
    _assert_same(model, folded, x)
    # masked channels are exactly zero in the folded producer's output
    head = keras.Model(folded.inputs, folded.layers[1].output)
    out = np.asarray(head(x))
    np.testing.assert_array_equal(out[..., [0, 2]], 0.0)


def test_fold_after_fused_batchnorm():
    inputs = keras.Input((6, 6, 3))
    y = Compactor()(L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(inputs)))
    model = keras.Model(inputs, L.ReLU()(y))
    randomize(model, seed=5)
    plain = fold_compactors(fuse_batchnorm(model))
    assert _count(plain, Compactor) == 0 and _count(plain, L.BatchNormalization) == 0
    _assert_same(model, plain, _x(model))


@pytest.mark.parametrize("build, reason", [
    (lambda x: Compactor(name="c")(L.ReLU()(L.Conv2D(4, 3)(x))), "not a convolution"),
    (lambda x: Compactor(name="c")(L.Conv2D(4, 3, activation="relu")(x)), "own activation"),
    (lambda x: Compactor(name="c")(L.Conv2D(6, 3, groups=3)(x)), "grouped"),
    (lambda x: Compactor(name="c")(L.DepthwiseConv2D(3)(x)), "depthwise"),
    (lambda x: (lambda c: L.Add()([Compactor(name="c")(c), c]))(L.Conv2D(4, 3)(x)), "other layers"),
    (lambda x: Compactor(name="c")(x), "model input"),
])
def test_fold_refuses_what_it_cannot_fold(build, reason):
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, build(inputs))
    with pytest.raises(KprunError, match=f"'c'.*{reason}"):
        fold_compactors(model)
