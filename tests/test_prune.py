"""kprune.prune end to end: targets, scopes, guards, exclusion, errors, equivalence."""

import keras
import numpy as np
import pytest
from keras import layers as L

import archs
import kprune
from kprune.errors import KprunError
from kprune.graph import DependencyGraph
from kprune.pruning import prune_plan
from kprune.surgeon import zero_plan
from kprune.tools.verify import randomize


def _x(model, n=4, seed=0):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _filters(model) -> dict:
    return {l.name: int(getattr(l, "filters", None) or getattr(l, "units", 0))
            for l in model.layers if hasattr(l, "filters") or hasattr(l, "units")}


def _plain():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(16, 3, padding="same", name="c2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(12, activation="relu", name="fc")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(x), name="plain")
    randomize(model, seed=0)
    return model


# Equivalence and the caller's model ---------------------------------------------
@pytest.mark.parametrize("criterion, scope", [("l1", "local"), ("fpgm", "global"),
                                              ("taylor", "global")])
def test_pruned_resnet_equals_zero_reference(criterion, scope):
    model = archs.resnet_basic()
    randomize(model, seed=1)
    x = _x(model)
    y = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    weights = [v.numpy().copy() for v in model.weights]
    kwargs = dict(ratio=0.4, criterion=criterion, scope=scope, data=(x, y), loss="mse")
    plan = prune_plan(model, **kwargs)
    small = kprune.prune(model, **kwargs)
    assert plan and small.count_params() < model.count_params()
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(zero_plan(model, plan)(x)),
                               rtol=1e-5, atol=1e-5)
    for before, var in zip(weights, model.weights):
        np.testing.assert_array_equal(before, var.numpy())
    assert not set(map(id, small.layers)) & set(map(id, model.layers))


def test_zero_ratio_returns_an_equal_copy():
    model = _plain()
    small = kprune.prune(model, ratio=0.0)
    assert small is not model
    np.testing.assert_allclose(np.asarray(small(_x(model))), np.asarray(model(_x(model))),
                               rtol=1e-6)


def test_nested_model_with_a_data_criterion():
    model = archs.nested()
    randomize(model, seed=2)
    x = _x(model)
    plan = prune_plan(model, ratio=0.5, criterion="mean_activation", data=x)
    small = kprune.prune(model, ratio=0.5, criterion="mean_activation", data=x)
    assert plan
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(zero_plan(model, plan)(x)),
                               rtol=1e-5, atol=1e-5)


# Scopes --------------------------------------------------------------------------
def _skewed():
    """c1 has four near-zero filters; c2's filters are all alike."""
    inp = keras.Input((6, 6, 2))
    c1 = L.Conv2D(8, 1, use_bias=False, name="c1")
    c2 = L.Conv2D(8, 1, use_bias=False, name="c2")
    model = keras.Model(inp, L.Conv2D(2, 1, name="head")(c2(L.ReLU()(c1(inp)))))
    c1.kernel.assign(np.ones((1, 1, 2, 8), "float32") * [0.01, 0.02, 0.03, 0.04, 1, 1, 1, 1])
    c2.kernel.assign(np.ones((1, 1, 8, 8), "float32") * (np.arange(8) + 10.0))
    return model


def test_global_and_local_differ_as_expected():
    model = _skewed()
    graph = DependencyGraph(model)
    g1, g2 = graph.group_of("c1").id, graph.group_of("c2").id
    assert prune_plan(model, ratio=0.25, scope="local") == {g1: [0, 1], g2: [0, 1]}
    assert prune_plan(model, ratio=0.25, scope="global") == {g1: [0, 1, 2, 3]}
    assert _filters(kprune.prune(model, ratio=0.25, scope="global")) == {
        "c1": 4, "c2": 8, "head": 2}


