"""Attention heads, per-head widths and einsum projections prune exactly."""

import keras
import numpy as np
import pytest

import kprune
from kprune.graph import DependencyGraph
from kprune.pruning import plan_macs
from kprune.surgeon import apply_plan, zero_plan

L = keras.layers


def _even_drop(group, per_part: int = 1) -> list:
    """`per_part` channels from every partition (head), else every third channel."""
    if group.partitions:
        part = group.partitions[0]
        return [int(i) for p in np.unique(part[part >= 0]) for i in np.flatnonzero(part == p)[:per_part]]
    return list(range(0, group.size, 3))[: max(1, group.size // 3)]


def _assert_same(model, plan, graph, x, atol=1e-5):
    small, ref = apply_plan(model, plan, graph), zero_plan(model, plan, graph)
    np.testing.assert_allclose(small.predict(x, verbose=0), ref.predict(x, verbose=0),
                               atol=atol, rtol=1e-5)
    return small


def _self_and_cross():
    inp, ctx = keras.Input((6, 10)), keras.Input((5, 7))
    x = L.Dense(12, name="embed")(inp)
    c = L.Dense(9, name="cembed")(ctx)
    a = L.MultiHeadAttention(4, 5, value_dim=3, name="mha")(x, x)
    b = L.MultiHeadAttention(3, 4, use_bias=False, name="cross")(a, c)
    return keras.Model([inp, ctx], L.Dense(4, name="head")(b))


def _inputs(model, n=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(n,) + tuple(t.shape[1:])).astype("float32") for t in model.inputs]
    return arrays[0] if len(arrays) == 1 else arrays


def test_every_attention_group_prunes_exactly():
    model = _self_and_cross()
    graph = DependencyGraph(model)
    slots = {(m.name, m.slot) for g in graph.prunable_groups() for m in g.producers}
    assert {("mha", "heads"), ("mha", "key_dim"), ("mha", "value_dim"), ("mha", "output"),
            ("cross", "heads"), ("cross", "output"), ("embed", None)} <= slots
    x = _inputs(model)
    for group in graph.prunable_groups():
        _assert_same(model, {group.id: _even_drop(group)}, graph, x)


def test_all_groups_at_once_shrink_the_config_and_reload(tmp_path):
    model = _self_and_cross()
    graph = DependencyGraph(model)
    plan = {g.id: _even_drop(g) for g in graph.prunable_groups()}
    small = _assert_same(model, plan, graph, _inputs(model))
    mha = small.get_layer("mha")
    assert (mha.num_heads, mha.key_dim, mha.value_dim) == (3, 4, 2)
    assert small.get_layer("cross").num_heads == 2
    path = tmp_path / "small.keras"
    small.save(path)
    again = keras.models.load_model(path, safe_mode=True)
    x = _inputs(model, seed=1)
    np.testing.assert_allclose(again.predict(x, verbose=0), small.predict(x, verbose=0), atol=1e-6)
    assert kprune.profile(small).macs == plan_macs(graph, plan) < kprune.profile(model).macs


def test_removed_heads_equal_their_outputs_zeroed_by_hand():
    inp = keras.Input((5, 8))
    mha = L.MultiHeadAttention(4, 3, name="mha")
    model = keras.Model(inp, mha(inp, inp))
    graph = DependencyGraph(model, prune_outputs=True)
    heads = next(g for g in graph.groups if any(m.slot == "heads" for m in g.producers))
    small = apply_plan(model, {heads.id: [1, 2]}, graph)
    x = _inputs(model)
    # The layer by hand, with heads 1 and 2 left out of the output projection.
    w = {v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v) for v in mha.weights}
    q = np.einsum("btd,dhk->bthk", x, w["query/kernel"]) + w["query/bias"]
    k = np.einsum("btd,dhk->bthk", x, w["key/kernel"]) + w["key/bias"]
    v = np.einsum("btd,dhk->bthk", x, w["value/kernel"]) + w["value/bias"]
    s = np.einsum("bthk,bshk->bhts", q / np.sqrt(3.0), k)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", a, v)
    keep = [0, 3]
    expected = np.einsum("bthk,hkd->btd", o[:, :, keep], w["attention_output/kernel"][keep])
    np.testing.assert_allclose(small.predict(x, verbose=0), expected + w["attention_output/bias"],
                               atol=1e-5)
    assert small.get_layer("mha").num_heads == 2


