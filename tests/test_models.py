import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from kprune.errors import KprunError
from kprune.models import cifar_resnet, vgg, vgg_cfg

RNG = np.random.default_rng(2)
SMALL_VGG11 = [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32]


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _layers(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


def _expected_resnet_trainable(depth, width, classes, in_channels=3, taps=9):
    """Trainable parameters of a CIFAR ResNet with 1x1 projections, by hand."""
    n = (depth - 2) // 6
    total = taps * in_channels * width + 2 * width  # stem conv + BN
    c_in = width
    for stage in range(3):
        c = width * 2**stage
        for block in range(n):
            total += taps * c_in * c + 2 * c + taps * c * c + 2 * c
            if c_in != c:
                total += c_in * c + 2 * c  # projection conv + BN
            c_in = c
    return total + c_in * classes + classes


def _expected_vgg_trainable(cfg, classes, in_channels=3):
    total, c_in = 0, in_channels
    for v in cfg:
        if v != "M":
            total += 9 * c_in * v + 2 * v
            c_in = v
    return total + c_in * classes + classes


# ResNet


def test_resnet56_parameter_count():
    model = cifar_resnet(56)
    trainable = _trainable(model)
    assert trainable == _expected_resnet_trainable(56, 16, 10)
    # He et al. 2016, Table 6: about 0.85M parameters.
    assert abs(trainable - 0.85e6) / 0.85e6 < 0.01


@pytest.mark.parametrize("depth", [20, 32])
def test_resnet_structure(depth):
    model = cifar_resnet(depth)
    n = (depth - 2) // 6
    convs = _layers(model, keras.layers.Conv2D)
    projections = [c for c in convs if c.name.endswith("_proj_conv")]
    assert len(convs) - len(projections) + 1 == depth
    assert [p.name for p in projections] == ["stage2_block1_proj_conv", "stage3_block1_proj_conv"]
    assert len(_layers(model, keras.layers.Add)) == 3 * n
    assert all(not c.use_bias for c in convs)
    assert all(isinstance(c.kernel_initializer, keras.initializers.HeNormal) for c in convs)
    assert _trainable(model) == _expected_resnet_trainable(depth, 16, 10)


def test_resnet20_forward():
    model = cifar_resnet(20)
    x = RNG.random((2, 32, 32, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert y.shape == (2, 10)
    np.testing.assert_allclose(y.sum(axis=1), np.ones(2), rtol=1e-5)
    assert model.get_layer("stage3_block3_out").output.shape == (None, 8, 8, 64)


def test_resnet_width_and_logits():
    model = cifar_resnet(8, num_classes=3, input_shape=(16, 16, 1), width=4,
                         classifier_activation=None)
    assert model.get_layer("stage3_block1_conv2").filters == 16
    assert model.output_shape == (None, 3)
    assert _trainable(model) == _expected_resnet_trainable(8, 4, 3, in_channels=1)
    assert model.get_layer("predictions").activation is keras.activations.linear


def test_resnet_for_sequences():
    model = cifar_resnet(20, input_shape=(40, 1), width=8, classifier_activation=None)
    assert not _layers(model, keras.layers.Conv2D)
    assert len(_layers(model, keras.layers.Conv1D)) == 19 + 2
    assert model.get_layer("stage3_block3_out").output.shape == (None, 10, 32)
    assert _trainable(model) == _expected_resnet_trainable(20, 8, 10, in_channels=1, taps=3)
    y = keras.ops.convert_to_numpy(model(RNG.random((2, 40, 1)).astype("float32")))
    assert y.shape == (2, 10)


def test_resnet_keras_round_trip(tmp_path):
    model = cifar_resnet(8, input_shape=(16, 16, 3), width=4)
    x = RNG.random((2, 16, 16, 3)).astype("float32")
    path = str(tmp_path / "resnet.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 21}, "6n \\+ 2"),
        ({"depth": 2}, "6n \\+ 2"),
        ({"depth": 20, "width": 0}, "width"),
        ({"depth": 20, "num_classes": 1.5}, "num_classes"),
        ({"depth": 20, "input_shape": (32,)}, "input_shape"),
        ({"depth": 20, "input_shape": 32}, "input_shape"),
    ],
)
def test_resnet_bad_arguments(kwargs, match):
    with pytest.raises(KprunError, match=match):
        cifar_resnet(**kwargs)


# VGG


def test_vgg19_has_20_04m_trainable_parameters():
    model = vgg(19)
    trainable = _trainable(model)
    # Network Slimming (Liu et al. 2017), Table 1, VGGNet on CIFAR-10: 20.04M.
    assert round(trainable / 1e6, 2) == 20.04
    assert trainable == _expected_vgg_trainable(vgg_cfg(19), 10)
    assert model.get_layer("avg_pool").output.shape == (None, 1, 1, 512)
    assert model.get_layer("predictions").kernel.shape == (512, 10)


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_vgg_cfgs(depth):
    cfg = vgg_cfg(depth)
    convs = [v for v in cfg if v != "M"]
    assert len(convs) + 3 == depth  # the three Dense layers of ImageNet VGG become one
    assert cfg.count("M") == 4


def test_vgg_cfg_returns_a_copy():
    cfg = vgg_cfg(11)
    cfg[0] = 1
    assert vgg_cfg(11)[0] != 1


def test_vgg11_small_cfg_forward():
    model = vgg(11, cfg=SMALL_VGG11)
    convs = _layers(model, keras.layers.Conv2D)
    assert [c.filters for c in convs] == [v for v in SMALL_VGG11 if v != "M"]
    assert [c.name for c in convs[:3]] == ["block1_conv1", "block2_conv1", "block3_conv1"]
    assert _trainable(model) == _expected_vgg_trainable(SMALL_VGG11, 10)
    x = RNG.random((2, 32, 32, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert y.shape == (2, 10)
    np.testing.assert_allclose(y.sum(axis=1), np.ones(2), rtol=1e-5)


def test_vgg_pruned_cfg_rebuilds_narrower_net():
    pruned = [v if v == "M" else max(1, v // 3) for v in vgg_cfg(11)]
    as_numpy = [v if v == "M" else np.int64(v) for v in pruned]  # as a pruner may return
    model = vgg(cfg=as_numpy)
    widths = [c.filters for c in _layers(model, keras.layers.Conv2D)]
    assert widths == [v for v in pruned if v != "M"]
    assert model.get_layer("predictions").kernel.shape == (widths[-1], 10)
    assert _trainable(model) == _expected_vgg_trainable(pruned, 10)


def test_vgg_slimming_initialisation():
    model = vgg(cfg=[4, "M", 4])
    bn = model.get_layer("block1_bn1")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.gamma), np.full(4, 0.5))
    assert not model.get_layer("block1_conv1").use_bias


def test_vgg_without_batch_norm():
    model = vgg(cfg=[4, "M", 8], batch_norm=False)
    assert not _layers(model, keras.layers.BatchNormalization)
    assert all(c.use_bias for c in _layers(model, keras.layers.Conv2D))


def test_vgg_keras_round_trip(tmp_path):
    model = vgg(cfg=[4, "M", 8, "M", 8, "M", 8], input_shape=(16, 16, 3), num_classes=5)
    x = RNG.random((2, 16, 16, 3)).astype("float32")
    path = str(tmp_path / "vgg.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 12}, "11, 13, 16, 19"),
        ({"cfg": [8, "X"]}, "positive ints or 'M'"),
        ({"cfg": [0, "M"]}, "positive ints or 'M'"),
        ({"cfg": ["M"]}, "at least one"),
        ({"cfg": "64M"}, "list"),
        ({"input_shape": (16, 16, 3)}, "too small"),
        ({"input_shape": (None, None, 3)}, "known"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_vgg_bad_arguments(kwargs, match):
    with pytest.raises(KprunError, match=match):
        vgg(**{"depth": 11, **kwargs})
