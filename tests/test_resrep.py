import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
from keras import layers as L

import archs
from kprune import resrep
from kprune.errors import KprunError, KprunWarning
from kprune.profile import profile as kprune_profile
from kprune.graph import DependencyGraph
from kprune.layers import Compactor
from kprune.tools.verify import randomize

RNG = np.random.default_rng(0)
ATTACH_FAMILIES = ["vgg", "resnet_basic", "resnet_bottleneck", "preact_resnet", "mobilenet_v2",
                   "densenet", "squeeze_excite", "xception", "conv1d_net", "conv3d_net",
                   "misc_2d", "sequential", "nested"]


def _x(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + tuple(model.input_shape[1:])).astype("float32")


def _out(model, x):
    return np.asarray(model(x, training=False))


def _assert_close(got, want):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def _random_masks(model, share=0.5, seed=0):
    """Random shared masks, keeping at least one channel per set."""
    rng = np.random.default_rng(seed)
    for names in resrep.compactor_sets(model):
        layers = [model.get_layer(n) for n in names]
        mask = (rng.random(layers[0].channels) > share).astype("float32")
        mask[rng.integers(len(mask))] = 1.0
        for layer in layers:
            layer.set_mask(mask)


# ---------------------------------------------------------------------------
# attach
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ATTACH_FAMILIES)
def test_attach_is_identity(name):
    model = archs.FAMILIES[name]()
    randomize(model, seed=1)
    before = [np.array(w) for w in model.get_weights()]
    rr = resrep.attach(model)
    assert resrep.compactors(rr)
    assert not any(isinstance(layer, Compactor) for layer in model._flatten_layers())
    x = _x(model)
    _assert_close(_out(rr, x), _out(model, x))
    for w, v in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w, v)


def test_attach_puts_compactors_after_batchnorm_and_shares_streams():
    model = archs.resnet_basic()
    rr = resrep.attach(model)
    flat_layers = {layer.name: layer for layer in rr.layers}
    for layer in resrep.compactors(rr):
        before = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
        assert isinstance(before, L.BatchNormalization)
        assert isinstance(flat_layers[layer.name], Compactor)
    sets = resrep.compactor_sets(rr)
    assert sorted(len(s) for s in sets) == [1, 1, 2, 2]  # stem + block 1, proj + block 2
    graph = DependencyGraph(rr)
    for names in sets:
        assert {graph.group_of(n).id for n in names} == {graph.group_of(names[0]).id}


def test_attach_moves_activation_after_compactor():
    model = archs.sequential()  # Conv2D(activation="relu") and Dense(activation="relu")
    randomize(model, seed=2)
    rr = resrep.attach(model)
    acts = [layer for layer in rr.layers if isinstance(layer, L.Activation)]
    assert len(acts) == 2
    for act in acts:
        before = act._inbound_nodes[0].input_tensors[0]._keras_history.operation
        assert isinstance(before, Compactor)
    x = _x(model)
    _assert_close(_out(rr, x), _out(model, x))


def test_attach_leaves_groups_it_cannot_convert_and_says_why():
    model = archs.preact_resnet()
    _, skipped = resrep.plan_sites(model)
    stream = [k for k in skipped if len(k) == 3][0]
    assert "constant it cannot absorb" in skipped[stream]
    rr = resrep.attach(model)
    attached = {n for s in resrep.compactor_sets(rr) for n in s}
    assert not any(f"{p}_compactor" in attached for p in stream)


def test_attach_exclude_by_name_and_type():
    model = archs.resnet_basic()
    stem = model.layers[1].name
    rr = resrep.attach(model, exclude=[stem])
    names = {n for s in resrep.compactor_sets(rr) for n in s}
    assert f"{stem}_compactor" not in names
    # the stem shares its channels with block 1: the whole stream is left
    assert len(resrep.compactor_sets(rr)) == 3
    with pytest.raises(KprunError, match="can take a compactor"):
        resrep.attach(model, exclude=[L.Conv2D])


def test_attach_errors():
    rr = resrep.attach(archs.vgg())
    with pytest.raises(KprunError, match="already has compactors"):
        resrep.attach(rr)
    with pytest.raises(KprunError, match="lam"):
        resrep.attach(archs.vgg(), lam=-1.0)
    with pytest.raises(KprunError, match="no Compactor"):
        resrep.convert(archs.vgg())


