"""A pruned model returns exactly the structure the original returns."""

import keras
import numpy as np
import pytest
from keras import layers as L

import kprune
from kprune.graph import DependencyGraph
from kprune.surgeon import apply_plan, copy_model, delete_channels, zero_plan
from kprune.tools.verify import random_plan, randomize


def _trunk(inp):
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    y = L.Conv2D(6, 3, padding="same", name="c2")(x)
    return x, L.GlobalAveragePooling2D()(y)


def single():
    inp = keras.Input((8, 8, 3))
    _, y = _trunk(inp)
    return keras.Model(inp, L.Dense(3, name="out")(y))


def listed():
    inp = keras.Input((8, 8, 3))
    _, y = _trunk(inp)
    return keras.Model(inp, [L.Dense(3, name="a")(y), L.Dense(2, name="b")(y)])


def single_in_list():
    inp = keras.Input((8, 8, 3))
    _, y = _trunk(inp)
    return keras.Model(inp, [L.Dense(3, name="a")(y)])


def keyed():
    inp = keras.Input((8, 8, 3))
    x, y = _trunk(inp)
    return keras.Model(inp, {"stem": L.Conv2D(4, 1, name="stem_out")(x), "logits": L.Dense(3)(y),
                             "aux": L.Dense(2)(y)})


def nested():
    inp = keras.Input((8, 8, 3))
    x, y = _trunk(inp)
    return keras.Model(inp, {"heads": [L.Dense(3)(y), L.Dense(2)(y)],
                             "maps": {"s1": L.Conv2D(4, 1)(x)}})


def dict_inputs():
    a, b = keras.Input((8, 8, 3), name="image"), keras.Input((5,), name="extra")
    _, y = _trunk(a)
    z = L.Concatenate()([y, L.Dense(4)(b)])
    return keras.Model({"image": a, "extra": b}, L.Dense(3, name="out")(z))


def sequential():
    return keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(8, 3), L.ReLU(), L.Conv2D(6, 3),
                             L.GlobalAveragePooling2D(), L.Dense(3)])


BUILDERS = {f.__name__: f for f in (single, listed, single_in_list, keyed, nested, dict_inputs,
                                    sequential)}


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)

    def one(t):
        return rng.normal(size=(2,) + tuple(t.shape[1:])).astype("float32")

    struct = getattr(model, "_inputs_struct", None)
    return keras.tree.map_structure(one, struct) if struct is not None else one(model.inputs[0])


def _same(got, want):
    keras.tree.assert_same_structure(got, want)
    for g, w in zip(keras.tree.flatten(got), keras.tree.flatten(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_rebuild_keeps_the_structure(name):
    model = BUILDERS[name]()
    randomize(model, seed=1)
    x = _inputs(model)
    want = model(x)
    graph = DependencyGraph(model)
    plan = random_plan(graph, 0.4, seed=0)
    assert plan
    small, ref = apply_plan(model, plan, graph), zero_plan(model, plan, graph)
    _same(small(x), ref(x))
    _same(copy_model(model)(x), want)
    pruned = kprune.prune(model, ratio=0.3)
    keras.tree.assert_same_structure(pruned(x), want)
    if not isinstance(want, dict) and not isinstance(want, list):
        assert keras.tree.is_nested(pruned(x)) is False


def test_a_single_output_stays_a_tensor_and_fits_a_wrapping_model():
    model = single()
    small = delete_channels(model, "c1", [0, 1])
    x = _inputs(model)
    assert not isinstance(small(x), (list, tuple, dict))
    assert len(small.outputs) == 1 and not isinstance(small.output, list)
    inp = keras.Input((8, 8, 3))
    wrapped = keras.Model(inp, L.Softmax()(small(inp)))   # a task around a pruned backbone
    assert wrapped(x).shape == (2, 3)


def test_dict_outputs_keep_their_keys_and_values():
    model = keyed()
    small = kprune.prune(model, ratio=0.5)
    x = _inputs(model)
    got, want = small(x), model(x)
    assert set(got) == set(want) == {"stem", "logits", "aux"}
    for key in want:
        assert tuple(got[key].shape) == tuple(want[key].shape)


def test_dict_inputs_stay_a_dict(tmp_path):
    model = dict_inputs()
    small = kprune.prune(model, ratio=0.5)
    assert isinstance(small._inputs_struct, dict) and set(small._inputs_struct) == {"image", "extra"}
    x = _inputs(model)
    assert small(x).shape == (2, 3)
    small.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(small(x)), rtol=1e-6, atol=1e-6)
