"""Update rules against hand-computed numpy gradients, composition, config and binding."""

import keras
import numpy as np
import pytest

from kprune.errors import KprunError
from kprune.layers import Compactor
from kprune.train.rules import (Chain, GroupLassoRule, MaskRule, ResRepRule, SlimmingRule, chain,
                          find_variable)

L = keras.layers


def _compactor_model():
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(3, 3, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = Compactor(name="conv_compactor")(x)
    x = L.Conv2D(4, 1, name="head")(x)
    model = keras.Model(inp, x)
    rng = np.random.default_rng(1)
    comp = model.get_layer("conv_compactor")
    comp.kernel.assign(rng.normal(size=(3, 3)).astype("float32"))
    comp.set_mask([1.0, 0.0, 1.0])
    model.get_layer("bn").gamma.assign(np.array([0.5, -2.0, 0.0], dtype="float32"))
    return model


def _grads(variables, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=tuple(v.shape)).astype("float32") for v in variables]


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _check_only(rule, model, expected: dict, seed=0):
    """Apply `rule` to every trainable variable; those not in `expected` must pass unchanged."""
    variables = model.trainable_variables
    grads = _grads(variables, seed)
    out = rule(grads, variables)
    assert len(out) == len(variables)
    for v, g, o in zip(variables, grads, out):
        want = expected[v.path](g) if v.path in expected else g
        np.testing.assert_allclose(_np(o), want, rtol=1e-5, atol=1e-7)


def test_resrep_rule_masks_and_adds_column_lasso():
    model = _compactor_model()
    comp = model.get_layer("conv_compactor")
    lam = 0.01
    kernel = comp.kernel.numpy().astype("float64")
    mask = np.array([1.0, 0.0, 1.0])
    lasso = lam * kernel / np.sqrt((kernel ** 2).sum(axis=0, keepdims=True))
    rule = ResRepRule.from_model(model, lam=lam)
    assert [v.path for v in rule.variables] == [comp.kernel.path]
    _check_only(rule, model, {comp.kernel.path: lambda g: mask[None, :] * g + lasso})


def test_resrep_rule_zero_column_gets_zero_penalty():
    model = _compactor_model()
    comp = model.get_layer("conv_compactor")
    kernel = comp.kernel.numpy()
    kernel[:, 1] = 0.0
    comp.kernel.assign(kernel)
    rule = ResRepRule(1.0, pairs=[(comp.kernel, comp.mask)])
    grad = np.ones((3, 3), dtype="float32")
    out = _np(rule([grad], [comp.kernel])[0])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 1], np.zeros(3))


def test_slimming_rule_adds_s_sign_gamma():
    model = _compactor_model()
    bn = model.get_layer("bn")
    s = 0.1
    gamma = bn.gamma.numpy()
    rule = SlimmingRule.from_layers([bn], s=s)
    _check_only(rule, model, {bn.gamma.path: lambda g: g + s * np.sign(gamma)})


def test_group_lasso_rule_over_output_channels_of_a_conv_kernel():
    model = _compactor_model()
    conv = model.get_layer("conv")
    lam = 0.05
    kernel = conv.kernel.numpy().astype("float64")
    norms = np.sqrt((kernel ** 2).sum(axis=(0, 1, 2), keepdims=True))
    rule = GroupLassoRule(lam, [conv.kernel])
    _check_only(rule, model, {conv.kernel.path: lambda g: g + lam * kernel / norms})


def test_group_lasso_rule_other_axis():
    var = keras.Variable(np.array([[3.0, 0.0], [4.0, 1.0]], dtype="float32"), name="w")
    rule = GroupLassoRule(1.0, [var], axis=0)
    out = _np(rule([np.zeros((2, 2), "float32")], [var])[0])
    rows = np.array([[3.0, 0.0], [4.0, 1.0]])
    np.testing.assert_allclose(out, rows / np.linalg.norm(rows, axis=1, keepdims=True), rtol=1e-6)


