"""kprune's public paths on whichever Keras backend runs the tests.

Run on TensorFlow with the rest of the suite, and by `.ci/run` again under
`KERAS_BACKEND=jax` and `KERAS_BACKEND=torch` (with the files listed there):
every test reads `keras.backend.backend()` and checks what a user of that
backend gets, a working path or a clear `KprunError`.
"""

import keras
import numpy as np
import pytest
from keras import layers as L

BACKEND = keras.backend.backend()
if BACKEND in ("jax", "torch"):
    pytest.importorskip(BACKEND, reason=f"KERAS_BACKEND={BACKEND} needs the '{BACKEND}' package "
                        "(pip install -e '.[backends]')")

import kprune
from kprune.errors import KprunError
from kprune.pruning import prune_plan
from kprune.surgeon import zero_plan

RNG = np.random.default_rng(0)
X = RNG.random((8, 8, 8, 3)).astype("float32")
Y = RNG.integers(0, 3, 8)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _np(value):
    return np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")


def _cnn(widths=(8, 8), bias=False):
    inp = keras.Input((8, 8, 3))
    x = inp
    for i, f in enumerate(widths):
        x = L.Conv2D(f, 3, padding="same", use_bias=bias, name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="fc")(x), name="cnn")


def _resnet():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(inp)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(y))
    x = L.ReLU()(L.Add()([x, y]))
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.GlobalAveragePooling2D()(L.Conv2D(10, 1)(x))
    return keras.Model(inp, L.Dense(3)(x), name="resnet")


def _random_model(build=_cnn, seed=1):
    model = build()
    kprune.verify.randomize(model, seed)
    return model


def test_profile_and_graph():
    model = _random_model(_resnet)
    p = kprune.profile(model)
    assert p.params == model.count_params()
    assert p.macs > 0
    graph = kprune.DependencyGraph(model)
    assert graph.prunable_groups()


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "orthogonality", "bn_scale", "random",
                                       "taylor", "apoz", "mean_activation"])
def test_one_shot_equals_the_masked_original(criterion):
    model = _random_model(_resnet)
    kwargs = {"ratio": 0.5, "criterion": criterion, "data": (X, Y), "loss": LOSS, "seed": 0}
    plan = prune_plan(model, **kwargs)
    assert plan
    small = kprune.prune(model, **kwargs)
    assert small.count_params() < model.count_params()
    np.testing.assert_allclose(_np(small(X)), _np(zero_plan(model, plan)(X)),
                               rtol=1e-4, atol=1e-5)


def test_flops_target_and_check_equivalence():
    model = _random_model(_resnet)
    small = kprune.prune(model, flops_target=0.5)
    assert kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
    graph = kprune.DependencyGraph(model)
    plan = kprune.verify.random_plan(graph, 0.5, seed=0)
    kprune.verify.check_equivalence(model, plan, X, rtol=1e-4, atol=1e-5, graph=graph)


def test_taylor_is_activation_times_gradient():
    w = np.array([0.5, -1.0, 2.0])
    inp = keras.Input((3,))
    hidden = L.Dense(3, use_bias=False, name="hidden", kernel_initializer="identity")(inp)
    out = L.Dense(1, use_bias=False, name="out")(hidden)
    model = keras.Model(inp, out)
    model.get_layer("out").kernel.assign(w.reshape(3, 1).astype("float32"))
    x = RNG.normal(size=(10, 3)).astype("float32")
    t = RNG.normal(size=(10, 1)).astype("float32")
    err = x @ w - t[:, 0]
    expected = np.abs(x * (2 * err[:, None] * w[None, :])).mean(axis=0)
    got = kprune.criteria.taylor(model, "hidden", (x, t), loss="mse", batch_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_data_criteria_show_a_progress_bar_only_when_verbose(capsys):
    model = _random_model()
    kprune.criteria.score_groups(model, criterion="apoz", data=X, batch_size=2)
    assert capsys.readouterr().out == ""
    kprune.criteria.score_groups(model, criterion="taylor", data=(X, Y), loss=LOSS,
                                 batch_size=2, verbose=1)
    out = capsys.readouterr().out
    assert "scoring channels with 'taylor'" in out and "4/4" in out


def test_surgeon_delete_channels():
    model = _random_model()
    small = kprune.delete_channels(model, "conv0", [0, 3])
    assert small.get_layer("conv0").filters == 6
    plan = {kprune.DependencyGraph(model).group_of("conv0").id: [0, 3]}
    np.testing.assert_allclose(_np(small(X)), _np(zero_plan(model, plan)(X)),
                               rtol=1e-4, atol=1e-5)


def test_resrep_fit_and_convert():
    rr = kprune.resrep.attach(_random_model())
    kprune.resrep.compile(rr, keras.optimizers.SGD(0.01), LOSS)
    scheduler = kprune.resrep.MaskScheduler(0.6, warmup_steps=1, interval=1, granularity=4)
    rr.fit(X, Y, batch_size=4, epochs=2, verbose=0, callbacks=[scheduler])
    assert scheduler.history
    small = kprune.resrep.convert(rr, verbose=0)
    assert kprune.profile(small).macs < kprune.resrep.original_macs(rr)
    np.testing.assert_allclose(_np(small(X)), _np(rr(X, training=False)), rtol=1e-4, atol=1e-5)


def test_resrep_saved_mid_training_resumes_after_reload(tmp_path):
    rr = kprune.resrep.attach(_random_model())
    kprune.resrep.compile(rr, keras.optimizers.SGD(0.01, momentum=0.9), LOSS)
    schedule = {"flops_target": 0.6, "warmup_steps": 1, "interval": 1, "granularity": 2}
    rr.fit(X, Y, batch_size=4, epochs=1, verbose=0,
           callbacks=[kprune.resrep.MaskScheduler(**schedule)])
    rr.save(tmp_path / "rr.keras")
    loaded = keras.saving.load_model(tmp_path / "rr.keras")
    saved = [_np(v) for v in rr.optimizer.variables if "mirror" not in v.path]
    restored = [_np(v) for v in loaded.optimizer.variables]
    assert len(saved) == len(restored)
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a, b)
    loaded.fit(X, Y, batch_size=4, epochs=1, verbose=0,
               callbacks=[kprune.resrep.MaskScheduler(**schedule)])
    small = kprune.resrep.convert(loaded, verbose=0)
    np.testing.assert_allclose(_np(small(X)), _np(loaded(X)), rtol=1e-4, atol=1e-5)


