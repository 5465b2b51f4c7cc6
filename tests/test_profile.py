"""MACs and parameter counts."""

import keras
import pytest
from keras import layers as L

import archs
import kprune
from kprune import KprunError
from kprune.profile import profile, register_macs


def _single(layer, shape):
    inp = keras.Input(shape)
    return keras.Model(inp, layer(inp))


@pytest.mark.parametrize("layer, shape, expected", [
    (L.Conv2D(8, 3, padding="same"), (6, 6, 4), 3 * 3 * 4 * 8 * 6 * 6),
    (L.Conv2D(8, 3, strides=2, padding="same", groups=2), (6, 6, 4), 3 * 3 * 2 * 8 * 3 * 3),
    (L.Conv1D(5, 3), (10, 2), 3 * 2 * 5 * 8),
    (L.Conv3D(4, 2), (3, 3, 3, 2), 8 * 2 * 4 * 8),
    (L.Conv2DTranspose(3, 3, strides=2, padding="same"), (4, 4, 2), 9 * 2 * 3 * 16),
    (L.DepthwiseConv2D(3, padding="same", depth_multiplier=2), (5, 5, 3), 9 * 6 * 25),
    (L.SeparableConv2D(7, 3, padding="same"), (5, 5, 3), (9 * 3 + 3 * 7) * 25),
    (L.Dense(6), (4,), 24),
    (L.Dense(6), (3, 4), 72),
    (L.LSTM(5), (7, 3), 7 * 4 * 5 * (3 + 5)),
    (L.GRU(4), (6, 3), 6 * 3 * 4 * (3 + 4)),
    (L.SimpleRNN(4, return_sequences=True), (6, 3), 6 * 1 * 4 * (3 + 4)),
    (L.Bidirectional(L.LSTM(5)), (7, 3), 2 * 7 * 4 * 5 * (3 + 5)),
    (L.TimeDistributed(L.Conv2D(4, 3)), (5, 6, 6, 2), 5 * 9 * 2 * 4 * 16),
    (L.Conv1DTranspose(3, 3, strides=2), (5, 2), 3 * 2 * 3 * 5),
    (L.Conv3DTranspose(2, 2), (2, 2, 2, 3), 8 * 3 * 2 * 8),
    (L.DepthwiseConv1D(3, depth_multiplier=2), (10, 3), 3 * 6 * 8),
    (L.SeparableConv1D(4, 3), (10, 2), (3 * 2 + 2 * 4) * 8),
    (L.Conv2D(8, 3, padding="same", data_format="channels_first"), (4, 6, 5), 9 * 4 * 8 * 30),
    (L.Conv2DTranspose(3, 2, strides=2, data_format="channels_first"), (2, 4, 5), 4 * 2 * 3 * 20),
    (L.DepthwiseConv2D(3, data_format="channels_first"), (3, 5, 6), 9 * 3 * 12),
    (L.SeparableConv2D(7, 3, data_format="channels_first"), (3, 5, 6), (9 * 3 + 3 * 7) * 12),
    (L.BatchNormalization(), (4, 4, 3), 0),
    (L.MaxPooling2D(), (4, 4, 3), 0),
    (L.ReLU(), (4, 4, 3), 0),
])
def test_hand_computed_macs(layer, shape, expected):
    assert profile(_single(layer, shape)).macs == expected


@pytest.mark.parametrize("family", sorted(archs.FAMILIES))
def test_params_equal_count_params(family):
    model = archs.FAMILIES[family]()
    assert profile(model).params == model.count_params()


@pytest.mark.parametrize("name", ["MobileNetV2", "EfficientNetB0", "ConvNeXtTiny"])
def test_params_equal_count_params_on_applications(name):
    # ConvNeXt nests a Sequential model: its layers are reached through walk().
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3))
    p = profile(model)
    assert p.params == model.count_params()
    assert p.macs == sum(r.macs for r in p.layers) > 0


def test_nested_model_counts_inner_layers():
    inner = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, padding="same"),
                              L.BatchNormalization()], name="inner")
    inp = keras.Input((6, 6, 3))
    out = L.Dense(5)(L.Flatten()(inner(inp)))
    model = keras.Model(inp, out)
    p = profile(model)
    assert p.macs == 9 * 3 * 4 * 36 + 144 * 5
    assert p.params == model.count_params()
    assert [r.class_name for r in p.layers][:2] == ["Conv2D", "BatchNormalization"]


def test_shared_layer_counts_macs_per_call_and_params_once():
    shared = L.Dense(4)
    a, b = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([a, b], L.Add()([shared(a), shared(b)]))
    p = profile(model)
    assert p.macs == 2 * 3 * 4
    assert p.params == model.count_params() == 16


def test_mobilenet_v2_matches_the_paper():
    p = profile(keras.applications.MobileNetV2(weights=None))
    assert round(p.macs / 1e6) == 301  # paper: 300M multiply-adds
    assert p.params == 3538984


def test_input_shape_rebuilds_unknown_sizes():
    model = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(None, None, 3))
    with pytest.raises(KprunError, match="input_shape"):
        profile(model)
    small, big = profile(model, input_shape=(32, 32, 3)), profile(model, input_shape=(64, 64, 3))
    assert big.macs == pytest.approx(4 * small.macs, rel=0.05)


def test_register_macs_for_a_custom_layer():
    @keras.saving.register_keras_serializable(package="kprune_tests")
    class Twice(L.Layer):
        def call(self, x):
            return x * 2

    model = _single(Twice(), (3,))
    assert profile(model).macs == 0
    register_macs(Twice, lambda layer, ins, outs: 3)
    assert profile(model).macs == 3


def test_table_and_dict():
    p = kprune.profile(archs.vgg())
    text = str(p)
    assert "total" in text and "Conv2D" in text
    assert p.to_dict()["macs"] == p.macs
    assert sum(r["macs"] for r in p.to_dict()["layers"]) == p.macs


def test_latency_is_positive():
    assert kprune.latency(archs.vgg(), runs=3) > 0