# Guards and exclusion -----------------------------------------------------------
def test_round_to_keeps_multiples():
    model = _plain()
    small = kprune.prune(model, ratio=0.3, round_to=4)
    kept = _filters(small)
    assert kept["c1"] % 4 == 0 and kept["c2"] % 4 == 0 and kept["fc"] % 4 == 0
    assert kept["c1"] < 16 and kept["fc"] < 12


def test_max_ratio_and_min_channels():
    model = _plain()
    assert _filters(kprune.prune(model, ratio=0.95, max_ratio=0.5)) == {
        "c1": 8, "c2": 8, "fc": 6, "head": 3}
    assert _filters(kprune.prune(model, ratio=0.95, min_channels=10)) == {
        "c1": 10, "c2": 10, "fc": 10, "head": 3}
    kept = _filters(kprune.prune(model, ratio=0.99, max_ratio=1.0))
    assert min(kept.values()) >= 1 and kept["c1"] == 1


def test_exclude_by_name_and_class():
    model = _plain()
    # an excluded layer keeps its shape: its input group (c1's) stays whole too
    assert _filters(kprune.prune(model, ratio=0.5, exclude=["c2"])) == {
        "c1": 16, "c2": 16, "fc": 6, "head": 3}
    kept = _filters(kprune.prune(model, ratio=0.5, exclude=[L.Dense]))
    assert kept["fc"] == 12 and kept["c2"] == 16 and kept["c1"] == 8
    assert _filters(kprune.prune(model, ratio=0.5, exclude="BatchNormalization"))["c1"] == 16


def test_config_list_maps_onto_groups():
    model = _plain()
    configs = [{"op_names": ["c2"], "exclude": True},
               {"op_types": ["Conv2D"], "sparsity": 0.5},
               {"op_types": [L.Dense], "sparsity": 0.25}]
    assert _filters(kprune.prune(model, config_list=configs)) == {
        "c1": 8, "c2": 16, "fc": 9, "head": 3}
    only_fc = [{"op_names": ["fc"], "sparsity_per_layer": 0.5}]
    assert _filters(kprune.prune(model, config_list=only_fc)) == {
        "c1": 16, "c2": 16, "fc": 6, "head": 3}


def test_bn_scale_prunes_only_groups_with_a_normalisation():
    model = _plain()
    assert _filters(kprune.prune(model, ratio=0.5, criterion="bn_scale")) == {
        "c1": 8, "c2": 16, "fc": 12, "head": 3}


# Errors -------------------------------------------------------------------------
class _Sub(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = L.Dense(2)

    def call(self, x):
        return self.d(x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of `ratio`, `flops_target`, `params_target`, `latency_target` or "
             "`config_list`; got none"),
    (dict(ratio=0.5, flops_target=0.5), "got ratio, flops_target"),
    (dict(ratio=1.0), "in \\[0, 1\\); got 1.0"),
    (dict(ratio=-0.1), "ratio"),
    (dict(ratio="half"), "ratio"),
    (dict(flops_target=0.0), "in \\(0, 1\\]; got 0.0"),
    (dict(flops_target=1.5), "flops_target"),
    (dict(ratio=0.5, criterion="l3"), "Unknown criterion 'l3'.*valid criteria"),
    (dict(ratio=0.5, scope="layer"), "Unknown scope 'layer'"),
    (dict(ratio=0.5, reduce="median"), "Unknown reduce 'median'"),
    (dict(ratio=0.5, criterion="apoz"), "'apoz' scores activations: pass `data`"),
    (dict(ratio=0.5, exclude=["c9"]), "'c9' is neither a layer name"),
    (dict(ratio=0.5, min_channels=0), "min_channels"),
    (dict(ratio=0.5, round_to=0), "round_to"),
    (dict(ratio=0.5, max_ratio=2), "max_ratio"),
    (dict(config_list=[{"op_types": ["Conv2D"]}]), "config_list\\[0\\] needs a 'sparsity'"),
    (dict(config_list=[{"sparsity": 0.5}]), "config_list\\[0\\] selects no layer"),
    (dict(config_list=[{"op_names": ["c1"], "sparsity": 0.5, "total": 1}]), "unknown keys"),
    (dict(config_list=[{"op_names": ["c1"], "sparsity": 0.5}], scope="global"), "scope='local'"),
])
def test_bad_input_raises_a_clear_error(kwargs, message):
    with pytest.raises(KprunError, match=message):
        kprune.prune(_plain(), **kwargs)


