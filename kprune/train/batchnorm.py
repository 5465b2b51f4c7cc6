"""Re-estimate BatchNormalization statistics after pruning or soft pruning.

A model whose channels were zeroed and regrown during training (Soft Filter
Pruning, AGP, RePr) ends with moving means and variances that lag behind
what its layers now compute: Keras' default momentum of 0.99 remembers about
a hundred steps. `recalibrate` replaces them by the exact average over some
training batches, as PyTorch's `torch.optim.swa_utils.update_bn` does: each
BatchNormalization layer's moving statistics are reset and then accumulated
with momentum `1 - 1/k` on the k-th batch, so after n batches they are the
mean of the n batch statistics. Nothing else changes: no weight is trained.

Example:

>>> small = sfp.finalize()
>>> kprune.train.recalibrate(small, x_train[:2048])
"""

from __future__ import annotations

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.select.criteria import _batches


def _norm_layers(model: keras.Model) -> list:
    """The BatchNormalization layers that update in training mode (frozen ones stay)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def recalibrate(model: keras.Model, data, batch_size: int = 64, steps: int | None = None,
                verbose: int = 0) -> keras.Model:
    """Set every BatchNormalization's moving statistics to their average over `data`.

    The model is changed in place (only the moving means and variances; as
    `model.fit` changes its weights) and returned. The batches run in
    training mode, so Dropout is active while the statistics are gathered.
    Frozen BatchNormalization layers (`trainable=False`) keep theirs.

    Args:
        model: A built Keras model.
        data: Training inputs: an array, `(x, y)`, a `tf.data.Dataset` or an
            iterable of batches (a batch may be `(x, y)`).
        batch_size: Batch size when `data` is an array.
        steps: Most batches to use (default: all of `data`).
        verbose: 1 shows a progress bar over the batches.

    Returns:
        `model`, with its statistics re-estimated.

    Example:

    >>> model = kprune.prune(model, flops_target=0.5)
    >>> recalibrate(model, x_train, steps=32).evaluate(x_test, y_test)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KprunError(f"recalibrate: `batch_size` must be an int >= 1, got {batch_size!r}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise KprunError(f"recalibrate: `steps` must be an int >= 1 or None, got {steps!r}.")
    norms = _norm_layers(model)
    if not norms:
        return model
    saved = [(layer, layer.momentum, [np.array(v) for v in (layer.moving_mean,
                                                             layer.moving_variance)])
             for layer in norms]
    for layer in norms:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, "float32"))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, "float32"))
    bar = keras.utils.Progbar(steps, unit_name="batch") if verbose else None
    if data is None:
        raise KprunError("recalibrate: pass `data`, training inputs (an array, (x, y), a "
                         "dataset or batches).")
    seen = 0
    try:
        for batch, _ in _batches(data, batch_size):
            if steps is not None and seen >= steps:
                break
            seen += 1
            for layer in norms:
                layer.momentum = 1.0 - 1.0 / seen
            model(batch, training=True)
            if bar is not None:
                bar.update(seen)
    finally:
        for layer, momentum, _ in saved:
            layer.momentum = momentum
    if not seen:
        for layer, _, (mean, var) in saved:
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)
        raise KprunError(f"recalibrate: `data` gave no batch for model '{model.name}'.")
    return model


__all__ = ["recalibrate"]
