"""Property: on random architectures built from the supported blocks, pruned == masked."""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers as L

from kprune.graph import DependencyGraph
from kprune.tools.verify import check_equivalence, random_plan, randomize


def _conv_bn(x, f, k=3, groups=1):
    x = L.Conv2D(f, k, padding="same", use_bias=False, groups=groups)(x)
    return L.ReLU()(L.BatchNormalization()(x))


def _block(x, kind, width):
    c = x.shape[-1]
    if kind == "conv":
        return _conv_bn(x, width)
    if kind == "residual":
        y = L.BatchNormalization()(L.Conv2D(c, 3, padding="same")(_conv_bn(x, width)))
        return L.ReLU()(L.Add()([x, y]))
    if kind == "inverted":
        y = _conv_bn(x, 2 * c, k=1)
        y = L.ReLU()(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(y)))
        return L.Add()([x, L.BatchNormalization()(L.Conv2D(c, 1)(y))])
    if kind == "dense":
        return L.Concatenate()([x, _conv_bn(x, 4)])
    if kind == "se":
        s = L.Conv2D(c, 1, activation="sigmoid")(L.Conv2D(2, 1, activation="relu")(
            L.GlobalAveragePooling2D(keepdims=True)(x)))
        return L.Multiply()([x, s])
    if kind == "grouped":
        return _conv_bn(_conv_bn(x, 8, k=1), 8, groups=2)
    if kind == "separable":
        return L.ReLU()(L.BatchNormalization()(L.SeparableConv2D(width, 3, padding="same")(x)))
    if kind == "pool":
        return L.MaxPooling2D(2, padding="same")(x)
    raise ValueError(kind)


KINDS = ["conv", "residual", "inverted", "dense", "se", "grouped", "separable", "pool"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(3, 8)), min_size=1, max_size=5),
    flatten_head=st.booleans(),
    fraction=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
)
def test_random_architectures_prune_exactly(blocks, flatten_head, fraction, seed):
    inp = keras.Input((8, 8, 3))
    x = _conv_bn(inp, 6)
    for kind, width in blocks:
        x = _block(x, kind, width)
    x = L.Flatten()(x) if flatten_head else L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(3)(L.Dense(5, activation="relu")(x)))
    randomize(model, seed=seed)
    graph = DependencyGraph(model)
    plan = random_plan(graph, fraction, seed=seed)
    x_in = np.random.default_rng(seed).normal(size=(2, 8, 8, 3)).astype("float32")
    small = check_equivalence(model, plan, x_in, graph=graph, rtol=1e-4, atol=1e-4)
    assert small.count_params() <= model.count_params()


def test_a_plan_emptying_one_part_of_a_concatenation():
    """Found by the property above: a Concatenate's part emptied by a plan of its group."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(3, 1, name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(a)
    x = L.Add()([L.Concatenate()([a, b]), L.Conv2D(7, 1, name="c")(a)])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    graph = DependencyGraph(model)
    group = graph.group_of("b")
    import pytest

    from kprune.errors import KprunError
    from kprune.surgeon import apply_plan

    with pytest.raises(KprunError, match="every output channel of 'b'"):
        apply_plan(model, {group.id: [3, 4, 5, 6]}, graph)
    plan = random_plan(graph, 0.9, seed=0)
    assert set(plan[group.id]) != {3, 4, 5, 6}
    check_equivalence(model, plan, np.ones((1, 8, 8, 3), "float32"), graph=graph)