def test_mask_rule_on_kernel_and_bias():
    model = _compactor_model()
    head = model.get_layer("head")
    mask = keras.Variable(np.array([1.0, 0.0, 0.0, 1.0], dtype="float32"), trainable=False,
                          name="head_mask")
    rule = MaskRule([(head.kernel, mask), (head.bias, mask)])
    m = np.array([1.0, 0.0, 0.0, 1.0])
    _check_only(rule, model, {head.kernel.path: lambda g: g * m,
                              head.bias.path: lambda g: g * m})


def test_chain_composes_in_order():
    model = _compactor_model()
    head = model.get_layer("head")
    mask = keras.Variable(np.array([0.0, 1.0, 1.0, 0.0], dtype="float32"), trainable=False,
                          name="head_mask")
    lam = 0.2
    kernel = head.kernel.numpy().astype("float64")
    norms = np.sqrt((kernel ** 2).sum(axis=(0, 1, 2), keepdims=True))
    m = np.array([0.0, 1.0, 1.0, 0.0])
    rule = chain(GroupLassoRule(lam, [head.kernel]), MaskRule([(head.kernel, mask)]))
    _check_only(rule, model, {head.kernel.path: lambda g: (g + lam * kernel / norms) * m})
    nested = chain(rule, SlimmingRule.from_layers([model.get_layer("bn")]))
    assert isinstance(nested, Chain) and len(nested.rules) == 3


def test_none_gradient_passes():
    model = _compactor_model()
    rule = ResRepRule.from_model(model)
    variables = model.trainable_variables
    out = rule([None] * len(variables), variables)
    assert out == [None] * len(variables)


@pytest.mark.parametrize("make", [
    lambda m: ResRepRule.from_model(m, lam=0.01),
    lambda m: SlimmingRule.from_layers([m.get_layer("bn")], s=0.1),
    lambda m: GroupLassoRule(0.1, [m.get_layer("conv").kernel]),
    lambda m: chain(ResRepRule.from_model(m), SlimmingRule.from_layers([m.get_layer("bn")])),
])
def test_config_round_trip_then_bind_to_reloaded_model(make, tmp_path):
    model = _compactor_model()
    rule = make(model)
    variables = model.trainable_variables
    grads = _grads(variables, seed=3)
    want = rule(grads, variables)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(rule))
    assert type(restored) is type(rule) and not restored.bound
    with pytest.raises(KprunError, match="bind"):
        restored(grads, loaded.trainable_variables)
    restored.bind(loaded)
    got = restored(grads, loaded.trainable_variables)
    for w, g in zip(want, got):
        np.testing.assert_allclose(_np(g), _np(w), rtol=1e-6)


def test_find_variable_nested_reload_paths():
    inner = keras.Sequential([L.Dense(3, name="d")], name="inner")
    inp = keras.Input((4,))
    model = keras.Model(inp, inner(L.Dense(4, name="d0")(inp)))
    kernel = inner.get_layer("d").kernel
    assert find_variable(kernel.path, model.variables) is kernel
    assert find_variable("d/kernel", model.variables) is kernel
    assert find_variable("inner/d/kernel", [kernel]) is kernel
    assert find_variable("kernel", model.variables) is None  # ambiguous
    assert find_variable("other/kernel", model.variables) is None