def test_mask_rule_in_fit_reads_the_mask_as_it_changes():
    model = _random_model()
    fc = model.get_layer("fc")
    mask = keras.Variable(np.array([1.0, 0.0, 1.0], "float32"), trainable=False, name="m")
    rule = kprune.rules.MaskRule([(fc.kernel, mask)])
    model.compile(optimizer=kprune.train.RuleOptimizer(keras.optimizers.SGD(0.1), [rule]),
                  loss=LOSS)
    before = _np(fc.kernel)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    after = _np(fc.kernel)
    np.testing.assert_array_equal(after[:, 1], before[:, 1])
    assert not np.allclose(after[:, 0], before[:, 0])
    mask.assign(np.array([0.0, 1.0, 1.0], "float32"))
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    last = _np(fc.kernel)
    np.testing.assert_array_equal(last[:, 0], after[:, 0])
    assert not np.allclose(last[:, 1], after[:, 1])


def test_group_lasso_rule_in_fit_matches_its_gradient():
    model = _random_model()
    conv = model.get_layer("conv0")
    rule = kprune.rules.GroupLassoRule(0.5, [conv.kernel])
    model.compile(optimizer=kprune.train.RuleOptimizer(keras.optimizers.SGD(0.1), [rule]),
                  loss=LOSS)
    model.get_layer("conv0").trainable = True
    before = _np(conv.kernel)
    model.fit(X[:4], Y[:4], batch_size=4, epochs=1, verbose=0)
    assert not np.allclose(_np(conv.kernel), before)


def test_slimming_fit_and_prune():
    model = _random_model()
    model.compile(optimizer=kprune.train.RuleOptimizer("sgd", [kprune.slimming.rule(model, 1e-3)]),
                  loss=LOSS)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    plan, _ = kprune.slimming.plan(model, 0.5)
    small, widths = kprune.slimming.prune(model, 0.5)
    assert plan and widths and small.count_params() < model.count_params()
    np.testing.assert_allclose(_np(small(X)), _np(zero_plan(model, plan)(X)),
                               rtol=1e-4, atol=1e-5)


def test_condensenet_fit_and_convert():
    from kprune.layers.learned_group_conv import LearnedGroupConv

    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same")(inp)
    h = LearnedGroupConv(8, groups=2, condense_factor=2, group_lasso=1e-3, name="lgc")(h)
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(h)))
    model.compile(optimizer="sgd", loss=LOSS)
    model.fit(X, Y, batch_size=4, epochs=2, verbose=0,
              callbacks=[kprune.condense.CondenseScheduler()])
    assert model.get_layer("lgc").stage >= 1  # condensed during fit
    small = kprune.condense.convert(model)
    np.testing.assert_allclose(_np(small(X)), _np(model(X)), rtol=1e-4, atol=1e-5)


def test_soft_filter_pruning_agp_and_repr_callbacks():
    model = _random_model()
    model.compile(optimizer="sgd", loss=LOSS)
    sfp = kprune.sfp.SoftFilterPruning(0.5)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[sfp])
    assert sfp.finalize().count_params() < model.count_params()
    model = _random_model()
    model.compile(optimizer="sgd", loss=LOSS)
    agp = kprune.agp.AGP(0.5, start_step=0, n_steps=2, frequency=1)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[agp])
    weights = _np(model.get_layer("conv0").kernel)
    assert (np.abs(weights).reshape(-1, 8).sum(axis=0) == 0).sum() == 4  # zeroed, kept zero
    model = _random_model()
    model.compile(optimizer="sgd", loss=LOSS)
    repr_ = kprune.repr.RePr(s1=1, s2=1, cycles=1, ratio=0.25)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[repr_])
    assert [event for _, event, _ in repr_.history] == ["drop", "reinit"]


