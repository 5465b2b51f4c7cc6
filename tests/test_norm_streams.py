"""Normalisation streams: LayerNorm, RMSNorm and GroupNorm pruned against numpy references."""

import keras
import numpy as np
import pytest

import kprune
from kprune.errors import KprunError
from kprune.graph import DependencyGraph, register_rule
from kprune.graph.norms import GroupNormRule
from kprune.surgeon import apply_plan, zero_plan
from kprune.tools.verify import randomize

L = keras.layers
D = 8
DROP = [1, 4, 6]


def _x(shape, n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + tuple(shape)).astype("float32")


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def _dense(model, name, x, keep_in=None, keep_out=None):
    """`model`'s Dense `name` on `x`, with its kernel rows and columns sliced."""
    layer = model.get_layer(name)
    kernel, bias = _np(layer.kernel), _np(layer.bias)
    if keep_in is not None:
        kernel = kernel[keep_in]
    if keep_out is not None:
        kernel, bias = kernel[:, keep_out], bias[keep_out]
    return x @ kernel + bias


def _vector(layer, attr, keep, axis=-1):
    value = getattr(layer, attr, None)
    if value is None or isinstance(value, bool):
        return None
    return np.take(_np(value), keep, axis=axis)


def _layer_norm(layer, x, keep):
    """LayerNormalization of `x` (already the kept channels) with sliced gamma and beta."""
    axes = tuple(layer.axis)
    gamma, beta = _vector(layer, "gamma", keep), _vector(layer, "beta", keep)
    if layer.rms_scaling:
        out = x / np.sqrt(x.var(axis=axes, keepdims=True) + layer.epsilon)
        return out * gamma if gamma is not None else out
    out = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(
        x.var(axis=axes, keepdims=True) + layer.epsilon)
    if gamma is not None:
        out = out * gamma
    return out + beta if beta is not None else out


def _rms_norm(layer, x, keep):
    rms = np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + layer.epsilon)
    return x / rms * _vector(layer, "scale", keep)


def _kept(drop, size=D):
    return np.setdiff1d(np.arange(size), drop)


# --------------------------------------------------------------------------
# LayerNormalization and RMSNormalization on a Dense stream
# --------------------------------------------------------------------------
def _chain(norm):
    inp = keras.Input((5,))
    x = L.Dense(D, name="d")(inp)
    x = norm(name="norm")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(x))
    randomize(model, seed=1)
    return model


def _residual(norm):
    inp = keras.Input((5,))
    x = L.Dense(D, name="embed")(inp)
    y = norm(name="norm1")(x)
    y = L.Dense(D, name="mlp")(y)
    x = L.Add()([x, y])
    out = L.Dense(2, name="head")(norm(name="norm2")(x))
    model = keras.Model(inp, out)
    randomize(model, seed=2)
    return model


