"""The dependency graph: which channels go together, and which may not go."""

import keras
import numpy as np
import pytest
from keras import layers as L

import archs
from kprune import KprunError
from kprune.graph import DependencyGraph, register_rule
from kprune.graph.rules import PassThroughRule


def _producers(group):
    return sorted(m.name for m in group.producers)


def test_residual_add_couples_every_branch():
    model = archs.resnet_basic()
    graph = DependencyGraph(model)
    stream = graph.group_of(model.layers[1].name)  # stem conv
    names = _producers(stream)
    assert len(names) == 2  # stem conv and the second conv of the identity block
    assert stream.prunable and stream.size == 8
    assert len({m.name for m in stream.params}) == 2  # their BatchNormalizations
    # The stream is read by the identity block's first conv and the projection block.
    assert len({m.name for m in stream.consumers}) == 3


def test_concatenate_places_each_input_at_its_offset():
    inp = keras.Input((4, 4, 3))
    a = L.Conv2D(5, 1, name="a")(inp)
    b = L.Conv2D(3, 1, name="b")(inp)
    c = L.Concatenate()([a, b])
    out = L.Conv2D(2, 1, name="c")(c)
    graph = DependencyGraph(keras.Model(inp, out))
    ga, gb = graph.group_of("a"), graph.group_of("b")
    assert ga.id != gb.id
    cons_a = [m for m in ga.consumers if m.name == "c"][0]
    cons_b = [m for m in gb.consumers if m.name == "c"][0]
    np.testing.assert_array_equal(cons_a.index, [0, 1, 2, 3, 4, -1, -1, -1])
    np.testing.assert_array_equal(cons_b.index, [-1, -1, -1, -1, -1, 0, 1, 2])


def test_flatten_maps_rows_spatial_times_channels():
    inp = keras.Input((2, 3, 4))
    x = L.Conv2D(4, 1, name="conv")(inp)
    x = L.Flatten()(x)
    out = L.Dense(2, name="dense")(x)
    graph = DependencyGraph(keras.Model(inp, out))
    dense = [m for m in graph.group_of("conv").consumers if m.name == "dense"][0]
    np.testing.assert_array_equal(dense.index, np.tile(np.arange(4), 6))


def test_depthwise_multiplier_ties_outputs_to_input_channel():
    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(3, 1, name="conv")(inp)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    out = L.Conv2D(2, 1, name="pw")(x)
    graph = DependencyGraph(keras.Model(inp, out))
    group = graph.group_of("conv")
    pw = [m for m in group.consumers if m.name == "pw"][0]
    np.testing.assert_array_equal(pw.index, [0, 0, 1, 1, 2, 2])


def test_squeeze_excitation_multiply_couples_channels():
    model = archs.squeeze_excite()
    graph = DependencyGraph(model)
    group = graph.group_of(model.layers[1].name)
    # The SE expansion convolution and Dense write the same channels as the trunk conv.
    kinds = {type(m.layer).__name__ for m in group.producers}
    assert kinds == {"Conv2D", "Dense"}
    assert group.prunable


def test_grouped_conv_partitions_are_recorded():
    model = archs.resnext()
    graph = DependencyGraph(model)
    grouped = [l for l in model.layers if isinstance(l, L.Conv2D) and l.groups > 1][0]
    group = graph.group_of(grouped.name)
    assert group.partitions
    part = group.partitions[0]
    assert sorted(np.bincount(part[part >= 0]).tolist()) == [4, 4, 4, 4]


def test_outputs_and_inputs_are_blocked_with_a_reason():
    model = archs.vgg()
    graph = DependencyGraph(model)
    head = graph.group_of(model.layers[-1].name)
    assert not head.prunable and "output" in head.reason
    blocked = [g for g in graph.groups if not g.prunable]
    assert any("input" in g.reason for g in blocked)
    graph_all = DependencyGraph(model, prune_outputs=True)
    assert graph_all.group_of(model.layers[-1].name).prunable


def test_layer_with_no_rule_stops_propagation():
    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(4, 1, name="before")(inp)
    x = L.Lambda(lambda t: t * 2.0, name="mystery")(x)
    x = L.Conv2D(4, 1, name="after")(x)
    out = L.Dense(2)(L.GlobalAveragePooling2D()(x))
    graph = DependencyGraph(keras.Model(inp, out))
    before = graph.group_of("before")
    assert not before.prunable and "mystery" in before.reason and "no channel rule" in before.reason
    assert graph.group_of("after").prunable


def test_layer_norm_over_channels_is_approximate_and_group_norm_keeps_whole_groups():
    inp = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(inp)
    a = L.LayerNormalization(name="ln")(a)
    b = L.Conv2D(6, 1, name="b")(a)
    b = L.GroupNormalization(groups=3)(b)
    out = L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1)(b)))
    model = keras.Model(inp, out)
    graph = DependencyGraph(model)
    ga = graph.group_of("a")
    assert ga.prunable and ga.approximate and "ln" in [m.name for m in ga.params]
    assert ga.notes == ["statistics of 'ln' (LayerNormalization) are taken over the kept channels"]
    exact = DependencyGraph(model, approximate=False).group_of("a")
    assert not exact.prunable and "LayerNormalization" in exact.reason
    gb = graph.group_of("b")
    assert gb.prunable and gb.size == 3 and not gb.approximate  # pairs share one GroupNorm group


def test_register_rule_extends_the_graph():
    @keras.saving.register_keras_serializable(package="kprune_tests")
    class Scale(L.Layer):
        def call(self, x):
            return x * 3.0

    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(4, 1, name="conv")(inp)
    x = Scale(name="scale")(x)
    out = L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(3, 1)(x)))
    model = keras.Model(inp, out)
    assert not DependencyGraph(model).group_of("conv").prunable
    register_rule(Scale, PassThroughRule())
    assert DependencyGraph(model).group_of("conv").prunable


def test_nested_models_are_inlined():
    model = archs.nested()
    graph = DependencyGraph(model)
    names = [c.layer.name for c in graph.flat.calls]
    assert "inner_block" not in names and "head" not in names
    stem = graph.group_of("stem")
    assert len(stem.producers) == 2  # stem + inner block conv, joined by the Add


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(KprunError, match="subclassed"):
        DependencyGraph(net)


def test_unbuilt_sequential_is_refused():
    with pytest.raises(KprunError, match="input shape"):
        DependencyGraph(keras.Sequential([L.Dense(2)]))


def test_keras_applications_resnet50_groups():
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3))
    graph = DependencyGraph(model)
    stream = graph.group_of("conv2_block1_0_conv")
    assert stream.prunable and stream.size == 256
    assert "conv2_block3_3_conv" in _producers(stream)
    assert len(graph.prunable_groups()) == 37
