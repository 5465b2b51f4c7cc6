"""Rules for `keras.ops` operations: channels pass, split, slice or block; pruned == masked."""

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops
from keras.src.ops import numpy as knp

from kprune.errors import KprunError
from kprune.graph import DependencyGraph, register_rule, walk
from kprune.graph import rules as R
from kprune.surgeon import apply_plan
from kprune.tools.verify import check_equivalence, random_plan, randomize


def _stem(shape=(6, 6, 3), filters=8, name="conv"):
    inp = keras.Input(shape)
    x = L.Conv2D(filters, 3, padding="same", name=name)(inp)
    return inp, L.BatchNormalization(name=f"{name}_bn")(x)


def _head(x):
    """A conv consumer, then a pooled Dense output."""
    x = L.Conv2D(4, 1, name="head")(x)
    return L.Dense(3, name="out")(L.GlobalAveragePooling2D()(x))


def _inputs(model, n=2, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    xs = [rng.normal(size=(n,) + s).astype("float32") for s in shapes]
    return xs[0] if len(xs) == 1 else xs


def _prune(model, plan=None, fraction=0.4, seed=0):
    """Randomize, prune by `plan` (default: a random one) and check pruned == masked."""
    randomize(model, seed=1)
    graph = DependencyGraph(model)
    plan = random_plan(graph, fraction, seed=seed) if plan is None else plan
    assert plan
    small = check_equivalence(model, plan, _inputs(model), graph=graph)
    assert small.count_params() < model.count_params()
    return graph, small


def _consumer(group, name):
    return [m for m in group.consumers if m.name == name][0]


# --------------------------------------------------------------------------
# Pad
# --------------------------------------------------------------------------
def test_pad_before_strided_conv_passes_channels():
    """ResNetV2 style: explicit keras.ops.pad, then a valid strided convolution."""
    inp, x = _stem()
    x = L.ReLU()(x)
    x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    x = L.Conv2D(6, 3, strides=2, name="down")(x)
    model = keras.Model(inp, _head(x))
    graph, small = _prune(model)
    group = graph.group_of("conv")
    assert group.prunable and "down" in {m.name for m in group.consumers}
    kept = group.size - len(random_plan(graph, 0.4, seed=0)[group.id])
    assert small.get_layer("down").kernel.shape[2] == kept


def test_pad_on_the_channel_axis_blocks():
    inp, x = _stem()
    x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [1, 1]])
    graph = DependencyGraph(keras.Model(inp, _head(x)))
    group = graph.group_of("conv")
    assert not group.prunable and "pads the channel axis" in group.reason


# --------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------
def test_channel_split_parts_go_to_different_consumers():
    inp, x = _stem()
    a, b = ops.split(x, 2, axis=-1)
    a = L.Conv2D(4, 1, name="conv_a")(a)
    b = L.Conv2D(4, 1, name="conv_b")(L.ReLU()(b))
    model = keras.Model(inp, _head(L.Add()([a, b])))
    graph = DependencyGraph(model)
    group = graph.group_of("conv")
    assert group.prunable
    np.testing.assert_array_equal(_consumer(group, "conv_a").index, [0, 1, 2, 3])
    np.testing.assert_array_equal(_consumer(group, "conv_b").index, [4, 5, 6, 7])
    # Uneven removal: the parts get new sizes (2 and 3).
    _, small = _prune(model, plan={group.id: [0, 3, 6]})
    assert small.get_layer("conv_a").kernel.shape[2] == 2
    assert small.get_layer("conv_b").kernel.shape[2] == 3


def test_channel_split_concatenated_back_in_another_order():
    inp, x = _stem()
    a, b, c = ops.split(x, [2, 5], axis=-1)
    x = ops.concatenate([c, L.ReLU()(a), b * 2.0], axis=-1)
    model = keras.Model(inp, _head(x))
    graph = DependencyGraph(model)
    group = graph.group_of("conv")
    assert group.prunable
    np.testing.assert_array_equal(_consumer(group, "head").index, [5, 6, 7, 0, 1, 2, 3, 4])
    _prune(model, plan={group.id: [1, 4, 7]})
    _prune(model, plan={group.id: [0, 2, 3, 5, 6]})


def test_split_on_a_spatial_axis_passes_channels():
    inp, x = _stem()
    top, bottom = ops.split(x, 2, axis=1)
    x = L.Concatenate(axis=1)([bottom, top])
    model = keras.Model(inp, _head(x))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable


