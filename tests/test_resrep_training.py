"""ResRep end to end: train with the Res rule and the mask schedule, resume, convert.

The unit parts (identity attach, the rule's gradient, the schedule on fixed
kernels, conversion of random masks) are in test_resrep.py and
test_rules.py; here the masks come from real training.
"""

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

import archs
from kprune import resrep
from kprune.layers import Compactor
from kprune.models import cifar_resnet
from kprune.profile import profile
from kprune.train import RuleOptimizer, Trainer


def _cifar_resnet20():
    return cifar_resnet(20, num_classes=4, input_shape=(12, 12, 3), width=6,
                        classifier_activation=None)


def _data(model, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + tuple(model.input_shape[1:])).astype("float32")
    classes = model.output_shape[-1]
    return x, rng.integers(0, classes, size=n)


def _masks(model) -> dict:
    return {layer.name: keras.ops.convert_to_numpy(layer.mask).copy()
            for layer in resrep.compactors(model)}


def _assert_close(got, want, rtol=1e-5):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1.0))


def _assert_same_state(a, b):
    for v, w in zip(a.weights, b.weights):
        np.testing.assert_allclose(np.asarray(v), np.asarray(w), rtol=1e-6, atol=1e-7,
                                   err_msg=v.path)
    for v, w in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_allclose(np.asarray(v), np.asarray(w), rtol=1e-6, atol=1e-7,
                                   err_msg=v.path)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ---------------------------------------------------------------------------
# Training with masks, then lossless conversion
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("build", [_cifar_resnet20, archs.mobilenet_v2, archs.densenet],
                         ids=["cifar_resnet20", "mobilenet_v2", "densenet"])
def test_trained_masks_convert_losslessly(build):
    model = build()
    rr = resrep.attach(model, lam=1e-3)
    resrep.compile(rr, keras.optimizers.SGD(0.05, momentum=0.9),
                   LOSS if build is _cifar_resnet20 else "mse")
    x, labels = _data(rr, 64)
    y = labels if build is _cifar_resnet20 else \
        np.random.default_rng(1).normal(size=(64,) + rr.output_shape[1:]).astype("float32")
    scheduler = resrep.MaskScheduler(0.5, warmup_steps=4, interval=2, granularity=12)
    history = rr.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[scheduler])
    assert np.all(np.isfinite(history.history["loss"]))

    # The schedule reached the target with real, trained kernels.
    assert scheduler.macs_ratio <= 0.5
    masked = sum(int((m == 0).sum()) for m in _masks(rr).values())
    assert masked > 0
    small = resrep.convert(rr)
    assert not any(isinstance(layer, Compactor) for layer in small.layers)
    macs = profile(small).macs
    assert macs == resrep.converted_macs(rr)
    assert macs <= 0.5 * profile(model).macs
    assert macs == pytest.approx(scheduler.macs_ratio * profile(model).macs)

    x_test, _ = _data(rr, 16, seed=2)
    _assert_close(np.asarray(small(x_test, training=False)),
                  np.asarray(rr(x_test, training=False)))


def test_masked_channels_shrink_under_the_res_rule():
    rr = resrep.attach(_cifar_resnet20(), lam=0.05)
    resrep.compile(rr, keras.optimizers.SGD(0.02, momentum=0.9), LOSS)
    x, y = _data(rr, 32)
    # Mask channels now; the rule's lasso term alone then acts on them.
    scheduler = resrep.MaskScheduler(0.6, warmup_steps=0, interval=10_000, granularity=20)
    scheduler.set_model(rr)
    scheduler.update()
    masks = _masks(rr)

    def norms():
        return {layer.name: np.linalg.norm(
            keras.ops.convert_to_numpy(layer.kernel).reshape(-1, layer.channels), axis=0)
            for layer in resrep.compactors(rr)}

    before = norms()
    rr.fit(x, y, batch_size=8, epochs=3, verbose=0)
    after = norms()
    for name, mask in masks.items():
        off = mask == 0
        if off.any():
            assert np.all(after[name][off] < before[name][off]), name
    np.testing.assert_array_equal(np.concatenate(list(_masks(rr).values())),
                                  np.concatenate(list(masks.values())))


# ---------------------------------------------------------------------------
# The schedule inside kprune.Trainer
# ---------------------------------------------------------------------------
def test_mask_scheduler_in_trainer_matches_model_fit():
    def run(use_trainer):
        keras.utils.set_random_seed(0)
        rr = resrep.attach(_cifar_resnet20(), lam=1e-3)
        x, y = _data(rr, 48)
        scheduler = resrep.MaskScheduler(0.6, warmup_steps=3, interval=2, granularity=3)
        seen = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                # Masked channels, each once: a residual stream's channel is masked in
                # every compactor of its set.
                masks = scheduler._layout.masks() if scheduler._layout is not None else {}
                seen.append(sum(int(m.sum()) for m in masks.values()))

        args = dict(batch_size=8, epochs=2, shuffle=False, verbose=0,
                    callbacks=[scheduler, Record()])
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        if use_trainer:
            res = resrep.rule(rr)
            Trainer(rr, optimizer, LOSS, rules=[res],
                    extra_optimizers=[(res, resrep.compactor_optimizer(optimizer))]).fit(x, y, **args)
        else:
            resrep.compile(rr, optimizer, LOSS).fit(x, y, **args)
        return rr, seen

    fitted, seen_fit = run(False)
    trained, seen_trainer = run(True)
    # 12 steps: updates after steps 3, 5, 7, 9, 11 with 3 more channels each time
    assert seen_fit == [0, 0, 3, 3, 6, 6, 9, 9, 12, 12, 15, 15]
    assert seen_trainer == seen_fit
    _assert_same_state(trained, fitted)


