"""Channel masks during training (ChannelMasker) and the schedules on them: SFP, RePr, AGP."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

import archs
from kprune import agp, criteria
from kprune.errors import KprunError
from kprune.train.masking import ChannelMasker, lowest_global, uniform_ratio
from kprune.pruning import plan_macs
from kprune.methods.repr import RePr, orthogonal_filters
from kprune.methods.sfp import SoftFilterPruning
from kprune.tools.verify import random_plan, randomize


def _x(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + tuple(model.input_shape[1:])).astype("float32")


def _data(model, n=32, seed=0):
    rng = np.random.default_rng(seed)
    return _x(model, n, seed), rng.integers(0, 3, n)


def _compiled(name, seed=1):
    model = archs.FAMILIES[name]()
    randomize(model, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _np(variable):
    return np.array(variable.numpy())


def _masked_masker(model, seed=0, mode="hard"):
    masker = ChannelMasker(mode=mode)
    masker.set_model(model)
    plan = random_plan(masker.graph, 0.5, seed=seed)
    masker.set_plan({gid: ch for gid, ch in plan.items() if gid in masker.masks})
    return masker


def _columns(layer, channels):
    return _np(layer.kernel)[..., channels]


# ---------------------------------------------------------------------------
# ChannelMasker
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg", "resnet_basic", "densenet", "mobilenet_v2", "xception"])
def test_masked_model_equals_finalized(name):
    model = archs.FAMILIES[name]()
    randomize(model, seed=1)
    masker = _masked_masker(model)
    assert masker.plan()
    before = [_np(w) for w in model.weights]
    small = masker.finalize()
    for w, b in zip(model.weights, before):  # finalize leaves the model alone
        np.testing.assert_array_equal(_np(w), b)
    masker.apply()
    x = _x(model)
    assert small.count_params() < model.count_params()
    want = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(small(x, training=False)), want, rtol=1e-5, atol=1e-5)


def test_masked_channels_output_exact_zeros_in_training_and_inference():
    model = archs.resnet_basic()
    randomize(model, seed=2)
    masker = _masked_masker(model, seed=3)
    masker.apply()
    x = _x(model, 6)
    for gid, channels in masker.plan().items():
        group = masker.graph.groups[gid]
        for member in group.params:
            if not isinstance(member.layer, keras.layers.BatchNormalization):
                continue
            probe = keras.Model(model.inputs[0], member.layer.output)
            positions = np.flatnonzero(np.isin(member.index, channels))
            for training in (False, True):
                out = np.asarray(probe(x, training=training))
                np.testing.assert_array_equal(out[..., positions], 0.0)
                assert np.abs(np.delete(out, positions, axis=-1)).max() > 0
            gamma = _np(member.layer.gamma)[positions]
            assert np.all(gamma != 0)  # gamma is kept so filters can still learn


def test_hard_mode_keeps_channels_zero_through_training():
    model = _compiled("vgg")
    masker = _masked_masker(model, seed=4)
    plan = masker.plan()
    first = masker.graph.groups[next(iter(plan))]
    conv = first.producers[0].layer
    kept = np.setdiff1d(np.arange(first.size), plan[first.id])
    kept_before = _columns(conv, kept)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(np.abs(_columns(conv, plan[first.id])).max())

    x, y = _data(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[masker, Probe()])
    assert len(seen) == 8 and max(seen) == 0.0
    assert np.abs(_columns(conv, kept) - kept_before).max() > 0  # the rest trained


def test_hard_masks_hold_under_the_gradient_tape_trainer():
    from kprune.train import Trainer

    model = archs.resnet_basic()
    randomize(model, seed=7)
    masker = _masked_masker(model, seed=8)
    x, y = _data(model)
    Trainer(model, keras.optimizers.SGD(0.05, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True)).fit(
        x, y, batch_size=8, epochs=1, verbose=0, callbacks=[masker])
    for gid, channels in masker.plan().items():
        for member in masker.graph.groups[gid].producers:
            positions = np.flatnonzero(np.isin(member.index, channels))
            assert np.abs(_np(member.layer.kernel)[..., positions]).max() == 0.0
    small = masker.finalize()
    x4 = _x(model)
    np.testing.assert_allclose(np.asarray(small(x4, training=False)),
                               np.asarray(model(x4, training=False)), rtol=1e-5, atol=1e-5)


def test_masker_errors_name_the_layer():
    model = archs.vgg()
    masker = ChannelMasker()
    with pytest.raises(KprunError, match="no model"):
        masker.mask(0, [0])
    masker.set_model(model)
    name = masker.groups[0].producers[0].name
    with pytest.raises(KprunError, match=name):
        masker.mask(name, [99])
    with pytest.raises(KprunError, match="min_channels"):
        masker.mask(name, range(masker.groups[0].size))
    with pytest.raises(KprunError, match="mode"):
        ChannelMasker(mode="medium")
    dense_out = model.layers[-1].name
    with pytest.raises(KprunError, match=dense_out):
        masker.mask(dense_out, [0])


def test_lowest_global_uses_raw_scores_and_never_empties():
    model = archs.vgg()
    masker = ChannelMasker()
    masker.set_model(model)
    g1, g2 = masker.groups[:2]
    scores = {g1.id: np.full(g1.size, 0.01), g2.id: np.linspace(1.0, 2.0, g2.size)}
    plan = lowest_global([g1, g2], scores, g1.size + 2)
    assert len(plan[g1.id]) == g1.size - 1  # the group keeps one channel
    assert plan[g2.id] == [0, 1, 2]  # the next lowest are taken instead


def test_uniform_ratio_reaches_target_and_no_less_would():
    model = archs.resnet_basic()
    ratio = uniform_ratio(model, 0.5)
    masker = ChannelMasker()
    masker.set_model(model)
    from kprune import pruners

    def macs(r):
        zeros = {g.id: np.zeros(g.size) for g in masker.groups}
        return plan_macs(masker.graph, pruners.local_plan(masker.groups, zeros, r, max_ratio=1.0))

    base = plan_macs(masker.graph, {})
    assert macs(ratio) <= 0.5 * base
    assert macs(ratio - 1e-6) > 0.5 * base


# ---------------------------------------------------------------------------
# SFP
# ---------------------------------------------------------------------------
def test_sfp_masks_lowest_l2_and_move_when_weights_change():
    model = archs.vgg()
    randomize(model, seed=5)
    sfp = SoftFilterPruning(0.5)
    sfp.set_model(model)
    group = sfp.groups[0]
    conv = group.producers[0].layer
    first = sfp.select()[group.id]
    l2 = criteria.l2(conv)
    assert sorted(first) == sorted(np.argsort(l2)[:len(first)].tolist())
    # The zeroed filters grow back stronger than the kept ones: the mask moves.
    kernel = _np(conv.kernel)
    kept = np.setdiff1d(np.arange(group.size), first)
    kernel[..., first] = 10.0 * (1 + np.arange(len(first)))
    kernel[..., kept] *= 1e-3
    conv.kernel.assign(kernel)
    second = sfp.select()[group.id]
    assert sorted(second) == sorted(kept[np.argsort(l2[kept])][:len(second)].tolist())
    assert set(second).isdisjoint(first)
    assert len(sfp.history) == 2


def test_sfp_zeroed_filters_keep_training_between_epochs():
    model = _compiled("vgg")
    sfp = SoftFilterPruning(0.5)
    regrown = []

    class BeforeSfp(keras.callbacks.Callback):  # runs before SFP re-zeroes at epoch end
        def on_epoch_end(self, epoch, logs=None):
            if sfp.history:
                gid, channels = next(iter(sfp.history[-1].items()))
                conv = sfp.graph.groups[gid].producers[0].layer
                regrown.append(np.abs(_columns(conv, channels)).max())

    x, y = _data(model)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[BeforeSfp(), sfp])
    assert len(regrown) == 2 and min(regrown) > 0  # soft: zeroed filters trained on
    gid, channels = next(iter(sfp.plan().items()))
    conv = sfp.graph.groups[gid].producers[0].layer
    assert np.abs(_columns(conv, channels)).max() == 0.0  # zeroed at the last epoch end
    small = sfp.finalize()
    x4 = _x(model)
    np.testing.assert_allclose(np.asarray(small(x4, training=False)),
                               np.asarray(model(x4, training=False)), rtol=1e-5, atol=1e-5)


def test_sfp_rejects_bad_arguments():
    with pytest.raises(KprunError, match="ratio"):
        SoftFilterPruning(1.0)
    with pytest.raises(KprunError, match="bn_scale"):
        SoftFilterPruning(0.3, criterion="bn_scale")
    with pytest.raises(KprunError, match="interval"):
        SoftFilterPruning(0.3, interval=0)


# ---------------------------------------------------------------------------
# RePr
# ---------------------------------------------------------------------------
def test_orthogonal_filters_are_orthonormal_and_orthogonal_to_kept():
    rng = np.random.default_rng(0)
    kept = rng.normal(size=(5, 12))
    avoid = rng.normal(size=(3, 12))
    new = orthogonal_filters(kept, 3, avoid, rng)
    np.testing.assert_allclose(new @ kept.T, 0.0, atol=1e-10)
    np.testing.assert_allclose(new @ avoid.T, 0.0, atol=1e-10)  # room for both: 12 > 5 + 3 + 3
    np.testing.assert_allclose(new @ new.T, np.eye(3), atol=1e-10)
    tight = orthogonal_filters(kept, 5, rng.normal(size=(5, 12)), rng)  # 5+5+5 > 12: kept only
    np.testing.assert_allclose(tight @ kept.T, 0.0, atol=1e-10)


def test_repr_reinitialises_dropped_filters_orthogonal_to_kept():
    model = archs.vgg()
    randomize(model, seed=6)
    cb = RePr(s1=1, s2=1, cycles=1, ratio=0.3, seed=0)
    cb.set_model(model)
    dropped = cb.drop()
    assert dropped and sum(len(c) for c in dropped.values()) == int(0.3 * sum(
        g.size for g in cb.groups))
    for gid, channels in dropped.items():
        conv = cb.graph.groups[gid].producers[0].layer
        assert np.abs(_columns(conv, channels)).max() == 0.0
    cb.reinitialize()
    assert not cb.plan()
    for gid, channels in dropped.items():
        conv = cb.graph.groups[gid].producers[0].layer
        w = np.moveaxis(_np(conv.kernel).astype(np.float64), -1, 0).reshape(conv.filters, -1)
        kept = np.setdiff1d(np.arange(conv.filters), channels)
        new = w[channels]
        norms = np.linalg.norm(w[kept], axis=1)
        np.testing.assert_allclose(new @ w[kept].T, 0.0, atol=1e-4 * norms.max() ** 2)
        np.testing.assert_allclose(np.linalg.norm(new, axis=1), norms.mean(), rtol=1e-5)


def test_repr_schedule_and_prune_at_end():
    cb = RePr(s1=3, s2=2, cycles=2)
    events = {t: cb.event(t) for t in range(1, 16) if cb.event(t)}
    assert events == {3: "drop", 5: "reinit", 8: "drop", 10: "reinit"}
    model = _compiled("resnet_basic")
    cb = RePr(s1=2, s2=2, cycles=2, ratio=0.3, prune_at_end=True, seed=0)
    x, y = _data(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    assert [e[:2] for e in cb.history] == [(2, "drop"), (4, "reinit"), (6, "drop")]
    small = cb.finalize()
    assert small.count_params() < model.count_params()
    x4 = _x(model)
    np.testing.assert_allclose(np.asarray(small(x4, training=False)),
                               np.asarray(model(x4, training=False)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# AGP
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("s_i,s_f,t0,n,dt", [(0.0, 0.8, 0, 4, 25), (0.1, 0.6, 10, 5, 3)])
def test_agp_schedule_matches_the_formula(s_i, s_f, t0, n, dt):
    for t in range(0, t0 + n * dt + 2 * dt):
        got = agp.sparsity_at(t, s_f, s_i, t0, n, dt)
        if t < t0:
            assert got == 0.0
            continue
        t_k = t0 + min((t - t0) // dt, n) * dt  # the last pruning step
        want = s_f + (s_i - s_f) * (1 - (t_k - t0) / (n * dt)) ** 3
        assert got == pytest.approx(want, abs=1e-12)
    assert agp.sparsity_at(t0, s_f, s_i, t0, n, dt) == pytest.approx(s_i)
    assert agp.sparsity_at(t0 + n * dt, s_f, s_i, t0, n, dt) == pytest.approx(s_f)


def test_agp_channel_mode_prunes_monotonically_to_final_sparsity():
    model = _compiled("resnet_basic")
    cb = agp.AGP(0.5, start_step=1, n_steps=3, frequency=2)
    masks = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            masks.append({g: m.copy() for g, m in cb.masker.masks.items()})

    x, y = _data(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb, Record()])
    assert [s for s, _ in cb.history] == [1, 3, 5, 7]
    for before, after in zip(masks, masks[1:]):
        for gid in before:
            assert np.all(after[gid] >= before[gid])  # pruned channels stay pruned
    for group in cb.masker.groups:
        assert cb.masker.masks[group.id].sum() == int(np.floor(0.5 * group.size + 0.5))
    small = cb.finalize()
    x4 = _x(model)
    np.testing.assert_allclose(np.asarray(small(x4, training=False)),
                               np.asarray(model(x4, training=False)), rtol=1e-5, atol=1e-5)


def test_agp_unstructured_warns_and_keeps_the_shape():
    model = _compiled("vgg")
    with pytest.warns(UserWarning, match="no faster"):
        cb = agp.AGP(0.6, n_steps=2, frequency=2, mode="unstructured")
    x, y = _data(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    with pytest.warns(UserWarning, match="no faster"):
        dense = cb.finalize()
    assert dense.count_params() == model.count_params()
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel = _np(dense.get_layer(layer.name).kernel)
            assert (kernel == 0).sum() == int(np.floor(0.6 * kernel.size + 0.5))


def test_agp_rejects_bad_arguments():
    with pytest.raises(KprunError, match="initial_sparsity"):
        agp.AGP(0.3, initial_sparsity=0.5)
    with pytest.raises(KprunError, match="mode"):
        agp.AGP(0.3, mode="block")
    with pytest.raises(KprunError, match="frequency"):
        agp.AGP(0.3, frequency=0)