def test_split_part_left_empty_is_refused():
    inp, x = _stem()
    a, b = ops.split(x, 2, axis=-1)
    model = keras.Model(inp, _head(L.Concatenate()([a, b])))
    graph = DependencyGraph(model)
    with pytest.raises(KprunError, match="empty part"):
        apply_plan(model, {graph.group_of("conv").id: [0, 1, 2, 3]}, graph)


# --------------------------------------------------------------------------
# GetItem and Slice
# --------------------------------------------------------------------------
def test_channel_slice_carries_its_part():
    inp, x = _stem()
    a = L.Conv2D(3, 1, name="conv_a")(x[..., 2:6])
    b = L.Conv2D(3, 1, name="conv_b")(x[:, :, :, ::-1])
    model = keras.Model(inp, _head(L.Add()([a, b])))
    graph = DependencyGraph(model)
    group = graph.group_of("conv")
    assert group.prunable
    np.testing.assert_array_equal(_consumer(group, "conv_a").index, [2, 3, 4, 5])
    np.testing.assert_array_equal(_consumer(group, "conv_b").index, [7, 6, 5, 4, 3, 2, 1, 0])
    _, small = _prune(model, plan={group.id: [0, 2, 7]})
    assert small.get_layer("conv_a").kernel.shape[2] == 3
    _prune(model, seed=5)


def test_slice_selecting_only_removed_channels_is_refused():
    inp, x = _stem()
    model = keras.Model(inp, _head(L.Concatenate()([x[..., :2], x])))
    graph = DependencyGraph(model)
    with pytest.raises(KprunError, match="no channel"):
        apply_plan(model, {graph.group_of("conv").id: [0, 1]}, graph)


def test_spatial_indexing_passes_channels():
    inp, x = _stem()
    x = x[:, 1:-1, ::2]
    x = x[:, None][:, 0]  # a new axis, then indexed away again
    model = keras.Model(inp, _head(x))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable


def test_integer_index_of_the_channel_axis_blocks():
    inp, x = _stem()
    y = ops.expand_dims(x[..., 0], -1)
    model = keras.Model(inp, _head(L.Concatenate()([L.Conv2D(2, 1)(x), y])))
    group = DependencyGraph(model).group_of("conv")
    assert not group.prunable and "integer index" in group.reason


def test_strided_channel_slice_blocks():
    inp, x = _stem()
    model = keras.Model(inp, _head(x[..., ::2]))
    group = DependencyGraph(model).group_of("conv")
    assert not group.prunable and "every 2th channel" in group.reason


def test_keras_ops_slice_on_the_channel_axis():
    inp, x = _stem()
    part = ops.slice(x, [0, 0, 0, 3], [-1, -1, -1, 4])
    model = keras.Model(inp, _head(L.Concatenate()([part, L.Conv2D(2, 1, name="side")(x)])))
    graph = DependencyGraph(model)
    group = graph.group_of("conv")
    assert group.prunable
    _prune(model, plan={group.id: [0, 3, 5]})


# --------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", [ops.mean, ops.max, ops.sum, ops.min])
def test_spatial_reduction_feeds_dense(reduce):
    inp, x = _stem()
    pooled = reduce(x, axis=[1, 2])
    model = keras.Model(inp, L.Dense(3, name="out")(L.Dense(5, name="fc")(pooled)))
    graph, small = _prune(model)
    group = graph.group_of("conv")
    assert group.prunable and _consumer(group, "fc").index.tolist() == list(range(8))


def test_spatial_mean_with_keepdims_feeds_a_conv():
    inp, x = _stem()
    y = L.Conv2D(4, 1, name="squeeze")(ops.mean(x, axis=(1, 2), keepdims=True))
    model = keras.Model(inp, L.Dense(3)(ops.reshape(y, (-1, 4))))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable and graph.group_of("squeeze").prunable


def test_reduction_over_the_channels_blocks():
    inp, x = _stem()
    attention = ops.mean(x, axis=-1, keepdims=True)
    model = keras.Model(inp, _head(L.Conv2D(4, 1)(x) * attention))
    group = DependencyGraph(model).group_of("conv")
    assert not group.prunable and "reduces over the channel axis" in group.reason