def test_bad_inputs_raise_kprun_error():
    model = _compactor_model()
    comp = model.get_layer("conv_compactor")
    head = model.get_layer("head")
    with pytest.raises(KprunError, match="lam"):
        ResRepRule.from_model(model, lam=-1.0)
    with pytest.raises(KprunError, match="s"):
        SlimmingRule(float("nan"), [model.get_layer("bn").gamma])
    with pytest.raises(KprunError, match="compactor"):
        ResRepRule(1e-4, pairs=[(head.kernel, comp.mask)])
    with pytest.raises(KprunError, match="mask"):
        MaskRule([(head.kernel, comp.mask)])  # 3 entries for 4 channels
    with pytest.raises(KprunError, match="Compactor"):
        ResRepRule.from_model(keras.Sequential([keras.Input((2,)), L.Dense(2)]))
    with pytest.raises(KprunError, match="gamma"):
        SlimmingRule.from_layers([head])
    with pytest.raises(KprunError, match="neither a Keras variable"):
        GroupLassoRule(1e-4, [np.zeros(3)])
    with pytest.raises(KprunError, match="no variable"):
        ResRepRule(1e-4, pairs=[("missing/kernel", "missing/mask")]).bind(model)
    with pytest.raises(KprunError, match="gradients"):
        ResRepRule.from_model(model)([None], model.trainable_variables)
    with pytest.raises(KprunError, match="pairs"):
        ResRepRule(1e-4)
    with pytest.raises(KprunError, match="from_layers"):
        SlimmingRule(1e-4)
    with pytest.raises(KprunError, match="axis"):
        GroupLassoRule(1e-4, [head.kernel], axis=7)
    with pytest.raises(KprunError, match="predicate"):
        MaskRule(lambda v: True)


def test_resrep_rule_on_a_pointwise_conv_kernel():
    """A (1, 1, C, C) kernel: the mask runs along the last axis, norms over the other three."""
    rng = np.random.default_rng(4)
    kernel = keras.Variable(rng.normal(size=(1, 1, 4, 4)).astype("float32"), name="k")
    mask = keras.Variable(np.array([0.0, 1.0, 1.0, 0.0], "float32"), trainable=False, name="m")
    grad = rng.normal(size=(1, 1, 4, 4)).astype("float32")
    lam = 0.3
    out = _np(ResRepRule(lam, pairs=[(kernel, mask)])([grad], [kernel])[0])
    k = kernel.numpy().astype("float64")
    want = grad * mask.numpy() + lam * k / np.sqrt((k ** 2).sum(axis=(0, 1, 2), keepdims=True))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="compares with tf.GradientTape's gradient of a TensorFlow value")
def test_group_lasso_rule_is_the_gradient_of_the_group_lasso_regularizer():
    import tensorflow as tf

    from kprune.layers.regularizers import GroupLasso

    rng = np.random.default_rng(5)
    var = keras.Variable(rng.normal(size=(3, 3, 2, 5)).astype("float32"), name="k")
    with tf.GradientTape() as tape:
        penalty = GroupLasso(0.2)(var)
    want = tape.gradient(penalty, var.value)
    got = GroupLassoRule(0.2, [var])([np.zeros((3, 3, 2, 5), "float32")], [var])[0]
    np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-7)


def test_group_lasso_rule_matches_the_hand_computed_gradient():
    # The same check on every backend: d/dK of l * sum_j ||K[..., j]|| is l * K / ||K[..., j]||.
    rng = np.random.default_rng(5)
    value = rng.normal(size=(3, 3, 2, 5)).astype("float32")
    var = keras.Variable(value, name="k")
    k = value.astype("float64")
    want = 0.2 * k / np.sqrt((k ** 2).sum(axis=(0, 1, 2), keepdims=True))
    got = GroupLassoRule(0.2, [var])([np.zeros((3, 3, 2, 5), "float32")], [var])[0]
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-7)


def test_predicate_selects_then_binds_for_saving():
    model = _compactor_model()
    bn = model.get_layer("bn")
    s = 0.1
    rule = SlimmingRule(s, lambda v: v.path.endswith("/gamma"))
    assert not rule.bound
    _check_only(rule, model, {bn.gamma.path: lambda g: g + s * np.sign(bn.gamma.numpy())})
    with pytest.raises(KprunError, match="predicate"):
        rule.get_config()
    rule.bind(model)
    assert rule.bound and rule.variables == [bn.gamma]
    assert rule.get_config() == {"s": s, "variables": [bn.gamma.path]}


def test_numpy_numbers_are_accepted():
    model = _compactor_model()
    rule = ResRepRule.from_model(model, lam=np.float32(0.5))
    assert rule.lam == 0.5
    assert GroupLassoRule(0.1, [model.get_layer("conv").kernel], axis=np.int64(-1)).axis == -1
