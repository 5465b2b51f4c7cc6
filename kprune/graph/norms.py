"""Rules for normalisation layers that take statistics over the channels.

BatchNormalization keeps one set of statistics per channel, so removing a
channel leaves the others as they were. The layers here do not:

* `LayerNormalization` and `RMSNormalization` over the channel axis compute a
  mean (and a variance, or a root mean square) over all the channels of a
  position. Once channels are removed the statistics are taken over the kept
  ones, so the pruned model is close to the masked one
  (`kprune.surgeon.zero_plan`) but not equal to it. The channels are still
  prunable: the layer is a per-channel `param` member (gamma, beta or scale
  are sliced) and the group is marked `approximate`, with a note naming the
  layer. `DependencyGraph(model, approximate=False)` blocks such groups.
* `GroupNormalization` takes statistics per normalisation group. By default
  whole groups are removed (exact); `GroupNormRule(mode="channels")` removes
  the same number of channels from every group instead (approximate).

A normalisation over axes that do not hold the channels is a per-position
operation for the channels: they pass through, and nothing is sliced.

ConvNeXt's `LayerScale` (a per-channel scale, used after the MLP of every
ConvNeXt block) is registered here too, so its residual streams can be pruned.

Example:

>>> inp = keras.Input((8,))
>>> x = keras.layers.Dense(16, name="d")(inp)
>>> x = keras.layers.LayerNormalization(name="ln")(x)
>>> model = keras.Model(inp, keras.layers.Dense(3)(x))
>>> group = DependencyGraph(model).group_of("d")
>>> group.prunable, group.approximate
(True, True)
>>> group.notes
["statistics of 'ln' (LayerNormalization) are taken over the kept channels"]
"""

from __future__ import annotations

import weakref

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.rules import ChannelParamRule, LayerRule, norm_axis, register_rule

# The position of the channels in the normalised weights of a layer, as seen
# when the graph was built (None: the layer does not normalise the channels).
# `slice` is not told the channel axis, and a LayerNormalization over
# axis 1 of a (batch, 8, 8) tensor reads the same whether or not axis 1
# holds the channels.
_CHANNEL_POSITION: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _axes(layer) -> list:
    """The layer's `axis` as a list, in the order its weights are laid out."""
    axis = layer.axis
    return sorted(axis) if isinstance(axis, (list, tuple)) else [axis]


def _weight_key(layer, weights: dict, attr: str) -> str | None:
    """The key in `weights` of the variable `layer.<attr>`, or None if it has none.

    `weights` is keyed as `kprune.surgeon.rebuild.weights_of` names the
    layer's weights, in `layer.weights` order.
    """
    var = getattr(layer, attr, None)
    if not isinstance(var, keras.Variable):
        return None
    for key, other in zip(weights, layer.weights):
        if other is var:
            return key
    short = var.path.split("/")[-1]
    return short if short in weights else None


def _take(value: np.ndarray, keep: np.ndarray, axis: int) -> np.ndarray:
    return np.take(value, np.flatnonzero(keep), axis=axis)


def _unknown_input(ctx):
    return ctx.unknown_outputs(f"input of '{ctx.layer.name}' has unknown channels")


