"""Every family: prune a random share of every prunable group; outputs equal the masked original."""

import keras
import numpy as np
import pytest

import archs
from kprune.graph import DependencyGraph
from kprune.surgeon import apply_plan
from kprune.tools.verify import check_equivalence, random_plan, randomize


def _inputs(model, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + tuple(model.inputs[0].shape[1:])).astype("float32")


def _snapshot(model):
    return [np.array(v.numpy()) for v in model.weights]


@pytest.mark.parametrize("family", sorted(archs.FAMILIES))
def test_pruned_equals_masked_original(family):
    model = archs.FAMILIES[family]()
    randomize(model, seed=1)
    before = _snapshot(model)
    x = _inputs(model)
    y_before = np.asarray(model(x))
    graph = DependencyGraph(model)
    assert graph.prunable_groups(), family
    plan = random_plan(graph, 0.5, seed=2)
    assert plan
    small = check_equivalence(model, plan, x, graph=graph)
    assert small.count_params() < model.count_params()
    # The caller's model and its weights are untouched.
    for a, b in zip(before, _snapshot(model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(model(x)), y_before)
    assert not set(map(id, small.layers)) & set(map(id, model.layers))


@pytest.mark.parametrize("family", sorted(archs.FAMILIES))
def test_pruned_model_round_trips_keras_file(family, tmp_path):
    model = archs.FAMILIES[family]()
    randomize(model, seed=3)
    graph = DependencyGraph(model)
    small = apply_plan(model, random_plan(graph, 0.3, seed=4), graph)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _inputs(model)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(small(x)), rtol=1e-6, atol=1e-6)


def test_zero_plan_differs_from_original():
    """The reference really silences channels (guards against a vacuous comparison)."""
    from kprune.surgeon import zero_plan

    model = archs.resnet_basic()
    randomize(model, seed=5)
    graph = DependencyGraph(model)
    plan = random_plan(graph, 0.5, seed=6)
    x = _inputs(model)
    assert not np.allclose(np.asarray(zero_plan(model, plan, graph)(x)), np.asarray(model(x)))


def test_channels_first_convnet_weights_are_sliced_exactly():
    """CPU TensorFlow cannot run NCHW convolutions: check the weights instead."""
    model = archs.channels_first_convnet()
    randomize(model, seed=7)
    graph = DependencyGraph(model)
    conv_a = model.layers[1]
    group = graph.group_of(conv_a.name)
    assert group.prunable
    assert {m.name for m in group.producers} == {conv_a.name, model.layers[4].name}
    drop = [1, 4, 6]
    small = apply_plan(model, {group.id: drop})
    keep = np.setdiff1d(np.arange(8), drop)
    a_old, a_new = conv_a.get_weights(), small.get_layer(conv_a.name).get_weights()
    np.testing.assert_array_equal(a_new[0], a_old[0][..., keep])
    np.testing.assert_array_equal(a_new[1], a_old[1][keep])
    bn_old, bn_new = model.layers[2].get_weights(), small.get_layer(model.layers[2].name).get_weights()
    for o, n in zip(bn_old, bn_new):
        np.testing.assert_array_equal(n, o[keep])
    conv_b = model.layers[4]
    b_old, b_new = conv_b.get_weights(), small.get_layer(conv_b.name).get_weights()
    np.testing.assert_array_equal(b_new[0], b_old[0][:, :, keep][..., keep])
    # Flatten(channels_first) then Dense: rows are (h, w, c) ordered, c fastest.
    dense = model.layers[-1]
    rows = np.arange(4 * 4 * 8).reshape(4, 4, 8)[..., keep].reshape(-1)
    np.testing.assert_array_equal(small.get_layer(dense.name).get_weights()[0], dense.get_weights()[0][rows])
