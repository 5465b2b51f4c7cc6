"""kprune.train.recalibrate: BatchNormalization statistics re-estimated as an exact average."""

import keras
import numpy as np
import pytest
from keras import layers as L

from kprune.errors import KprunError
from kprune.train import recalibrate


def _model(frozen=False):
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(3, 3, padding="same", name="conv")(inp)
    bn = L.BatchNormalization(name="bn", momentum=0.99)
    x = bn(x)
    x = L.ReLU()(x)
    x = L.Conv2D(4, 1, name="conv2")(x)
    x = L.BatchNormalization(name="bn2", trainable=not frozen)(x)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(1, 2, size=layer.moving_variance.shape))
    return model


def _x(n=24, seed=1):
    return np.random.default_rng(seed).normal(2.0, 3.0, size=(n, 6, 6, 2)).astype("float32")


def test_statistics_are_the_average_of_the_batch_statistics():
    model, x = _model(), _x()
    conv = keras.Model(model.input, model.get_layer("conv").output)
    batches = [x[i:i + 8] for i in range(0, 24, 8)]
    outs = [np.asarray(conv(b)) for b in batches]
    mean = np.mean([o.mean(axis=(0, 1, 2)) for o in outs], axis=0)
    var = np.mean([o.var(axis=(0, 1, 2)) for o in outs], axis=0)
    weights = [np.array(w) for w in model.trainable_weights]
    assert recalibrate(model, (x, np.zeros(24)), batch_size=8) is model
    bn = model.get_layer("bn")
    np.testing.assert_allclose(np.array(bn.moving_mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(bn.moving_variance), var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.99                                   # restored
    for before, after in zip(weights, model.trainable_weights):  # nothing trained
        np.testing.assert_array_equal(before, np.array(after))


def test_steps_and_iterables_of_batches():
    a, b = _model(), _model()
    b.set_weights(a.get_weights())
    x = _x()
    recalibrate(a, x, batch_size=8, steps=2)
    recalibrate(b, [(x[:8], None), (x[8:16], None)])
    for name in ("bn", "bn2"):
        np.testing.assert_allclose(np.array(a.get_layer(name).moving_mean),
                                   np.array(b.get_layer(name).moving_mean), rtol=1e-6, atol=1e-6)


def test_frozen_batchnorm_keeps_its_statistics():
    model = _model(frozen=True)
    before = np.array(model.get_layer("bn2").moving_mean)
    recalibrate(model, _x(), batch_size=8)
    np.testing.assert_array_equal(np.array(model.get_layer("bn2").moving_mean), before)
    assert not np.allclose(np.array(model.get_layer("bn").moving_mean), 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(steps=0), "steps"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(KprunError, match=message):
        recalibrate(_model(), _x(), **kwargs)


def test_empty_data_is_refused_and_changes_nothing():
    model = _model()
    before = np.array(model.get_layer("bn").moving_mean)
    with pytest.raises(KprunError, match="no batch"):
        recalibrate(model, [])
    np.testing.assert_array_equal(np.array(model.get_layer("bn").moving_mean), before)
