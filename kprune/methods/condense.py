"""CondenseNet: learn group convolutions while training, then convert them.

CondenseNet (Huang et al., "CondenseNet: An Efficient DenseNet using
Learned Group Convolutions", CVPR 2018) trains 1x1 convolutions that learn
which input channels each of their groups reads (`LearnedGroupConv`), and
a classifier that learns which features it reads (`LearnedDense`).

Training runs on a schedule driven by progress `p` (the share of training
steps done): during the first half, a layer with `C` stages condenses
`C - 1` times, evenly spaced, at `p = k / (2 (C - 1))` for `k = 1 .. C - 1`;
the second half optimises the sparse network. The stage lives in the
layers, so a model saved and reloaded mid-training resumes where it was.
Conversion turns every learned layer into plain, cheap parts:

    IndexSelect -> BatchNormalization -> ReLU -> Conv2D(groups=G) -> ChannelShuffle

for a learned group convolution, and `IndexSelect -> Dense` for the
classifier. In inference mode the converted model computes what the
trained model computes.

The workflow:

    model = kprune.models.condensenet("cifar")
    model.compile(optimizer=..., loss=..., metrics=[...])
    model.fit(data, epochs=E, callbacks=[kprune.condense.CondenseScheduler()])
    small = kprune.condense.convert(model)
"""

from __future__ import annotations

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.walk import walk
from kprune.layers.channel_shuffle import ChannelShuffle
from kprune.layers.index_select import IndexSelect
from kprune.layers.learned_group_conv import LearnedDense, LearnedGroupConv
from kprune.surgeon.rebuild import Rebuilder, weights_of

LEARNED = (LearnedGroupConv, LearnedDense)


def learned_layers(model: keras.Model) -> list:
    """The `LearnedGroupConv` and `LearnedDense` layers of `model`, nested models included.

    Args:
        model: A functional or Sequential model.

    Returns:
        The layers, each once, in call order.
    """
    found: dict = {}
    for call in walk(model).calls:
        if isinstance(call.layer, LEARNED):
            found.setdefault(id(call.layer), call.layer)
    return list(found.values())


def target_stage(progress: float, final_stage: int) -> int:
    """The stage a layer with `final_stage` condensing steps should be at.

    Stage `k` starts at progress `k / (2 * final_stage)`: the condensing
    steps are evenly spaced over the first half of training, the last one
    at progress 0.5.

    Args:
        progress: Share of training done, in [0, 1] (values above 1 count as 1).
        final_stage: The layer's last stage (`C - 1`).

    Returns:
        An int in `[0, final_stage]`.

    Example:

    >>> [target_stage(p, 3) for p in (0.0, 0.17, 0.34, 0.5, 0.9)]
    [0, 1, 2, 3, 3]
    """
    if not np.isfinite(progress) or progress < 0:
        raise KprunError(f"target_stage: `progress` must be a finite number >= 0, "
                         f"got {progress!r}.")
    if final_stage <= 0:
        return 0
    return int(min(final_stage, np.floor(2 * progress * final_stage + 1e-9)))


def condense(model: keras.Model, progress: float, layers: list | None = None) -> int:
    """Bring every learned layer of `model` to its stage for `progress`.

    A layer behind its target stage condenses once per missing stage; a
    layer at or beyond it is left alone (stages never go back). Use this in
    a custom training loop; `CondenseScheduler` calls it for `model.fit`.

    Args:
        model: A model with learned layers (changed in place: this is training).
        progress: Share of training done, in [0, 1].
        layers: The learned layers, if already known (saves a graph walk).

    Returns:
        The number of condensing steps taken.

    Example:

    >>> model = kprune.models.condensenet("cifar", input_shape=(8, 8, 3))
    >>> condense(model, 0.5)        # LearnedGroupConv: 3 steps each, LearnedDense: 1
    127
    >>> condense(model, 0.9)        # the second half changes nothing
    0
    """
    steps = 0
    for layer in learned_layers(model) if layers is None else layers:
        target = target_stage(progress, layer.final_stage)
        while layer.stage < target:
            layer.condense_step()
            steps += 1
    return steps


