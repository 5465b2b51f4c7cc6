"""Automated Gradual Pruning: raise the sparsity along a cubic schedule while training.

AGP (Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
pruning for model compression", 2017) prunes at steps
`t = t0, t0 + dt, ..., t0 + n * dt` to the sparsity

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3

so it prunes fast early, while the network still has redundancy, and slowly
near the end. Pruned weights stay pruned; the rest keep training.

Two modes:

* "channel" (default): the sparsity is the share of every dependency
  group's channels that is masked (lowest filter norm first), as
  `kprune.masking.ChannelMasker` masks them; `finalize()` removes them, so
  the model really gets smaller and faster.
* "unstructured": single kernel weights of every Conv*/Dense layer are
  zeroed by magnitude, layer by layer (NNI's Level pruner). The model keeps
  its shape: it has the same MACs, parameter count and speed as before,
  unless it is run by a sparse kernel library or compressed on disk.
  `finalize()` returns a copy with the zeros, and a warning says so.

Example:

>>> agp = kprune.agp.AGP(0.5, start_step=0, n_steps=10, frequency=50)
>>> model.fit(x, y, epochs=10, callbacks=[agp])
>>> small = agp.finalize()
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from kprune.select import criteria, pruners
from kprune.errors import KprunError
from kprune.graph.walk import walk
from kprune.train.masking import ChannelMasker
from kprune.surgeon.plan import copy_model

MODES = ("channel", "unstructured")
NO_SPEEDUP = ("AGP(mode='unstructured') zeroes single weights: the model keeps its shape, "
              "MACs and parameter count, and runs no faster. Use mode='channel' to remove "
              "channels for real.")


def sparsity_at(step: int, final_sparsity: float, initial_sparsity: float = 0.0,
                start_step: int = 0, n_steps: int = 10, frequency: int = 100) -> float:
    """The AGP sparsity in force after `step` training steps.

    Before `start_step` nothing is pruned (0). From `start_step` on, the value
    of the last pruning step `t_k = start_step + k * frequency` (k <= n_steps)
    holds: `s_f + (s_i - s_f) * (1 - k / n_steps) ** 3`.

    Args:
        step: Training steps done.
        final_sparsity: s_f.
        initial_sparsity: s_i.
        start_step: t0.
        n_steps: n, the number of pruning steps after t0.
        frequency: dt, training steps between pruning steps.

    Returns:
        The sparsity, a float.

    Example:

    >>> sparsity_at(50, 0.8, start_step=0, n_steps=4, frequency=25)   # k = 2
    0.7
    """
    if step < start_step:
        return 0.0
    k = min((step - start_step) // frequency, n_steps)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - k / n_steps) ** 3


def _check(final_sparsity, initial_sparsity, start_step, n_steps, frequency) -> None:
    for name, value in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise KprunError(f"AGP: `{name}` must be a number in [0, 1), got {value!r}.")
    if initial_sparsity > final_sparsity:
        raise KprunError(f"AGP: `initial_sparsity` ({initial_sparsity}) must not exceed "
                         f"`final_sparsity` ({final_sparsity}).")
    for name, value, low in (("start_step", start_step, 0), ("n_steps", n_steps, 1),
                             ("frequency", frequency, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise KprunError(f"AGP: `{name}` must be an int >= {low}, got {value!r}.")


class AGP(keras.callbacks.Callback):
    """Prune gradually to `final_sparsity` along the cubic AGP schedule.

    Args:
        final_sparsity: s_f, in [0, 1).
        initial_sparsity: s_i, the sparsity set at `start_step`.
        start_step: t0, the training step of the first pruning step.
        n_steps: n, the number of pruning steps after t0.
        frequency: dt, training steps between pruning steps.
        mode: "channel" (default) or "unstructured" (no speedup; see the
            module docstring).
        criterion: Filter criterion ranking channels in "channel" mode.
        exclude: Layer names, class names or classes left whole.
        min_channels: Channels every group keeps ("channel" mode).
        round_to: Keep a multiple of this many channels where possible.
        verbose: 1 prints a line per pruning step.

    Attributes:
        step: Training steps seen.
        sparsity: The sparsity now in force.
        history: `(step, sparsity)` for every pruning step.
        masker: The `ChannelMasker` ("channel" mode) or the weight masker.

    Example:

    >>> agp = AGP(0.5, n_steps=8, frequency=20)
    >>> model.fit(x, y, epochs=5, callbacks=[agp])
    >>> small = agp.finalize()
    """

    def __init__(self, final_sparsity: float, initial_sparsity: float = 0.0, start_step: int = 0,
                 n_steps: int = 10, frequency: int = 100, mode: str = "channel",
                 criterion: str = "l2", exclude=(), min_channels: int = 1, round_to: int = 1,
                 verbose: int = 0):
        super().__init__()
        _check(final_sparsity, initial_sparsity, start_step, n_steps, frequency)
        if mode not in MODES:
            raise KprunError(f"AGP: `mode` must be 'channel' or 'unstructured', got {mode!r}.")
        pruners.check_guards(1.0, min_channels, round_to)
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step = int(start_step)
        self.n_steps, self.frequency = int(n_steps), int(frequency)
        self.mode = mode
        self.verbose = verbose
        self.step = 0
        self.sparsity = 0.0
        self.history: list = []
        if mode == "channel":
            if criteria.get_criterion(criterion).kind != "filters":
                raise KprunError(f"AGP: criterion {criterion!r} does not score filters.")
            self.criterion, self.round_to = criterion, int(round_to)
            self.masker = ChannelMasker("hard", exclude=exclude, min_channels=min_channels)
        else:
            warnings.warn(NO_SPEEDUP, UserWarning, stacklevel=2)
            self.masker = WeightMasker(exclude=exclude)

    def schedule(self, step: int) -> float:
        """`sparsity_at(step, ...)` with this callback's settings."""
        return sparsity_at(step, self.final_sparsity, self.initial_sparsity, self.start_step,
                           self.n_steps, self.frequency)

    def is_pruning_step(self, step: int) -> bool:
        """Whether `step` is one of t0, t0 + dt, ..., t0 + n * dt."""
        offset = step - self.start_step
        return offset >= 0 and offset % self.frequency == 0 \
            and offset // self.frequency <= self.n_steps

    def set_model(self, model) -> None:
        super().set_model(model)
        self.masker.set_model(model)

    def prune_to(self, sparsity: float) -> None:
        """Mask up to `sparsity` now; what is masked stays masked."""
        if self.mode == "channel":
            masker = self.masker
            groups = masker.groups
            scores = criteria.score_groups(self.model, groups, self.criterion, graph=masker.graph)
            for gid, values in scores.items():
                values[masker.masks[gid]] = -np.inf  # pruned channels stay pruned
            plan = pruners.local_plan(groups, scores, sparsity, max_ratio=1.0,
                                      min_channels=masker.min_channels, round_to=self.round_to)
            masker.set_plan(plan)
        else:
            self.masker.prune_to(sparsity)
        self.masker.apply()
        self.sparsity = sparsity
        self.history.append((self.step, sparsity))
        if self.verbose:
            print(f"AGP step {self.step}: sparsity {sparsity:.3f} "
                  f"({self.masker.sparsity():.1%} masked)")

    def _maybe_prune(self) -> None:
        if self.is_pruning_step(self.step):
            self.prune_to(self.schedule(self.step))

    def on_train_begin(self, logs=None) -> None:
        if not self.history or self.history[-1][0] != self.step:
            self._maybe_prune()
        self.masker.apply()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.step += 1
        self._maybe_prune()
        self.masker.apply()

    def finalize(self, model: keras.Model | None = None) -> keras.Model:
        """The pruned model: channels removed ("channel"), or a copy with zeros.

        Args:
            model: The model (default: the one trained); left untouched.

        Returns:
            A new model.
        """
        if self.mode == "unstructured":
            warnings.warn(NO_SPEEDUP, UserWarning, stacklevel=2)
        return self.masker.finalize(model)