def test_export_keras_reloads_on_every_backend(tmp_path):
    small = kprune.prune(_random_model(), ratio=0.5)
    report = kprune.export(small, str(tmp_path), formats=["keras"], representative_data=X)
    assert report["keras"]["max_abs_diff"] <= 1e-5
    loaded = keras.saving.load_model(report["keras"]["path"])
    np.testing.assert_allclose(_np(loaded(X)), _np(small(X)), rtol=1e-5, atol=1e-6)


def test_graph_exports_work_or_name_the_backend(tmp_path):
    small = kprune.prune(_random_model(), ratio=0.5)
    if BACKEND == "torch":
        for fmt in ("saved_model", "tflite"):
            with pytest.raises(KprunError, match="not supported on the Keras 'torch' backend"):
                kprune.export(small, str(tmp_path / fmt), formats=[fmt])
            assert not (tmp_path / fmt).exists()
        return
    report = kprune.export(small, str(tmp_path), formats=["saved_model", "tflite"])
    assert report["saved_model"]["max_abs_diff"] <= 1e-4
    assert report["tflite"]["max_abs_diff"] <= 1e-4


def test_latency_target_works_on_tensorflow_and_names_the_backend_elsewhere(monkeypatch,
                                                                            tmp_path):
    model = _random_model()
    if BACKEND != "tensorflow":
        with pytest.raises(KprunError, match=f"timed on the TensorFlow backend.*'{BACKEND}'"):
            kprune.prune(model, latency_target=0.5)
        with pytest.raises(KprunError, match="TensorFlow backend"):
            kprune.latency.LatencyModel(model, verbose=0)
        return
    from kprune import latency as kl

    def fake(models, *args, **kwargs):  # seconds in proportion to MACs: no timing in a test
        return [1e-9 * kprune.profile(m).macs + 1e-6 for m in models]

    monkeypatch.setenv("KPRUNE_CACHE", str(tmp_path))  # fake timings stay out of the cache
    monkeypatch.setattr(kl, "measure_interleaved", fake)
    small = kprune.prune(model, latency_target=0.6)
    assert kprune.profile(small).macs < kprune.profile(model).macs


def test_trainer_runs_on_tensorflow_and_points_to_fit_elsewhere():
    model = _random_model()
    if BACKEND != "tensorflow":
        with pytest.raises(KprunError, match=f"'{BACKEND}' backend.*model.fit.*RuleOptimizer"):
            kprune.Trainer(model, "sgd", LOSS)
        return
    history = kprune.Trainer(model, "sgd", LOSS).fit(X, Y, epochs=1, batch_size=4, verbose=0)
    assert "loss" in history.history


def test_head_taylor_is_the_derivative_of_the_loss_along_each_head():
    inp = keras.Input((6, 4))
    x = L.Dense(8, name="embed")(inp)
    x = L.Add()([x, L.MultiHeadAttention(3, 4, name="mha")(x, x)])
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(x)))
    graph = kprune.DependencyGraph(model)
    heads = next(g for g in graph.groups if any(m.slot == "heads" for m in g.producers))
    x, y = RNG.normal(size=(8, 6, 4)).astype("float32"), RNG.integers(0, 3, 8)
    scores = kprune.criteria.group_scores(model, heads, "taylor", graph=graph, data=(x, y),
                                          loss=LOSS, batch_size=8)
    layer = model.get_layer("mha")
    kernels = {v.path.split("/", 1)[1]: v for v in layer.weights if v.path.endswith("kernel")}
    saved = {k: _np(v) for k, v in kernels.items()}

    def loss_with_head_scaled(h, scale):
        for key, v in kernels.items():
            value = saved[key].copy()
            if key.startswith("attention_output"):
                value[h] *= scale
            else:
                value[:, h] *= scale
            v.assign(value.astype("float32"))
        total = float(np.sum(_np(LOSS(y, model(x)))) * len(x))  # LOSS averages over the batch
        for key, v in kernels.items():
            v.assign(saved[key].astype("float32"))
        return total

    eps = 1e-2  # d/de L(W_h (1 + e)) at 0 is the sum of weight x gradient over the head
    slope = np.array([(loss_with_head_scaled(h, 1 + eps) - loss_with_head_scaled(h, 1 - eps))
                      / (2 * eps) for h in range(3)])
    np.testing.assert_allclose(scores, np.abs(slope) / np.abs(slope).max(), rtol=2e-2, atol=2e-3)
