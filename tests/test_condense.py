import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from kprune import condense as kc
from kprune.errors import KprunError
from kprune.graph.walk import walk
from kprune.layers import ChannelShuffle, IndexSelect, LearnedDense, LearnedGroupConv
from kprune.models import condensenet
from kprune.profile import profile

RNG = np.random.default_rng(0)


def _rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


def _np(x):
    if isinstance(x, keras.Variable):
        return np.asarray(x.numpy())
    return np.asarray(keras.ops.convert_to_numpy(x))


def _randomize(model_or_layer, seed=0):
    """Random kernels and BN statistics; masks and stages are left alone."""
    rng = np.random.default_rng(seed)
    for var in model_or_layer.weights:
        name = var.path.split("/")[-1]
        if name in ("mask", "stage"):
            continue
        value = rng.normal(0.0, 0.5, size=tuple(var.shape))
        if name == "moving_variance":
            value = np.abs(value) + 0.5
        var.assign(value.astype(var.dtype))


def _roundtrip(model, tmp_path):
    path = str(tmp_path / f"{model.name}.keras")
    model.save(path)
    return keras.saving.load_model(path, safe_mode=True)


def _lgc(x, filters, groups, condense_factor, **kwargs):
    layer = LearnedGroupConv(filters, groups=groups, condense_factor=condense_factor, **kwargs)
    return layer, layer(x)


def _reference_lgc(layer, x):
    """BN (inference) -> ReLU -> 1x1 conv with kernel * mask, in numpy."""
    gamma, beta, mean, var = (_np(w) for w in layer.norm.weights)
    h = np.maximum(gamma * (x - mean) / np.sqrt(var + layer.norm_epsilon) + beta, 0)
    mask = _np(layer.mask)
    kernel = _np(layer.kernel)[0, 0]
    full = mask[:, np.arange(layer.filters) % layer.groups]
    return np.einsum("...i,io->...o", h, kernel * full)