# --------------------------------------------------------------------------
# Element-wise
# --------------------------------------------------------------------------
def test_scalar_arithmetic_passes_channels():
    inp, x = _stem()
    x = x / 6.0
    x = x * 0.5 + 1
    x = 1.0 - x
    x = ops.maximum(x ** 2, 0.1)
    x = ops.minimum(2.0, ops.true_divide(x, 3.0))
    model = keras.Model(inp, _head(x))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable


def test_broadcast_constant_passes_and_per_channel_constant_is_sliced():
    inp, x = _stem()
    spatial = np.linspace(0.5, 1.5, 36, dtype="float32").reshape(1, 6, 6, 1)
    scale = np.arange(1, 9, dtype="float32")
    shift = keras.ops.convert_to_tensor(np.linspace(-1, 1, 8, dtype="float32"))
    x = x * spatial
    x = x * scale
    x = ops.add(shift, x)
    model = keras.Model(inp, _head(x))
    graph, small = _prune(model)
    assert graph.group_of("conv").prunable
    kept = np.setdiff1d(np.arange(8), random_plan(graph, 0.4, seed=0)[graph.group_of("conv").id])
    consts = [a for call in walk(small).calls if isinstance(call.layer, knp.Multiply)
              for a in call.args if isinstance(a, np.ndarray) and a.ndim == 1]
    np.testing.assert_array_equal(consts[0], scale[kept])


def test_per_channel_variable_blocks():
    inp, x = _stem()
    w = keras.Variable(np.ones(8, "float32"))
    model = keras.Model(inp, _head(x * w))
    group = DependencyGraph(model).group_of("conv")
    assert not group.prunable and "not a constant array" in group.reason


def test_add_of_two_graph_tensors_ties_their_producers():
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    b = L.Conv2D(8, 1, name="b")(inp)
    x = ops.add(a, b)
    x = ops.multiply(x, ops.sigmoid(L.Conv2D(8, 1, name="gate")(x)))
    model = keras.Model(inp, _head(x - a))
    graph = DependencyGraph(model)
    group = graph.group_of("a")
    assert group.prunable and {m.name for m in group.producers} == {"a", "b", "gate"}
    _prune(model)


def test_single_channel_broadcast_over_the_channels():
    inp, x = _stem()
    mask = ops.sigmoid(L.Conv2D(1, 1, name="mask")(x))
    model = keras.Model(inp, _head(x * mask))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable and not graph.group_of("mask").prunable


@pytest.mark.parametrize("fn", [
    ops.relu, ops.relu6, ops.sigmoid, ops.silu, ops.gelu, ops.hard_sigmoid, ops.hard_silu,
    ops.elu, ops.leaky_relu, ops.tanh, ops.exp, ops.negative, ops.square,
    lambda t: ops.sqrt(ops.abs(t)), lambda t: ops.cast(t, "float16"),
    lambda t: ops.clip(t, -1.0, 1.0), lambda t: ops.softmax(t, axis=1),
])
def test_unary_ops_pass_channels(fn):
    inp, x = _stem()
    y = fn(x)
    model = keras.Model(inp, _head(ops.cast(y, "float32")))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable


@pytest.mark.parametrize("fn", [
    lambda t: ops.max_pool(t, 2, padding="same"),
    lambda t: ops.average_pool(t, 3, strides=1, padding="same"),
    lambda t: ops.image.resize(t, (3, 3)),
    lambda t: ops.where(t > 0, t, 0.1 * t),
])
def test_spatial_and_select_ops_pass_channels(fn):
    inp, x = _stem()
    model = keras.Model(inp, _head(fn(x)))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable


def test_squeeze_of_a_kept_dimension():
    inp, x = _stem()
    pooled = ops.squeeze(ops.max(x, axis=(1, 2), keepdims=True), axis=(1, 2))
    model = keras.Model(inp, L.Dense(3)(L.Dense(5, name="fc")(pooled)))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable


def test_softmax_over_the_channels_blocks():
    inp, x = _stem()
    group = DependencyGraph(keras.Model(inp, _head(ops.softmax(x)))).group_of("conv")
    assert not group.prunable and "normalises over the channel axis" in group.reason


def test_squeeze_excite_made_of_ops():
    inp, x = _stem()
    s = ops.mean(x, axis=[1, 2])
    s = L.Dense(8, activation="sigmoid", name="excite")(L.Dense(2, activation="relu")(s))
    s = ops.expand_dims(ops.expand_dims(s, 1), 1)
    model = keras.Model(inp, _head(x * s))
    graph, _ = _prune(model)
    group = graph.group_of("conv")
    assert group.prunable and "excite" in {m.name for m in group.producers}


