"""Every criterion on a hand-made case whose answer is known."""

import keras
import numpy as np
import pytest
from keras import layers as L

from kprune import criteria
from kprune.errors import KprunError
from kprune.graph import DependencyGraph


def _built(layer, input_shape):
    layer.build(input_shape)
    return layer


def _set(layer, **values):
    for name, value in values.items():
        getattr(layer, name).assign(np.asarray(value, dtype="float32"))
    return layer


V = np.array([1.0, -2.0, 3.0, 0.5])


# Weight criteria on single layers -----------------------------------------
@pytest.mark.parametrize("make, shape, kernel_shape", [
    (lambda: L.Conv1D(4, 3), (None, 8, 2), (3, 2, 4)),
    (lambda: L.Conv2D(4, 2), (None, 8, 8, 3), (2, 2, 3, 4)),
    (lambda: L.Conv3D(4, 2), (None, 4, 4, 4, 2), (2, 2, 2, 2, 4)),
    (lambda: L.Dense(4), (None, 5), (5, 4)),
    (lambda: L.Conv2D(4, 2, groups=2), (None, 8, 8, 6), (2, 2, 3, 4)),
])
def test_l1_l2_of_constant_filters(make, shape, kernel_shape):
    layer = _built(make(), shape)
    kernel = np.ones(kernel_shape) * V  # output channel j is the constant V[j]
    _set(layer, kernel=kernel)
    per_filter = int(np.prod(kernel_shape[:-1]))
    np.testing.assert_allclose(criteria.l1(layer), per_filter * np.abs(V), rtol=1e-6)
    np.testing.assert_allclose(criteria.l2(layer), np.sqrt(per_filter) * np.abs(V), rtol=1e-6)


def test_conv_transpose_scores_the_output_axis():
    layer = _built(L.Conv2DTranspose(4, 2), (None, 4, 4, 3))
    assert tuple(layer.kernel.shape) == (2, 2, 4, 3)  # (..., out, in)
    _set(layer, kernel=np.ones((2, 2, 4, 3)) * V[:, None])
    np.testing.assert_allclose(criteria.l1(layer), 12 * np.abs(V), rtol=1e-6)


def test_depthwise_scores_every_output_position():
    layer = _built(L.DepthwiseConv2D(3, depth_multiplier=2), (None, 6, 6, 2))
    per = np.array([[1.0, 2.0], [3.0, 4.0]])  # (in channel, multiplier)
    _set(layer, kernel=np.ones((3, 3, 2, 2)) * per)
    # output position c * multiplier + m carries per[c, m]
    np.testing.assert_allclose(criteria.l1(layer), 9 * per.reshape(-1), rtol=1e-6)


def test_separable_conv_scores_its_pointwise_kernel():
    layer = _built(L.SeparableConv2D(4, 3, depth_multiplier=2), (None, 6, 6, 3))
    _set(layer, depthwise_kernel=np.random.default_rng(0).normal(size=(3, 3, 3, 2)),
         pointwise_kernel=np.ones((1, 1, 6, 4)) * V)
    np.testing.assert_allclose(criteria.l2(layer), np.sqrt(6) * np.abs(V), rtol=1e-6)


def test_layer_without_filters_is_refused():
    with pytest.raises(KprunError, match="bn.*BatchNormalization"):
        criteria.l1(_built(L.BatchNormalization(name="bn"), (None, 4)))


def test_fpgm_scores_the_geometric_median_lowest():
    layer = _built(L.Dense(5), (None, 2))
    points = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
    _set(layer, kernel=points.T)  # filter j is the column points[j]
    expected = [np.linalg.norm(points - p, axis=1).sum() for p in points]
    scores = criteria.fpgm(layer)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert int(np.argmin(scores)) == 0
    np.testing.assert_allclose(scores[0], 4.0, rtol=1e-6)