LAYER_NORMS = {
    "default": lambda **kw: L.LayerNormalization(**kw),
    "no_center": lambda **kw: L.LayerNormalization(center=False, **kw),
    "no_scale": lambda **kw: L.LayerNormalization(scale=False, **kw),
    "bare": lambda **kw: L.LayerNormalization(center=False, scale=False, **kw),
    "rms_scaling": lambda **kw: L.LayerNormalization(rms_scaling=True, **kw),
}


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`:UserWarning")
@pytest.mark.parametrize("variant", sorted(LAYER_NORMS))
def test_layer_norm_stream_matches_numpy_over_kept_channels(variant):
    model = _chain(LAYER_NORMS[variant])
    graph = DependencyGraph(model)
    group = graph.group_of("d")
    assert group.prunable and group.approximate
    assert group.notes[0].startswith("statistics of 'norm' (LayerNormalization")
    assert "taken over the kept channels" in group.notes[0]
    small = apply_plan(model, {group.id: DROP}, graph)
    assert small.get_layer("norm").output.shape[-1] == D - len(DROP)
    x, keep = _x((5,)), _kept(DROP)
    h = _dense(model, "d", x, keep_out=keep)
    want = _dense(model, "head", _layer_norm(model.get_layer("norm"), h, keep), keep_in=keep)
    np.testing.assert_allclose(_np(small(x)), want, rtol=1e-4, atol=1e-5)


def test_approximate_false_blocks_the_layer_norm_stream():
    model = _chain(L.LayerNormalization)
    group = DependencyGraph(model, approximate=False).group_of("d")
    assert not group.prunable and group.approximate
    assert "'norm' (LayerNormalization)" in group.reason and "approximate=False" in group.reason
    with pytest.raises(KprunError, match="cannot be pruned"):
        apply_plan(model, {group.id: DROP}, DependencyGraph(model, approximate=False))


def test_pruned_layer_norm_stream_is_not_the_masked_model():
    """The statistics change: apply_plan differs from zero_plan (why the group is approximate)."""
    model = _chain(L.LayerNormalization)
    graph = DependencyGraph(model)
    plan = {graph.group_of("d").id: DROP}
    x = _x((5,))
    assert not np.allclose(_np(apply_plan(model, plan, graph)(x)),
                           _np(zero_plan(model, plan, graph)(x)), atol=1e-4)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_residual_stream_through_two_norms_matches_numpy(norm):
    cls = L.LayerNormalization if norm == "layer" else L.RMSNormalization
    reference = _layer_norm if norm == "layer" else _rms_norm
    model = _residual(cls)
    graph = DependencyGraph(model)
    group = graph.group_of("embed")
    assert group.prunable and group.approximate and len(group.notes) == 2
    assert {m.name for m in group.producers} == {"embed", "mlp"}
    assert {m.name for m in group.params} == {"norm1", "norm2"}
    small = apply_plan(model, {group.id: DROP}, graph)
    x, keep = _x((5,)), _kept(DROP)
    s = _dense(model, "embed", x, keep_out=keep)
    y = reference(model.get_layer("norm1"), s, keep)
    s = s + _dense(model, "mlp", y, keep_in=keep, keep_out=keep)
    want = _dense(model, "head", reference(model.get_layer("norm2"), s, keep), keep_in=keep)
    np.testing.assert_allclose(_np(small(x)), want, rtol=1e-4, atol=1e-5)


def test_rms_norm_stream_matches_numpy():
    model = _chain(L.RMSNormalization)
    graph = DependencyGraph(model)
    group = graph.group_of("d")
    assert group.prunable and group.approximate
    assert group.notes == ["statistics of 'norm' (RMSNormalization) are taken over the kept "
                           "channels"]
    assert not DependencyGraph(model, approximate=False).group_of("d").prunable
    small = apply_plan(model, {group.id: DROP}, graph)
    assert small.get_layer("norm").scale.shape == (D - len(DROP),)
    x, keep = _x((5,)), _kept(DROP)
    h = _dense(model, "d", x, keep_out=keep)
    want = _dense(model, "head", _rms_norm(model.get_layer("norm"), h, keep), keep_in=keep)
    np.testing.assert_allclose(_np(small(x)), want, rtol=1e-4, atol=1e-5)


def test_layer_norm_over_several_axes_slices_gamma_on_the_channels():
    inp = keras.Input((3, 5))
    x = L.Dense(D, name="d")(inp)
    x = L.LayerNormalization(axis=[1, 2], name="norm")(x)
    model = keras.Model(inp, L.Flatten()(L.Dense(2, name="head")(x)))
    randomize(model, seed=3)
    graph = DependencyGraph(model)
    group = graph.group_of("d")
    assert group.approximate and "over axes [1, 2]" in group.notes[0]
    small = apply_plan(model, {group.id: DROP}, graph)
    assert small.get_layer("norm").gamma.shape == (3, D - len(DROP))
    x, keep = _x((3, 5)), _kept(DROP)
    h = _dense(model, "d", x, keep_out=keep)
    want = _dense(model, "head", _layer_norm(model.get_layer("norm"), h, keep), keep_in=keep)
    np.testing.assert_allclose(_np(small(x)), want.reshape(len(x), -1), rtol=1e-4, atol=1e-5)


def test_layer_norm_over_other_axes_passes_channels_exactly():
    """LayerNorm over the sequence axis, as long as the channels: gamma is left whole."""
    inp = keras.Input((D, 5))
    x = L.Dense(D, name="d")(inp)
    x = L.LayerNormalization(axis=1, name="norm")(x)
    model = keras.Model(inp, L.Flatten()(L.Dense(2, name="head")(x)))
    randomize(model, seed=4)
    graph = DependencyGraph(model)
    group = graph.group_of("d")
    assert group.prunable and not group.approximate and not group.notes
    assert "norm" not in [m.name for m in group.params]
    plan = {group.id: DROP}
    small = apply_plan(model, plan, graph)
    assert small.get_layer("norm").gamma.shape == (D,)
    x = _x((D, 5))
    np.testing.assert_allclose(_np(small(x)), _np(zero_plan(model, plan, graph)(x)),
                               rtol=1e-5, atol=1e-5)


def test_layer_norm_with_mixed_sign_axes_is_blocked():
    inp = keras.Input((3, 5))
    x = L.Dense(D, name="d")(inp)
    x = L.LayerNormalization(axis=[1, -1], name="norm")(x)
    model = keras.Model(inp, L.Flatten()(L.Dense(2)(x)))
    group = DependencyGraph(model).group_of("d")
    assert not group.prunable and group.blocker.name == "norm"
    assert "negative and positive" in group.reason


# --------------------------------------------------------------------------
# GroupNormalization
# --------------------------------------------------------------------------
def _group_norm_model(groups=2, channels=D):
    inp = keras.Input((3, 3, 2))
    x = L.Conv2D(channels, 1, name="conv")(inp)
    x = L.GroupNormalization(groups=groups, name="gn")(x)
    out = L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    randomize(model, seed=5)
    return model


def _group_norm_reference(model, x, keep_channels, groups):
    """conv (1x1) -> GroupNorm with `groups` groups over the kept channels -> pool -> head."""
    conv, gn = model.get_layer("conv"), model.get_layer("gn")
    kernel = _np(conv.kernel)[0, 0][:, keep_channels]
    h = x @ kernel + _np(conv.bias)[keep_channels]
    n, hh, ww, c = h.shape
    g = h.reshape(n, hh, ww, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    h = ((g - mean) / np.sqrt(var + gn.epsilon)).reshape(n, hh, ww, c)
    h = h * _np(gn.gamma)[keep_channels] + _np(gn.beta)[keep_channels]
    return _dense(model, "head", h.mean(axis=(1, 2)), keep_in=keep_channels)


@pytest.fixture
def channels_mode():
    register_rule(L.GroupNormalization, GroupNormRule(mode="channels"))
    try:
        yield
    finally:
        register_rule(L.GroupNormalization, GroupNormRule())


def test_group_norm_groups_mode_is_exact_and_matches_numpy():
    model = _group_norm_model(groups=4)
    graph = DependencyGraph(model)
    group = graph.group_of("conv")
    assert group.prunable and group.size == 4 and not group.approximate
    plan = {group.id: [1, 3]}  # normalisation groups 1 and 3: channels 2, 3, 6, 7
    small = apply_plan(model, plan, graph)
    assert small.get_layer("gn").groups == 2
    x = _x((3, 3, 2))
    np.testing.assert_allclose(_np(small(x)), _np(zero_plan(model, plan, graph)(x)),
                               rtol=1e-5, atol=1e-5)
    want = _group_norm_reference(model, x, np.array([0, 1, 4, 5]), groups=2)
    np.testing.assert_allclose(_np(small(x)), want, rtol=1e-4, atol=1e-5)
    assert DependencyGraph(model, approximate=False).group_of("conv").prunable


def test_group_norm_channels_mode_removes_evenly_and_matches_numpy(channels_mode):
    model = _group_norm_model(groups=2)
    graph = DependencyGraph(model)
    group = graph.group_of("conv")
    assert group.prunable and group.size == D and group.approximate
    assert group.notes == ["statistics of 'gn' (GroupNormalization) are taken over the kept "
                           "channels of each group"]
    assert not DependencyGraph(model, approximate=False).group_of("conv").prunable
    with pytest.raises(KprunError, match="same number"):
        apply_plan(model, {group.id: [0, 1]}, graph)  # both from the first group
    small = apply_plan(model, {group.id: [0, 3, 5, 6]}, graph)
    assert small.get_layer("gn").groups == 2
    x = _x((3, 3, 2))
    want = _group_norm_reference(model, x, np.array([1, 2, 4, 7]), groups=2)
    np.testing.assert_allclose(_np(small(x)), want, rtol=1e-4, atol=1e-5)


def test_group_norm_channels_mode_with_one_channel_per_group_is_exact(channels_mode):
    model = _group_norm_model(groups=D)
    group = DependencyGraph(model).group_of("conv")
    assert group.prunable and group.size == D and not group.approximate


def test_group_norm_rule_validates_its_mode():
    with pytest.raises(KprunError, match="mode"):
        GroupNormRule(mode="halves")


# --------------------------------------------------------------------------
# ConvNeXt
# --------------------------------------------------------------------------
def test_layer_scale_is_sliced_exactly():
    from keras.src.applications.convnext import LayerScale

    inp = keras.Input((5,))
    x = L.Dense(D, name="d")(inp)
    x = LayerScale(0.5, D, name="scale")(x)
    model = keras.Model(inp, L.Dense(3)(x))
    randomize(model, seed=6)
    graph = DependencyGraph(model)
    group = graph.group_of("d")
    assert group.prunable and not group.approximate
    plan = {group.id: DROP}
    small = apply_plan(model, plan, graph)
    assert small.get_layer("scale").projection_dim == D - len(DROP)
    x = _x((5,))
    np.testing.assert_allclose(_np(small(x)), _np(zero_plan(model, plan, graph)(x)),
                               rtol=1e-5, atol=1e-5)


def test_convnext_streams_prune_to_half_the_macs_and_reload(tmp_path):
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3),
                                            include_top=True, classes=10)
    exact = DependencyGraph(model, approximate=False)
    approximate = DependencyGraph(model)
    assert len(approximate.prunable_groups()) > len(exact.prunable_groups())
    assert "LayerScale" not in approximate.blockers()
    assert all(g.notes for g in approximate.prunable_groups() if g.approximate)
    small = kprune.prune(model, flops_target=0.5)
    assert kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
    assert "LayerScale" not in DependencyGraph(small).blockers()
    path = tmp_path / "convnext.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _x((32, 32, 3), n=2)
    np.testing.assert_allclose(_np(loaded(x)), _np(small(x)), rtol=1e-6, atol=1e-6)