def test_attached_model_round_trips_safe_mode(tmp_path):
    model = archs.mobilenet_v2()
    rr = resrep.attach(model)
    randomize(rr, seed=3)
    _random_masks(rr)
    path = str(tmp_path / "rr.keras")
    rr.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _x(model)
    _assert_close(_out(loaded, x), _out(rr, x))
    assert resrep.compactor_sets(loaded) == resrep.compactor_sets(rr)


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ATTACH_FAMILIES)
def test_convert_random_masks_is_lossless(name):
    model = archs.FAMILIES[name]()
    rr = resrep.attach(model)
    randomize(rr, seed=4)
    _random_masks(rr, seed=5)
    before = [np.array(w) for w in rr.get_weights()]
    small = resrep.convert(rr)
    assert not any(isinstance(layer, Compactor) for layer in small.layers)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in small.layers) \
        or name in ("preact_resnet", "densenet", "conv1d_net")
    assert small.count_params() < model.count_params()
    x = _x(model)
    _assert_close(_out(small, x), _out(rr, x))
    for w, v in zip(before, rr.get_weights()):
        np.testing.assert_array_equal(w, v)


def test_convert_folds_constants_of_masked_channels_into_consumers():
    # DenseNet: conv -> concat -> BN -> ReLU -> 1x1 conv: a masked channel is a
    # non-zero constant after the BN; the 1x1 conv's bias takes it.
    model = archs.densenet()
    rr = resrep.attach(model)
    randomize(rr, seed=6)
    _random_masks(rr, share=0.6, seed=7)
    small = resrep.convert(rr)
    x = _x(model)
    _assert_close(_out(small, x), _out(rr, x))
    consumers = [layer for layer in small.layers if isinstance(layer, L.Conv2D)
                 and layer.kernel_size == (1, 1)]
    assert all(layer.use_bias for layer in consumers)


def test_converted_macs_match_profile():
    from kprune.profile import profile

    for build in (archs.resnet_basic, archs.mobilenet_v2, archs.densenet, archs.vgg):
        rr = resrep.attach(build())
        _random_masks(rr, seed=8)
        assert resrep.converted_macs(rr) == profile(resrep.convert(rr)).macs
        assert resrep.original_macs(rr) == profile(build()).macs


# ---------------------------------------------------------------------------
# MaskScheduler
# ---------------------------------------------------------------------------
def _scheduler(model, **kw):
    scheduler = resrep.MaskScheduler(**kw)
    scheduler.set_model(model)
    return scheduler


def _masked(model) -> int:
    return sum(int(np.sum(keras.ops.convert_to_numpy(layer.mask) == 0))
               for layer in resrep.compactors(model))


def test_scheduler_reaches_target_and_keeps_min_channels():
    rr = resrep.attach(archs.resnet_basic())
    randomize(rr, seed=9)
    for layer in resrep.compactors(rr):
        layer.set_mask(np.ones(layer.channels))
    scheduler = _scheduler(rr, flops_target=0.3, granularity=10_000, min_channels=2)
    scheduler.update()
    assert resrep.converted_macs(rr) <= 0.3 * resrep.original_macs(rr)
    assert scheduler.macs_ratio == resrep.converted_macs(rr) / resrep.original_macs(rr)
    low = _scheduler(rr, flops_target=0.001, granularity=10_000, min_channels=2)
    low.update()
    for names in resrep.compactor_sets(rr):
        masks = [keras.ops.convert_to_numpy(rr.get_layer(n).mask) for n in names]
        assert int(masks[0].sum()) == 2  # every group keeps exactly min_channels
        for m in masks[1:]:
            np.testing.assert_array_equal(m, masks[0])  # one mask per set


def test_scheduler_masks_weakest_channels_first_and_respects_granularity():
    rr = resrep.attach(archs.vgg())
    layers = resrep.compactors(rr)
    weak = [(0, 3), (2, 5), (1, 0)]  # (compactor, channel), weakest first
    for i, c in weak:
        kernel = np.eye(layers[i].channels, dtype="float32")
        kernel[:, c] *= 0.01 * (1 + weak.index((i, c)))
        layers[i].kernel.assign(kernel)
    scheduler = _scheduler(rr, flops_target=0.1, granularity=2)
    scheduler.update()
    assert _masked(rr) == 2
    for i, c in weak[:2]:
        assert keras.ops.convert_to_numpy(layers[i].mask)[c] == 0
    counts = []
    for _ in range(4):
        scheduler.update()
        counts.append(_masked(rr))
    assert counts == [4, 6, 8, 10]


