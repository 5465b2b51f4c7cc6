"""kerassurgeon-style operations, and their errors."""

import keras
import numpy as np
import pytest
from keras import layers as L

import archs
from kprune import KprunError
from kprune.graph import DependencyGraph
from kprune.surgeon import (Surgeon, apply_plan, delete_channels, delete_layer, insert_layer,
                            replace_layer, zero_plan)
from kprune.tools.verify import randomize


def _x(model, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2,) + tuple(model.inputs[0].shape[1:])).astype("float32")


@pytest.fixture
def resnet():
    model = archs.resnet_basic()
    randomize(model, seed=0)
    return model


def test_delete_channels_removes_them_from_the_whole_group(resnet):
    stem = resnet.layers[1]
    small = delete_channels(resnet, stem, [0, 5])
    graph = DependencyGraph(resnet)
    group = graph.group_of(stem.name)
    for member in group.producers:
        assert small.get_layer(member.name).filters == 6
    x = _x(resnet)
    ref = zero_plan(resnet, {group.id: [0, 5]}, graph)
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)


def test_delete_channels_accepts_layer_names(resnet):
    small = delete_channels(resnet, resnet.layers[1].name, [1])
    assert small.get_layer(resnet.layers[1].name).filters == 7


@pytest.mark.parametrize("channels, message", [
    ([8], "out of range"),
    ([-1], "out of range"),
    ([2, 2], "Repeated"),
    (list(range(8)), "every channel"),
])
def test_delete_channels_bad_indices(resnet, channels, message):
    with pytest.raises(KprunError, match=message) as err:
        delete_channels(resnet, resnet.layers[1], channels)
    assert resnet.layers[1].name in str(err.value)


def test_delete_channels_of_a_blocked_group_names_the_reason(resnet):
    with pytest.raises(KprunError, match="output"):
        delete_channels(resnet, resnet.layers[-1], [0])


def test_uneven_grouped_conv_removal_is_refused():
    model = archs.resnext()
    graph = DependencyGraph(model)
    grouped = [l for l in model.layers if isinstance(l, L.Conv2D) and l.groups > 1][0]
    group = graph.group_of(grouped.name)
    with pytest.raises(KprunError, match="grouped convolution"):
        apply_plan(model, {group.id: [0]}, graph)
    part = group.partitions[0]
    even = [int(np.flatnonzero(part == p)[0]) for p in range(4)]
    apply_plan(model, {group.id: even}, graph)


def test_unknown_group_id(resnet):
    with pytest.raises(KprunError, match="does not exist"):
        apply_plan(resnet, {999: [0]})


def test_delete_layer_bypasses_it():
    model = archs.vgg()
    randomize(model, seed=1)
    dropout = [l for l in model.layers if isinstance(l, L.Dropout)][0]
    new = delete_layer(model, dropout)
    assert dropout.name not in [l.name for l in new.layers]
    x = _x(model)
    np.testing.assert_allclose(np.asarray(new(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_delete_layer_that_changes_shape_is_refused():
    model = archs.vgg()
    conv = [l for l in model.layers if isinstance(l, L.Conv2D)][0]
    with pytest.raises(KprunError, match=conv.name):
        delete_layer(model, conv)


def test_insert_layer_goes_before_the_layer():
    model = archs.vgg()
    dense = model.layers[-1]
    new = insert_layer(model, dense, L.Activation("linear", name="inserted"))
    names = [l.name for l in new.layers]
    assert names.index("inserted") == names.index(dense.name) - 1
    x = _x(model)
    np.testing.assert_allclose(np.asarray(new(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_replace_layer():
    model = archs.vgg()
    relu = [l for l in model.layers if isinstance(l, L.ReLU)][0]
    new = replace_layer(model, relu, L.Activation("tanh", name="tanh"))
    assert "tanh" in [l.name for l in new.layers] and relu.name not in [l.name for l in new.layers]


def test_surgeon_runs_several_jobs_in_one_rebuild(resnet):
    surgeon = Surgeon(resnet)
    stem = resnet.layers[1]
    head = resnet.layers[-1]
    surgeon.add_job("delete_channels", stem, channels=[0, 1])
    surgeon.add_job("insert_layer", head, new_layer=L.Dropout(0.1, name="drop"))
    new = surgeon.operate()
    assert new.get_layer(stem.name).filters == 6
    assert "drop" in [l.name for l in new.layers]


def test_surgeon_rejects_unknown_jobs_and_layers(resnet):
    surgeon = Surgeon(resnet)
    with pytest.raises(KprunError, match="Unknown job"):
        surgeon.add_job("explode", resnet.layers[1])
    with pytest.raises(KprunError, match="not a layer"):
        surgeon.add_job("delete_layer", "nope")
    with pytest.raises(KprunError, match="new_layer"):
        surgeon.add_job("replace_layer", resnet.layers[1])


def test_shared_layer_is_shared_after_surgery():
    inp = keras.Input((4, 4, 3))
    conv = L.Conv2D(6, 1, name="first")(inp)
    shared = L.Conv2D(6, 1, name="shared")
    a = shared(conv)
    b = shared(L.ReLU()(conv))
    out = L.Dense(2)(L.GlobalAveragePooling2D()(L.Add()([a, b])))
    model = keras.Model(inp, out)
    randomize(model, seed=2)
    small = delete_channels(model, "first", [0, 2])
    assert small.get_layer("shared").kernel.shape[-2] == 4
    graph = DependencyGraph(model)
    ref = zero_plan(model, {graph.group_of("first").id: [0, 2]}, graph)
    x = _x(model)
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
