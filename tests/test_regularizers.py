import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from kprune.errors import KprunError
from kprune.layers.regularizers import GroupLasso

RNG = np.random.default_rng(1)


def _numpy_group_lasso(kernel, l, axis):
    moved = np.moveaxis(kernel, axis, -1).reshape(-1, kernel.shape[axis])
    return l * np.sqrt((moved.astype("float64") ** 2).sum(axis=0)).sum()


@pytest.mark.parametrize(
    "shape, axis",
    [((6, 4), -1), ((3, 3, 5, 7), -1), ((3, 5, 4), 0), ((3, 3, 3, 2, 4), -1), ((4, 6), 1)],
)
def test_value_matches_numpy(shape, axis):
    kernel = RNG.standard_normal(shape).astype("float32")
    reg = GroupLasso(l=0.3, axis=axis)
    np.testing.assert_allclose(
        float(reg(kernel)), _numpy_group_lasso(kernel, 0.3, axis), rtol=1e-5
    )


def test_gradient_matches_numpy_and_is_zero_on_a_zero_channel():
    kernel = RNG.standard_normal((3, 3, 2, 4)).astype("float32")
    kernel[..., 1] = 0.0
    var = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        loss = GroupLasso(l=0.5)(var)
    grad = tape.gradient(loss, var).numpy()

    norms = np.sqrt((kernel**2).sum(axis=(0, 1, 2)))
    expected = np.where(norms > 0, 0.5 * kernel / np.where(norms > 0, norms, 1.0), 0.0)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_as_kernel_regularizer_adds_the_penalty():
    layer = keras.layers.Dense(5, kernel_regularizer=GroupLasso(l=0.01))
    layer(np.zeros((1, 3), "float32"))
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    np.testing.assert_allclose(
        float(sum(layer.losses)), _numpy_group_lasso(kernel, 0.01, -1), rtol=1e-5
    )


def test_config_and_keras_round_trip(tmp_path):
    reg = GroupLasso(l=2e-4, axis=0)
    assert GroupLasso.from_config(reg.get_config()).get_config() == {"l": 2e-4, "axis": 0}

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, kernel_regularizer=GroupLasso(3e-4), name="conv")(inputs)
    model = keras.Model(inputs, x)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    restored = loaded.get_layer("conv").kernel_regularizer
    assert isinstance(restored, GroupLasso)
    assert restored.get_config() == {"l": 3e-4, "axis": -1}
    kernel = keras.ops.convert_to_numpy(model.get_layer("conv").kernel)
    np.testing.assert_allclose(
        float(sum(loaded.losses)), _numpy_group_lasso(kernel, 3e-4, -1), rtol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"l": -1.0}, ">= 0"),
        ({"l": float("nan")}, "finite"),
        ({"l": "big"}, "number"),
        ({"axis": 1.5}, "int"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(KprunError, match=match):
        GroupLasso(**kwargs)


def test_axis_out_of_range_raises():
    with pytest.raises(KprunError, match="axis 2"):
        GroupLasso(axis=2)(np.ones((3, 4), "float32"))
