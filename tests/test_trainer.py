"""kprune.Trainer and kprune.train.RuleOptimizer: same updates, callbacks, validation, resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kprune
from kprune.errors import KprunError
from kprune.layers import Compactor
from kprune.train.rules import GroupLassoRule, MaskRule, ResRepRule, SlimmingRule
from kprune.train import RuleOptimizer, Trainer, bind

L = keras.layers


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(3, 3, kernel_regularizer=keras.regularizers.L2(1e-2), name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = Compactor(name="conv_compactor")(x)
    x = L.ReLU()(x)
    x = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, x)
    rng = np.random.default_rng(seed)
    comp = model.get_layer("conv_compactor")
    comp.kernel.assign(np.eye(3, dtype="float32") + 0.1 * rng.normal(size=(3, 3)).astype("float32"))
    comp.set_mask([1.0, 0.0, 1.0])
    return model


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 6, 6, 2)).astype("float32"), rng.random((n, 2)).astype("float32")


def _setup(model):
    """Rules and optimizers as ResRep wants them: compactors on their own SGD."""
    rule = ResRepRule.from_model(model, lam=0.05)
    slim = SlimmingRule.from_layers([model.get_layer("bn")], s=0.01)
    return dict(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-3),
                rules=[rule, slim],
                extra_optimizers=[(rule, keras.optimizers.SGD(0.05, momentum=0.99))])


def _wrapped(model):
    kw = _setup(model)
    return RuleOptimizer(kw["optimizer"], kw["rules"], kw["extra_optimizers"])


def _assert_same_weights(a, b, rtol=1e-6, atol=1e-7):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_trainer_and_model_fit_give_the_same_weights_and_logs():
    x, y = _data()
    xv, yv = _data(8, seed=1)
    args = dict(batch_size=4, epochs=2, shuffle=False, verbose=0, validation_data=(xv, yv))

    a = _model()
    history_a = Trainer(a, loss="mse", metrics=["mae"], **_setup(a)).fit(x, y, **args)
    b = _model()
    b.compile(optimizer=_wrapped(b), loss="mse", metrics=["mae"])
    history_b = b.fit(x, y, **args)

    _assert_same_weights(a, b)
    assert int(a.optimizer.iterations) == int(b.optimizer.iterations) == 8
    assert set(history_a.history) == {"loss", "mae", "val_loss", "val_mae"}
    for key in history_b.history:
        np.testing.assert_allclose(history_a.history[key], history_b.history[key], rtol=1e-5)


def test_rules_and_optimizers_change_training():
    """Each rule and the compactor optimizer move the weights away from plain training."""
    x, y = _data()
    plain = _model()
    Trainer(plain, keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-3), "mse").fit(
        x, y, batch_size=8, verbose=0, shuffle=False)
    ruled = _model()
    Trainer(ruled, loss="mse", **_setup(ruled)).fit(x, y, batch_size=8, verbose=0, shuffle=False)
    for name in ("conv_compactor", "bn"):
        before = plain.get_layer(name).trainable_weights[0].numpy()
        after = ruled.get_layer(name).trainable_weights[0].numpy()
        assert not np.allclose(before, after)


def test_masked_channels_do_not_learn_and_lasso_shrinks_them():
    x, y = _data()
    model = _model()
    head = model.get_layer("head")
    mask = keras.Variable(np.array([1.0, 0.0], dtype="float32"), trainable=False, name="m")
    kernel_before = head.kernel.numpy()
    bias_before = head.bias.numpy()
    Trainer(model, "sgd", "mse", rules=[MaskRule([(head.kernel, mask), (head.bias, mask)])]).fit(
        x, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(head.kernel.numpy()[:, 1], kernel_before[:, 1])
    np.testing.assert_allclose(head.bias.numpy()[1], bias_before[1])
    assert not np.allclose(head.kernel.numpy()[:, 0], kernel_before[:, 0])

    model = _model()
    conv = model.get_layer("conv")
    norms_before = np.linalg.norm(conv.kernel.numpy().reshape(-1, 3), axis=0)
    opt = keras.optimizers.SGD(0.1)
    Trainer(model, opt, "mse", rules=[GroupLassoRule(1.0, [conv.kernel])]).fit(
        x, y, batch_size=8, verbose=0)
    norms_after = np.linalg.norm(conv.kernel.numpy().reshape(-1, 3), axis=0)
    assert np.all(norms_after < norms_before)


def test_rule_optimizer_one_step_by_hand():
    """Main optimizer with weight decay, extra optimizer without, a rule before both."""
    a = keras.Variable(np.array([1.0, -2.0], dtype="float32"), name="a")
    b = keras.Variable(np.array([[0.5, 3.0], [4.0, 0.0]], dtype="float32"), name="b")
    ga = np.array([0.1, 0.2], dtype="float32")
    gb = np.array([[1.0, 1.0], [1.0, 1.0]], dtype="float32")
    lam = 0.5
    opt = RuleOptimizer(keras.optimizers.SGD(0.1, weight_decay=0.5),
                        [GroupLassoRule(lam, [b])],
                        extra_optimizers=[([b], keras.optimizers.SGD(0.2))])
    a0, b0 = a.numpy().astype("float64"), b.numpy().astype("float64")
    opt.apply([ga, gb], [a, b])
    want_a = a0 - 0.1 * 0.5 * a0 - 0.1 * ga
    want_b = b0 - 0.2 * (gb + lam * b0 / np.linalg.norm(b0, axis=0, keepdims=True))
    np.testing.assert_allclose(a.numpy(), want_a, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), want_b, rtol=1e-6)
    assert int(opt.iterations) == 1


def test_predicate_selector():
    x, y = _data()
    a = _model()
    b = _model()
    is_compactor = lambda v: "compactor" in v.path  # noqa: E731
    for model, selector in ((a, is_compactor), (b, [b.get_layer("conv_compactor").kernel])):
        opt = RuleOptimizer(keras.optimizers.SGD(0.1), extra_optimizers=[
            (selector, keras.optimizers.SGD(0.5, momentum=0.5))])
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    _assert_same_weights(a, b)
    assert a.optimizer.get_config()["extra_optimizers"][0]["variables"] == \
        [a.get_layer("conv_compactor").kernel.path]


def test_predicate_selector_cannot_be_saved_before_building():
    opt = RuleOptimizer("sgd", extra_optimizers=[(lambda v: True, "adam")])
    with pytest.raises(KprunError, match="predicate"):
        opt.get_config()


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.events = []
        self.logs = []

    def on_train_begin(self, logs=None):
        self.events.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(f"epoch_begin {epoch}")

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(f"batch_begin {batch}")

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(f"batch_end {batch}")
        self.logs.append(dict(logs))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(f"epoch_end {epoch}")
        self.logs.append(dict(logs))

    def on_train_end(self, logs=None):
        self.events.append("train_end")


def test_callbacks_see_the_model_hooks_and_logs(tmp_path):
    x, y = _data(8)
    model = _model()
    recorder = _Recorder()
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))
    trainer = Trainer(model, "sgd", "mse", metrics=["mae"])
    history = trainer.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[recorder, checkpoint],
                          validation_data=(x, y))
    assert recorder.model is model
    assert recorder.events == ["train_begin",
                               "epoch_begin 0", "batch_begin 0", "batch_end 0", "batch_begin 1",
                               "batch_end 1", "epoch_end 0",
                               "epoch_begin 1", "batch_begin 0", "batch_end 0", "batch_begin 1",
                               "batch_end 1", "epoch_end 1", "train_end"]
    assert set(recorder.logs[0]) == {"loss", "mae"}
    assert set(recorder.logs[2]) == {"loss", "mae", "val_loss", "val_mae"}
    assert history.history["loss"] == [recorder.logs[2]["loss"], recorder.logs[5]["loss"]]
    saved = keras.saving.load_model(tmp_path / "e2.keras", safe_mode=True)
    _assert_same_weights(saved, model)


def test_early_stopping_stops():
    x, y = _data(8)
    model = _model()
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=0)
    history = Trainer(model, "sgd", "mse").fit(x, y, batch_size=8, epochs=5, verbose=0,
                                               callbacks=[stop])
    assert stop.stopped_epoch == 1
    assert len(history.history["loss"]) == 2


def test_validation_logs_equal_evaluate():
    x, y = _data()
    xv, yv = _data(8, seed=2)
    model = _model()
    trainer = Trainer(model, "sgd", "mse", metrics=["mae"])
    history = trainer.fit(x, y, batch_size=4, verbose=0, validation_data=(xv, yv))
    logs = trainer.evaluate(xv, yv, batch_size=4, verbose=0)
    keras_logs = model.evaluate(xv, yv, batch_size=4, verbose=0, return_dict=True)
    for key in ("loss", "mae"):
        np.testing.assert_allclose(history.history[f"val_{key}"][0], logs[key], rtol=1e-6)
        np.testing.assert_allclose(logs[key], keras_logs[key], rtol=1e-6)


def test_model_losses_are_in_the_loss():
    x, y = _data(8)
    model = _model()
    logs = Trainer(model, "sgd", "mse").evaluate(x, y, batch_size=8, verbose=0)
    mse = np.mean((model.predict(x, verbose=0) - y) ** 2)
    penalty = 1e-2 * np.sum(model.get_layer("conv").kernel.numpy() ** 2)
    np.testing.assert_allclose(logs["loss"], mse + penalty, rtol=1e-5)


def test_dataset_input_equals_arrays():
    x, y = _data()
    a, b = _model(), _model()
    Trainer(a, "sgd", "mse").fit(x, y, batch_size=4, shuffle=False, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    Trainer(b, "sgd", "mse").fit(dataset, verbose=0)
    _assert_same_weights(a, b)


def test_progress_bar(capsys):
    x, y = _data(8)
    Trainer(_model(), "sgd", "mse").fit(x, y, batch_size=4, epochs=2, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "2/2" in out and "loss:" in out


def _resume_case(tmp_path, use_trainer: bool):
    x, y = _data(16)
    first, second = (x[:8], y[:8]), (x[8:], y[8:])
    args = dict(batch_size=4, shuffle=False, verbose=0)

    def start():
        model = _model()
        if use_trainer:
            trainer = Trainer(model, loss="mse", **_setup(model))
            return model, trainer.fit
        model.compile(optimizer=_wrapped(model), loss="mse")
        return model, model.fit

    model, fit = start()
    fit(*first, **args)
    model.get_layer("conv_compactor").set_mask([0.0, 1.0, 1.0])
    path = tmp_path / "mid.keras"
    model.save(path)
    fit(*second, **args)

    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.optimizer, RuleOptimizer)
    np.testing.assert_allclose(loaded.get_layer("conv_compactor").mask.numpy(), [0.0, 1.0, 1.0])
    if use_trainer:
        Trainer(loaded, loaded.optimizer, "mse").fit(*second, **args)
    else:
        bind(loaded).fit(*second, **args)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 4
    _assert_same_weights(loaded, model)
    for got, want in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)


def test_resume_model_fit_from_keras_file(tmp_path):
    _resume_case(tmp_path, use_trainer=False)


def test_resume_trainer_from_keras_file(tmp_path):
    _resume_case(tmp_path, use_trainer=True)


def test_unbound_rule_after_reload_raises(tmp_path):
    x, y = _data(8)
    model = _model()
    model.compile(optimizer=_wrapped(model), loss="mse")
    model.fit(x, y, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    with pytest.raises(KprunError, match="bind"):
        loaded.fit(x, y, batch_size=8, verbose=0)


def test_bad_arguments():
    model = _model()
    x, y = _data(8)
    with pytest.raises(KprunError, match="not both"):
        Trainer(model, RuleOptimizer("sgd"), "mse", rules=[ResRepRule.from_model(model)])
    with pytest.raises(KprunError, match="keras.Model"):
        Trainer("model", "sgd", "mse")
    trainer = Trainer(model, "sgd", "mse")
    with pytest.raises(KprunError, match="batch_size"):
        trainer.fit(x, y, batch_size=0)
    with pytest.raises(KprunError, match="epochs"):
        trainer.fit(x, y, epochs=-1)
    with pytest.raises(KprunError, match="lengths"):
        trainer.fit(x, y[:4])
    with pytest.raises(KprunError, match="validation_data"):
        trainer.fit(x, y, validation_data=x)
    with pytest.raises(KprunError, match="Rule"):
        RuleOptimizer("sgd", ["not a rule"])
    with pytest.raises(KprunError, match="pairs"):
        RuleOptimizer("sgd", extra_optimizers=["sgd"])
    with pytest.raises(KprunError, match="bind"):
        bind(model.__class__(model.inputs, model.outputs))
    with pytest.raises(KprunError, match="path"):
        m = _model()
        m.compile(RuleOptimizer("sgd", extra_optimizers=[(["nowhere/kernel"], "sgd")]), "mse")
        m.fit(x, y, verbose=0)


def test_trainer_is_exported():
    assert kprune.Trainer is Trainer


def test_rule_with_predicate_selects_its_optimizer_and_saves(tmp_path):
    x, y = _data(8)
    model = _model()
    rule = GroupLassoRule(0.1, lambda v: v.path.endswith("head/kernel"))
    opt = RuleOptimizer("sgd", [rule], extra_optimizers=[(rule, keras.optimizers.SGD(0.3))])
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=8, verbose=0)
    config = opt.get_config()
    head = model.get_layer("head").kernel.path
    assert config["extra_optimizers"][0]["variables"] == [head]
    assert config["rules"][0]["config"]["variables"] == [head]
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    loaded.fit(x, y, batch_size=8, verbose=0)
    model.fit(x, y, batch_size=8, verbose=0)
    _assert_same_weights(loaded, model)


def test_resrep_compile_wires_the_rule_and_compactor_optimizer():
    x, y = _data(8)
    a = _model()
    kprune.resrep.compile(a, keras.optimizers.SGD(0.1, weight_decay=1e-3), "mse", lam=0.05)
    a.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    b = _model()
    res = ResRepRule.from_model(b, lam=0.05)
    opt = RuleOptimizer(keras.optimizers.SGD(0.1, weight_decay=1e-3), [res],
                        extra_optimizers=[(res, keras.optimizers.SGD(0.1, momentum=0.99))])
    b.compile(optimizer=opt, loss="mse")
    b.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    _assert_same_weights(a, b)
    assert a.optimizer.get_config()["extra_optimizers"][0]["variables"] == \
        [a.get_layer("conv_compactor").kernel.path]


def test_mixed_precision_loss_scaling_as_in_model_fit():
    """compile() wraps the RuleOptimizer in a LossScaleOptimizer; the Trainer steps through it."""
    x, _ = _data(16)
    y = 10.0 * np.ones((16, 2), "float32")  # large gradients: the first loss scales overflow
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        a, b = _model(), _model()
        kw = _setup(a)
        Trainer(a, loss="mse", **kw).fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
        b.compile(optimizer=_wrapped(b), loss="mse")
        b.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(a.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(a.optimizer.inner_optimizer, RuleOptimizer)
    # Steps with non-finite scaled gradients were skipped, the same ones on both paths.
    assert 0 < int(a.optimizer.iterations) == int(b.optimizer.iterations) < 6
    _assert_same_weights(a, b, rtol=1e-5, atol=1e-6)


def test_bind_finds_the_rule_optimizer_inside_loss_scaling():
    from kprune.train.optimizer import rule_optimizer

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        model.compile(optimizer=_wrapped(model), loss="mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert rule_optimizer(model) is model.optimizer.inner_optimizer
    assert bind(model) is model
    plain = _model()
    plain.compile(optimizer="sgd", loss="mse")
    assert rule_optimizer(plain) is None
    with pytest.raises(KprunError, match="no RuleOptimizer"):
        bind(plain)