def test_grouped_query_attention_removes_key_value_heads():
    inp = keras.Input((6, 8))
    x = L.Dense(8, name="embed")(inp)
    y = L.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2,
                              name="gqa")(x, x)
    y = L.Add()([x, y])
    model = keras.Model(inp, L.Dense(3)(y))
    graph = DependencyGraph(model)
    x_ = _inputs(model)
    for group in graph.prunable_groups():
        _assert_same(model, {group.id: _even_drop(group)}, graph, x_)
    kv = next(g for g in graph.groups if any(m.slot == "kv_heads" for m in g.producers))
    small = apply_plan(model, {kv.id: [0]}, graph)
    gqa = small.get_layer("gqa")
    assert (gqa.num_query_heads, gqa.num_key_value_heads) == (2, 1)
    assert kprune.profile(small).macs == plan_macs(graph, {kv.id: [0]})


def test_einsum_dense_mlp_prunes_its_hidden_units():
    inp = keras.Input((6, 8))
    h = L.EinsumDense("abc,cd->abd", output_shape=(None, 16), bias_axes="d", activation="gelu",
                      name="fc1")(inp)
    out = L.EinsumDense("abd,de->abe", output_shape=(None, 8), name="fc2")(h)
    model = keras.Model(inp, out)
    graph = DependencyGraph(model)
    group = graph.group_of("fc1")
    assert group.prunable and group.size == 16
    small = _assert_same(model, {group.id: [0, 5, 9, 15]}, graph, _inputs(model))
    assert tuple(small.get_layer("fc1").kernel.shape) == (8, 12)
    assert kprune.criteria.group_scores(model, group, "l2", graph=graph).shape == (16,)


def test_attention_scores_output_keeps_heads_whole():
    inp = keras.Input((5, 8))
    out, scores = L.MultiHeadAttention(2, 4, name="mha")(inp, inp, return_attention_scores=True)
    model = keras.Model(inp, [L.Dense(2)(out), L.Flatten()(scores)])
    graph = DependencyGraph(model)
    heads = next(g for g in graph.groups if any(m.slot == "heads" for m in g.producers))
    assert not heads.prunable and "attention scores" in heads.reason
    assert graph.group_of("mha").prunable or any(
        g.prunable for g in graph.groups if any(m.slot == "key_dim" for m in g.producers))


def test_an_attention_mask_tensor_is_kept_whole():
    inp = keras.Input((5, 8))
    mask = L.Dense(5, name="mask_maker")(inp)
    out = L.MultiHeadAttention(2, 4, name="mha")(inp, inp, attention_mask=mask)
    model = keras.Model(inp, L.Dense(2)(out))
    group = DependencyGraph(model).group_of("mask_maker")
    assert not group.prunable and "mask" in group.reason


def _tiny_transformer():
    inp = keras.Input((8, 6))
    x = L.Dense(16, name="embed")(inp)
    for i in range(2):
        y = L.MultiHeadAttention(4, 4, name=f"mha{i}")(x, x)
        x = L.Add()([x, y])
        y = L.Dense(32, activation="gelu", name=f"fc{i}a")(x)
        x = L.Add()([x, L.Dense(16, name=f"fc{i}b")(y)])
    out = L.Dense(3)(L.GlobalAveragePooling1D()(x))
    model = keras.Model(inp, out)
    model.compile(loss="sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "taylor"])
def test_head_scores_follow_the_criterion(criterion):
    model = _tiny_transformer()
    graph = DependencyGraph(model)
    heads = next(g for g in graph.groups if any(m.slot == "heads" for m in g.producers))
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(16, 8, 6)).astype("float32"), rng.integers(0, 3, 16))
    scores = kprune.criteria.group_scores(model, heads, criterion, graph=graph, data=data)
    assert scores.shape == (4,) and np.isfinite(scores).all() and np.ptp(scores) > 0


def test_head_taylor_is_weight_times_gradient_per_head():
    model = _tiny_transformer()
    graph = DependencyGraph(model)
    heads = next(g for g in graph.groups
                 if any(m.slot == "heads" and m.name == "mha0" for m in g.producers))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 8, 6)).astype("float32"), rng.integers(0, 3, 8)
    scores = kprune.criteria.group_scores(model, heads, "taylor", graph=graph, data=(x, y),
                                          batch_size=8)
    import tensorflow as tf

    layer = model.get_layer("mha0")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, model(x)))
    grads = tape.gradient(loss, layer.weights)
    wg = {v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v) * g.numpy()
          for v, g in zip(layer.weights, grads)}
    per_head = (np.einsum("dhk->h", wg["query/kernel"]) + np.einsum("dhk->h", wg["key/kernel"])
                + np.einsum("dhk->h", wg["value/kernel"])
                + np.einsum("hkd->h", wg["attention_output/kernel"]))
    expected = np.abs(per_head) / np.abs(per_head).max()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)


def test_flops_target_prunes_heads_and_mlps():
    model = _tiny_transformer()
    small = kprune.prune(model, flops_target=0.5)
    assert kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
    assert small.get_layer("mha0").num_heads < 4 or small.get_layer("mha0").key_dim < 4
    assert small.get_layer("fc0a").units < 32
