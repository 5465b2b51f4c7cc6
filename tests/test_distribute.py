"""tf.distribute: the Trainer and model.fit with a RuleOptimizer on two logical CPU devices.

Logical devices must be configured before TensorFlow initialises, so the
work runs in a fresh Python process that prints its results as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np
    from kprune.errors import KprunError
    from kprune.layers import Compactor
    from kprune.train.rules import ResRepRule, SlimmingRule
    from kprune.train import RuleOptimizer, Trainer

    L = keras.layers


    def make():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 6, 2))
        x = L.Conv2D(3, 3, kernel_regularizer="l2", name="conv")(inp)
        # Synchronized statistics: the same batch statistics on 2 replicas as on 1 device.
        x = L.BatchNormalization(synchronized=True, name="bn")(x)
        x = Compactor(name="conv_compactor")(x)
        x = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x))
        model = keras.Model(inp, x)
        model.get_layer("conv_compactor").set_mask([1.0, 0.0, 1.0])
        return model


    def setup(model):
        rule = ResRepRule.from_model(model, lam=0.05)
        slim = SlimmingRule.from_layers([model.get_layer("bn")], s=0.01)
        return dict(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), rules=[rule, slim],
                    extra_optimizers=[(rule, keras.optimizers.SGD(0.05, momentum=0.99))])


    def wrapped(model):
        kw = setup(model)
        return RuleOptimizer(kw["optimizer"], kw["rules"], kw["extra_optimizers"])


    rng = np.random.default_rng(0)
    x = rng.random((16, 6, 6, 2)).astype("float32")
    y = rng.random((16, 2)).astype("float32")
    fit_args = dict(batch_size=8, epochs=2, shuffle=False, verbose=0, validation_data=(x, y))
    out = {}

    single = make()
    single.compile(wrapped(single), "mse", metrics=["mae"])
    out["single_logs"] = single.fit(x, y, **fit_args).history
    out["single"] = [w.tolist() for w in single.get_weights()]

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out["replicas"] = strategy.num_replicas_in_sync

    with strategy.scope():
        model = make()
    # The model's strategy is used; compiled metrics are built before the distributed step.
    trainer = Trainer(model, loss="mse", metrics=["mae"], **setup(model))
    out["trainer_strategy"] = trainer.strategy is strategy
    out["trainer_logs"] = trainer.fit(x, y, **fit_args).history
    out["trainer"] = [w.tolist() for w in model.get_weights()]

    with strategy.scope():
        model = make()
        model.compile(wrapped(model), "mse", metrics=["mae"])
    out["fit_logs"] = model.fit(x, y, **fit_args).history
    out["fit"] = [w.tolist() for w in model.get_weights()]

    outside = make()
    try:
        Trainer(outside, "sgd", "mse", strategy=strategy)
        out["outside_error"] = ""
    except KprunError as error:
        out["outside_error"] = str(error)
    print("RESULT " + json.dumps(out))
""")


def _run() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_mirrored_strategy_matches_one_device():
    out = _run()
    assert out["replicas"] == 2
    assert out["trainer_strategy"]
    for name in ("trainer", "fit"):
        assert set(out[f"{name}_logs"]) == {"loss", "mae", "val_loss", "val_mae"}
        for key, want in out["single_logs"].items():
            np.testing.assert_allclose(out[f"{name}_logs"][key], want, rtol=1e-5)
        for got, want in zip(out[name], out["single"]):
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    assert "outside the scope" in out["outside_error"]
