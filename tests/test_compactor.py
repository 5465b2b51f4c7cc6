import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from kprune.errors import KprunError
from kprune.layers import Compactor
from kprune.layers.compactor import compactor_macs

RNG = np.random.default_rng(0)


def _rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((3, 5), -1),
        ((3, 6, 5), -1),
        ((3, 4, 4, 5), -1),
        ((3, 3, 3, 3, 5), -1),
        ((3, 5, 6), 1),
        ((3, 5, 4, 4), 1),
        ((3, 5, 3, 3, 3), 1),
    ],
)
def test_identity_at_init(shape, axis):
    x = _rand(*shape)
    layer = Compactor(axis=axis)
    y = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
    c = shape[axis]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), np.eye(c))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.mask), np.ones(c))


@pytest.mark.parametrize("shape, axis", [((2, 4, 4, 6), -1), ((2, 6, 4, 4), 1), ((2, 3, 6, 2), 2)])
def test_masked_linear_map_matches_numpy(shape, axis):
    x = _rand(*shape)
    layer = Compactor(axis=axis)
    layer.build(shape)
    c = shape[axis]
    kernel = _rand(c, c)
    mask = (RNG.random(c) > 0.5).astype("float32")
    layer.kernel.assign(kernel)
    layer.set_mask(mask)
    y = keras.ops.convert_to_numpy(layer(x))
    moved = np.moveaxis(x, axis, -1)
    expected = np.moveaxis(np.einsum("...i,ij->...j", moved, kernel) * mask, -1, axis)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_mask_zeroes_channels_and_active_channels():
    x = _rand(2, 4, 4, 6)
    layer = Compactor()
    layer.build(x.shape)
    mask = np.array([1, 0, 1, 1, 0, 1], dtype="float32")
    layer.set_mask(mask)
    y = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(y, x * mask, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(layer.active_channels(), np.flatnonzero(mask))


def test_masked_channel_gets_no_kernel_gradient():
    layer = Compactor()
    x = _rand(4, 5)
    layer.build(x.shape)
    layer.set_mask([1, 1, 0, 1, 1])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    grad = tape.gradient(loss, layer.kernel).numpy()
    np.testing.assert_array_equal(grad[:, 2], np.zeros(5))
    assert np.all(np.abs(grad[:, [0, 1, 3, 4]]).sum(axis=0) > 0)


def test_mask_is_not_trainable():
    layer = Compactor()
    layer.build((None, 3))
    assert [w.path for w in layer.trainable_weights] == [layer.kernel.path]
    assert [w.path for w in layer.non_trainable_weights] == [layer.mask.path]


@pytest.mark.parametrize("axis, shape", [(-1, (8, 8, 4)), (1, (4, 8, 8))])
def test_keras_round_trip_keeps_kernel_mask_and_outputs(tmp_path, axis, shape):
    inputs = keras.Input(shape)
    # TensorFlow's CPU Conv2D has no channels_first kernel: scale channels instead.
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs) if axis == -1 else inputs * 2.0
    x = Compactor(axis=axis, name="compactor")(x)
    model = keras.Model(inputs, x)
    layer = model.get_layer("compactor")
    layer.kernel.assign(_rand(4, 4))
    layer.set_mask([1, 0, 1, 0])

    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    restored = loaded.get_layer("compactor")

    assert isinstance(restored, Compactor)
    assert restored.axis == axis
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored.kernel), keras.ops.convert_to_numpy(layer.kernel)
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored.mask), keras.ops.convert_to_numpy(layer.mask)
    )
    x = _rand(2, *shape)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_get_config_round_trip():
    layer = Compactor(axis=1, name="c")
    clone = Compactor.from_config(layer.get_config())
    assert clone.axis == 1 and clone.name == "c"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Compactor(axis=0)(np.zeros((2, 3), "float32")), "batch axis"),
        (lambda: Compactor(axis=3)(np.zeros((2, 3), "float32")), "axis 3"),
        (lambda: Compactor(axis="x"), "must be an int"),
        (lambda: Compactor().build((None, None)), "unknown size"),
        (lambda: Compactor().build((4,)), "rank 2 or more"),
        (lambda: Compactor().set_mask([1.0]), "not built"),
    ],
)
def test_bad_input_raises(make, match):
    with pytest.raises(KprunError, match=match):
        make()


def test_set_mask_checks_shape_and_values():
    layer = Compactor(name="comp")
    layer.build((None, 3))
    with pytest.raises(KprunError, match="comp.*shape"):
        layer.set_mask([1.0, 0.0])
    with pytest.raises(KprunError, match="finite"):
        layer.set_mask([1.0, np.nan, 1.0])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.mask), np.ones(3))


def test_compactor_macs_counts_every_position():
    layer = Compactor(axis=1)
    layer.build((None, 4, 6, 5))
    assert compactor_macs(layer, (None, 4, 6, 5), (None, 4, 6, 5)) == 6 * 5 * 4 * 4
    with pytest.raises(KprunError, match="unknown"):
        compactor_macs(layer, (None, 4, None, 5), (None, 4, None, 5))
