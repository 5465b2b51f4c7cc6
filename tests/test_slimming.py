"""Network Slimming: the global |gamma| threshold, surgery, cfg, and the L1 rule on gamma."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
from keras import layers as L

import archs
from kprune import slimming
from kprune.errors import KprunError
from kprune.graph import DependencyGraph
from kprune.models import vgg
from kprune.train.rules import SlimmingRule
from kprune.surgeon import copy_model
from kprune.train import RuleOptimizer, Trainer
from kprune.tools.verify import randomize

CFG = [6, "M", 8, "M", 8, 10, "M", 12, 12]


def _small_vgg(seed=0):
    model = vgg(cfg=CFG, input_shape=(16, 16, 3), classifier_activation=None)
    randomize(model, seed=seed)
    return model


def _resnet(seed=0):
    """Basic blocks with an identity and a projection shortcut, at 8x8."""
    model = archs.resnet_basic()
    randomize(model, seed=seed)
    return model


def _x(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + tuple(model.input_shape[1:])).astype("float32")


def _np(variable):
    return np.array(variable.numpy())


def _gamma_beta_zeroed(model, plan, graph):
    """A copy of `model` whose pruned channels have gamma = beta = 0 in every BN of the group."""
    ref = copy_model(model)
    for gid, channels in plan.items():
        for member in graph.groups[gid].params:
            if not isinstance(member.layer, L.BatchNormalization):
                continue
            positions = np.flatnonzero(np.isin(member.index, channels))
            bn = ref.get_layer(member.layer.name)
            for var in (bn.gamma, bn.beta):
                value = _np(var)
                value[positions] = 0.0
                var.assign(value)
    return ref


def _set_gammas(model, values):
    for layer, gamma in zip([l for l in model.layers if isinstance(l, L.BatchNormalization)],
                            values):
        layer.gamma.assign(np.asarray(gamma, dtype="float32"))


# ---------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("build,percent", [(_small_vgg, 0.5), (_small_vgg, 0.7), (_resnet, 0.5)])
def test_slimmed_equals_original_with_gamma_and_beta_zeroed(build, percent):
    model = build()
    before = [_np(w) for w in model.weights]
    graph = DependencyGraph(model)
    plan, threshold = slimming.plan(model, percent, graph=graph)
    small, _ = slimming.prune(model, percent)
    for w, b in zip(model.weights, before):  # the caller's model is untouched
        np.testing.assert_array_equal(_np(w), b)
    assert small.count_params() < model.count_params()
    ref = _gamma_beta_zeroed(model, plan, graph)
    x = _x(model)
    got = keras.tree.flatten(small(x, training=False))
    want = keras.tree.flatten(ref(x, training=False))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_resnet_residual_group_is_scored_as_one():
    model = _resnet()
    graph = DependencyGraph(model)
    stream = max(graph.prunable_groups(), key=lambda g: len(g.params))
    bns = [m for m in stream.params if isinstance(m.layer, L.BatchNormalization)]
    assert len(bns) > 1  # the stem and the block ends share the channels
    want = np.mean([np.abs(_np(m.layer.gamma))[np.argsort(m.index)] for m in bns], axis=0)
    np.testing.assert_allclose(slimming.scores(model, graph)[stream.id], want, rtol=1e-6)


# ---------------------------------------------------------------------------
# The threshold
# ---------------------------------------------------------------------------
def test_threshold_removes_the_lowest_gammas_globally():
    model = _small_vgg()
    rng = np.random.default_rng(1)
    widths = [v for v in CFG if v != "M"]
    distinct = (rng.permutation(sum(widths)) + 1).astype("float32") * 0.01
    values = np.split(distinct, np.cumsum(widths)[:-1])
    _set_gammas(model, values)
    plan, threshold = slimming.plan(model, 0.4)
    everything = np.concatenate(values)
    count = int(np.floor(0.4 * len(everything)))
    assert threshold == pytest.approx(np.sort(everything)[count - 1])
    graph = DependencyGraph(model)
    bn_names = [l.name for l in model.layers if isinstance(l, L.BatchNormalization)]
    for name, gamma in zip(bn_names, values):
        group = next(g for g in graph.prunable_groups() if name in g.layer_names())
        removed = plan.get(group.id, [])
        assert sorted(removed) == sorted(np.flatnonzero(gamma <= threshold).tolist())


@pytest.mark.parametrize("min_channels", [1, 2])
def test_threshold_never_empties_a_layer(min_channels):
    model = _small_vgg()
    widths = [v for v in CFG if v != "M"]
    values = [np.full(w, 0.5) for w in widths]
    values[2] = np.full(widths[2], 1e-6)  # a whole layer below any sensible threshold
    _set_gammas(model, values)
    small, cfg = slimming.prune(model, 0.5, min_channels=min_channels)
    kept = [v for v in cfg if v != "M"]
    assert kept[2] == min_channels
    assert all(k >= min_channels for k in kept)
    total = sum(widths)
    assert total - sum(kept) == int(np.floor(0.5 * total))  # the count is still reached


def test_cfg_rebuilds_the_same_architecture():
    model = _small_vgg()
    small, cfg = slimming.prune(model, 0.6)
    assert [v == "M" for v in cfg] == [v == "M" for v in CFG]
    rebuilt = vgg(cfg=cfg, input_shape=(16, 16, 3), classifier_activation=None)
    assert rebuilt.count_params() == small.count_params()
    for a, b in zip(rebuilt.layers, small.layers):
        assert [tuple(w.shape) for w in a.weights] == [tuple(w.shape) for w in b.weights]


def test_widths_of_other_models_is_a_dict():
    small, widths = slimming.prune(_resnet(), 0.5)
    assert isinstance(widths, dict)
    for name, width in widths.items():
        layer = small.get_layer(name)
        assert width == (layer.units if isinstance(layer, L.Dense) else layer.filters)


def test_bad_input_raises():
    model = _small_vgg()
    with pytest.raises(KprunError, match="percent"):
        slimming.prune(model, 1.0)
    with pytest.raises(KprunError, match="min_channels"):
        slimming.prune(model, 0.5, min_channels=0)
    inp = keras.Input((8, 8, 3))
    plain = keras.Model(inp, L.Dense(2)(L.Flatten()(L.Conv2D(4, 3)(inp))), name="no_bn")
    with pytest.raises(KprunError, match="no_bn"):
        slimming.prune(plain, 0.5)


# ---------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------
def test_gammas_cover_prunable_batchnorms_only():
    inp = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn_a")(L.Conv2D(4, 3, name="conv_a")(inp))
    x = L.BatchNormalization(name="bn_out")(L.Conv2D(3, 1, name="conv_out")(x))
    model = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    names = [v.path for v in slimming.gammas(model)]
    assert names == [model.get_layer("bn_a").gamma.path]  # bn_out reaches the model output


def test_rule_adds_s_sign_gamma_to_the_gradient():
    model = _small_vgg()
    s = 1e-2
    rule = slimming.rule(model, s=s)
    assert isinstance(rule, SlimmingRule)
    variables = model.trainable_variables
    gammas = {id(v) for v in slimming.gammas(model)}
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=tuple(v.shape)).astype("float32") for v in variables]
    out = rule(grads, variables)
    for g, v, o in zip(grads, variables, out):
        want = g + s * np.sign(_np(v)) if id(v) in gammas else g  # other gradients untouched
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-6, atol=1e-7)


def _loss_gradients(model, x, y):
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return dict(zip([v.path for v in model.trainable_variables],
                    tape.gradient(loss, model.trainable_variables)))


@pytest.mark.parametrize("path", ["fit", "trainer"])
def test_one_sgd_step_with_the_rule_matches_the_hand_computed_update(path):
    model = _small_vgg(seed=4)
    for gamma in slimming.gammas(model):  # mixed signs, so sign(gamma) matters
        value = _np(gamma)
        gamma.assign(value * np.where(np.arange(len(value)) % 2, -1.0, 1.0).astype("float32"))
    x, y = _x(model, 8, seed=5), np.arange(8) % 10
    s, lr = 0.05, 0.1
    grads = _loss_gradients(copy_model(model), x, y)
    before = {v.path: _np(v) for v in slimming.gammas(model)}
    rule = slimming.rule(model, s=s)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if path == "fit":
        model.compile(optimizer=RuleOptimizer(keras.optimizers.SGD(lr), [rule]), loss=loss)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    else:
        Trainer(model, keras.optimizers.SGD(lr), loss, rules=[rule]).fit(
            x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for gamma in slimming.gammas(model):
        g = np.asarray(grads[gamma.path])
        want = before[gamma.path] - lr * (g + s * np.sign(before[gamma.path]))
        np.testing.assert_allclose(_np(gamma), want, rtol=1e-5, atol=1e-6)


def test_rule_rejects_bad_strength():
    with pytest.raises(KprunError, match="`s`"):
        slimming.rule(_small_vgg(), s=-1.0)