def test_orthogonality_penalises_correlated_filters():
    layer = _built(L.Dense(3), (None, 3))
    w = np.array([[1, 0, 0], [2, 0, 0], [0, 1, 0]], dtype=float)  # filters as rows
    _set(layer, kernel=w.T)
    # filters 0 and 1 are parallel (overlap 1 with one of two others), 2 is orthogonal
    np.testing.assert_allclose(criteria.orthogonality(layer), [0.5, 0.5, 1.0], atol=1e-6)


def test_orthogonality_ignores_the_scale_of_a_layer():
    rng = np.random.default_rng(1)
    small = _built(L.Conv2D(6, 3), (None, 8, 8, 4))
    large = _built(L.Conv2D(6, 3), (None, 8, 8, 4))
    kernel = rng.normal(size=(3, 3, 4, 6))
    _set(small, kernel=kernel * 1e-3)
    _set(large, kernel=kernel * 1e3)
    np.testing.assert_allclose(criteria.orthogonality(small), criteria.orthogonality(large),
                               rtol=1e-5)
    assert (criteria.orthogonality(small) >= 0).all() and (criteria.orthogonality(small) <= 1).all()


def test_bn_scale_is_the_absolute_gamma():
    bn = _set(_built(L.BatchNormalization(), (None, 3)), gamma=[-3.0, 0.5, 2.0])
    np.testing.assert_allclose(criteria.bn_scale(bn), [3.0, 0.5, 2.0])
    with pytest.raises(KprunError, match="no_gamma.*gamma"):
        criteria.bn_scale(_built(L.BatchNormalization(scale=False, name="no_gamma"), (None, 3)))


