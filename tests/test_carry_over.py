"""Layers the plan leaves alone are copied even when their config does not round-trip."""

import keras
import numpy as np
import pytest
from keras import layers as L

import kprune
from kprune.surgeon import copy_model
from kprune.surgeon.rebuild import clone_layer


class ExtraKeys(L.Layer):
    """Writes a derived key into its config that its constructor refuses (as some hub layers do)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), name="w")

    def call(self, x):
        return keras.ops.matmul(x, self.w)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "num_cells": self.units * 2}


class BrokenConfig(L.Layer):
    """`get_config` fails; Keras recorded the constructor arguments."""

    def __init__(self, scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def build(self, shape):
        self.b = self.add_weight(shape=(shape[-1],), name="b", initializer="ones")

    def call(self, x):
        return x * self.scale + self.b

    def get_config(self):
        raise TypeError("get_config() missing 1 required positional argument: 'self'")


class Hopeless(BrokenConfig):
    """`get_config` fails and the constructor took an object Keras cannot record."""

    def __init__(self, helper=object, **kwargs):
        super().__init__(**kwargs)
        self.helper = helper


def _model(layer):
    inp = keras.Input((6,))
    x = L.Dense(8, name="d1")(inp)
    x = layer(x)
    return keras.Model(inp, L.Dense(3, name="d2")(x))


@pytest.mark.parametrize("layer", [ExtraKeys(5, name="extra"), BrokenConfig(3.0, name="broken")])
def test_untouched_layer_is_copied_with_its_weights(layer):
    model = _model(layer)
    for v in model.weights:
        v.assign(np.random.default_rng(0).normal(size=v.shape).astype("float32"))
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    copy = copy_model(model)
    np.testing.assert_allclose(np.asarray(copy(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    new = copy.get_layer(layer.name)
    assert new is not layer and type(new) is type(layer)
    assert all(a is not b for a, b in zip(new.weights, layer.weights))
    with pytest.warns(kprune.KprunWarning, match=type(layer).__name__):
        small = kprune.prune(model, ratio=0.5, exclude=[layer.name])
    assert small.get_layer("d1").units == 8  # d1 feeds the custom layer: left whole
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_clone_layer_says_which_ways_failed():
    layer = Hopeless(name="hopeless")
    layer.build((None, 4))  # it holds a weight, so it cannot simply be shared
    with pytest.raises(kprune.KprunError, match=r"^Layer 'hopeless' \(Hopeless\) cannot be copied: "
                                                r"from_config\(get_config\(\)\) fails \(TypeError"):
        clone_layer(layer)
    with pytest.raises(kprune.KprunError, match="hopeless"):
        copy_model(_model(Hopeless(name="hopeless")))


def test_a_bad_new_config_is_a_kprune_error():
    with pytest.raises(kprune.KprunError, match=r"Layer 'd' \(Dense\) cannot be copied: "
                                                r"the new config fails"):
        clone_layer(L.Dense(2, name="d"), {"units": -1, "name": "d"})


class Stateless(L.Layer):
    """No weights, and a constructor argument Keras cannot record."""

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def call(self, x):
        return self.fn(x)

    def get_config(self):
        raise TypeError("cannot serialize a function")


def test_an_uncopyable_stateless_layer_is_called_again():
    model = _model(Stateless(keras.ops.tanh, name="fn"))
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    copy = copy_model(model)
    assert copy.get_layer("fn") is model.get_layer("fn")
    np.testing.assert_allclose(np.asarray(copy(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_a_copy_made_past_a_broken_config_saves_and_reloads(tmp_path):
    model = _model(ExtraKeys(5, name="extra"))
    copy = copy_model(model)
    assert "num_cells" not in copy.get_layer("extra").get_config()
    copy.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True,
                                     custom_objects={"ExtraKeys": ExtraKeys})
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