def test_shared_channels_are_scored_on_the_same_scale_as_single_ones():
    # A residual stream's channel is read by one compactor per producer; fresh
    # (identity) compactors must not rank it sqrt(k) times stronger than an
    # inner channel, or the stream is never pruned and the inner layers are
    # cut alone (measured on MNIST-1D at 25% of the MACs: 88.6% accuracy with
    # the summed norm, 95.3% with this root mean square).
    rr = resrep.attach(archs.resnet_basic())
    layout = resrep._Layout(rr)
    shared = [(gid, members) for gid, members in layout.sets if len(members) > 1]
    assert shared, "the model has no shared compactor set"
    for gid, score in layout.scores().items():
        np.testing.assert_allclose(score, 1.0, rtol=1e-6)
    gid, members = shared[0]
    rng = np.random.default_rng(0)
    total = np.zeros(layout.graph.groups[gid].size)
    count = np.zeros_like(total)
    for layer, channels in members:
        kernel = rng.normal(size=tuple(layer.kernel.shape)).astype("float32")
        layer.kernel.assign(kernel)
        np.add.at(total, channels, np.sum(kernel.astype("float64") ** 2, axis=0))
        np.add.at(count, channels, 1)
    np.testing.assert_allclose(layout.scores()[gid], np.sqrt(total / count), rtol=1e-6)


def test_local_scope_masks_the_same_share_of_every_group_weakest_first():
    rr = resrep.attach(archs.vgg())
    randomize(rr, seed=4)
    rng = np.random.default_rng(1)
    for layer in resrep.compactors(rr):
        layer.kernel.assign(rng.normal(size=tuple(layer.kernel.shape)).astype("float32"))
    scheduler = _scheduler(rr, flops_target=0.5, granularity=10_000, scope="local")
    drop = scheduler.update()
    layout = resrep._Layout(rr)
    scores = layout.scores()
    shares = {gid: masked.sum() / len(masked) for gid, masked in drop.items()}
    widest = max(1.0 / len(m) for m in drop.values())
    assert max(shares.values()) - min(shares.values()) <= widest + 1e-9
    assert min(shares.values()) > 0
    for gid, masked in drop.items():  # within a group, the weakest norms go
        if masked.any() and not masked.all():
            assert scores[gid][masked].max() <= scores[gid][~masked].min()
    assert resrep.converted_macs(rr) <= 0.5 * resrep.original_macs(rr)
    with pytest.raises(KprunError, match="`scope` must be 'global' or 'local'"):
        resrep.MaskScheduler(0.5, scope="uniform")


def test_scheduler_warmup_and_interval_in_fit():
    rr = resrep.attach(archs.vgg())
    rr.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y = _x(rr, n=16), RNG.normal(size=(16, 3)).astype("float32")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(_masked(rr))

    scheduler = resrep.MaskScheduler(0.5, warmup_steps=5, interval=3, granularity=1)
    with pytest.warns(KprunWarning, match=r"the masks reach \d\d\.\d% of the original MACs, not "
                                          r"the target 50\.0%; 4 mask update\(s\) by step 16"):
        rr.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[scheduler, Record()])
    # 16 steps; updates after steps 5, 8, 11, 14, one channel more each time
    assert seen == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_scheduler_warns_inside_warmup_and_not_once_the_target_is_met(capsys):
    import warnings

    rr = resrep.attach(archs.vgg())
    rr.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y = _x(rr, n=8), RNG.normal(size=(8, 3)).astype("float32")
    with pytest.warns(KprunWarning, match="inside the warm-up"):
        rr.fit(x, y, batch_size=2, epochs=1, verbose=0,
               callbacks=[resrep.MaskScheduler(0.5, warmup_steps=100)])
    reach = resrep.MaskScheduler(0.5, warmup_steps=0, interval=1, granularity=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KprunWarning)
        rr.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[reach])
    assert reach.macs_ratio <= 0.5
    small = resrep.convert(rr)
    printed = capsys.readouterr().out
    ratio = kprune_profile(small).macs / resrep.original_macs(rr)
    assert f"{ratio:.1%} of the original" in printed and ratio <= 0.5


def test_scheduler_validates_arguments():
    with pytest.raises(KprunError, match="flops_target"):
        resrep.MaskScheduler(1.5)
    with pytest.raises(KprunError, match="interval"):
        resrep.MaskScheduler(0.5, interval=0)
    with pytest.raises(KprunError, match="min_channels"):
        resrep.MaskScheduler(0.5, min_channels=0)