# ---------------------------------------------------------------------------
# ChannelShuffle and IndexSelect
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape, groups", [((2, 6), 3), ((2, 3, 3, 8), 4), ((2, 4, 4, 8), 1)])
def test_channel_shuffle_interleaves(shape, groups):
    x = _rand(*shape)
    c = shape[-1]
    expected = x.reshape(*shape[:-1], groups, c // groups).swapaxes(-1, -2).reshape(shape)
    layer = ChannelShuffle(groups)
    np.testing.assert_allclose(_np(layer(x)), expected)
    np.testing.assert_allclose(x[..., layer.permutation(c)], expected)


def test_channel_shuffle_after_group_split_restores_order():
    # filters g, g + G, ... computed by group g, laid out group after group
    x = np.arange(12, dtype="float32")[None]
    grouped = np.concatenate([x[:, g::3] for g in range(3)], axis=-1)
    np.testing.assert_array_equal(_np(ChannelShuffle(3)(grouped)), x)


def test_index_select_gathers_with_repeats():
    x = _rand(2, 3, 3, 5)
    indices = [4, 0, 0, 2]
    np.testing.assert_allclose(_np(IndexSelect(indices)(x)), x[..., indices])


def test_shuffle_and_select_errors_name_the_layer():
    with pytest.raises(KprunError, match="'shuf'.*5 channels"):
        ChannelShuffle(2, name="shuf")(_rand(1, 5))
    with pytest.raises(KprunError, match="'sel'.*index 7"):
        IndexSelect([0, 7], name="sel")(_rand(1, 5))
    with pytest.raises(KprunError, match="'bad'"):
        IndexSelect([], name="bad")
    with pytest.raises(KprunError, match="'neg'"):
        IndexSelect([1, -1], name="neg")


def test_shuffle_and_select_roundtrip(tmp_path):
    inputs = keras.Input((4, 4, 6))
    y = ChannelShuffle(3)(IndexSelect([5, 1, 1, 0, 2, 3])(inputs))
    model = keras.Model(inputs, y)
    x = _rand(2, 4, 4, 6)
    np.testing.assert_allclose(_np(_roundtrip(model, tmp_path)(x)), _np(model(x)))


# ---------------------------------------------------------------------------
# LearnedGroupConv
# ---------------------------------------------------------------------------
def test_learned_group_conv_matches_numpy_after_condensing():
    x = _rand(2, 4, 4, 8)
    layer = LearnedGroupConv(12, groups=3, condense_factor=4)
    layer.build(x.shape)
    _randomize(layer)
    layer.condense_step()
    np.testing.assert_allclose(_np(layer(x, training=False)), _reference_lgc(layer, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups, condense_factor", [(4, 4), (2, 4), (4, 2), (3, 3)])
def test_each_stage_keeps_in_channels_times_one_minus_k_over_c(groups, condense_factor):
    in_channels = 12
    layer = LearnedGroupConv(6 * groups, groups=groups, condense_factor=condense_factor)
    layer.build((None, 4, 4, in_channels))
    _randomize(layer)
    for k in range(1, condense_factor):
        before = layer.kept_inputs()
        scores = layer.importance()
        layer.condense_step()
        assert layer.stage == k
        kept = layer.kept_inputs()
        for g in range(groups):
            assert len(kept[g]) == in_channels * (condense_factor - k) // condense_factor
            dropped = np.setdiff1d(before[g], kept[g])
            # the dropped inputs are the lightest (L1 over the group's filters) of those alive
            assert scores[dropped, g].max() <= scores[kept[g], g].min()
    with pytest.raises(KprunError, match="last stage"):
        layer.condense_step()


def test_groups_own_interleaved_filters():
    layer = LearnedGroupConv(8, groups=4, condense_factor=2)
    layer.build((None, 2, 2, 6))
    kernel = np.zeros((1, 1, 6, 8), dtype="float32")
    # filter o belongs to group o % 4: give group 1 (filters 1 and 5) weight on inputs 3, 4, 5
    kernel[0, 0, 3:, 1] = 1.0
    kernel[0, 0, 3:, 5] = 1.0
    kernel[0, 0, :3, [0, 2, 3, 4, 6, 7]] = 1.0
    layer.kernel.assign(kernel)
    layer.condense_step()
    kept = layer.kept_inputs()
    np.testing.assert_array_equal(kept[1], [3, 4, 5])
    for g in (0, 2, 3):
        np.testing.assert_array_equal(kept[g], [0, 1, 2])
    full = _np(layer.kernel_mask())[0, 0]
    for o in range(8):
        np.testing.assert_array_equal(full[:, o], _np(layer.mask)[:, o % 4])


def test_lasso_penalty_matches_numpy_and_stops_at_last_stage():
    layer = LearnedGroupConv(8, groups=2, condense_factor=3, group_lasso=0.1)
    x = _rand(2, 3, 3, 6)
    layer.build(x.shape)
    _randomize(layer)
    for stage in range(3):
        kernel = _np(layer.kernel)[0, 0] * _np(layer.kernel_mask())[0, 0]
        expected = sum(np.sqrt((kernel[i, g::2] ** 2).sum())
                       for g in range(2) for i in range(6))
        if stage == 2:
            expected = 0.0
        np.testing.assert_allclose(float(_np(layer.lasso_penalty())), expected, rtol=1e-5)
        if stage < 2:
            layer.condense_step()
    inputs = keras.Input((3, 3, 6))
    model = keras.Model(inputs, LearnedGroupConv(8, groups=2, group_lasso=0.1)(inputs))
    lgc = model.layers[-1]
    _randomize(lgc)
    model(x)
    np.testing.assert_allclose(float(_np(model.losses[0])), 0.1 * float(_np(lgc.lasso_penalty())),
                               rtol=1e-5)


def test_learned_group_conv_divisibility_errors_name_the_layer():
    with pytest.raises(KprunError, match="'lgc'.*input channels \\(10\\).*condense_factor \\(4\\)"):
        LearnedGroupConv(8, groups=4, name="lgc")(_rand(1, 2, 2, 10))
    with pytest.raises(KprunError, match="'lgc2'.*filters \\(10\\).*groups \\(4\\)"):
        LearnedGroupConv(10, groups=4, name="lgc2")
    with pytest.raises(KprunError, match="'lgc3'.*4-D"):
        LearnedGroupConv(8, groups=4, name="lgc3")(_rand(2, 8))
    with pytest.raises(KprunError, match="block1_layer2_lgc"):
        condensenet(stages=(3,), growth=(6,), input_shape=(8, 8, 3), groups_3x3=1)


def test_learned_group_conv_roundtrip_keeps_mask_and_stage(tmp_path):
    inputs = keras.Input((4, 4, 8))
    model = keras.Model(inputs, LearnedGroupConv(8, groups=2, condense_factor=4,
                                                 dropout_rate=0.2, group_lasso=1e-3)(inputs))
    layer = model.layers[-1]
    _randomize(layer)
    layer.condense_step()
    layer.condense_step()
    loaded = _roundtrip(model, tmp_path)
    copy = loaded.layers[-1]
    assert isinstance(copy, LearnedGroupConv)
    assert copy.stage == 2
    assert copy.get_config() == layer.get_config()
    np.testing.assert_array_equal(_np(copy.mask), _np(layer.mask))
    x = _rand(2, 4, 4, 8)
    np.testing.assert_allclose(_np(loaded(x, training=False)), _np(model(x, training=False)),
                               rtol=1e-6, atol=1e-6)


def test_learned_dense_keeps_heaviest_features_and_roundtrips(tmp_path):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, LearnedDense(3, keep_ratio=0.5, activation="softmax")(inputs))
    layer = model.layers[-1]
    kernel = np.ones((6, 3), dtype="float32") * np.array([[1], [5], [2], [-6], [0.5], [3]])
    layer.kernel.assign(kernel)
    layer.condense_step()
    np.testing.assert_array_equal(layer.kept_inputs(), [1, 3, 5])
    x = _rand(4, 6)
    logits = (x * _np(layer.mask)) @ kernel + _np(layer.bias)
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(model(x)), expected, rtol=1e-5, atol=1e-6)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.layers[-1].stage == 1
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=1e-6)
    with pytest.raises(KprunError, match="already condensed"):
        layer.condense_step()


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("final_stage", [1, 3, 7])
def test_target_stage_spaces_stages_over_the_first_half(final_stage):
    for k in range(final_stage + 1):
        assert kc.target_stage(k / (2 * final_stage), final_stage) == k
        if k:
            assert kc.target_stage(k / (2 * final_stage) - 1e-3, final_stage) == k - 1
    assert kc.target_stage(1.0, final_stage) == final_stage


