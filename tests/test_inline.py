"""Composite layers are seen through: their sub-layers prune like a functional model's."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import kprune
from kprune.graph import DependencyGraph, walk
from kprune.graph.walk import is_composite, trace
from kprune.tools.verify import check_equivalence, random_plan, randomize


@keras.saving.register_keras_serializable(package="kprune_tests")
class ConvBNAct(L.Layer):
    """Conv -> BN -> ReLU as one subclassed layer."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = L.Conv2D(filters, 3, padding="same", use_bias=False)
        self.bn = L.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="kprune_tests")
class Residual(L.Layer):
    """Two nested `ConvBNAct` blocks and a skip connection."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.a = ConvBNAct(filters)
        self.b = ConvBNAct(filters)

    def call(self, x):
        return x + self.b(self.a(x))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class OwnScale(L.Layer):
    """A conv followed by a per-channel scale the layer owns (a LayerScale)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(filters, 1)

    def build(self, shape):
        self.gamma = self.add_weight(name="gamma", shape=(self.conv.filters,), initializer="ones")

    def call(self, x):
        return self.conv(x) * self.gamma


class Untraceable(L.Layer):
    """Written with raw TensorFlow ops: runs in a model, but not on symbolic Keras tensors."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 1)

    def call(self, x):
        import tensorflow as tf

        return tf.nn.relu(self.conv(x))


def _model(block):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="stem")(inp)
    x = block(x)
    x = L.Conv2D(5, 1, name="after")(x)
    return keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))


def _x(model, seed=0):
    shape = (3,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _node_counts(layer):
    return [(len(s._inbound_nodes), len(s._outbound_nodes))
            for s in layer._flatten_layers(include_self=True, recursive=True)]


def test_composite_is_inlined_recursively_and_prunes():
    block = Residual(6, name="res")
    model = _model(block)
    randomize(model, seed=1)
    before = _node_counts(block)
    graph = DependencyGraph(model)
    assert _node_counts(block) == before  # tracing left the caller's layers as they were
    names = {type(c.layer).__name__ for c in graph.flat.calls}
    assert {"Conv2D", "BatchNormalization"} <= names and "Residual" not in names
    assert "ConvBNAct" not in names
    inner = graph.group_of(block.a.conv)
    assert inner.prunable and inner.size == 6
    # the residual stream ties the stem to the block's second conv
    assert graph.group_of("stem") is graph.group_of(block.b.conv)
    plan = random_plan(graph, 0.5, seed=0)
    assert inner.id in plan
    small = check_equivalence(model, plan, _x(model), graph=graph)
    assert all(type(l).__module__.startswith("keras.") for l in small.layers)


def test_inlined_model_reloads_without_the_composite_classes(tmp_path):
    model = _model(Residual(6, name="res"))
    small = kprune.prune(model, ratio=0.5)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _x(model)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(small(x)), rtol=1e-6, atol=1e-6)
    assert small.count_params() < model.count_params()


@keras.saving.register_keras_serializable(package="kprune_tests")
class ConvGelu(L.Layer):
    """Conv -> exact GELU, the GELU held as a lambda (as KerasHub's ConvNormAct does)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = L.Conv2D(filters, 3, padding="same")
        self.act = L.Activation(lambda x: keras.activations.gelu(x, approximate=False))

    def call(self, x):
        return self.act(self.conv(x))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def test_sublayer_with_a_lambda_keeps_the_composite_whole_so_it_reloads(tmp_path):
    model = _model(ConvGelu(6, name="cg"))
    randomize(model, seed=0)
    graph = DependencyGraph(model)
    (call,) = [c for c in graph.flat.calls if c.opaque]
    assert call.layer.name == "cg" and "safe_mode=True" in call.opaque
    small = kprune.surgeon.apply_plan(model, random_plan(graph, 0.5, seed=0), graph)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _x(model)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(small(x)), rtol=1e-6, atol=1e-6)


def test_own_weights_keep_the_layer_whole_with_a_reason():
    block = OwnScale(4, name="scaled")
    model = _model(block)
    assert not is_composite(keras.layers.Conv2D(2, 1))
    assert is_composite(block)
    inner, why = trace(block, (model.layers[1].output,), {})
    assert inner is None and "gamma" in why
    graph = DependencyGraph(model)
    stem = graph.group_of("stem")
    assert not stem.prunable
    assert "scaled" in stem.reason and "OwnScale" in stem.reason and "gamma" in stem.reason
    assert type(stem.blocker).__name__ == "OwnScale"
    assert graph.blockers() == {"OwnScale": 1}


def test_untraceable_layer_kept_whole_with_the_cause():
    model = _model(Untraceable(name="branchy"))
    graph = DependencyGraph(model)
    stem = graph.group_of("stem")
    assert not stem.prunable
    assert "branchy" in stem.reason and "does not trace" in stem.reason
    # the layer is still copied as one call, so the groups after it prune
    after = graph.group_of("after")
    assert after.prunable
    model_x = _x(model, seed=1)
    randomize(model, seed=2)
    check_equivalence(model, random_plan(graph, 0.4, seed=0), model_x, graph=graph)


def test_profile_counts_inside_composites_and_names_what_it_cannot():
    model = _model(Residual(6))
    p = kprune.profile(model)
    conv_rows = [r for r in p.layers if r.class_name == "Conv2D"]
    assert len(conv_rows) == 4
    assert p.macs == sum(r.macs for r in p.layers) and p.macs > 0
    assert p.params == model.count_params()
    assert p.uncounted == []
    q = kprune.profile(_model(OwnScale(4, name="scaled")))
    assert q.uncounted == ["scaled (OwnScale)"]
    assert "scaled (OwnScale)" in str(q)


def test_prune_warns_when_blocked_groups_stop_it():
    model = _model(OwnScale(4, name="scaled"))
    # 0.2 of the 6 + 5 channels in play is ~2; the blocked stem leaves 1 of the head's 5
    with pytest.warns(kprune.KprunWarning, match=r"removed 1 of the ~2 channels asked for; "
                                                 r"1 group\(s\) .*OwnScale \(1 group\)"):
        kprune.prune(model, ratio=0.2)
    with pytest.warns(kprune.KprunWarning, match=r"removed no channel; .*OwnScale \(1 group\)"):
        small = kprune.prune(model, ratio=0.5, exclude=["after"])
    x = _x(model)
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_unreachable_flops_target_names_the_blocking_classes_first():
    with pytest.raises(kprune.KprunError, match=r"^Model '.*' cannot reach 10.0% of its MACs: "
                                                r"groups are left whole by .*OwnScale \(1 group\)"):
        kprune.prune(_model(OwnScale(4, name="scaled")), flops_target=0.1)


def test_no_warning_when_the_plan_removes_what_was_asked():
    model = _model(Residual(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", kprune.KprunWarning)
        kprune.prune(model, ratio=0.5)


def test_walk_keeps_calls_of_keras_layers_with_sublayers_whole():
    inp = keras.Input((5, 8))
    out = L.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    flat = walk(keras.Model(inp, out))
    assert [type(c.layer).__name__ for c in flat.calls] == ["MultiHeadAttention"]