class WeightMasker:
    """Masks single kernel weights by magnitude, layer by layer (AGP's unstructured mode).

    Covers the kernels of Conv*, Conv*Transpose, DepthwiseConv*,
    SeparableConv* (both kernels) and Dense layers. Zeroing weights gives no
    speedup: the model keeps its shape.

    Args:
        exclude: Layer names, class names or classes left dense.
    """

    KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")

    def __init__(self, exclude=()):
        self.exclude = pruners.check_exclude(exclude)
        self.model = None
        self.masks: dict = {}  # (layer position, attribute) -> boolean array, True = zero
        self._vars: dict = {}

    def set_model(self, model) -> None:
        if model is self.model:
            return
        self.model = model
        self.masks, self._vars = {}, {}
        for pos, layer in enumerate(_layers(model)):
            if not isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D,
                                      keras.layers.Conv3D, keras.layers.Dense,
                                      keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                                      keras.layers.Conv3DTranspose, keras.layers.DepthwiseConv1D,
                                      keras.layers.DepthwiseConv2D,
                                      keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
                continue
            if _excluded(layer, self.exclude):
                continue
            for name in self.KERNELS:
                var = getattr(layer, name, None)
                if var is not None and hasattr(var, "assign"):
                    self._vars[(pos, name)] = var
                    self.masks[(pos, name)] = np.zeros(tuple(var.shape), dtype=bool)

    def prune_to(self, sparsity: float) -> None:
        """Zero the `sparsity` share of smallest |w| in every kernel (masked ones first)."""
        for key, var in self._vars.items():
            value = np.abs(np.asarray(var.numpy(), np.float64)).reshape(-1)
            value[self.masks[key].reshape(-1)] = -np.inf
            k = int(np.floor(sparsity * value.size + 0.5))
            mask = np.zeros(value.size, dtype=bool)
            mask[np.argsort(value, kind="stable")[:k]] = True
            self.masks[key] = mask.reshape(self.masks[key].shape)

    def sparsity(self) -> float:
        """Share of the covered weights that are zeroed."""
        total = sum(m.size for m in self.masks.values())
        return float(sum(int(m.sum()) for m in self.masks.values()) / total) if total else 0.0

    def apply(self, variables: dict | None = None) -> None:
        """Write the zeros into the kernels (of `variables`, default the model's)."""
        for key, var in (variables or self._vars).items():
            if self.masks[key].any():
                var.assign(var * (~self.masks[key]).astype(var.dtype))

    def finalize(self, model: keras.Model | None = None) -> keras.Model:
        """A copy of `model` with the masked weights zeroed (same shape, no speedup)."""
        model = self.model if model is None else model
        copy = copy_model(model)
        layers = _layers(copy)
        self.apply({(pos, name): getattr(layers[pos], name) for pos, name in self._vars})
        return copy


def _excluded(layer, entries) -> bool:
    for entry in entries:
        if isinstance(entry, str) and entry in (layer.name, type(layer).__name__):
            return True
        if isinstance(entry, type) and isinstance(layer, entry) or entry is layer:
            return True
    return False


def _layers(model) -> list:
    """The model's layers in flat call order, each once."""
    out, seen = [], set()
    for call in walk(model).calls:
        if isinstance(call.layer, keras.layers.Layer) and id(call.layer) not in seen:
            seen.add(id(call.layer))
            out.append(call.layer)
    return out


__all__ = ["AGP", "WeightMasker", "sparsity_at"]
