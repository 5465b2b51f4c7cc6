"""Trainer: a tf.function GradientTape loop that applies kprune's update rules."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from kprune.errors import KprunError
from kprune.train.optimizer import RuleOptimizer


class Trainer:
    """Train a Keras model with update rules in an explicit GradientTape loop.

    Each step runs the model under a `tf.GradientTape`, computes the
    compiled loss plus `model.losses`, takes the gradients, and hands them
    to a `kprune.train.RuleOptimizer`, which applies `rules` and steps every
    variable with its optimizer. `model.fit` with the same `RuleOptimizer`
    computes the same updates; the Trainer is the loop to read or change.

    The model is compiled with the wrapped optimizer, the loss and the
    metrics, so `model.optimizer` (its `iterations`), the metrics and
    `model.save` behave as after `model.compile`. Keras callbacks
    (`ModelCheckpoint`, `EarlyStopping`, `kprune.resrep.MaskScheduler`,
    your own) see the usual hooks and logs, and a Keras progress bar shows
    the epoch.

    With `strategy` (or a model built under a `tf.distribute` strategy's
    scope), batches are split across the replicas, the step runs with
    `strategy.run`, and the gradients are summed across replicas by the
    optimizer, as in `model.fit`.

    The Trainer needs the TensorFlow backend; on JAX or PyTorch it raises a
    `KprunError`: compile the model with a `RuleOptimizer` and call
    `model.fit`, which computes the same updates on every backend.

    Args:
        model: A Keras model (trained in place).
        optimizer: An optimizer instance or name, or a `RuleOptimizer`
            (then `rules` and `extra_optimizers` must be empty).
        loss: A loss as `model.compile` takes it.
        metrics: Metrics as `model.compile` takes them.
        rules: `kprune.rules.Rule`s applied to every step's gradients.
        extra_optimizers: `[(selector, optimizer), ...]` as in
            `RuleOptimizer`: variables that train with their own optimizer.
        strategy: A `tf.distribute.Strategy`; by default the model's.

    Example:

    >>> rule = kprune.rules.ResRepRule.from_model(rr, lam=1e-4)
    >>> trainer = kprune.Trainer(rr, keras.optimizers.SGD(0.01, momentum=0.9),
    ...                          "sparse_categorical_crossentropy", metrics=["accuracy"],
    ...                          rules=[rule],
    ...                          extra_optimizers=[(rule, keras.optimizers.SGD(0.01, momentum=0.99))])
    >>> history = trainer.fit(x, y, epochs=2, batch_size=64, validation_data=(xv, yv))
    """

    def __init__(self, model: keras.Model, optimizer, loss, metrics: Sequence | None = None,
                 rules: Sequence = (), extra_optimizers: Sequence | None = None,
                 strategy: tf.distribute.Strategy | None = None):
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise KprunError(f"Trainer: kprune.Trainer is a TensorFlow GradientTape loop and "
                             f"does not run on the Keras '{backend}' backend. Use model.fit "
                             "with the same rules instead: model.compile(optimizer="
                             "kprune.train.RuleOptimizer(optimizer, rules, extra_optimizers), "
                             "loss=...), then model.fit(...); it computes the same updates on "
                             "every backend.")
        if not isinstance(model, keras.Model):
            raise KprunError(f"Trainer: `model` must be a keras.Model, got {type(model).__name__}.")
        self.model = model
        self.strategy = strategy or model.distribute_strategy
        self._check_scope()
        with self.strategy.scope():
            if isinstance(optimizer, RuleOptimizer):
                if rules or extra_optimizers:
                    raise KprunError("Trainer: give `rules` and `extra_optimizers` either to the "
                                     "Trainer or to the RuleOptimizer, not both.")
                self.optimizer = optimizer
            else:
                self.optimizer = RuleOptimizer(optimizer, list(rules), extra_optimizers)
            model.compile(optimizer=self.optimizer, loss=loss, metrics=metrics)
            self._loss = keras.metrics.Mean(name="loss")
        self._train_function = None
        self._test_function = None

    def _check_scope(self) -> None:
        outside = [v.path for v in self.model.variables
                   if not self.strategy.extended.variable_created_in_scope(v.value)]
        if outside:
            raise KprunError(f"Trainer: model '{self.model.name}' was built outside the scope of "
                             f"the strategy (variable '{outside[0]}'); build or load it under "
                             "`with strategy.scope():`.")

    # ------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------
    def _replicas(self):
        return tf.cast(self.strategy.num_replicas_in_sync, "float32")

    def train_step(self, data) -> None:
        """One replica's step: forward, loss, gradients, rules and optimizer update.

        Args:
            data: A batch `(x, y)` or `(x, y, sample_weight)` (or `x`).
        """
        model = self.model
        # The RuleOptimizer, or the LossScaleOptimizer that compile() puts around it for
        # mixed precision: it scales the loss and unscales the gradients before the rules.
        optimizer = model.optimizer
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                      training=True)
            scaled = optimizer.scale_loss(loss)
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        optimizer.apply(grads, variables)
        self._track(x, y, y_pred, sample_weight, loss)

    def test_step(self, data) -> None:
        """One replica's evaluation step: forward pass, loss and metrics."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = model(x, training=False)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                  training=False)
        self._track(x, y, y_pred, sample_weight, loss)

    def _track(self, x, y, y_pred, sample_weight, loss) -> None:
        # Keras losses divide by the replica count under tf.distribute; undo it for the log.
        size = tf.shape(tf.nest.flatten(x)[0])[0]
        self._loss.update_state(tf.cast(loss, "float32") * self._replicas(), sample_weight=size)
        self.model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _logs(self) -> dict:
        logs = dict(self.model.get_metrics_result())
        logs["loss"] = self._loss.result()
        return logs

    def _make_function(self, step):
        strategy = self.strategy

        @tf.function(reduce_retracing=True)
        def function(batch):
            strategy.run(step, args=(batch,))
            return self._logs()

        return function

    def _reset(self) -> None:
        self.model.reset_metrics()
        self._loss.reset_state()

    # ------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------
    def _dataset(self, x, y, sample_weight, batch_size: int, shuffle: bool):
        if isinstance(x, tf.data.Dataset):
            if y is not None or sample_weight is not None:
                raise KprunError("Trainer: with a tf.data.Dataset, give no `y` or "
                                 "`sample_weight`; the dataset yields them.")
            return x
        if x is None:
            raise KprunError("Trainer: no data given.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise KprunError(f"Trainer: `batch_size` must be an int >= 1, got {batch_size!r}.")
        parts = tuple(p for p in (x, y, sample_weight) if p is not None)
        sizes = {len(leaf) for part in parts for leaf in tf.nest.flatten(part)}
        if len(sizes) != 1:
            raise KprunError(f"Trainer: inputs, targets and sample weights have different "
                             f"lengths {sorted(sizes)}.")
        data = tf.data.Dataset.from_tensor_slices(parts if len(parts) > 1 else parts[0])
        if shuffle:
            data = data.shuffle(sizes.pop(), reshuffle_each_iteration=True)
        return data.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)

    @staticmethod
    def _steps(dataset):
        steps = int(dataset.cardinality())
        return steps if steps > 0 else None

    # ------------------------------------------------------------------
    # Public loops
    # ------------------------------------------------------------------
    def fit(self, x=None, y=None, epochs: int = 1, batch_size: int = 32,
            validation_data=None, callbacks: Sequence | None = None, verbose: int = 1,
            shuffle: bool = True, sample_weight=None,
            initial_epoch: int = 0) -> keras.callbacks.History:
        """Train for `epochs` epochs.

        Args:
            x: Inputs (arrays) or a batched `tf.data.Dataset` of `(x, y)` or
                `(x, y, sample_weight)`.
            y: Targets, when `x` holds arrays.
            epochs: Index of the last epoch (as in `model.fit`).
            batch_size: Batch size for arrays.
            validation_data: `(x, y)`, `(x, y, sample_weight)` or a dataset,
                evaluated after every epoch (logs prefixed `val_`).
            callbacks: Keras callbacks.
            verbose: 0 silent, 1 progress bar, 2 one line per epoch.
            shuffle: Shuffle arrays every epoch.
            sample_weight: Per-sample weights, with arrays.
            initial_epoch: Epoch to start from (to resume).

        Returns:
            A `keras.callbacks.History`.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise KprunError(f"Trainer: `epochs` must be an int >= 0, got {epochs!r}.")
        dataset = self._dataset(x, y, sample_weight, batch_size, shuffle)
        steps = self._steps(dataset)
        distributed = self.strategy.experimental_distribute_dataset(dataset)
        if validation_data is not None:
            val = validation_data if isinstance(validation_data, tf.data.Dataset) \
                else self._dataset(*_unpack(validation_data), batch_size, shuffle=False)
        history = keras.callbacks.History()
        callback_list = keras.callbacks.CallbackList(
            list(callbacks or []) + [history], add_progbar=verbose != 0, model=self.model,
            verbose=verbose, epochs=epochs, steps=steps)
        self._build(dataset)
        if self._train_function is None:
            self._train_function = self._make_function(self.train_step)
        model = self.model
        model.stop_training = False
        callback_list.on_train_begin()
        logs = {}
        for epoch in range(initial_epoch, epochs):
            self._reset()
            callback_list.on_epoch_begin(epoch)
            for step, batch in enumerate(distributed):
                callback_list.on_train_batch_begin(step)
                logs = _numpy(self._train_function(batch))
                callback_list.on_train_batch_end(step, logs)
                if model.stop_training:
                    break
            epoch_logs = dict(logs)
            if validation_data is not None:
                val_logs = self.evaluate(val, verbose=0, _callbacks=callback_list)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callback_list.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
        callback_list.on_train_end(logs)
        return history

    def evaluate(self, x=None, y=None, batch_size: int = 32, verbose: int = 1,
                 sample_weight=None, callbacks: Sequence | None = None, _callbacks=None) -> dict:
        """Loss and metrics of the model on some data, in inference mode.

        Args:
            x: Inputs (arrays) or a batched `tf.data.Dataset`.
            y: Targets, when `x` holds arrays.
            batch_size: Batch size for arrays.
            verbose: 0 silent, 1 progress bar.
            sample_weight: Per-sample weights, with arrays.
            callbacks: Keras callbacks (their `on_test_*` hooks run).

        Returns:
            A dict of metric name -> float.
        """
        dataset = self._dataset(x, y, sample_weight, batch_size, shuffle=False)
        if _callbacks is None:
            _callbacks = keras.callbacks.CallbackList(
                list(callbacks or []), add_progbar=verbose != 0, model=self.model,
                verbose=verbose, epochs=1, steps=self._steps(dataset))
        self._build(dataset)
        if self._test_function is None:
            self._test_function = self._make_function(self.test_step)
        self._reset()
        _callbacks.on_test_begin()
        logs = {}
        for step, batch in enumerate(self.strategy.experimental_distribute_dataset(dataset)):
            _callbacks.on_test_batch_begin(step)
            logs = _numpy(self._test_function(batch))
            _callbacks.on_test_batch_end(step, logs)
        _callbacks.on_test_end(logs)
        return logs

    def _build(self, dataset) -> None:
        """Build the model, compiled metrics and optimizer (in the strategy's scope); bind rules.

        No variable can be created inside `strategy.run` (a MirroredStrategy
        step fails on a compiled metric built there), so, as `model.fit`
        does before a distributed loop, every variable is created first from
        the dataset's element spec.
        """
        model = self.model
        with self.strategy.scope():
            model._symbolic_build(data_batch=dataset.element_spec)
        if not all(rule.bound for rule in self.optimizer.rules):
            self.optimizer.bind(model)


def _unpack(data) -> tuple:
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise KprunError("Trainer: `validation_data` must be (x, y), (x, y, sample_weight) "
                         "or a tf.data.Dataset.")
    return tuple(data) + (None,) * (3 - len(data))


def _numpy(logs: dict) -> dict:
    return {k: float(keras.ops.convert_to_numpy(v)) for k, v in logs.items()}