# --------------------------------------------------------------------------
# LayerNormalization and RMSNormalization
# --------------------------------------------------------------------------
class StatisticsNormRule(LayerRule):
    """Base rule of a normalisation whose statistics span the channel axis.

    Subclasses name the per-channel weights (`WEIGHTS`, attributes of the
    layer) and describe the layer in the group's note (`describe`).

    Over axes that include the channels, the layer is a `param` member of
    the channels' group and the group is `approximate`; its weights span the
    normalised axes and are sliced on the channels' one. Over axes that do
    not include the channels the channels pass through and nothing is
    sliced. Blocked: axes given as negative and positive numbers mixed (such
    as `[1, -1]`, whose weights Keras lays out in another order than it
    reads them), and a layer called on inputs with the channels on
    different axes.
    """

    WEIGHTS: tuple = ()

    def describe(self, layer) -> str:
        return type(layer).__name__

    def propagate(self, ctx):
        layer, spec = ctx.layer, ctx.inputs[0] if ctx.inputs else None
        if spec is None:
            return _unknown_input(ctx)
        rank = len(ctx.shapes[0])
        raw = _axes(layer)
        axes = [norm_axis(int(a), rank) for a in raw]
        if spec.axis in axes and axes != sorted(axes):
            # Keras lays the weights out in the order of `raw` but broadcasts them in
            # the order of the axes: a channel's entries cannot be told apart.
            ctx.block(spec.atoms, f"'{layer.name}' ({type(layer).__name__}) normalises axes "
                                  f"{raw}, negative and positive mixed: its weights cannot "
                                  "be sliced on the channels")
            return [spec]
        # None: the channels are not normalised, the layer is per-position for them.
        position = axes.index(spec.axis) if spec.axis in axes else None
        if _CHANNEL_POSITION.get(layer, position) != position:
            ctx.block(spec.atoms, f"'{layer.name}' ({type(layer).__name__}) is called on inputs "
                                  "with the channels on different axes")
            return [spec]
        _CHANNEL_POSITION[layer] = position
        if position is None:
            return [spec]
        ctx.param(spec.atoms)
        ctx.approximate(spec.atoms, f"statistics of '{layer.name}' ({self.describe(layer)}) "
                                    "are taken over the kept channels")
        return [spec]

    def slice(self, layer, weights, keep_in, keep_out):
        position = _CHANNEL_POSITION.get(layer, 0)
        keep = keep_in[0]
        w = dict(weights)
        if position is None:
            return None, w
        for attr in self.WEIGHTS:
            key = _weight_key(layer, weights, attr)
            if key is None:
                continue
            value = weights[key]
            if value.ndim <= position or value.shape[position] != len(keep):
                raise KprunError(f"Layer '{layer.name}': weight '{key}' of shape {value.shape} "
                                 f"has no axis of {len(keep)} channels at position {position}.")
            w[key] = _take(value, keep, position)
        return None, w


class LayerNormRule(StatisticsNormRule):
    """LayerNormalization: prunable over the channels, with approximate statistics.

    The mean and variance (with `rms_scaling=True`, the variance alone) of
    each position are taken over the normalised axes; once channels are
    removed they are taken over the kept ones. The group is marked
    `approximate` and `gamma` and `beta` (those the layer has: `scale=False`
    and `center=False` drop them) are sliced on the channels.

    Args:
        None.

    Example:

    >>> register_rule(keras.layers.LayerNormalization, LayerNormRule())
    >>> graph = DependencyGraph(model)
    >>> graph.group_of("d").notes
    ["statistics of 'ln' (LayerNormalization) are taken over the kept channels"]
    """

    WEIGHTS = ("gamma", "beta")

    def describe(self, layer) -> str:
        parts = ["LayerNormalization"]
        if len(_axes(layer)) > 1:
            parts.append(f"over axes {_axes(layer)}")
        if getattr(layer, "rms_scaling", False):
            parts.append("with rms_scaling")
        return " ".join(parts)


class RMSNormRule(StatisticsNormRule):
    """RMSNormalization: prunable over the channels, with approximate statistics.

    The root mean square of each position is taken over the normalised axes;
    once channels are removed it is taken over the kept ones. The group is
    marked `approximate` and the layer's `scale` is sliced on the channels.

    Args:
        None.

    Example:

    >>> register_rule(keras.layers.RMSNormalization, RMSNormRule())
    >>> DependencyGraph(model).group_of("d").approximate
    True
    """

    WEIGHTS = ("scale",)

    def describe(self, layer) -> str:
        axes = _axes(layer)
        return "RMSNormalization" + (f" over axes {axes}" if len(axes) > 1 else "")


# --------------------------------------------------------------------------
# GroupNormalization
# --------------------------------------------------------------------------
GROUP_NORM_MODES = ("groups", "channels")