def test_random_is_seeded():
    layer = _built(L.Dense(7), (None, 2))
    a, b = criteria.random(layer, seed=3), criteria.random(layer, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (7,)
    assert not np.array_equal(a, criteria.random(layer, seed=4))


# Data criteria ------------------------------------------------------------
def _relu_model():
    inp = keras.Input((4, 4, 3))
    conv = L.Conv2D(3, 1, use_bias=False, name="conv")
    out = L.ReLU(name="relu")(conv(inp))
    model = keras.Model(inp, L.Conv2D(2, 1, name="head")(out))
    conv.kernel.assign(np.eye(3, dtype="float32")[None, None])
    return model


def _pattern(n=6):
    """Channel 0 always negative, channel 1 negative on half the samples, 2 positive."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, size=(n, 4, 4, 3)).astype("float32")
    x[..., 0] *= -1
    x[: n // 2, ..., 1] *= -1
    return x


def test_apoz_counts_zeros_after_relu():
    x = _pattern()
    scores = criteria.apoz(_relu_model(), "relu", x, batch_size=4)
    np.testing.assert_allclose(scores, (np.maximum(x, 0) != 0).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(scores, [0.0, 0.5, 1.0])


def test_mean_activation_after_relu():
    x = _pattern()
    scores = criteria.mean_activation(_relu_model(), "relu", x, batch_size=4)
    np.testing.assert_allclose(scores, np.maximum(x, 0).mean(axis=(0, 1, 2)), rtol=1e-6)


def _taylor_model(w):
    inp = keras.Input((3,))
    hidden = L.Dense(3, use_bias=False, name="hidden")
    out_layer = L.Dense(1, use_bias=False, name="out")
    model = keras.Model(inp, out_layer(hidden(inp)))
    hidden.kernel.assign(np.eye(3, dtype="float32"))
    out_layer.kernel.assign(np.asarray(w, dtype="float32").reshape(3, 1))
    return model


def test_taylor_is_activation_times_gradient():
    w = np.array([0.5, -1.0, 2.0])
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 3)).astype("float32")
    t = rng.normal(size=(10, 1)).astype("float32")
    model = _taylor_model(w)
    # per-sample squared error: d/da_c = 2 (x.w - t) w_c, activation a = x
    err = x @ w - t[:, 0]
    expected = np.abs(x * (2 * err[:, None] * w[None, :])).mean(axis=0)
    np.testing.assert_allclose(criteria.taylor(model, "hidden", (x, t), loss="mse"),
                               expected, rtol=1e-5)
    # the scores do not depend on how the data is batched
    np.testing.assert_allclose(criteria.taylor(model, "hidden", (x, t), loss="mse", batch_size=3),
                               expected, rtol=1e-5)
    batches = [(x[:4], t[:4]), (x[4:], t[4:])]
    np.testing.assert_allclose(criteria.taylor(model, "hidden", batches, loss="mse"),
                               expected, rtol=1e-5)


def test_taylor_sums_spatial_positions_before_the_absolute_value():
    inp = keras.Input((2, 1, 1))
    conv = L.Conv2D(1, 1, use_bias=False, name="conv")
    model = keras.Model(inp, L.GlobalAveragePooling2D()(conv(inp)))
    conv.kernel.assign(np.ones((1, 1, 1, 1), dtype="float32"))
    x = np.array([[[[1.0]], [[-1.0]]]], dtype="float32")  # a sums to 0 over positions
    t = np.array([[1.0]], dtype="float32")
    # loss (mean(a) - t)^2, gradient equal at both positions: sum(a * g) = 0
    np.testing.assert_allclose(criteria.taylor(model, conv, (x, t), loss="mse"), [0.0], atol=1e-7)


def test_taylor_uses_the_compiled_loss_and_needs_one():
    w = np.array([0.5, -1.0, 2.0])
    x = np.ones((2, 3), dtype="float32")
    t = np.zeros((2, 1), dtype="float32")
    model = _taylor_model(w)
    with pytest.raises(KprunError, match="taylor.*loss"):
        criteria.taylor(model, "hidden", (x, t))
    with pytest.raises(KprunError, match="targets"):
        criteria.taylor(model, "hidden", x, loss="mse")
    model.compile(loss="mse")
    np.testing.assert_allclose(criteria.taylor(model, "hidden", (x, t)),
                               criteria.taylor(model, "hidden", (x, t), loss="mse"))


def test_data_criteria_need_data_and_a_known_layer():
    model = _relu_model()
    with pytest.raises(KprunError, match="needs `data`"):
        criteria.apoz(model, "relu", None)
    with pytest.raises(KprunError, match="'nope' is not a layer"):
        criteria.apoz(model, "nope", _pattern())


# Registry -----------------------------------------------------------------
def test_registry():
    assert criteria.get_criterion("fpgm").fn is criteria.fpgm
    assert set(criteria.available_criteria()) >= {
        "l1", "l2", "fpgm", "bn_scale", "taylor", "apoz", "mean_activation",
        "orthogonality", "random"}
    with pytest.raises(KprunError, match="Unknown criterion 'l3'.*fpgm.*l1"):
        criteria.get_criterion("l3")


# Group scores -------------------------------------------------------------
def _residual_model():
    inp = keras.Input((4, 4, 2))
    a = L.Conv2D(4, 1, use_bias=False, name="a")(inp)
    b = L.Conv2D(4, 1, use_bias=False, name="b")(inp)
    x = L.Add()([a, b])
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    model = keras.Model(inp, L.Conv2D(3, 1, name="head")(x))
    model.get_layer("a").kernel.assign(np.ones((1, 1, 2, 4), "float32") * [1, 2, 3, 4])
    model.get_layer("b").kernel.assign(np.ones((1, 1, 2, 4), "float32") * [8, 2, 4, 1])
    model.get_layer("bn").gamma.assign(np.array([0.5, -2.0, 1.0, 0.25], "float32"))
    return model


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min", "prod"])
def test_group_reduces_normalised_member_scores(reduce):
    model = _residual_model()
    graph = DependencyGraph(model)
    group = graph.group_of("a")
    assert {m.name for m in group.producers} == {"a", "b"}
    rows = []
    for name in ("a", "b"):
        member = next(m for m in group.producers if m.name == name)
        s = np.empty(group.size)
        s[member.index] = criteria.l1(member.layer)
        rows.append(s / s.max())
    expected = getattr(np, reduce)(np.stack(rows), axis=0)
    np.testing.assert_allclose(
        criteria.group_scores(model, group, "l1", reduce=reduce, graph=graph), expected, rtol=1e-6)


def test_group_bn_scale_reads_the_normalisation_layer():
    model = _residual_model()
    gamma = np.abs([0.5, -2.0, 1.0, 0.25])
    np.testing.assert_allclose(criteria.group_scores(model, DependencyGraph(model).group_of("a"),
                                                     "bn_scale"), gamma / gamma.max())


def test_group_without_normalisation_has_no_bn_scale():
    model = _relu_model()
    graph = DependencyGraph(model)
    with pytest.raises(KprunError, match="bn_scale.*nothing to score.*conv"):
        criteria.group_scores(model, graph.group_of("conv"), "bn_scale", graph=graph)
    with pytest.raises(KprunError, match="Unknown reduce 'median'"):
        criteria.group_scores(model, graph.group_of("conv"), "l1", reduce="median", graph=graph)


def test_group_includes_depthwise_filters():
    inp = keras.Input((6, 6, 2))
    conv = L.Conv2D(3, 1, use_bias=False, name="conv")
    dw = L.DepthwiseConv2D(3, use_bias=False, name="dw")
    model = keras.Model(inp, L.Conv2D(2, 1, name="head")(dw(conv(inp))))
    conv.kernel.assign(np.ones((1, 1, 2, 3), "float32") * [1, 2, 4])
    dw.kernel.assign(np.ones((3, 3, 3, 1), "float32") * np.array([3, 2, 1.0])[:, None])
    expected = (np.array([1, 2, 4]) / 4 + np.array([3, 2, 1]) / 3) / 2
    np.testing.assert_allclose(
        criteria.group_scores(model, DependencyGraph(model).group_of("conv"), "l1"), expected,
        rtol=1e-6)


def test_group_data_scores_average_flattened_positions():
    inp = keras.Input((2, 2, 3))
    conv = L.Conv2D(3, 1, use_bias=False, activation="relu", name="conv")
    x = L.Flatten()(conv(inp))
    model = keras.Model(inp, L.Dense(2, name="head")(x))
    conv.kernel.assign(np.eye(3, dtype="float32")[None, None])
    x = _pattern()[:, :2, :2, :]
    graph = DependencyGraph(model)
    group = graph.group_of("conv")
    expected = np.maximum(x, 0).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(criteria.group_scores(model, group, "mean_activation", data=x,
                                                     graph=graph), expected / expected.max(),
                               rtol=1e-6)
    np.testing.assert_allclose(criteria.group_scores(model, group, "apoz", data=x, graph=graph),
                               [0.0, 0.5, 1.0])


def test_group_data_scores_inside_a_nested_model():
    inner_in = keras.Input((4, 4, 3))
    conv = L.Conv2D(3, 1, use_bias=False, name="inner_conv")
    inner = keras.Model(inner_in, L.ReLU(name="inner_relu")(conv(inner_in)), name="inner")
    conv.kernel.assign(np.eye(3, dtype="float32")[None, None] * [1.0, 2.0, 3.0])
    inp = keras.Input((4, 4, 3))
    model = keras.Model(inp, L.Conv2D(2, 1, name="head")(inner(inp)))
    x = np.abs(_pattern())
    expected = x.mean(axis=(0, 1, 2)) * [1.0, 2.0, 3.0]
    graph = DependencyGraph(model)
    scores = criteria.group_scores(model, graph.group_of("inner_conv"), "mean_activation",
                                   data=x, graph=graph)
    np.testing.assert_allclose(scores, expected / expected.max(), rtol=1e-5)
    np.testing.assert_allclose(criteria.mean_activation(model, "inner_relu", x), expected,
                               rtol=1e-5)


def test_group_random_is_seeded_per_group():
    model = _residual_model()
    graph = DependencyGraph(model)
    a = criteria.score_groups(model, criterion="random", seed=0, graph=graph)
    b = criteria.score_groups(model, criterion="random", seed=0, graph=graph)
    assert a.keys() == b.keys() and a
    for gid in a:
        np.testing.assert_array_equal(a[gid], b[gid])