class CondenseScheduler(keras.callbacks.Callback):
    """Condense the learned layers of a model as training progresses.

    Before every training batch, progress is `(epoch * steps_per_epoch +
    batch) / (epochs * steps_per_epoch)` and every learned layer is brought
    to its stage for it (see `condense`). `epochs` and `steps_per_epoch` come
    from `model.fit` (its `epochs` and the number of batches per epoch)
    unless given here; a run resumed with `fit(..., initial_epoch=e)`
    continues the schedule. Works with any trainer that calls Keras
    callbacks (`set_model`, `on_train_begin`, `on_epoch_begin`,
    `on_train_batch_begin`).

    Args:
        epochs: Total training epochs (default: `fit`'s `epochs`).
        steps_per_epoch: Batches per epoch (default: from `fit`).
        verbose: 1 prints a line whenever layers condense.

    Attributes:
        progress: Progress at the last batch seen.

    Example:

    >>> model.fit(x, y, epochs=8, callbacks=[CondenseScheduler()])
    """

    def __init__(self, epochs: int | None = None, steps_per_epoch: int | None = None,
                 verbose: int = 0):
        super().__init__()
        for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise KprunError(f"CondenseScheduler: `{name}` must be a positive int or None, "
                                 f"got {value!r}.")
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self.progress = 0.0
        self._epoch = 0
        self._total = None
        self._steps = None
        self._layers = None

    def on_train_begin(self, logs=None) -> None:
        params = self.params or {}
        epochs = self.epochs or params.get("epochs")
        steps = self.steps_per_epoch or params.get("steps")
        if not epochs or not steps:
            raise KprunError(
                "CondenseScheduler: the number of epochs and of steps per epoch are unknown "
                f"(got epochs={epochs!r}, steps_per_epoch={steps!r}); pass them to "
                "CondenseScheduler(epochs=..., steps_per_epoch=...)."
            )
        self._steps = int(steps)
        self._total = int(epochs) * self._steps
        self._layers = learned_layers(self.model)
        if not self._layers:
            raise KprunError(f"CondenseScheduler: model '{self.model.name}' has no "
                             "LearnedGroupConv or LearnedDense layer.")

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._epoch = int(epoch)

    def on_train_batch_begin(self, batch, logs=None) -> None:
        if self._total is None:
            self.on_train_begin()
        self.progress = min(1.0, (self._epoch * self._steps + int(batch)) / self._total)
        steps = condense(self.model, self.progress, self._layers)
        if steps and self.verbose:
            stages: dict = {}
            for layer in self._layers:
                stages.setdefault(type(layer).__name__, set()).add(layer.stage)
            now = ", ".join(f"{name} {sorted(s)}" for name, s in stages.items())
            print(f"\nCondenseScheduler: progress {self.progress:.3f}, {steps} condensing "
                  f"steps; stages now: {now}")


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------
def _group_inputs(layer: LearnedGroupConv) -> list:
    kept = layer.kept_inputs()
    sizes = {len(k) for k in kept}
    if len(sizes) != 1 or 0 in sizes:
        raise KprunError(
            f"LearnedGroupConv '{layer.name}': its groups read {[len(k) for k in kept]} input "
            "channels; conversion needs the same, non-zero number in every group."
        )
    return kept


def grouped_kernel(layer: LearnedGroupConv) -> tuple:
    """The channel gather and grouped kernel a `LearnedGroupConv` converts to.

    Group `g` of the grouped convolution reads the input channels that
    group `g` kept and computes filters `g, g + G, g + 2G, ...` of the
    learned layer, in that order; a `ChannelShuffle(G)` puts them back.

    Args:
        layer: A built layer whose groups keep equal numbers of inputs.

    Returns:
        `(indices, kernel)`: the input channels to gather (group after
        group) and the `(1, 1, len(indices) / G, filters)` kernel.
    """
    kept = _group_inputs(layer)
    groups, filters = layer.groups, layer.filters
    per_out = filters // groups
    source = layer.kernel.numpy()[0, 0]
    kernel = np.zeros((len(kept[0]), filters), dtype=source.dtype)
    for g, rows in enumerate(kept):
        kernel[:, g * per_out:(g + 1) * per_out] = source[rows][:, g::groups]
    return np.concatenate(kept), kernel[None, None]


