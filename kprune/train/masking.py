"""Channel masks during training, ending in one surgery.

Soft Filter Pruning (`kprune.sfp`), RePr (`kprune.repr`) and AGP
(`kprune.agp`) train a model whose weakest channels are switched off for a
while, and remove them for real at the end. `ChannelMasker` is the part they
share: a Keras callback holding one boolean mask per dependency group
(`kprune.graph.Group`) that zeroes the masked channels in the model's own
weights.

What "masked" means, precisely: for a masked channel `c` of a group,

* every producer of the group (Conv*, Conv*Transpose, SeparableConv*, Dense)
  has its output column `c` of the kernel set to zero, and its bias entry `c`;
* every BatchNormalization on the group has `beta[c] = 0` and
  `moving_mean[c] = 0` (gamma and the moving variance are kept, so a
  filter that comes back can still learn);
* every DepthwiseConv on the group has its bias entry `c` set to zero,
  GroupNormalization its `beta[c]`, an adapted Normalization its `mean[c]`.

The channel then carries exactly zero after every member of the group, in
training (the batch mean of a zero channel is zero) and in inference. When
the layers between the group's members and its consumers map zero to zero
(ReLU, pooling, Add, Concatenate, Dropout, ... as in VGG, ResNet, DenseNet
and MobileNet blocks), the masked model computes exactly what
`finalize()` returns: the same model with the masked channels removed.

Two modes:

* "hard": the zeros are written again after every training batch, so
  optimizer steps cannot revive masked channels;
* "soft" (Soft Filter Pruning): the zeros are written when the masks are
  updated (at the end of an epoch); masked filters keep training in between
  and may win their place back at the next update.

Example:

>>> masker = ChannelMasker(mode="hard")
>>> masker.set_model(model)
>>> masker.mask("conv1", [0, 3])
>>> model.fit(x, y, epochs=2, callbacks=[masker])
>>> small = masker.finalize()
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import keras
import numpy as np

from kprune.select import pruners
from kprune.errors import KprunError
from kprune.graph.dependency import DependencyGraph
from kprune.surgeon.plan import apply_plan, copy_model

_L = keras.layers
_CONV = (_L.Conv1D, _L.Conv2D, _L.Conv3D, _L.Dense)
_TRANSPOSE = (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)
_SEPARABLE = (_L.SeparableConv1D, _L.SeparableConv2D)
_DEPTHWISE = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
MODES = ("hard", "soft")


# --------------------------------------------------------------------------
# Which weights hold a channel
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Slot:
    """Positions of one variable that belong to a group's channels.

    Attributes:
        variable: The Keras variable.
        axis: The axis of `variable` along which positions run.
        index: One entry per position: the group channel, or -1.
        group: The group id.
    """

    variable: object
    axis: int
    index: np.ndarray
    group: int


def producer_variables(layer) -> list | None:
    """(variable, axis) pairs holding the output positions of a producer.

    Args:
        layer: A producer layer of a dependency group.

    Returns:
        The kernel (on its output axis) and bias, or None for a layer kprune
        does not know how to mask.
    """
    if isinstance(layer, _SEPARABLE):
        pairs = [(layer.pointwise_kernel, -1)]
    elif isinstance(layer, _TRANSPOSE):
        pairs = [(layer.kernel, -2)]
    elif isinstance(layer, _CONV):
        pairs = [(layer.kernel, -1)]
    else:
        return None
    if getattr(layer, "bias", None) is not None:
        pairs.append((layer.bias, 0))
    return pairs


def param_variables(layer) -> list | None:
    """(variable, axis) pairs to zero on a per-channel layer, or None if unknown.

    BatchNormalization: beta and moving mean; DepthwiseConv: bias;
    GroupNormalization: beta; Normalization: mean; PReLU: nothing (it maps
    zero to zero).
    """
    if isinstance(layer, _L.BatchNormalization):
        names = ["beta", "moving_mean"]
    elif isinstance(layer, _DEPTHWISE):
        names = ["bias"]
    elif isinstance(layer, _L.GroupNormalization):
        names = ["beta"]
    elif isinstance(layer, _L.Normalization):
        names = ["mean"]
    elif isinstance(layer, _L.PReLU):
        names = []
    else:
        return None
    pairs = []
    for name in names:
        var = getattr(layer, name, None)
        if var is not None and len(var.shape) >= 1:
            pairs.append((var, -1 if isinstance(layer, _L.Normalization) else 0))
    return pairs


def group_slots(group) -> list:
    """Every `Slot` that must be zeroed to mask the channels of `group`.

    Raises:
        KprunError: if the group is not prunable or one of its members maps a
            zero channel to something else (the message names the layer).
    """
    if not group.prunable:
        raise KprunError(f"Group {group.id} ({', '.join(group.layer_names()[:2])}) cannot be "
                         f"masked: {group.reason}.")
    slots, seen = [], set()
    for member in group.producers + group.params:
        finder = producer_variables if member.kind == "producer" else param_variables
        pairs = finder(member.layer)
        if pairs is None:
            raise KprunError(
                f"Layer '{member.name}' ({type(member.layer).__name__}) is a {member.kind} of "
                f"group {group.id}, but kprune does not know how to zero its channels.")
        for var, axis in pairs:
            key = (id(var), member.kind)
            if key in seen:
                continue
            seen.add(key)
            if var.shape[axis] != len(member.index):
                continue  # e.g. a PReLU alpha shared along the channel axis
            slots.append(Slot(var, axis, np.asarray(member.index), group.id))
    return slots


def maskable_groups(graph: DependencyGraph, exclude=()) -> dict:
    """`{group id: slots}` of every prunable group a `ChannelMasker` can handle.

    Args:
        graph: A model's dependency graph.
        exclude: Layer names, class names or classes whose groups are left out.
    """
    entries = pruners.check_exclude(exclude)
    out = {}
    for group in graph.prunable_groups():
        if pruners.is_excluded(group, entries):
            continue
        try:
            out[group.id] = group_slots(group)
        except KprunError:
            continue
    return out


# --------------------------------------------------------------------------
# Plans from scores
# --------------------------------------------------------------------------
def lowest_global(groups: Sequence, scores: Mapping, count: int, min_channels: int = 1) -> dict:
    """Drop the `count` lowest raw scores over all groups, never emptying a group.

    Unlike `kprune.pruners.global_plan`, scores are compared as they are (no
    per-group normalisation): the Network Slimming threshold on |gamma| and
    RePr's global orthogonality ranking need exactly that. A channel whose
    group already lost all but `min_channels` is skipped and the next lowest
    is taken. Groups feeding grouped convolutions lose the same number of
    channels in each convolution group (rounded down).

    Args:
        groups: Candidate `Group`s.
        scores: `{group id: scores}` (groups without scores are skipped).
        count: How many channels to drop in all.
        min_channels: Channels every group keeps (at least 1).

    Returns:
        The plan `{group id: sorted channel indices}`.

    Example:

    >>> lowest_global(graph.prunable_groups(), {0: [0.1, 0.9], 1: [0.5, 0.2]}, 2)
    {0: [0], 1: [1]}
    """
    pruners.check_guards(1.0, min_channels, 1)
    cands = [g for g in groups if g.id in scores]
    if not cands or count <= 0:
        return {}
    caps = {g.id: max(g.size - min_channels, 0) for g in cands}
    counts = pruners.take_lowest(cands, scores, caps, count)
    return pruners.ranked_plan(cands, scores, counts, max_ratio=1.0, min_channels=min_channels)


def uniform_ratio(model: keras.Model, flops_target: float, exclude=(), min_channels: int = 1,
                  graph: DependencyGraph | None = None) -> float:
    """The smallest per-group ratio whose local plan keeps at most `flops_target` of the MACs.

    Useful to give SFP or AGP (which drop the same share of every group) the
    MACs another method reached. MACs are computed from the plan
    (`kprune.pruning.plan_macs`), without surgery.

    Args:
        model: The model.
        flops_target: Share of the model's MACs to keep, in (0, 1].
        exclude: Layer names, class names or classes whose groups stay whole.
        min_channels: Channels every group keeps.
        graph: The model's dependency graph, if already built.

    Returns:
        A ratio in [0, 1).

    Raises:
        KprunError: if the target cannot be reached.

    Example:

    >>> uniform_ratio(model, 0.5)
    0.29...
    """
    from kprune.pruning import plan_macs

    if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float)) \
            or not 0 < flops_target <= 1:
        raise KprunError(f"uniform_ratio: `flops_target` must be in (0, 1], got {flops_target!r}.")
    graph = graph or DependencyGraph(model)
    groups = [graph.groups[g] for g in maskable_groups(graph, exclude)]
    zeros = {g.id: np.zeros(g.size) for g in groups}
    base = plan_macs(graph, {})
    budget = flops_target * base

    def macs(ratio):
        plan = pruners.local_plan(groups, zeros, ratio, max_ratio=1.0, min_channels=min_channels)
        return plan_macs(graph, plan)

    if macs(0.0) <= budget:
        return 0.0
    if macs(1.0) > budget:
        raise KprunError(f"Model '{model.name}' cannot reach {flops_target:.1%} of its MACs by "
                         f"dropping the same share of every group (the least is "
                         f"{macs(1.0) / base:.1%}).")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs(mid) <= budget else (mid, hi)
    return hi


# --------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------
class ChannelMasker(keras.callbacks.Callback):
    """Zero chosen channels of a model while it trains; remove them at the end.

    The masker holds one boolean mask (True = masked) per maskable group of
    the model's `DependencyGraph`. `mask`, `set_plan` and `clear` change the
    masks (between epochs, or from a subclass such as
    `kprune.sfp.SoftFilterPruning`); `apply` writes the zeros into the
    weights (see the module docstring for which weights); `finalize` returns
    a new model without the masked channels.

    In "hard" mode the zeros are written at the start of training and again
    after every batch; in "soft" mode at the start of training and at the
    end of every epoch. With `steps_per_execution > 1`, Keras calls the
    batch hook once per execution, so hard masks are rewritten that often.

    Args:
        mode: "hard" or "soft".
        exclude: Layer names, class names or classes whose groups are never
            masked.
        min_channels: Channels every group keeps unmasked.
        verbose: 1 prints a line when masks change.

    Attributes:
        graph: The model's `DependencyGraph` (after `set_model`).
        masks: `{group id: boolean array}` for every maskable group.

    Example:

    >>> masker = ChannelMasker()
    >>> masker.set_model(model)
    >>> masker.mask("conv1", [0, 1])
    >>> model.fit(x, y, callbacks=[masker])
    >>> small = masker.finalize()
    """

    def __init__(self, mode: str = "hard", exclude=(), min_channels: int = 1, verbose: int = 0):
        super().__init__()
        if mode not in MODES:
            raise KprunError(f"ChannelMasker: `mode` must be 'hard' or 'soft', got {mode!r}.")
        pruners.check_guards(1.0, min_channels, 1)
        self.mode = mode
        self.exclude = pruners.check_exclude(exclude)
        self.min_channels = int(min_channels)
        self.verbose = verbose
        self.graph = None
        self.masks: dict = {}
        self._slots: dict = {}
        self._factors = None
        self._owner = None

    # Model ------------------------------------------------------------------
    def set_model(self, model) -> None:
        """Attach to `model` (kept masks survive if it is the same model)."""
        super().set_model(model)
        if model is not self._owner:
            self._owner = model
            self.graph = DependencyGraph(model)
            self._slots = maskable_groups(self.graph, self.exclude)
            self.masks = {gid: np.zeros(self.graph.groups[gid].size, dtype=bool)
                          for gid in self._slots}
            self._factors = None

    def _require_model(self) -> None:
        if self.graph is None:
            raise KprunError("ChannelMasker has no model yet: pass it to model.fit "
                             "(callbacks=[...]) or call set_model(model) first.")

    @property
    def groups(self) -> list:
        """The maskable `Group`s."""
        self._require_model()
        return [self.graph.groups[gid] for gid in self._slots]

    def group(self, key):
        """The maskable group of a group id, a `Group`, or a producer layer (or its name)."""
        self._require_model()
        if isinstance(key, (str, keras.layers.Layer)):
            group = self.graph.group_of(key)
        else:
            gid = int(getattr(key, "id", key))
            if not 0 <= gid < len(self.graph.groups):
                raise KprunError(f"Group {gid} does not exist (the model has "
                                 f"{len(self.graph.groups)}).")
            group = self.graph.groups[gid]
        if group.id not in self._slots:
            group_slots(group)  # raises with the reason
            raise KprunError(f"Group {group.id} ({', '.join(group.layer_names()[:2])}) is "
                             "excluded from masking.")
        return group

    # Masks ------------------------------------------------------------------
    def mask(self, key, channels: Sequence[int]) -> None:
        """Set the masked channels of one group (replacing its previous mask).

        Args:
            key: A group id, a `Group`, or a producer layer (or its name).
            channels: The group channels to mask.

        Raises:
            KprunError: unknown group, index out of range, or fewer than
                `min_channels` channels left.
        """
        group = self.group(key)
        idx = np.asarray(list(channels), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= group.size):
            raise KprunError(f"Channel index out of range for group {group.id} "
                             f"({group.layer_names()[0]}): valid 0..{group.size - 1}, "
                             f"got {sorted(idx.tolist())}.")
        new = np.zeros(group.size, dtype=bool)
        new[idx] = True
        if group.size - new.sum() < self.min_channels:
            raise KprunError(f"Masking {int(new.sum())} of {group.size} channels of group "
                             f"{group.id} ({group.layer_names()[0]}) leaves fewer than "
                             f"min_channels={self.min_channels}.")
        if not np.array_equal(new, self.masks[group.id]):
            self.masks[group.id] = new
            self._factors = None

    def set_plan(self, plan: Mapping) -> None:
        """Replace every mask: `{group id: channels}`; groups not named are unmasked."""
        self._require_model()
        named = {self.group(k).id for k in plan}
        for gid in self.masks:
            if gid not in named:
                if self.masks[gid].any():
                    self.masks[gid] = np.zeros_like(self.masks[gid])
                    self._factors = None
        for key, channels in plan.items():
            self.mask(key, channels)

    def clear(self, key=None) -> None:
        """Unmask one group (or every group when `key` is None)."""
        self._require_model()
        keys = list(self.masks) if key is None else [self.group(key).id]
        for gid in keys:
            self.masks[gid] = np.zeros_like(self.masks[gid])
        self._factors = None

    def plan(self) -> dict:
        """The masks as a plan `{group id: sorted channel indices}` for `apply_plan`."""
        self._require_model()
        return {gid: np.flatnonzero(m).tolist() for gid, m in self.masks.items() if m.any()}

    def sparsity(self) -> float:
        """Share of the maskable channels that are masked."""
        total = sum(len(m) for m in self.masks.values())
        return float(sum(int(m.sum()) for m in self.masks.values()) / total) if total else 0.0

    def macs(self) -> int:
        """MACs of the model `finalize()` would return (from the plan, no surgery)."""
        from kprune.pruning import plan_macs

        self._require_model()
        return plan_macs(self.graph, self.plan())

    # Weights ----------------------------------------------------------------
    def _build_factors(self) -> list:
        """(variable, multiplier) for every variable holding a masked position."""
        by_var: dict = {}
        for gid, slots in self._slots.items():
            masked = self.masks[gid]
            if not masked.any():
                continue
            for slot in slots:
                hit = slot.index >= 0
                off = np.zeros(len(slot.index), dtype=bool)
                off[hit] = masked[slot.index[hit]]
                if not off.any():
                    continue
                entry = by_var.setdefault(id(slot.variable),
                                          [slot.variable, slot.axis, np.ones(len(off))])
                entry[2][off] = 0.0
        factors = []
        for var, axis, keep in by_var.values():
            shape = [1] * len(var.shape)
            shape[axis] = len(keep)
            factors.append((var, keep.reshape(shape).astype(var.dtype)))
        return factors

    def sync_state(self) -> None:
        """On JAX, put the training state back into the model's variables before reading them.

        Inside JAX's `model.fit` the variables hold no value between steps
        until synced (`Callback.model` does it; the masker reads variables it
        holds directly).
        """
        model = getattr(self, "_model", None) or getattr(self, "_owner", None)
        if keras.backend.backend() == "jax" and hasattr(model, "jax_state_sync"):
            model.jax_state_sync()

    def apply(self) -> None:
        """Write zeros into the weights of every masked channel now."""
        self._require_model()
        self.sync_state()
        if self._factors is None:
            self._factors = self._build_factors()
        for var, factor in self._factors:
            var.assign(var * factor)

    def finalize(self, model: keras.Model | None = None) -> keras.Model:
        """Remove the masked channels: one surgery through `apply_plan`.

        Args:
            model: The model to prune (default: the one being trained); any
                model of the same architecture works (for example one
                reloaded from a checkpoint). It is left untouched.

        Returns:
            A new, smaller model of plain Keras layers (a copy when nothing is
            masked).
        """
        self._require_model()
        model = self._owner if model is None else model
        graph = self.graph if model is self._owner else DependencyGraph(model)
        plan = self.plan()
        if not plan:
            return copy_model(model)
        return apply_plan(model, plan, graph)

    # Callback hooks ---------------------------------------------------------
    def on_train_begin(self, logs=None) -> None:
        self.apply()

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self.mode == "hard":
            self.apply()

    def on_epoch_end(self, epoch, logs=None) -> None:
        if self.mode == "soft":
            self.apply()

    def _report(self, what: str) -> None:
        if self.verbose:
            print(f"{type(self).__name__}: {what}: {sum(int(m.sum()) for m in self.masks.values())}"
                  f" channels masked ({self.sparsity():.1%}), {self.macs():,} MACs")


def count_for(ratio: float, total: int) -> int:
    """`floor(ratio * total)`, robust to float error (0.29 * 100 gives 29)."""
    return int(math.floor(ratio * total + 1e-9))


__all__ = ["ChannelMasker", "Slot", "count_for", "group_slots", "lowest_global",
           "maskable_groups", "param_variables", "producer_variables", "uniform_ratio"]