# --------------------------------------------------------------------------
# Moving axes and reshaping
# --------------------------------------------------------------------------
def test_transpose_keeping_channels():
    inp, x = _stem()
    x = ops.transpose(x, (0, 2, 1, 3))
    x = L.Conv2D(6, 3, name="mid")(x)
    y = ops.transpose(x, (0, 3, 1, 2))   # channels first ...
    y = ops.moveaxis(y * 2.0, 1, -1)     # ... and back
    y = ops.swapaxes(y, 1, 2)
    model = keras.Model(inp, _head(y))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable and graph.group_of("mid").prunable


def test_transpose_moving_the_batch_axis_blocks():
    inp, x = _stem()
    y = ops.transpose(ops.transpose(x, (1, 0, 2, 3)), (1, 0, 2, 3))
    group = DependencyGraph(keras.Model(inp, _head(y))).group_of("conv")
    assert not group.prunable and "batch axis" in group.reason


def test_reshape_keeping_the_channel_axis():
    inp, x = _stem()
    seq = ops.reshape(x, (-1, 36, 8))
    seq = L.Conv1D(5, 3, padding="same", name="seq_conv")(seq)
    x = ops.reshape(seq, (-1, 6, 6, 5))
    model = keras.Model(inp, _head(x))
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable and graph.group_of("seq_conv").prunable


def test_reshape_flattening_to_features():
    inp, x = _stem((4, 4, 3))
    flat = ops.reshape(x, (-1, 4 * 4 * 8))
    model = keras.Model(inp, L.Dense(3)(L.Dense(5, name="fc")(flat)))
    graph, small = _prune(model)
    group = graph.group_of("conv")
    np.testing.assert_array_equal(_consumer(group, "fc").index, np.tile(np.arange(8), 16))
    assert small.get_layer("fc").kernel.shape[0] == 16 * (8 - 3)


def test_reshape_mixing_the_channels_blocks():
    inp, x = _stem()
    y = ops.reshape(x, (-1, 6, 48))
    model = keras.Model(inp, L.Dense(3)(L.Flatten()(L.Conv1D(4, 1)(y))))
    group = DependencyGraph(model).group_of("conv")
    assert not group.prunable and "reshapes across the channel axis" in group.reason


# --------------------------------------------------------------------------
# Unknown operations, saving
# --------------------------------------------------------------------------
def test_operation_with_no_rule_blocks_with_its_name():
    inp, x = _stem()
    model = keras.Model(inp, _head(knp.Cumsum(axis=1, name="running")(x)))
    group = DependencyGraph(model).group_of("conv")
    assert not group.prunable
    assert "operation 'running' (Cumsum) has no channel rule" in group.reason
    assert "register_rule" in group.reason
    try:
        register_rule(knp.Cumsum, R.PassThroughRule())
        assert DependencyGraph(model).group_of("conv").prunable
    finally:
        del R._RULES[knp.Cumsum]


def _op_zoo():
    inp, x = _stem()
    x = ops.pad(L.ReLU()(x), [[0, 0], [1, 1], [1, 1], [0, 0]])
    a, b = ops.split(x, 2, axis=-1)
    x = ops.concatenate([L.Conv2D(4, 3, name="conv_a")(a), b[:, 1:-1, 1:-1] / 6.0], axis=-1)
    x = x * np.linspace(0.5, 1.5, 8, dtype="float32") + 1
    x = ops.transpose(x, (0, 2, 1, 3))[..., 1:]
    pooled = ops.mean(x, axis=[1, 2])
    return keras.Model(inp, L.Dense(3)(L.Dense(5)(pooled)), name="op_zoo")


def test_op_zoo_prunes_exactly():
    model = _op_zoo()
    graph, _ = _prune(model)
    assert graph.group_of("conv").prunable and graph.group_of("conv_a").prunable
    _prune(model, fraction=0.25, seed=7)


def test_pruned_op_model_round_trips_keras_file(tmp_path):
    model = _op_zoo()
    randomize(model, seed=2)
    graph = DependencyGraph(model)
    small = apply_plan(model, random_plan(graph, 0.4, seed=1), graph)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _inputs(model)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(small(x)), rtol=1e-6, atol=1e-6)