# ---------------------------------------------------------------------------
# Resume from .keras mid-training
# ---------------------------------------------------------------------------
def _resume_case(tmp_path, use_trainer):
    lam = 3e-3
    rr = resrep.attach(cifar_resnet(8, num_classes=3, input_shape=(8, 8, 3), width=4,
                      classifier_activation=None), lam=lam)
    x, y = _data(rr, 32)
    first, second = (x[:16], y[:16]), (x[16:], y[16:])
    args = dict(batch_size=4, shuffle=False, verbose=0)

    def schedule():
        return resrep.MaskScheduler(0.5, warmup_steps=2, interval=3, granularity=2)

    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    if use_trainer:
        res = resrep.rule(rr)
        fit = Trainer(rr, optimizer, LOSS, rules=[res],
                      extra_optimizers=[(res, resrep.compactor_optimizer(optimizer))]).fit
    else:
        fit = resrep.compile(rr, optimizer, LOSS).fit
    scheduler = schedule()
    fit(*first, callbacks=[scheduler], **args)
    saved_masks = _masks(rr)
    assert sum(int((m == 0).sum()) for m in saved_masks.values()) > 0
    path = tmp_path / "mid.keras"
    rr.save(path)
    fit(*second, callbacks=[scheduler], **args)

    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.optimizer, RuleOptimizer)
    assert [r.lam for r in loaded.optimizer.rules] == [lam]
    for name, mask in saved_masks.items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.get_layer(name).mask), mask)
    if use_trainer:
        Trainer(loaded, loaded.optimizer, LOSS).fit(*second, callbacks=[schedule()], **args)
    else:
        # No explicit kprune.train.bind: the MaskScheduler binds the reloaded rule.
        loaded.fit(*second, callbacks=[schedule()], **args)
    assert int(loaded.optimizer.iterations) == int(rr.optimizer.iterations) == 8
    for name, mask in _masks(rr).items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.get_layer(name).mask), mask)
    _assert_same_state(loaded, rr)
    x_test, _ = _data(rr, 8, seed=3)
    _assert_close(np.asarray(resrep.convert(loaded)(x_test)), np.asarray(resrep.convert(rr)(x_test)))


def test_resume_model_fit_from_keras_file(tmp_path):
    _resume_case(tmp_path, use_trainer=False)


def test_resume_trainer_from_keras_file(tmp_path):
    _resume_case(tmp_path, use_trainer=True)


# ---------------------------------------------------------------------------
# tf.distribute.MirroredStrategy on two logical CPUs
# ---------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import json
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np
    from kprune import resrep
    from kprune.models import cifar_resnet
    from kprune.profile import profile
    from kprune.train import Trainer

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    for path in ("fit", "trainer"):
        with strategy.scope():
            base = cifar_resnet(8, num_classes=3, input_shape=(8, 8, 3), width=4,
                      classifier_activation=None)
            rr = resrep.attach(base, lam=1e-3)
            optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
            if path == "fit":
                fit = resrep.compile(rr, optimizer, loss).fit
            else:
                res = resrep.rule(rr)
                fit = Trainer(rr, optimizer, loss, rules=[res],
                              extra_optimizers=[(res, resrep.compactor_optimizer(optimizer))]).fit
        scheduler = resrep.MaskScheduler(0.5, warmup_steps=2, interval=1, granularity=4)
        history = fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[scheduler])
        small = resrep.convert(rr)
        got = np.asarray(small(x[:8], training=False))
        want = np.asarray(rr(x[:8], training=False))
        out[path] = {
            "loss": [float(v) for v in history.history["loss"]],
            "iterations": int(keras.ops.convert_to_numpy(rr.optimizer.iterations)),
            "ratio": scheduler.macs_ratio,
            "macs": profile(small).macs,
            "converted_macs": resrep.converted_macs(rr),
            "original_macs": profile(base).macs,
            "got": got.tolist(), "want": want.tolist(),
        }
    print("RESULT" + json.dumps(out))
""")


def test_mirrored_strategy_trains_and_converts():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    assert out["replicas"] == 2
    for path in ("fit", "trainer"):
        run = out[path]
        assert run["iterations"] == 16
        assert np.all(np.isfinite(run["loss"]))
        assert run["ratio"] <= 0.5
        assert run["macs"] == run["converted_macs"] <= 0.5 * run["original_macs"]
        _assert_close(np.array(run["got"]), np.array(run["want"]))