def _small_net(condense_factor=4, groups=4, group_lasso=0.0):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    y = LearnedGroupConv(8, groups=groups, condense_factor=condense_factor,
                         group_lasso=group_lasso, name="lgc1")(x)
    x = keras.layers.Concatenate(name="cat")([x, y])
    y = LearnedGroupConv(16, groups=groups, condense_factor=condense_factor,
                         group_lasso=group_lasso, dropout_rate=0.1, name="lgc2")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.ReLU(name="relu")(y)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    outputs = LearnedDense(3, keep_ratio=0.5, name="head")(y)
    return keras.Model(inputs, outputs, name="small")


class _Recorder(keras.callbacks.Callback):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.stages, self.masks = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.stages.append([layer.stage for layer in self.layers])
        self.masks.append([_np(layer.mask).copy() for layer in self.layers])


def _data(n=12):
    return _rand(n, 6, 6, 3), RNG.integers(0, 3, n)


def test_scheduler_condenses_in_first_half_and_then_stops(tmp_path):
    model = _small_net(group_lasso=1e-3)
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layers = kc.learned_layers(model)
    assert [layer.name for layer in layers] == ["lgc1", "lgc2", "head"]
    recorder = _Recorder(layers)
    scheduler = kc.CondenseScheduler()
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=4, verbose=0, callbacks=[scheduler, recorder])
    total = 12
    for step, stages in enumerate(recorder.stages):
        progress = step / total
        assert stages == [kc.target_stage(progress, 3)] * 2 + [kc.target_stage(progress, 1)]
    half = total // 2
    assert recorder.stages[half] == [3, 3, 1]
    assert recorder.stages[half - 1] == [2, 2, 0]
    for later in recorder.masks[half:]:
        for a, b in zip(later, recorder.masks[half]):
            np.testing.assert_array_equal(a, b)
    for layer, mask in zip(layers, recorder.masks[-1]):
        np.testing.assert_array_equal(_np(layer.mask), mask)
    assert float(_np(layers[0].lasso_penalty())) == 0.0


def test_scheduler_resumes_after_keras_reload(tmp_path):
    model = _small_net()
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=4, initial_epoch=0, verbose=0,
              callbacks=[kc.CondenseScheduler(epochs=8)])
    # progress reached 11/24 < 0.5: LGC stage floor(6 * 11 / 24) = 2, head still dense
    assert [layer.stage for layer in kc.learned_layers(model)] == [2, 2, 0]
    loaded = _roundtrip(model, tmp_path)
    layers = kc.learned_layers(loaded)
    assert [layer.stage for layer in layers] == [2, 2, 0]
    for a, b in zip(layers, kc.learned_layers(model)):
        np.testing.assert_array_equal(_np(a.mask), _np(b.mask))
    recorder = _Recorder(layers)
    loaded.fit(x, y, batch_size=4, epochs=8, initial_epoch=4, verbose=0,
               callbacks=[kc.CondenseScheduler(), recorder])
    assert recorder.stages[0] == [3, 3, 1]  # progress 12/24 = 0.5 at the first resumed batch
    assert [layer.stage for layer in layers] == [3, 3, 1]


def test_condense_never_goes_back_and_scheduler_needs_learned_layers():
    model = _small_net()
    assert kc.condense(model, 0.5) == 3 + 3 + 1
    assert kc.condense(model, 0.1) == 0
    assert [layer.stage for layer in kc.learned_layers(model)] == [3, 3, 1]
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(KprunError, match="no LearnedGroupConv"):
        plain.fit(_rand(4, 4), _rand(4, 2), verbose=0, callbacks=[kc.CondenseScheduler()])


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("groups, condense_factor, progress",
                         [(4, 4, 0.5), (4, 4, 0.2), (2, 4, 0.5), (4, 2, 0.5), (1, 2, 0.5),
                          (4, 4, 0.0)])