class GroupNormRule(LayerRule):
    """GroupNormalization: whole groups, or the same share of every group.

    Args:
        mode: 'groups' (default): the channels of one normalisation group are
            one removable channel, so whole groups go and the others are
            untouched (exact). 'channels': channels are removed one by one,
            the same number from every normalisation group (`groups` stays);
            each group's statistics are then taken over its kept channels, so
            the group is marked `approximate`.

    Raises:
        KprunError: for an unknown `mode`.

    Example:

    >>> register_rule(keras.layers.GroupNormalization, GroupNormRule(mode="channels"))
    >>> group = DependencyGraph(model).group_of("conv")
    >>> group.size, group.approximate
    (16, True)
    """

    def __init__(self, mode: str = "groups"):
        if mode not in GROUP_NORM_MODES:
            raise KprunError(f"Unknown GroupNormRule mode {mode!r}; valid modes: "
                             f"{', '.join(map(repr, GROUP_NORM_MODES))}.")
        self.mode = mode

    @staticmethod
    def _groups(layer, channels: int) -> int:
        groups = int(layer.groups)
        return channels if groups == -1 else groups

    def propagate(self, ctx):
        layer, spec = ctx.layer, ctx.inputs[0] if ctx.inputs else None
        if spec is None:
            return _unknown_input(ctx)
        if norm_axis(int(layer.axis), len(ctx.shapes[0])) != spec.axis:
            ctx.block(spec.atoms, f"'{layer.name}' normalises another axis than the channels")
            return [spec]
        groups = self._groups(layer, spec.size)
        if groups <= 0 or spec.size % groups:
            ctx.block(spec.atoms, f"'{layer.name}' has {groups} groups for {spec.size} channels")
            return [spec]
        per = spec.size // groups
        if self.mode == "groups" or per == 1:
            self._tie_groups(ctx, spec.atoms, groups, per)
        else:
            ctx.partition(spec.atoms, groups)
            ctx.approximate(spec.atoms, f"statistics of '{layer.name}' (GroupNormalization) "
                                        "are taken over the kept channels of each group")
        ctx.param(spec.atoms)
        return [spec]

    @staticmethod
    def _tie_groups(ctx, atoms, groups: int, per: int) -> None:
        for g in range(groups):
            block = atoms[g * per:(g + 1) * per]
            ctx.tie(np.repeat(block[:1], per), block)

    def slice(self, layer, weights, keep_in, keep_out):
        keep = keep_in[0]
        config = layer.get_config()
        groups = self._groups(layer, len(keep))
        kept = keep.reshape(groups, -1).sum(axis=1)
        per = len(keep) // groups
        if set(kept.tolist()) <= {0, per}:  # whole groups removed
            config["groups"] = int((kept > 0).sum())
        elif len(set(kept.tolist())) > 1:
            raise KprunError(f"Layer '{layer.name}' (GroupNormalization, {groups} groups): "
                             "remove the same number of channels from every group or whole "
                             f"groups (kept per group: {kept.tolist()}).")
        w = dict(weights)
        for attr in ("gamma", "beta"):
            key = _weight_key(layer, weights, attr)
            if key is not None:
                w[key] = _take(weights[key], keep, 0)
        return config, w


# --------------------------------------------------------------------------
# ConvNeXt's LayerScale
# --------------------------------------------------------------------------
class LayerScaleRule(ChannelParamRule):
    """ConvNeXt's `LayerScale`: `x * gamma`, one entry of gamma per channel.

    The channels pass through; `gamma` is sliced and the layer's
    `projection_dim` set to the kept channel count. The variable is found
    through the layer's `gamma` attribute (Keras names it 'variable',
    'variable_1', ...) and handed back by position.

    Args:
        None.

    Example:

    >>> from keras.src.applications.convnext import LayerScale
    >>> register_rule(LayerScale, LayerScaleRule())
    """

    def __init__(self):
        super().__init__(("gamma",))

    def slice(self, layer, weights, keep_in, keep_out):
        key = _weight_key(layer, weights, "gamma")
        if key is None:
            raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}) has no gamma.")
        _, w = ChannelParamRule((key,)).slice(layer, weights, keep_in, keep_out)
        config = layer.get_config()
        config["projection_dim"] = int(keep_in[0].sum())
        return config, _in_order(w)

    def zero(self, layer, weights, drop_in):
        return _in_order(weights)


def _in_order(weights: dict) -> list:
    """The values of `weights` as a list in `layer.weights` order.

    LayerScale's variable has no name of its own: Keras calls it 'variable',
    'variable_3', ... in order of creation, so the rebuilt layer's variable
    has another name than the source's and can only be matched by position.
    """
    return list(weights.values())


def _register_defaults():
    L = keras.layers
    register_rule(L.LayerNormalization, LayerNormRule())
    register_rule(L.RMSNormalization, RMSNormRule())
    register_rule(L.GroupNormalization, GroupNormRule())
    try:
        from keras.src.applications.convnext import LayerScale
    except ImportError:  # a Keras without ConvNeXt
        return
    register_rule(LayerScale, LayerScaleRule())


_register_defaults()
