"""ClassToken and PositionEmbedding: shapes, saving, and pruning through them."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

import kprune
from kprune.errors import KprunError
from kprune.layers import ClassToken, PositionEmbedding

RNG = np.random.default_rng(0)


def _rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_class_token_prepends_the_token():
    layer = ClassToken(initializer="random_normal")
    x = _rand(3, 5, 4)
    y = _np(layer(x))
    assert y.shape == (3, 6, 4)
    assert tuple(layer.token.shape) == (1, 1, 4)
    assert [w.name for w in layer.weights] == ["token"]
    token = _np(layer.token)[0, 0]
    for b in range(3):
        np.testing.assert_array_equal(y[b, 0], token)
    np.testing.assert_array_equal(y[:, 1:], x)


def test_class_token_shapes_symbolic():
    inp = keras.Input((None, 6))
    out = ClassToken()(inp)
    assert tuple(out.shape) == (None, None, 6)
    assert tuple(ClassToken()(keras.Input((7, 6))).shape) == (None, 8, 6)


def test_class_token_starts_at_zero():
    y = _np(ClassToken()(_rand(2, 3, 5)))
    np.testing.assert_array_equal(y[:, 0], 0.0)


def test_position_embedding_adds_the_embedding():
    layer = PositionEmbedding(initializer="random_normal")
    x = _rand(3, 5, 4)
    y = _np(layer(x))
    assert y.shape == (3, 5, 4)
    assert tuple(layer.embedding.shape) == (1, 5, 4)
    assert [w.name for w in layer.weights] == ["embedding"]
    np.testing.assert_allclose(y, x + _np(layer.embedding), rtol=1e-6, atol=1e-6)


def test_position_embedding_initializer_argument():
    layer = PositionEmbedding(initializer="ones")
    layer.build((None, 3, 2))
    np.testing.assert_array_equal(_np(layer.embedding), np.ones((1, 3, 2)))
    default = PositionEmbedding()
    default.build((None, 64, 32))
    std = float(np.std(_np(default.embedding)))
    assert 0.01 < std < 0.03


@pytest.mark.parametrize("cls", [ClassToken, PositionEmbedding])
def test_rejects_inputs_that_are_not_sequences(cls):
    with pytest.raises(KprunError, match="tokens, channels"):
        cls()(keras.Input((4, 4, 3)))


def test_position_embedding_needs_a_fixed_length():
    with pytest.raises(KprunError, match="fixed number of tokens"):
        PositionEmbedding()(keras.Input((None, 3)))


@pytest.mark.parametrize("cls", [ClassToken, PositionEmbedding])
def test_config_round_trip(cls):
    layer = cls(initializer="ones", name="tok")
    clone = cls.from_config(layer.get_config())
    assert clone.name == "tok"
    assert isinstance(clone.initializer, keras.initializers.Ones)


def _token_model():
    inp = keras.Input((16, 8))
    x = keras.layers.Dense(12, name="embed")(inp)
    x = ClassToken(initializer="random_normal", name="cls_token")(x)
    x = PositionEmbedding(name="pos_embed")(x)
    x = keras.layers.Dense(5, name="mix")(x)
    x = x[:, 0]
    out = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inp, out)


def test_keras_round_trip_safe_mode(tmp_path):
    model = _token_model()
    x = _rand(4, 16, 8)
    path = str(tmp_path / "tokens.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("cls_token"), ClassToken)
    assert isinstance(loaded.get_layer("pos_embed"), PositionEmbedding)
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))


def test_token_layers_sit_on_the_embedding_group():
    model = _token_model()
    graph = kprune.graph.DependencyGraph(model)
    group = graph.group_of("embed")
    assert group.prunable, group.reason
    assert group.size == 12
    params = {m.name for m in group.params}
    assert {"cls_token", "pos_embed"} <= params
    assert "mix" in {m.name for m in group.consumers}


def test_apply_plan_equals_zero_plan():
    model = _token_model()
    for layer in model.layers:  # every weight non-zero, biases included
        for w in layer.weights:
            w.assign(_rand(*w.shape))
    graph = kprune.graph.DependencyGraph(model)
    plan = {graph.group_of("embed").id: [1, 4, 7]}
    small = kprune.surgeon.apply_plan(model, plan)
    ref = kprune.surgeon.zero_plan(model, plan)
    assert tuple(small.get_layer("cls_token").token.shape) == (1, 1, 9)
    assert tuple(small.get_layer("pos_embed").embedding.shape) == (1, 17, 9)
    keep = [i for i in range(12) if i not in (1, 4, 7)]
    np.testing.assert_array_equal(_np(small.get_layer("pos_embed").embedding),
                                  _np(model.get_layer("pos_embed").embedding)[..., keep])
    x = _rand(6, 16, 8)
    np.testing.assert_allclose(_np(small(x)), _np(ref(x)), rtol=1e-5, atol=1e-5)


def test_pruned_model_round_trips(tmp_path):
    model = _token_model()
    graph = kprune.graph.DependencyGraph(model)
    small = kprune.surgeon.apply_plan(model, {graph.group_of("embed").id: [0, 2]})
    x = _rand(2, 16, 8)
    path = str(tmp_path / "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(_np(loaded(x)), _np(small(x)))
