"""Channel importance criteria: one score per output channel, higher = more important.

Each criterion is a small function usable on its own:

* from weights, on one layer: `l1`, `l2`, `fpgm`, `orthogonality` (the layer's
  filters), `bn_scale` (|gamma| of a normalisation layer) and `random`;
* from data, on one layer's output: `taylor`, `apoz`, `mean_activation`.

`group_scores` turns any of them into one score per channel of a dependency
group (`kprune.graph.Group`): every member layer is scored, its positions are
mapped onto the group's channels, each member's scores are divided by their
maximum, and the members are reduced (mean by default). Data criteria look at
the tensors the group's consumers read, that is at the channels as the next
layers see them.

Example:

>>> model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
>>> l1(model.get_layer("Conv1")).shape
(32,)
>>> graph = kprune.graph.DependencyGraph(model)
>>> group_scores(model, graph.group_of("Conv1"), "fpgm", graph=graph).shape
(32,)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph import DependencyGraph, get_rule, walk
from kprune.graph.walk import is_tensor as walk_is_tensor
from kprune.surgeon.rebuild import Rebuilder, weights_of

# --------------------------------------------------------------------------
# Filters of one layer
# --------------------------------------------------------------------------
_L = keras.layers
_CONV = (_L.Conv1D, _L.Conv2D, _L.Conv3D)
_TRANSPOSE = (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)
_DEPTHWISE = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
_SEPARABLE = (_L.SeparableConv1D, _L.SeparableConv2D)


def _numpy(variable) -> np.ndarray:
    """A variable or eager tensor of any backend as a float64 numpy array."""
    if isinstance(variable, np.ndarray):
        return variable.astype(np.float64, copy=False)
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)


def filters(layer: keras.layers.Layer) -> np.ndarray:
    """The layer's filters as a matrix with one row per output channel.

    Conv1D/2D/3D (grouped too) and Dense: kernel `(..., out)`; Conv*Transpose:
    kernel `(..., out, in)`; DepthwiseConv: kernel `(..., in, multiplier)`, row
    `c * multiplier + m`; SeparableConv: its pointwise kernel. The bias is not
    part of a filter.

    Args:
        layer: A built layer of one of the kinds above (or a kprune Compactor).

    Returns:
        Array of shape `(output channels, weights per filter)`.

    Raises:
        KprunError: if the layer has no filters kprune knows how to read.

    Example:

    >>> filters(keras.layers.Dense(4, input_shape=(3,))).shape   # once built
    (4, 3)
    """
    kernel = getattr(layer, "pointwise_kernel", None) if isinstance(layer, _SEPARABLE) else None
    if kernel is None:
        kernel = getattr(layer, "kernel", None)
    if kernel is None or not layer.built:
        raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}) has no built kernel "
                         "to score filters on.")
    if not has_filters(layer):
        raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}) is not a layer whose "
                         "filters kprune can read (Conv*, Conv*Transpose, DepthwiseConv*, "
                         "SeparableConv*, Dense, Compactor).")
    w = _numpy(kernel)
    if isinstance(layer, _TRANSPOSE):
        w = np.moveaxis(w, -2, -1)
    elif isinstance(layer, _DEPTHWISE):
        w = w.reshape(w.shape[:-2] + (-1,))
    return np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)


def has_filters(layer) -> bool:
    """Whether `filters(layer)` can read the layer."""
    return isinstance(layer, _CONV + _TRANSPOSE + _DEPTHWISE + _SEPARABLE + (_L.Dense,)) or (
        type(layer).__name__ == "Compactor")


# --------------------------------------------------------------------------
# Weight criteria
# --------------------------------------------------------------------------
def _l1_rows(w: np.ndarray) -> np.ndarray:
    return np.abs(w).sum(axis=1)


def _l2_rows(w: np.ndarray) -> np.ndarray:
    return np.sqrt((w ** 2).sum(axis=1))


def _fpgm_rows(w: np.ndarray) -> np.ndarray:
    sq = (w ** 2).sum(axis=1)
    dist2 = sq[:, None] + sq[None, :] - 2.0 * (w @ w.T)  # |a - b|^2 without an (n, n, k) array
    np.fill_diagonal(dist2, 0.0)
    return np.sqrt(np.maximum(dist2, 0.0)).sum(axis=1)


def _orthogonality_rows(w: np.ndarray) -> np.ndarray:
    n = len(w)
    if n < 2:
        return np.ones(n)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    unit = w / np.where(norms > 0, norms, 1.0)
    overlap = np.abs(unit @ unit.T - np.eye(n))
    np.fill_diagonal(overlap, 0.0)
    return 1.0 - overlap.sum(axis=1) / (n - 1)


def l1(layer: keras.layers.Layer) -> np.ndarray:
    """L1 norm of every filter (Li et al., 2017).

    Args:
        layer: A layer with filters (see `filters`).

    Returns:
        Array of shape `(output channels,)`.

    Example:

    >>> l1(model.get_layer("conv2d"))
    """
    return _l1_rows(filters(layer))


def l2(layer: keras.layers.Layer) -> np.ndarray:
    """L2 norm of every filter.

    Args:
        layer: A layer with filters (see `filters`).

    Returns:
        Array of shape `(output channels,)`.

    Example:

    >>> l2(model.get_layer("conv2d"))
    """
    return _l2_rows(filters(layer))


def fpgm(layer: keras.layers.Layer) -> np.ndarray:
    """Sum of Euclidean distances from each filter to all others (He et al., 2019).

    Filters near the geometric median of the layer are the most replaceable and
    score lowest.

    Args:
        layer: A layer with filters (see `filters`).

    Returns:
        Array of shape `(output channels,)`.

    Example:

    >>> fpgm(model.get_layer("conv2d"))
    """
    return _fpgm_rows(filters(layer))


def orthogonality(layer: keras.layers.Layer) -> np.ndarray:
    """RePr's filter orthogonality (Prakash et al., 2019), as an importance.

    With unit-norm filters `W` (one per row) and `P = |W W^T - I|`, a filter's
    overlap is the mean of its row of `P` over the other filters; the score is
    `1 - overlap`, in [0, 1] for every layer, so layers of different widths and
    depths compare fairly. Filters correlated with many others score low.

    Args:
        layer: A layer with filters (see `filters`).

    Returns:
        Array of shape `(output channels,)`.

    Example:

    >>> orthogonality(model.get_layer("conv2d"))
    """
    return _orthogonality_rows(filters(layer))


def bn_scale(layer: keras.layers.Layer) -> np.ndarray:
    """|gamma| of a normalisation layer (Network Slimming, Liu et al., 2017).

    Args:
        layer: A built BatchNormalization (or another layer with a `gamma`).

    Returns:
        Array of shape `(channels,)`.

    Raises:
        KprunError: if the layer has no `gamma` (for example `scale=False`).

    Example:

    >>> bn_scale(model.get_layer("batch_normalization"))
    """
    gamma = getattr(layer, "gamma", None)
    if gamma is None:
        raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}) has no gamma "
                         "(scale) weight for criterion 'bn_scale'.")
    return np.abs(_numpy(gamma)).reshape(-1)


def random(layer: keras.layers.Layer, seed: int | None = None) -> np.ndarray:
    """Uniform random scores, one per output channel (a baseline).

    Args:
        layer: A layer with filters or a `gamma`.
        seed: Seed of the random generator.

    Returns:
        Array of shape `(output channels,)` in [0, 1).

    Example:

    >>> random(model.get_layer("conv2d"), seed=0)
    """
    n = len(bn_scale(layer)) if not has_filters(layer) else len(filters(layer))
    return np.random.default_rng(seed).random(n)


# --------------------------------------------------------------------------
# Data criteria
# --------------------------------------------------------------------------
@dataclasses.dataclass
class _View:
    """A tensor to observe: its channel axis and the channel of each position."""

    tensor: object
    axis: int
    index: np.ndarray
    size: int


class _Stat:
    """Accumulates one statistic per channel of a view over batches."""

    def __init__(self, view: _View, kind: str):
        self.view, self.kind = view, kind
        self.total = np.zeros(view.size)
        self.count = 0

    def add(self, value: np.ndarray, grad: np.ndarray | None = None) -> None:
        a = _positions_last(value, self.view.axis)  # (N, S, P)
        if self.kind == "taylor":
            per_sample = (a * _positions_last(grad, self.view.axis)).sum(axis=1)
            self.total += np.abs(_to_channels(per_sample, self.view, "sum")).sum(axis=0)
            self.count += a.shape[0]
            return
        stat = (a == 0) if self.kind == "apoz" else np.abs(a)
        self.total += _to_channels(stat.sum(axis=(0, 1))[None], self.view, "mean")[0]
        self.count += a.shape[0] * a.shape[1]

    def result(self) -> np.ndarray:
        value = self.total / max(self.count, 1)
        return 1.0 - value if self.kind == "apoz" else value


def _positions_last(value, axis: int) -> np.ndarray:
    a = np.moveaxis(np.asarray(value, dtype=np.float64), axis, -1)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _to_channels(values: np.ndarray, view: _View, how: str) -> np.ndarray:
    """(N, positions) -> (N, channels): sum or mean of the positions of each channel.

    Channels no position maps to get 0.
    """
    valid = np.flatnonzero(view.index >= 0)
    order = valid[np.argsort(view.index[valid], kind="stable")]
    channels, starts, counts = np.unique(view.index[order], return_index=True, return_counts=True)
    out = np.zeros((values.shape[0], view.size))
    if len(order):
        sums = np.add.reduceat(values[:, order], starts, axis=1)
        out[:, channels] = sums / counts if how == "mean" else sums
    return out


def _batches(data, batch_size: int):
    """Yield (x, y) batches from arrays `x`, a tuple `(x, y)` or an iterable of batches.

    A list of tuples (or any other iterable, such as a `tf.data.Dataset`) is
    taken as batches `(x, y)` or `(x,)`; a list of arrays as the inputs of a
    multi-input model.
    """
    if data is None:
        raise KprunError("This criterion needs `data`: an array of inputs, a tuple (x, y) "
                         "or a dataset of such batches.")
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif isinstance(data, (np.ndarray, dict)) or keras.ops.is_tensor(data) or (
            isinstance(data, list) and not all(isinstance(b, tuple) for b in data)):
        x, y = data, None  # a list of arrays is the inputs of a multi-input model
    else:
        for batch in data:
            if isinstance(batch, tuple):
                yield batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                yield batch, None
        return
    n = len(keras.tree.flatten(x)[0])
    for start in range(0, n, batch_size):
        cut = slice(start, start + batch_size)
        yield (keras.tree.map_structure(lambda a: a[cut], x),
               None if y is None else keras.tree.map_structure(lambda a: a[cut], y))


def _probe(flat, tensors: list, model: keras.Model, with_layers: bool = False):
    """A model from the inputs to `tensors` followed by the model's outputs.

    With `with_layers`, also `{id(source layer): layer of the probe}` for the
    layers the probe had to copy (nested models are rebuilt flat).
    """
    wanted = list(tensors) + list(flat.outputs)
    inputs = list(flat.inputs)
    copies: dict = {}
    if any(isinstance(layer, keras.Model) for layer in model.layers):
        # Tensors inside a nested model belong to its own graph: rebuild flat.
        rebuilder = Rebuilder(flat)
        rebuilder.run()
        wanted = [rebuilder.tensors[id(t)] for t in wanted]
        inputs = [rebuilder.tensors[id(t)] for t in inputs]
        copies = rebuilder.layers
    probe = keras.Model(inputs[0] if len(inputs) == 1 else inputs, wanted)
    return (probe, copies) if with_layers else probe


def _resolve_loss(model, loss) -> Callable:
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None:
        raise KprunError(f"Criterion 'taylor' needs the loss of model '{model.name}': pass "
                         "`loss=` or compile the model with one.")
    if isinstance(loss, (dict, list, tuple)):
        raise KprunError(f"Criterion 'taylor' needs one loss callable for model "
                         f"'{model.name}', got {type(loss).__name__}; pass `loss=`.")
    return keras.losses.get(loss) if isinstance(loss, str) else loss


def _count_batches(data, batch_size: int) -> int | None:
    """How many batches `_batches(data, batch_size)` yields, or None if it cannot tell."""
    if isinstance(data, tuple) and len(data) == 2:
        x = data[0]
    elif isinstance(data, (np.ndarray, dict)) or keras.ops.is_tensor(data) or (
            isinstance(data, list) and not all(isinstance(b, tuple) for b in data)):
        x = data
    else:
        try:
            return len(data)
        except TypeError:
            return None
    try:
        return -(-len(keras.tree.flatten(x)[0]) // batch_size)
    except TypeError:
        return None


def _progress(data, batch_size: int, verbose: int, what: str):
    """A `keras.utils.Progbar` over the batches of `data`, or None when `verbose` is 0."""
    if not verbose:
        return None
    print(f"kprune: scoring channels with {what}")
    return keras.utils.Progbar(_count_batches(data, batch_size), verbose=verbose,
                               unit_name="batch")


def _observe(model, flat, views: list, kind: str, data, loss=None,
             batch_size: int = 32, verbose: int = 0) -> list:
    """Per-channel statistic `kind` ('taylor', 'apoz', 'mean') of every view."""
    if not views:
        return []
    probe = _probe(flat, [v.tensor for v in views], model)
    stats = [_Stat(v, kind) for v in views]
    loss_fn = _resolve_loss(model, loss) if kind == "taylor" else None
    bar = _progress(data, batch_size, verbose, f"'{kind}'")
    seen = 0
    for x, y in _batches(data, batch_size):
        seen += 1
        if kind == "taylor":
            values, grads = _taylor_batch(probe, len(views), x, y, loss_fn, model, flat, views)
        else:
            values, grads = probe(x, training=False)[:len(views)], [None] * len(views)
        for stat, value, grad in zip(stats, values, grads):
            stat.add(_numpy(value), None if grad is None else _numpy(grad))
        if bar is not None:
            bar.update(seen)
    if bar is not None and bar.target is None:
        bar.update(seen, finalize=True)
    if not seen:
        raise KprunError(f"The data given to score model '{model.name}' holds no batch.")
    return [s.result() for s in stats]


def _summed_loss(loss_fn, y, preds, x):
    """The loss summed over the batch (a loss that averages is scaled by the batch size)."""
    value = loss_fn(y, preds[0] if len(preds) == 1 else preds)
    if len(value.shape) == 0:
        batch = keras.ops.shape(keras.tree.flatten(x)[0])[0]
        return value * keras.ops.cast(batch, value.dtype)
    return keras.ops.sum(value)


def _run_flat(flat, x, added: dict, watched: list):
    """Run the calls of `flat` on `x`; `added[id(tensor)]` is added to that tensor.

    Returns the values of the `watched` tensors (before the addition) and the
    model's flat outputs. Backend-neutral: every call is an eager layer call,
    so JAX can differentiate it with respect to the added values.
    """
    values: dict = {}
    structure = flat.input_structure if flat.input_structure is not None else (
        flat.inputs[0] if len(flat.inputs) == 1 else flat.inputs)
    for tensor, value in zip(keras.tree.flatten(structure), keras.tree.flatten(x)):
        values[id(tensor)] = keras.ops.convert_to_tensor(value)
    seen: dict = {}

    def fill(item):
        return values[id(item)] if walk_is_tensor(item) else item

    for call in flat.calls:
        args = keras.tree.map_structure(fill, call.args)
        kwargs = keras.tree.map_structure(fill, call.kwargs)
        if getattr(call.layer, "_call_has_training_arg", False):
            kwargs = dict(kwargs, training=False)
        outputs = keras.tree.flatten(call.layer(*args, **kwargs))
        for tensor, value in zip(call.outputs, outputs):
            if id(tensor) in added:
                seen[id(tensor)] = value
                value = value + added[id(tensor)]
            values[id(tensor)] = value
    return [seen[id(t)] for t in watched], [values[id(t)] for t in flat.outputs]


def _taylor_batch(probe, n_views, x, y, loss_fn, model, flat=None, views=None):
    """Activations of the views and the gradients of the summed loss at them."""
    if y is None:
        raise KprunError(f"Criterion 'taylor' needs targets: pass data=(x, y) for model "
                         f"'{model.name}'.")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outs = probe(x, training=False)
            acts, preds = outs[:n_views], outs[n_views:]
            total = _summed_loss(loss_fn, y, preds, x)
        grads = tape.gradient(total, acts)
        return acts, [g if g is not None else tf.zeros_like(a) for a, g in zip(acts, grads)]
    if backend == "torch":
        import torch

        outs = probe(x, training=False)
        acts, preds = outs[:n_views], outs[n_views:]
        total = _summed_loss(loss_fn, y, preds, x)
        grads = torch.autograd.grad(total, acts, allow_unused=True) if total.requires_grad \
            else [None] * n_views
        return ([a.detach() for a in acts],
                [g if g is not None else torch.zeros_like(a) for a, g in zip(acts, grads)])
    if backend == "jax":
        import jax

        tensors = [v.tensor for v in views]
        zeros = [keras.ops.zeros((keras.ops.shape(keras.tree.flatten(x)[0])[0],)
                                 + tuple(t.shape[1:]), dtype=t.dtype) for t in tensors]

        def loss_of(deltas):
            acts, preds = _run_flat(flat, x, {id(t): d for t, d in zip(tensors, deltas)},
                                    tensors)
            return _summed_loss(loss_fn, y, preds, x), acts

        grads, acts = jax.grad(loss_of, has_aux=True)(zeros)
        return acts, grads
    raise KprunError(f"Criterion 'taylor' has no gradient for Keras backend '{backend}'; "
                     "use the tensorflow, jax or torch backend.")


def _weight_gradients(probe, variables: list, x, y, loss_fn):
    """Gradients of the summed loss of `probe` at `variables` (None where it does not depend)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            preds = probe(x, training=False)
            total = keras.ops.sum(loss_fn(y, preds[0] if len(preds) == 1 else preds))
        return tape.gradient(total, variables)
    if backend == "torch":
        import torch

        preds = probe(x, training=False)
        total = keras.ops.sum(loss_fn(y, preds[0] if len(preds) == 1 else preds))
        wrt = [v.value for v in variables]
        usable = [i for i, w in enumerate(wrt) if w.requires_grad]
        grads = torch.autograd.grad(total, [wrt[i] for i in usable], allow_unused=True) \
            if usable and total.requires_grad else []
        out = [None] * len(variables)
        for i, g in zip(usable, grads):
            out[i] = g
        return out
    if backend == "jax":
        import jax

        def loss_of(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                preds = probe(x, training=False)
                return keras.ops.sum(loss_fn(y, preds[0] if len(preds) == 1 else preds))

        return jax.grad(loss_of)([v.value for v in variables])
    raise KprunError(f"Criterion 'taylor' has no gradient for Keras backend '{backend}'; "
                     "use the tensorflow, jax or torch backend.")


def _layer_view(model, layer) -> tuple:
    flat = walk(model)
    name = layer if isinstance(layer, str) else layer.name
    for call in flat.calls:
        if call.layer is layer or call.layer.name == name:
            out = call.outputs[0]
            rank = len(out.shape)
            axis = 1 if getattr(call.layer, "data_format", None) == "channels_first" and rank > 2 \
                else rank - 1
            size = int(out.shape[axis])
            return flat, _View(out, axis, np.arange(size), size)
    raise KprunError(f"Layer '{name}' is not a layer of model '{model.name}'.")


def taylor(model: keras.Model, layer, data, loss=None, batch_size: int = 32,
           verbose: int = 0) -> np.ndarray:
    """First-order Taylor importance of a layer's output channels (Molchanov et al., 2017).

    For every sample, the product activation x d(loss)/d(activation) is summed
    over the spatial positions of a channel; its absolute value is averaged
    over the samples. The loss is taken per sample (not divided by the batch
    size), so scores do not depend on how `data` is batched.

    Args:
        model: The model (functional or Sequential).
        layer: The layer (or its name) whose output is scored.
        data: `(x, y)` arrays, or an iterable of `(x, y)` batches.
        loss: A Keras loss (name, object or function); defaults to the
            compiled model's loss.
        batch_size: Batch size when `data` holds arrays.

    Returns:
        Array of shape `(output channels,)`.

    Example:

    >>> taylor(model, "conv2d", (x, y), loss="sparse_categorical_crossentropy")
    """
    flat, view = _layer_view(model, layer)
    return _observe(model, flat, [view], "taylor", data, loss, batch_size, verbose)[0]


def apoz(model: keras.Model, layer, data, batch_size: int = 32,
         verbose: int = 0) -> np.ndarray:
    """One minus the Average Percentage of Zeros of a layer's output (Hu et al., 2016).

    Args:
        model: The model (functional or Sequential).
        layer: The layer (or its name) whose output is scored; a ReLU (or a
            layer with a ReLU activation) gives the meaningful zeros.
        data: Input arrays, `(x, y)`, or an iterable of batches.
        batch_size: Batch size when `data` holds arrays.

    Returns:
        Array of shape `(output channels,)`: the share of non-zero activations.

    Example:

    >>> apoz(model, "re_lu", x)
    """
    flat, view = _layer_view(model, layer)
    return _observe(model, flat, [view], "apoz", data, None, batch_size, verbose)[0]


def mean_activation(model: keras.Model, layer, data, batch_size: int = 32,
                    verbose: int = 0) -> np.ndarray:
    """Mean absolute activation of each output channel over samples and positions.

    After a ReLU this is the plain mean activation of Molchanov et al. (2017).

    Args:
        model: The model (functional or Sequential).
        layer: The layer (or its name) whose output is scored.
        data: Input arrays, `(x, y)`, or an iterable of batches.
        batch_size: Batch size when `data` holds arrays.

    Returns:
        Array of shape `(output channels,)`.

    Example:

    >>> mean_activation(model, "re_lu", x)
    """
    flat, view = _layer_view(model, layer)
    return _observe(model, flat, [view], "mean", data, None, batch_size, verbose)[0]


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Criterion:
    """A named criterion.

    Attributes:
        name: Registry name.
        kind: 'filters' (scores the filters of producers and depthwise
            layers), 'gamma' (scores normalisation layers), 'data' (scores
            activations: `stat` is 'taylor', 'apoz' or 'mean') or 'random'.
        fn: The per-layer function (`fn(layer)` for 'filters' and 'gamma').
        stat: The activation statistic of a 'data' criterion.
        rows: For 'filters' criteria, the same score computed from a matrix
            of filters (one row per channel), used for layers whose rule
            exposes its filters (attention heads, EinsumDense); None for a
            criterion that only reads layers.
    """

    name: str
    kind: str
    fn: Callable
    stat: str | None = None
    rows: Callable | None = None

    @property
    def needs_data(self) -> bool:
        return self.kind == "data"


_CRITERIA: dict = {}


def register_criterion(name: str, fn: Callable, kind: str = "filters") -> None:
    """Add a per-layer weight criterion to the registry.

    Args:
        name: The name `prune(..., criterion=name)` will accept.
        fn: `fn(layer) -> np.ndarray` of one score per output channel.
        kind: 'filters' (called on producers and depthwise layers) or 'gamma'
            (called on the normalisation layers of a group).

    Example:

    >>> register_criterion("linf", lambda layer: np.abs(filters(layer)).max(axis=1))
    """
    if kind not in ("filters", "gamma"):
        raise KprunError(f"Criterion kind must be 'filters' or 'gamma', got {kind!r}.")
    _CRITERIA[name] = Criterion(name, kind, fn)


for _name, _fn, _rows in (("l1", l1, _l1_rows), ("l2", l2, _l2_rows), ("fpgm", fpgm, _fpgm_rows),
                          ("orthogonality", orthogonality, _orthogonality_rows)):
    _CRITERIA[_name] = Criterion(_name, "filters", _fn, rows=_rows)
register_criterion("bn_scale", bn_scale, kind="gamma")
_CRITERIA["random"] = Criterion("random", "random", random)
_CRITERIA["taylor"] = Criterion("taylor", "data", taylor, "taylor")
_CRITERIA["apoz"] = Criterion("apoz", "data", apoz, "apoz")
_CRITERIA["mean_activation"] = Criterion("mean_activation", "data", mean_activation, "mean")


def get_criterion(name) -> Criterion:
    """The registered criterion called `name` (a `Criterion` passes through).

    Raises:
        KprunError: for an unknown name; the message lists the valid ones.

    Example:

    >>> get_criterion("fpgm").kind
    'filters'
    """
    if isinstance(name, Criterion):
        return name
    if not isinstance(name, str) or name not in _CRITERIA:
        raise KprunError(f"Unknown criterion {name!r}; valid criteria: "
                         f"{', '.join(sorted(_CRITERIA))}.")
    return _CRITERIA[name]


def available_criteria() -> list:
    """Names of every registered criterion."""
    return sorted(_CRITERIA)


# --------------------------------------------------------------------------
# Group scores
# --------------------------------------------------------------------------
REDUCERS = {
    "mean": np.nanmean,
    "sum": np.nansum,
    "max": np.nanmax,
    "min": np.nanmin,
    "prod": np.nanprod,
}


class NotApplicable(KprunError):
    """The criterion has nothing to score in a group (e.g. bn_scale without a BN)."""


def _onto_group(scores: np.ndarray, index: np.ndarray, size: int, owner: str) -> np.ndarray:
    """Per-position scores -> per-group-channel scores (mean of positions; NaN if none)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(index):
        raise KprunError(f"Layer '{owner}': {len(scores)} scores for {len(index)} channel "
                         "positions.")
    valid = index >= 0
    sums = np.bincount(index[valid], weights=scores[valid], minlength=size)
    counts = np.bincount(index[valid], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _normalise(scores: np.ndarray) -> np.ndarray:
    top = np.nanmax(np.abs(scores)) if np.isfinite(scores).any() else 0.0
    return scores / top if top > 0 else scores


def _reduce(rows: list, reduce: str, size: int) -> np.ndarray:
    if reduce not in REDUCERS:
        raise KprunError(f"Unknown reduce {reduce!r}; valid: {', '.join(REDUCERS)}.")
    stacked = np.stack([_normalise(r) for r in rows])
    covered = ~np.isnan(stacked).all(axis=0)
    out = np.zeros(size)
    out[covered] = REDUCERS[reduce](stacked[:, covered], axis=0)
    if not covered.all():  # a channel no member scores ranks with the least important
        out[~covered] = out[covered].min() if covered.any() else 0.0
    return out


def rule_filters(member, weights: dict | None = None) -> np.ndarray | None:
    """The filters of a group member as its layer's rule sees them, or None.

    Attention layers and EinsumDense expose the filters of each of their
    channel kinds (`member.slot`: 'heads', 'key_dim', 'value_dim', 'output')
    through their rule's `rows`.

    Args:
        member: A `kprune.graph.Member`.
        weights: Weight name -> array to read instead of the layer's values
            (Taylor passes weight x gradient).
    """
    if weights is None:
        weights = dict(weights_of(member.layer))
    return get_rule(member.layer).rows(member.layer, member.slot, weights)


def _weight_rows(group, crit: Criterion) -> list:
    if crit.kind == "gamma":
        members = [m for m in group.params if getattr(m.layer, "gamma", None) is not None]
    else:
        members = [m for m in group.producers if has_filters(m.layer) or m.slot is not None
                   or rule_filters(m) is not None]
        members += [m for m in group.params if isinstance(m.layer, _DEPTHWISE)]
    seen, rows = set(), []
    for m in members:
        key = (id(m.layer), m.kind, m.slot)
        if key in seen:
            continue
        seen.add(key)
        if crit.kind == "filters" and not has_filters(m.layer):
            matrix = rule_filters(m)
            if matrix is None or crit.rows is None:
                continue
            scores = crit.rows(np.asarray(matrix, dtype=np.float64))
        else:
            scores = crit.fn(m.layer)
        rows.append(_onto_group(scores, m.index, group.size, m.name))
    return rows


def _inner_members(group) -> list:
    """Producers whose channels live inside their layer (no tensor to observe)."""
    return [m for m in group.producers if m.slot not in (None, "output")]


def _weight_taylor(model, flat, groups, data, loss, batch_size, verbose=0) -> dict:
    """Taylor importance of inner channels (heads): |sum of weight x gradient| per channel.

    Removing a head zeroes its filters; to first order the loss changes by
    the sum of weight x gradient over them (Molchanov et al., 2019). The
    absolute value is taken per batch and averaged over the batches.
    """
    probe, layer_map = _probe(flat, [], model, with_layers=True)
    members = [m for g in groups for m in _inner_members(g)]
    layers = list({id(m.layer): m.layer for m in members}.values())
    variables = {id(layer): list(layer_map.get(id(layer), layer).weights) for layer in layers}
    loss_fn = _resolve_loss(model, loss)
    totals = {id(m): np.zeros(len(m.index)) for m in members}
    batches = 0
    bar = _progress(data, batch_size, verbose, "'taylor' on weights")
    for x, y in _batches(data, batch_size):
        if y is None:
            raise KprunError(f"Criterion 'taylor' needs targets: pass data=(x, y) for model "
                             f"'{model.name}'.")
        flat_vars = [v for layer in layers for v in variables[id(layer)]]
        grads = dict(zip([id(v) for v in flat_vars],
                         _weight_gradients(probe, flat_vars, x, y, loss_fn)))
        for layer in layers:
            names = [n for n, _ in weights_of(layer)]
            prods = {n: _numpy(v) * (_numpy(grads[id(v)]) if grads[id(v)] is not None else 0.0)
                     for n, v in zip(names, variables[id(layer)])}
            for m in members:
                if m.layer is layer:
                    totals[id(m)] += np.abs(rule_filters(m, prods).sum(axis=1))
        batches += 1
        if bar is not None:
            bar.update(batches)
    if bar is not None and bar.target is None:
        bar.update(batches, finalize=True)
    if not batches:
        raise KprunError(f"The data given to score model '{model.name}' holds no batch.")
    out = {}
    for g in groups:
        rows = [_onto_group(totals[id(m)] / batches, m.index, g.size, m.name)
                for m in _inner_members(g)]
        if rows:
            out[g.id] = rows
    return out


def _group_views(graph: DependencyGraph, group) -> list:
    """Views of the tensors the group's consumers read (or, if none, the outputs)."""
    readers = {id(m.layer) for m in group.consumers}
    tensors = []
    for call in graph.flat.calls:
        if id(call.layer) in readers:
            tensors += call.inputs
    if not tensors:
        tensors = list(graph.flat.outputs)
    views, seen = [], set()
    for t in tensors:
        spec = graph.specs.get(id(t))
        if spec is None or id(t) in seen:
            continue
        groups = graph.atom_group[spec.atoms]
        if not (groups == group.id).any():
            continue
        seen.add(id(t))
        index = np.where(groups == group.id, graph.atom_channel[spec.atoms], -1)
        views.append(_View(t, spec.axis, index, group.size))
    return views


def score_groups(model: keras.Model, groups=None, criterion="l1", reduce: str = "mean",
                 data=None, loss=None, seed: int | None = None,
                 graph: DependencyGraph | None = None, batch_size: int = 32,
                 verbose: int = 0) -> dict:
    """Scores of many groups at once (one pass over `data` for data criteria).

    Args:
        model: The model the groups belong to.
        groups: Groups (or group ids) of `graph`; default: its prunable groups.
        criterion, reduce, data, loss, seed, batch_size: As in `group_scores`.
        graph: The model's `DependencyGraph`, if already built.
        verbose: 1 shows a `keras.utils.Progbar` over the batches of a data
            criterion; 0 (default) is quiet.

    Returns:
        `{group id: scores}` for every group the criterion applies to; groups
        with nothing to score (for example `bn_scale` on a group without a
        BatchNormalization) are left out.

    Example:

    >>> scores = score_groups(model, criterion="l2")
    """
    crit = get_criterion(criterion)
    graph = graph or DependencyGraph(model)
    if groups is None:
        groups = graph.prunable_groups()
    groups = [graph.groups[int(getattr(g, "id", g))] for g in groups]
    if reduce not in REDUCERS:
        raise KprunError(f"Unknown reduce {reduce!r}; valid: {', '.join(REDUCERS)}.")
    if crit.kind == "random":
        return {g.id: np.random.default_rng(None if seed is None else [seed, g.id]).random(g.size)
                for g in groups}
    if crit.kind != "data":
        out = {}
        for g in groups:
            rows = _weight_rows(g, crit)
            if rows:
                out[g.id] = _reduce(rows, reduce, g.size)
        return out
    inner = [g for g in groups if _inner_members(g)]
    groups = [g for g in groups if not _inner_members(g)]
    views = {g.id: _group_views(graph, g) for g in groups}
    flat_views = [v for g in groups for v in views[g.id]]
    results = iter(_observe(model, graph.flat, flat_views, crit.stat, data, loss, batch_size,
                            verbose))
    out = {}
    for g in groups:
        rows = [next(results) for _ in views[g.id]]
        if rows:
            out[g.id] = _reduce(rows, reduce, g.size)
    if inner and crit.stat == "taylor":  # heads and head widths: from their weights' gradients
        for gid, rows in _weight_taylor(model, graph.flat, inner, data, loss, batch_size,
                                         verbose).items():
            out[gid] = _reduce(rows, reduce, graph.groups[gid].size)
    return out


def group_scores(model: keras.Model, group, criterion="l1", reduce: str = "mean", data=None,
                 loss=None, seed: int | None = None, graph: DependencyGraph | None = None,
                 batch_size: int = 32, verbose: int = 0) -> np.ndarray:
    """One importance score per channel of a dependency group.

    Every member layer is scored (the filters of producers and depthwise
    layers for weight criteria, normalisation layers for `bn_scale`, the
    tensors the consumers read for data criteria), positions are mapped to
    group channels with `member.index` (positions sharing a channel are
    averaged), each member's scores are divided by their maximum, and members
    are reduced with `reduce`.

    Args:
        model: The model.
        group: A `Group` of the model's `DependencyGraph` (or its id).
        criterion: A registered criterion name (see `available_criteria()`).
        reduce: 'mean', 'sum', 'max', 'min' or 'prod' over members.
        data: Inputs for data criteria: arrays, `(x, y)`, or batches.
        loss: Loss for 'taylor' (default: the compiled model's).
        seed: Seed for 'random'.
        graph: The model's `DependencyGraph`, if already built.
        batch_size: Batch size when `data` holds arrays.
        verbose: 1 shows a progress bar over the batches of a data criterion.

    Returns:
        Array of shape `(group.size,)`, higher = more important.

    Raises:
        KprunError: unknown criterion or reduce, missing data or loss, or a
            group with nothing to score for this criterion.

    Example:

    >>> g = DependencyGraph(model)
    >>> group_scores(model, g.group_of("conv2d"), "l1", graph=g)
    """
    graph = graph or DependencyGraph(model)
    gid = int(getattr(group, "id", group))
    out = score_groups(model, [gid], criterion, reduce, data, loss, seed, graph, batch_size,
                       verbose)
    if gid not in out:
        names = ", ".join(graph.groups[gid].layer_names()[:3])
        raise NotApplicable(f"Criterion {get_criterion(criterion).name!r} has nothing to score "
                            f"in the group of layers {names}.")
    return out[gid]


__all__ = [
    "Criterion", "NotApplicable", "apoz", "available_criteria", "bn_scale", "filters", "fpgm",
    "get_criterion", "group_scores", "l1", "l2", "mean_activation", "orthogonality", "random",
    "register_criterion", "rule_filters", "score_groups", "taylor",
]