def _convert_lgc(rebuilder: Rebuilder, layer: LearnedGroupConv) -> tuple:
    indices, kernel = grouped_kernel(layer)
    norm = dict(weights_of(layer.norm))
    name = layer.name
    parts = [
        IndexSelect(indices.tolist(), name=rebuilder.unique_name(f"{name}_select")),
        keras.layers.BatchNormalization(momentum=layer.norm_momentum,
                                        epsilon=layer.norm_epsilon,
                                        name=rebuilder.unique_name(f"{name}_norm")),
        keras.layers.ReLU(name=rebuilder.unique_name(f"{name}_relu")),
        keras.layers.Conv2D(layer.filters, 1, groups=layer.groups, use_bias=False,
                            name=rebuilder.unique_name(f"{name}_conv")),
    ]
    if layer.groups > 1:
        parts.append(ChannelShuffle(layer.groups, name=rebuilder.unique_name(f"{name}_shuffle")))
    weights = {1: [norm[k][indices] for k in ("gamma", "beta", "moving_mean", "moving_variance")],
               3: [kernel]}
    return parts, weights


def _convert_dense(rebuilder: Rebuilder, layer: LearnedDense) -> tuple:
    kept = layer.kept_inputs()
    if len(kept) == 0:
        raise KprunError(f"LearnedDense '{layer.name}': every input feature is masked.")
    kernel = layer.kernel.numpy()[kept]
    dense = keras.layers.Dense(layer.units, activation=layer.activation, use_bias=layer.use_bias,
                               name=rebuilder.unique_name(layer.name))
    values = [kernel] + ([layer.bias.numpy()] if layer.use_bias else [])
    if len(kept) == layer.in_features:
        return [dense], {0: values}
    select = IndexSelect(kept.tolist(), name=rebuilder.unique_name(f"{layer.name}_select"))
    return [select, dense], {1: values}


def convert(model: keras.Model) -> keras.Model:
    """Rebuild a trained CondenseNet-style model in its converted, cheap form.

    Every `LearnedGroupConv` becomes `IndexSelect -> BatchNormalization ->
    ReLU -> Conv2D(groups=G) -> ChannelShuffle(G)` (dropout is dropped: it
    does nothing at inference); every `LearnedDense` becomes `IndexSelect
    -> Dense` over the features it kept (a plain `Dense` if it kept them
    all). Other layers are copied with their weights. The model walks
    through `kprune.graph.walk`, so nested models are inlined. Layers may
    be at any stage; at the last stage each group of a learned group
    convolution reads `in_channels / C` channels, so the 1x1 convolution
    costs `1 / C` of its dense cost.

    Args:
        model: A functional or Sequential model (left untouched).

    Returns:
        A new model that, in inference mode, computes what `model` does.
        Its only non-Keras layers are `IndexSelect` and `ChannelShuffle`.

    Example:

    >>> small = convert(model)
    >>> np.allclose(small.predict(x), model.predict(x), atol=1e-5)
    True
    """
    made: dict = {}

    def make_call(call, args, kwargs):
        layer = call.layer
        if not isinstance(layer, LEARNED):
            return rebuilder.copy_call(call, args, kwargs)
        first = id(layer) not in made
        if first:
            convert_one = _convert_lgc if isinstance(layer, LearnedGroupConv) else _convert_dense
            made[id(layer)] = convert_one(rebuilder, layer)
        parts, weights = made[id(layer)]
        x = args[0] if args else kwargs["inputs"]
        for part in parts:
            x = part(x)
        if first:
            for i, values in weights.items():
                parts[i].set_weights(values)
        return [x]

    rebuilder = Rebuilder(walk(model), make_call)
    return rebuilder.run()


__all__ = ["CondenseScheduler", "condense", "convert", "grouped_kernel", "learned_layers",
           "target_stage"]