def test_convert_small_net_equals_masked_model(groups, condense_factor, progress, tmp_path):
    model = _small_net(condense_factor, groups)
    _randomize(model)
    kc.condense(model, progress)
    before = [_np(w).copy() for w in model.weights]
    small = kc.convert(model)
    for a, w in zip(before, model.weights):
        np.testing.assert_array_equal(a, _np(w))
    assert not any(isinstance(c.layer, (LearnedGroupConv, LearnedDense))
                   for c in walk(small).calls)
    x = _rand(5, 6, 6, 3)
    want = _np(model(x, training=False))
    np.testing.assert_allclose(_np(small(x, training=False)), want, rtol=1e-5, atol=1e-5)
    loaded = _roundtrip(small, tmp_path)
    np.testing.assert_allclose(_np(loaded(x, training=False)), want, rtol=1e-5, atol=1e-5)


def test_convert_builds_the_paper_block_and_costs_one_over_c():
    model = _small_net(4, 4)
    _randomize(model)
    kc.condense(model, 0.5)
    small = kc.convert(model)
    names = [layer.name for layer in small.layers]
    for part, cls in (("select", IndexSelect), ("norm", keras.layers.BatchNormalization),
                      ("relu", keras.layers.ReLU), ("conv", keras.layers.Conv2D),
                      ("shuffle", ChannelShuffle)):
        layer = small.get_layer(f"lgc2_{part}")
        assert type(layer) is cls
    assert names.index("lgc2_select") < names.index("lgc2_conv") < names.index("lgc2_shuffle")
    conv = small.get_layer("lgc2_conv")
    assert conv.groups == 4 and conv.kernel.shape == (1, 1, 4, 16)  # 16 inputs / C per group
    assert len(small.get_layer("head_select").indices) == 8
    dense_macs = {r.name: r.macs for r in profile(model).layers}
    small_macs = {r.name: r.macs for r in profile(small).layers}
    for name in ("lgc1", "lgc2"):
        assert small_macs[f"{name}_conv"] * 4 == dense_macs[name]
    assert small_macs["head"] * 2 == dense_macs["head"]


def test_convert_inlines_nested_models():
    inner = _small_net(2, 2)
    _randomize(inner)
    kc.condense(inner, 0.5)
    inputs = keras.Input((6, 6, 3))
    outer = keras.Model(inputs, keras.layers.Softmax()(inner(inputs)))
    small = kc.convert(outer)
    x = _rand(3, 6, 6, 3)
    np.testing.assert_allclose(_np(small(x, training=False)), _np(outer(x, training=False)),
                               rtol=1e-5, atol=1e-6)


def test_convert_refuses_unequal_groups():
    model = _small_net(2, 2)
    layer = model.get_layer("lgc1")
    mask = np.ones((8, 2), dtype="float32")
    mask[0, 0] = 0
    layer.mask.assign(mask)
    with pytest.raises(KprunError, match="'lgc1'.*\\[7, 8\\]"):
        kc.convert(model)


# ---------------------------------------------------------------------------
# CondenseNet
# ---------------------------------------------------------------------------
def test_condensenet86_converted_equals_trained_at_small_input():
    model = condensenet("cifar", input_shape=(8, 8, 3), classifier_activation=None)
    assert model.name == "condensenet86"
    lgcs = [layer for layer in model.layers if isinstance(layer, LearnedGroupConv)]
    assert len(lgcs) == 42
    assert model.get_layer("predictions").kernel.shape == (16 + 14 * (8 + 16 + 32), 10)
    _randomize(model, seed=3)
    kc.condense(model, 0.5)
    small = kc.convert(model)
    x = _rand(2, 8, 8, 3)
    want = _np(model(x, training=False))
    got = _np(small(x, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    convs = [layer for layer in small.layers
             if isinstance(layer, keras.layers.Conv2D) and layer.name.endswith("_lgc_conv")]
    assert len(convs) == 42
    for conv, lgc in zip(convs, lgcs):
        assert conv.groups == 4
        assert conv.kernel.shape[2] * 4 == lgc.in_channels  # each group reads in / C channels


def test_condensenet_imagenet_layout_at_small_input():
    model = condensenet("imagenet", input_shape=(32, 32, 3), num_classes=5)
    assert model.name == "condensenet74"
    assert model.get_layer("stem_conv").strides == (2, 2)
    assert model.get_layer("block5_layer8_concat").output.shape == (None, 1, 1, 2064)
    assert model.get_layer("block2_layer1_lgc").input.shape[-1] == 48  # all block-1 features
    with pytest.raises(KprunError, match="variant"):
        condensenet("mnist")
    with pytest.raises(KprunError, match="same length"):
        condensenet(stages=(2, 2), growth=(8,))
