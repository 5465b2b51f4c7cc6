"""kprune.lowrank: exact decompositions, hand-counted costs, rank selection, errors, round trips."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import kprune
from kprune import KprunError, KprunWarning
from kprune.tools.cli import main

lowrank = kprune.lowrank
RNG = np.random.default_rng(0)


def single(layer, shape):
    """A model of one layer on an input of `shape`, with a non-zero bias."""
    inp = keras.Input(shape)
    model = keras.Model(inp, layer(inp))
    if getattr(layer, "use_bias", False):
        layer.bias.assign(RNG.normal(size=layer.bias.shape).astype("float32"))
    return model


def predict(model, x):
    """`model.predict(x)`; XLA-compiled for channels_first convolutions on TensorFlow.

    TensorFlow's CPU Conv2D has no channels_first (NCHW) kernel; XLA has one.
    """
    if keras.backend.backend() == "tensorflow" and any(
            getattr(layer, "data_format", None) == "channels_first" for layer in model.layers):
        model.compile(jit_compile=True)
    return model.predict(x, verbose=0)


def batch(model, n=3):
    return RNG.normal(size=(n,) + tuple(model.inputs[0].shape[1:])).astype("float32")


# (case id, layer factory, input shape, kind)
CASES = [
    ("dense", lambda: L.Dense(6, activation="relu"), (5,), "channel"),
    ("dense_seq", lambda: L.Dense(6), (4, 5), "channel"),
    ("conv2d_same_stride", lambda: L.Conv2D(6, 3, strides=2, padding="same", activation="relu"),
     (9, 9, 4), "channel"),
    ("conv2d_dilated", lambda: L.Conv2D(5, 3, dilation_rate=2, padding="same"), (9, 9, 3),
     "channel"),
    ("spatial_valid_strides", lambda: L.Conv2D(6, (3, 5), strides=(2, 1), activation="relu"),
     (9, 10, 4), "spatial"),
    ("spatial_same_strides", lambda: L.Conv2D(5, 3, strides=2, padding="same"), (9, 8, 3),
     "spatial"),
    ("spatial_dilated", lambda: L.Conv2D(5, (3, 3), dilation_rate=(2, 1), padding="same",
                                         use_bias=False), (8, 8, 3), "spatial"),
    ("spatial_channels_first", lambda: L.Conv2D(5, 3, strides=2, padding="same",
                                                data_format="channels_first"), (3, 9, 8),
     "spatial"),
    ("conv1d_causal", lambda: L.Conv1D(6, 3, padding="causal", activation="tanh"), (10, 4),
     "channel"),
    ("conv1d_strides", lambda: L.Conv1D(5, 4, strides=2), (11, 3), "channel"),
    ("conv3d", lambda: L.Conv3D(5, 2, padding="same"), (4, 4, 4, 3), "channel"),
]


def _hand_rank_r(kernel, kind, rank):
    """The rank-r kernel, by numpy, in the layout of each decomposition."""
    k = kernel.astype("float64")
    if kind == "channel":
        m = k.reshape(-1, k.shape[-1])
    else:
        kh, kw, cin, cout = k.shape
        m = np.einsum("ijco->icjo", k).reshape(kh * cin, kw * cout)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    mr = u[:, :rank] @ np.diag(s[:rank]) @ vt[:rank]
    if kind == "channel":
        return mr.reshape(k.shape).astype("float32")
    kh, kw, cin, cout = k.shape
    return np.einsum("icjo->ijco", mr.reshape(kh, cin, kw, cout)).astype("float32")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_full_rank_equals_the_original(case):
    _, make, shape, kind = case
    model = single(make(), shape)
    layer = model.layers[-1]
    x = batch(model)
    full = lowrank.full_rank(layer.kernel.shape, kind)
    out = lowrank.decompose(model, {layer.name: (kind, full)}, only_cheaper=False)
    assert [type(lay) for lay in out.layers[1:]] == [type(layer)] * 2
    np.testing.assert_allclose(predict(out, x), predict(model, x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rank_r_equals_the_layer_with_the_numpy_rank_r_kernel(case):
    _, make, shape, kind = case
    model = single(make(), shape)
    layer = model.layers[-1]
    x = batch(model)
    rank = 2
    small = lowrank.decompose(model, {layer.name: (kind, rank)}, only_cheaper=False)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.layers[-1].kernel.assign(_hand_rank_r(layer.kernel.numpy(), kind, rank))
    np.testing.assert_allclose(predict(small, x), predict(reference, x),
                               rtol=1e-4, atol=1e-5)
    first = small.get_layer(f"{layer.name}_lowrank")
    assert first.kernel.shape[-1] == rank and not first.use_bias
    second = small.get_layer(layer.name)
    assert second.activation is layer.activation or \
        second.activation.__name__ == layer.activation.__name__


def test_macs_and_params_are_those_counted_by_hand():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="a")(inp)        # 8x8x16
    x = L.Conv2D(32, (3, 5), strides=2, padding="valid", name="b")(x)          # 3x2x32
    x = L.Flatten()(x)                                                           # 192
    model = keras.Model(inp, L.Dense(10, name="fc")(x))
    small = lowrank.decompose(model, {"a": 4, "b": ("spatial", 6), "fc": 3})
    p = kprune.profile(small)
    # a: 3x3x3 -> 4 on 8x8, then 1x1 4 -> 16 on 8x8; no bias
    a = 9 * 3 * 4 * 64 + 4 * 16 * 64
    # b: 3x1 (stride 2 in height) 16 -> 6 on 3x8 (the width stays 8), then 1x5 6 -> 32 on 3x2
    b = 3 * 16 * 6 * (3 * 8) + 5 * 6 * 32 * (3 * 2)
    fc = 192 * 3 + 3 * 10
    assert p.macs == a + b + fc
    assert p.params == (27 * 4 + 4 * 16) + (3 * 16 * 6 + 5 * 6 * 32 + 32) + (192 * 3 + 3 * 10 + 10)
    assert p.params == small.count_params()


def tiny():
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(12, 3, padding="same", use_bias=False, name="c1")(inp)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(x))
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(24, activation="relu", name="fc1")(x)
    return keras.Model(inp, L.Dense(4, name="fc2")(x), name="tiny")


def _accuracy_like(model_ref, x):
    ref = predict(model_ref, x)

    def evaluate(m):
        return float(1.0 / (1.0 + np.mean((predict(m, x) - ref) ** 2)))
    return evaluate


SELECTIONS = [("uniform", {}), ("uniform", {"uniform_by": "energy"}), ("enc_map", {}),
              ("enc_model", {}), ("enc_map", {"metric": "accuracy", "points": 2}),
              ("enc_inf", {"candidates": 3})]


@pytest.mark.parametrize("method, extra", SELECTIONS,
                         ids=[m + "".join(f"-{v}" for v in e.values()) for m, e in SELECTIONS])
def test_every_selection_meets_its_macs_target(method, extra):
    model = tiny()
    x = batch(model, 4)
    if method == "enc_inf" or extra.get("metric") == "accuracy":
        extra = {**extra, "evaluate": _accuracy_like(model, x)}
    before = [w.copy() for w in model.get_weights()]
    base = kprune.profile(model).macs
    sel = lowrank.select_ranks(model, 0.6, method, verbose=0, **extra)
    small = lowrank.decompose(model, sel)
    macs = kprune.profile(small).macs
    assert macs == sel.macs <= 0.6 * base
    assert sel.params == small.count_params()
    assert sel.ranks and "dw" not in sel.ranks
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    if method == "enc_inf":
        assert len(sel.candidates) == 3 and sel.accuracy == max(c[3] for c in sel.candidates)
        np.testing.assert_allclose(extra["evaluate"](small), sel.accuracy, rtol=1e-4)


def test_enc_model_scores_at_least_enc_map_and_compress_meets_the_target():
    model = tiny()
    enc_map = lowrank.select_ranks(model, 0.5, "enc_map", verbose=0)
    enc_model = lowrank.select_ranks(model, 0.5, "enc_model", verbose=0)
    assert enc_model.score >= enc_map.score - 1e-12
    assert enc_map.score == pytest.approx(lowrank.network_metric(enc_map.layers, enc_map.ranks))
    small = lowrank.compress(model, flops_target=0.5, method="enc_model", verbose=0)
    assert kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
    assert "kind" in str(enc_map) and "c2" in str(enc_map)


def test_energy_metric_is_the_share_of_squared_singular_values():
    model = tiny()
    info = lowrank.rank_metrics(model, verbose=0)["c2"]
    s = np.linalg.svd(model.get_layer("c2").kernel.numpy().reshape(-1, 16).astype("float64"),
                      compute_uv=False)
    np.testing.assert_allclose(info.metric["channel"], np.cumsum(s**2) / np.sum(s**2),
                               rtol=1e-6)
    assert set(info.metric) == {"channel", "spatial"}
    assert set(lowrank.rank_metrics(model, verbose=0, kinds=["channel"])["c2"].metric) == \
        {"channel"}


def test_decomposed_model_prunes_profiles_and_reloads_with_safe_mode(tmp_path):
    model = tiny()
    x = batch(model)
    small = lowrank.compress(model, flops_target=0.6, verbose=0)
    path = str(tmp_path / "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(predict(loaded, x), predict(small, x),
                               rtol=1e-5, atol=1e-6)
    assert all(type(lay).__module__.startswith("keras.") for lay in loaded.layers)
    pruned = kprune.prune(small, flops_target=0.7)
    assert kprune.profile(pruned).macs <= 0.7 * kprune.profile(small).macs
    assert pruned.output_shape == model.output_shape


def test_shared_layer_is_decomposed_at_every_call():
    inp = keras.Input((6, 8))
    dense = L.Dense(8, name="shared")
    model = keras.Model(inp, L.Add()([dense(inp), dense(L.ReLU()(inp))]))
    x = batch(model)
    small = lowrank.decompose(model, {"shared": 8}, only_cheaper=False)
    np.testing.assert_allclose(predict(small, x), predict(model, x),
                               rtol=1e-4, atol=1e-5)
    assert kprune.profile(lowrank.decompose(model, {"shared": 2})).macs == 2 * 6 * 2 * (8 + 8)


def test_a_rank_that_does_not_lower_macs_leaves_the_layer_with_a_warning():
    model = tiny()
    with pytest.warns(KprunWarning, match="fc2"):
        out = lowrank.decompose(model, {"fc2": 4, "c2": 2})
    names = [lay.name for lay in out.layers]
    assert "fc2_lowrank" not in names and "c2_lowrank" in names


@pytest.mark.parametrize("ranks, message", [
    ({"c2": 0}, "rank 0 is outside 1..16"),
    ({"c2": 17}, "rank 17 is outside 1..16"),
    ({"c2": ("spatial", 37)}, "rank 37 is outside 1..36, the ranks of its spatial"),
    ({"nope": 2}, "'nope' is not a layer of model 'tiny'"),
    ({"dw": 2}, "'dw' \\(DepthwiseConv2D\\) cannot be decomposed"),
    ({"fc1": ("spatial", 2)}, "'fc1' \\(Dense\\) has no 'spatial'"),
    ({"c2": ("svd", 2)}, "no 'svd' decomposition"),
    ({"c2": 2.5}, "'c2': a rank is a positive int"),
])
def test_bad_ranks_are_refused_naming_the_layer(ranks, message):
    with pytest.raises(KprunError, match=message):
        lowrank.decompose(tiny(), ranks)


def test_grouped_convolution_is_refused():
    model = single(L.Conv2D(4, 3, groups=2), (6, 6, 4))
    with pytest.raises(KprunError, match="grouped convolution"):
        lowrank.decompose(model, {model.layers[-1].name: 1})


@pytest.mark.parametrize("kwargs, message", [
    ({"flops_target": 0.01}, "cannot reach 1.0% of its MACs"),
    ({"flops_target": 0.0}, "in \\(0, 1\\]"),
    ({"method": "svd"}, "Unknown method 'svd'"),
    ({"method": "enc_inf"}, "pass `evaluate"),
    ({"metric": "accuracy"}, "pass `evaluate"),
    ({"exclude": ["missing"]}, "'missing' is neither"),
    ({"kinds": ["spatial"]}, "must include 'channel'"),
    ({"method": "uniform", "uniform_by": "energy", "metric": "accuracy"}, "takes metric='energy'"),
    ({"exclude": ["Conv2D", "Dense"]}, "has no layer whose decomposition lowers its MACs"),
])
def test_bad_selections_are_refused(kwargs, message):
    kwargs = {"flops_target": 0.5, **kwargs}
    with pytest.raises(KprunError, match=message):
        lowrank.select_ranks(tiny(), verbose=0, **kwargs)


def test_cli_decompose(tmp_path, capsys):
    model = tiny()
    src, out = str(tmp_path / "m.keras"), str(tmp_path / "out.keras")
    model.save(src)
    assert main(["decompose", src, out, "--flops-target", "0.5", "--method", "enc_model"]) == 0
    text = capsys.readouterr().out
    small = keras.saving.load_model(out, safe_mode=True)
    assert kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
    assert "enc_model" in text and out in text
    assert main(["decompose", src, out, "--flops-target", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kprune: error: ") and "cannot reach" in err[0]
    assert main(["decompose", src, out, "--flops-target", "0.5", "--method", "enc_inf"]) == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["decompose", "--help"])
    assert capsys.readouterr().out.startswith("usage: kprune decompose")


def test_public_name():
    import importlib

    assert importlib.import_module("kprune.lowrank") is importlib.import_module(
        "kprune.methods.lowrank")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(kprune.lowrank.compress)