def test_subclassed_model_is_refused():
    model = _Sub()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(KprunError, match="subclassed"):
        kprune.prune(model, ratio=0.5)


# FLOPs target ------------------------------------------------------------------
def _wide_resnet():
    inp = keras.Input((8, 8, 3))
    x = archs.conv_bn(inp, 32)
    for filters, stride in ((32, 1), (48, 2)):
        y = archs.conv_bn(x, filters, strides=stride)
        y = archs.conv_bn(y, filters, act=False)
        if stride != 1:
            x = archs.conv_bn(x, filters, kernel=1, strides=stride, act=False)
        x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(3)(x), name="wide_resnet")
    randomize(model, seed=3)
    return model


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_flops_target_is_met_closely(scope, target):
    from kprune.profile import profile

    model = _wide_resnet()
    base = profile(model).macs
    small = kprune.prune(model, flops_target=target, scope=scope)
    share = profile(small).macs / base
    assert share <= target
    assert share >= target - 0.03


def test_flops_target_result_equals_zero_reference():
    model = _wide_resnet()
    x = _x(model)
    plan = prune_plan(model, flops_target=0.5, criterion="l2", scope="global", round_to=4)
    small = kprune.prune(model, flops_target=0.5, criterion="l2", scope="global", round_to=4)
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(zero_plan(model, plan)(x)),
                               rtol=1e-5, atol=1e-5)
    assert all(l.filters % 4 == 0 for l in small.layers if isinstance(l, L.Conv2D))


def test_unreachable_flops_target_is_refused():
    with pytest.raises(KprunError, match="cannot reach 10.0% of its MACs"):
        kprune.prune(_wide_resnet(), flops_target=0.1, max_ratio=0.5)


def test_flops_target_one_keeps_everything():
    model = _plain()
    assert _filters(kprune.prune(model, flops_target=1.0)) == _filters(model)


@pytest.mark.parametrize("family", ["resnet_bottleneck", "mobilenet_v2", "densenet", "resnext",
                                    "xception", "vgg", "nested", "conv1d_net"])
def test_plan_macs_equals_the_profile_of_the_pruned_model(family):
    from kprune.profile import profile
    from kprune.pruning import plan_macs
    from kprune.tools.verify import random_plan

    model = archs.FAMILIES[family]()
    graph = DependencyGraph(model)
    plan = random_plan(graph, 0.5, seed=4)
    assert plan_macs(graph, {}) == profile(model).macs
    assert plan_macs(graph, plan) == profile(kprune.apply_plan(model, plan, graph)).macs


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_flops_target_search_shows_progress_only_when_verbose(verbose, capsys):
    model = _wide_resnet()
    quiet = kprune.prune(model, flops_target=0.5)
    small = kprune.prune(model, flops_target=0.5, verbose=verbose)
    out = capsys.readouterr().out
    assert [l.get_config() for l in small.layers] == [l.get_config() for l in quiet.layers]
    if verbose == 0:
        assert out == ""
    elif verbose == 1:  # one bar over the bisection, then the plan
        assert "searching the ratio for the MACs target" in out and "step" in out
        assert "kept:" in out and "keeps" not in out
        assert "pruning model 'wide_resnet'" in out
    else:  # every step on a line of its own
        steps = [line for line in out.splitlines() if " of the MACs" in line]
        assert len(steps) >= 3 and all(line.startswith("kprune: ratio ") for line in steps)
