"""One rule per layer type: how channels pass through it and how to slice it.

A rule has three jobs:

* `propagate(ctx)`: given the channel layout of the call's inputs, say which
  atoms the outputs carry, and record the layer's role (producer, consumer,
  per-channel parameters) or block a group it cannot handle.
* `slice(layer, weights, keep_in, keep_out)`: the new config and weights once
  some input/output channels are removed.
* `zero(layer, weights, drop_in)`: the same layer with the input weights of
  removed channels set to zero (the reference a pruned model must equal).

Users extend the table with `register_rule(LayerClass, rule)`.
"""

from __future__ import annotations

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.channels import ChannelSpec
from kprune.layers.compactor import Compactor
from kprune.layers.tokens import ClassToken, PositionEmbedding

_RULES: dict = {}


def register_rule(layer_class, rule: "LayerRule") -> None:
    """Register `rule` for layers of exactly `layer_class`.

    Args:
        layer_class: A Keras layer (or operation) class.
        rule: A `LayerRule` instance.

    Example:

    >>> register_rule(MyScale, PassThroughRule())   # a per-element layer
    """
    _RULES[layer_class] = rule


def has_rule(layer) -> bool:
    """Whether a rule is registered for `layer`'s exact class."""
    return type(layer) in _RULES


def get_rule(layer) -> "LayerRule":
    """The rule for `layer`'s exact class, or the blocking `UnknownRule`."""
    return _RULES.get(type(layer), UNKNOWN)


def channel_axis(layer, rank: int) -> int:
    """Channel axis (with batch axis) of a layer that has a `data_format`."""
    fmt = getattr(layer, "data_format", "channels_last")
    return 1 if fmt == "channels_first" else rank - 1


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _idx(mask):
    return np.flatnonzero(mask)


class LayerRule:
    """Base rule: copies config and weights unchanged."""

    def propagate(self, ctx) -> list:
        raise NotImplementedError

    def slice(self, layer, weights: dict, keep_in: list, keep_out: list):
        """(new config, new weights) once channels are removed.

        A config of None means "the layer's own": the surgeon copies it as it
        copies an untouched layer, so a layer whose config does not
        round-trip can still sit on a pruned group.
        """
        return None, dict(weights)

    def zero(self, layer, weights: dict, drop_in: list) -> dict:
        return dict(weights)

    def slice_for(self, call, weights: dict, keep_in: list, keep_out: list,
                  keep_inner: dict):
        """`slice` for one call, with the kept channels inside the layer.

        Rules whose layers hold channels of their own (`RuleContext.inner`,
        attention heads) or need the call's arguments override this; the
        default calls `slice(call.layer, ...)`.

        Args:
            call: The `kprune.graph.walk.Call` being rebuilt.
            weights: Weight name -> numpy value.
            keep_in, keep_out: Kept-channel masks per input and output tensor.
            keep_inner: `{slot: kept mask}` of the layer's inner channels that
                lose some.
        """
        if keep_inner:
            raise KprunError(f"Layer '{call.layer.name}': the rule "
                             f"{type(self).__name__} cannot slice inner channels "
                             f"{sorted(keep_inner)}.")
        return self.slice(call.layer, weights, keep_in, keep_out)

    def zero_for(self, call, weights: dict, drop_in: list, drop_inner: dict) -> dict:
        """`zero` for one call, with the removed inner channels (see `slice_for`)."""
        if drop_inner:
            raise KprunError(f"Layer '{call.layer.name}': the rule "
                             f"{type(self).__name__} cannot silence inner channels "
                             f"{sorted(drop_inner)}.")
        return self.zero(call.layer, weights, drop_in)

    def rows(self, layer, slot: str | None, weights: dict) -> np.ndarray | None:
        """The filters of `slot` as rows, one per channel, for weight criteria.

        `weights` maps weight names to arrays (the layer's values, or for
        Taylor their products with the loss gradient). None when the rule has
        no filters for `slot`; `kprune.criteria` then reads the layer itself.
        """
        return None

    def inner_attrs(self, layer, keep_inner: dict) -> dict:
        """The layer's size attributes once inner channels are removed (for MAC counts)."""
        return {}

    def slice_call(self, call):
        """Outputs of a stateless `keras.ops` operation on pruned tensors.

        The surgeon calls this instead of `slice` for operations (they have no
        weights or config to slice) whose channels change.

        Args:
            call: A `kprune.graph.ops.OpCall`: the operation, its new arguments,
                and the kept channels and channel axis of every tensor.

        Returns:
            The call's outputs in the new model. The default calls the same
            operation on the new arguments.
        """
        return call.run()


class UnknownRule(LayerRule):
    """A layer with no rule: its inputs' groups are blocked, outputs are new."""

    def propagate(self, ctx):
        opaque = getattr(ctx.call, "opaque", None)
        if opaque:
            reason = (f"layer '{ctx.layer.name}' ({type(ctx.layer).__name__}) is kept whole: "
                      f"{opaque}")
        else:
            kind = "layer" if isinstance(ctx.layer, keras.layers.Layer) else "operation"
            reason = (f"{kind} '{ctx.layer.name}' ({type(ctx.layer).__name__}) has no "
                      "channel rule; register one with kprune.graph.register_rule")
        ctx.block_all(reason)
        return ctx.unknown_outputs(reason)


UNKNOWN = UnknownRule()


def _input_on_axis(ctx, axis_expected: int, what: str):
    """The first input's spec if its channel axis is `axis_expected`, else None (blocked)."""
    spec = ctx.inputs[0] if ctx.inputs else None
    if spec is None:
        return None
    if spec.axis != axis_expected:
        ctx.block(spec.atoms, f"layer '{ctx.layer.name}' reads axis {axis_expected} "
                              f"but the channels of its input are on axis {spec.axis} ({what})")
        return None
    return spec


# --------------------------------------------------------------------------
# Producers and consumers
# --------------------------------------------------------------------------
class ConvRule(LayerRule):
    """Conv1D/2D/3D, with `groups >= 1`. Kernel: (*k, Cin/groups, Cout)."""

    def propagate(self, ctx):
        layer = ctx.layer
        rank = len(ctx.shapes[0])
        axis = channel_axis(layer, rank)
        spec = _input_on_axis(ctx, axis, "data_format")
        cout = int(layer.filters)
        groups = int(getattr(layer, "groups", 1) or 1)
        out_axis = channel_axis(layer, len(ctx.out_shapes[0]))
        if spec is not None and groups > 1 and groups == spec.size and cout % groups == 0:
            # One input channel per conv group (a depthwise conv written as Conv2D):
            # removing a channel removes its group and its outputs, like DepthwiseConv.
            atoms = np.repeat(spec.atoms, cout // groups)
            ctx.param(atoms)
            return [ChannelSpec(out_axis, atoms)]
        if spec is not None and groups > 1 and spec.size == cout:
            # Grouped conv with Cin == Cout (ResNeXt, depthwise-like): channel i in
            # and out are removed together, evenly over the conv groups.
            ctx.consumer(spec.atoms)
            ctx.producer(spec.atoms)
            ctx.partition(spec.atoms, groups)
            return [ChannelSpec(out_axis, spec.atoms)]
        out = ctx.fresh(cout)
        if spec is not None:
            ctx.consumer(spec.atoms)
            if groups > 1:
                ctx.partition(spec.atoms, groups)
        if groups > 1:
            ctx.partition(out, groups)
        ctx.producer(out)
        return [ChannelSpec(out_axis, out)]

    def slice(self, layer, weights, keep_in, keep_out):
        config = layer.get_config()
        groups = int(config.get("groups", 1) or 1)
        kin, kout = keep_in[0], keep_out[0]
        w = dict(weights)
        kernel = w["kernel"]
        if groups == 1:
            w["kernel"] = kernel[..., _idx(kin), :][..., _idx(kout)]
        elif kernel.shape[-2] == 1 and len(kin) == groups:  # depthwise-like: groups shrink
            w["kernel"] = kernel[..., _idx(kout)]
            config["groups"] = int(kin.sum())
        else:
            w["kernel"] = _slice_grouped(layer.name, kernel, kin, kout, groups)
        if "bias" in w:
            w["bias"] = w["bias"][_idx(kout)]
        config["filters"] = int(kout.sum())
        return config, w

    def zero(self, layer, weights, drop_in):
        w = dict(weights)
        groups = int(getattr(layer, "groups", 1) or 1)
        kernel = w["kernel"].copy()
        drop = _idx(drop_in[0])
        if groups == 1:
            kernel[..., drop, :] = 0
        else:
            cin_g = kernel.shape[-2]
            cout_g = kernel.shape[-1] // groups
            for i in drop:
                g = i // cin_g
                kernel[..., i % cin_g, g * cout_g:(g + 1) * cout_g] = 0
        w["kernel"] = kernel
        return w


def _slice_grouped(name, kernel, kin, kout, groups):
    cin_g, cout = kernel.shape[-2], kernel.shape[-1]
    cout_g = cout // groups
    blocks, n_in, n_out = [], set(), set()
    for g in range(groups):
        ins = _idx(kin[g * cin_g:(g + 1) * cin_g])
        outs = g * cout_g + _idx(kout[g * cout_g:(g + 1) * cout_g])
        n_in.add(len(ins))
        n_out.add(len(outs))
        blocks.append(kernel[..., ins, :][..., outs])
    if len(n_in) > 1 or len(n_out) > 1:
        raise KprunError(
            f"Layer '{name}' is a grouped convolution with {groups} groups: channels must "
            f"be removed evenly from every group (kept inputs per group {sorted(n_in)}, "
            f"kept outputs per group {sorted(n_out)})."
        )
    if 0 in n_in or 0 in n_out:
        raise KprunError(f"Layer '{name}': removal would empty a convolution group.")
    return np.concatenate(blocks, axis=-1)


class ConvTransposeRule(LayerRule):
    """Conv1D/2D/3DTranspose. Kernel: (*k, Cout, Cin)."""

    def propagate(self, ctx):
        layer = ctx.layer
        spec = _input_on_axis(ctx, channel_axis(layer, len(ctx.shapes[0])), "data_format")
        out = ctx.fresh(int(layer.filters))
        if spec is not None:
            ctx.consumer(spec.atoms)
        ctx.producer(out)
        return [ChannelSpec(channel_axis(layer, len(ctx.out_shapes[0])), out)]

    def slice(self, layer, weights, keep_in, keep_out):
        config, w = layer.get_config(), dict(weights)
        w["kernel"] = w["kernel"][..., _idx(keep_out[0]), :][..., _idx(keep_in[0])]
        if "bias" in w:
            w["bias"] = w["bias"][_idx(keep_out[0])]
        config["filters"] = int(keep_out[0].sum())
        return config, w

    def zero(self, layer, weights, drop_in):
        w = dict(weights)
        kernel = w["kernel"].copy()
        kernel[..., _idx(drop_in[0])] = 0
        w["kernel"] = kernel
        return w


class DepthwiseRule(LayerRule):
    """DepthwiseConv1D/2D: channel c in gives outputs c*m .. c*m+m-1 (m = multiplier)."""

    def propagate(self, ctx):
        layer = ctx.layer
        spec = _input_on_axis(ctx, channel_axis(layer, len(ctx.shapes[0])), "data_format")
        out_axis = channel_axis(layer, len(ctx.out_shapes[0]))
        mult = int(layer.depth_multiplier)
        if spec is None:
            return ctx.unknown_outputs(f"input of '{layer.name}' has unknown channels")
        atoms = np.repeat(spec.atoms, mult)
        ctx.param(atoms)
        return [ChannelSpec(out_axis, atoms)]

    def slice(self, layer, weights, keep_in, keep_out):
        w = dict(weights)
        w["kernel"] = w["kernel"][..., _idx(keep_in[0]), :]
        if "bias" in w:
            w["bias"] = w["bias"][_idx(keep_out[0])]
        return layer.get_config(), w


class SeparableConvRule(LayerRule):
    """SeparableConv1D/2D: depthwise (*k, Cin, m), pointwise (*1, Cin*m, Cout)."""

    def propagate(self, ctx):
        layer = ctx.layer
        spec = _input_on_axis(ctx, channel_axis(layer, len(ctx.shapes[0])), "data_format")
        out = ctx.fresh(int(layer.filters))
        if spec is not None:
            ctx.consumer(spec.atoms)
        ctx.producer(out)
        return [ChannelSpec(channel_axis(layer, len(ctx.out_shapes[0])), out)]

    def slice(self, layer, weights, keep_in, keep_out):
        config, w = layer.get_config(), dict(weights)
        mult = int(layer.depth_multiplier)
        kin, kout = keep_in[0], keep_out[0]
        w["depthwise_kernel"] = w["depthwise_kernel"][..., _idx(kin), :]
        rows = _idx(np.repeat(kin, mult))
        w["pointwise_kernel"] = w["pointwise_kernel"][..., rows, :][..., _idx(kout)]
        if "bias" in w:
            w["bias"] = w["bias"][_idx(kout)]
        config["filters"] = int(kout.sum())
        return config, w

    def zero(self, layer, weights, drop_in):
        w = dict(weights)
        mult = int(layer.depth_multiplier)
        dw, pw = w["depthwise_kernel"].copy(), w["pointwise_kernel"].copy()
        dw[..., _idx(drop_in[0]), :] = 0
        pw[..., _idx(np.repeat(drop_in[0], mult)), :] = 0
        w["depthwise_kernel"], w["pointwise_kernel"] = dw, pw
        return w


class DenseRule(LayerRule):
    """Dense on the last axis. Kernel: (in, out)."""

    def propagate(self, ctx):
        layer = ctx.layer
        if getattr(layer, "lora_rank", None):
            return UNKNOWN.propagate(ctx)
        spec = _input_on_axis(ctx, len(ctx.shapes[0]) - 1, "Dense reads the last axis")
        out = ctx.fresh(int(layer.units))
        if spec is not None:
            ctx.consumer(spec.atoms)
        ctx.producer(out)
        return [ChannelSpec(len(ctx.out_shapes[0]) - 1, out)]

    def slice(self, layer, weights, keep_in, keep_out):
        config, w = layer.get_config(), dict(weights)
        w["kernel"] = w["kernel"][_idx(keep_in[0])][:, _idx(keep_out[0])]
        if "bias" in w:
            w["bias"] = w["bias"][_idx(keep_out[0])]
        config["units"] = int(keep_out[0].sum())
        return config, w

    def zero(self, layer, weights, drop_in):
        w = dict(weights)
        kernel = w["kernel"].copy()
        kernel[_idx(drop_in[0])] = 0
        w["kernel"] = kernel
        return w


class CompactorRule(LayerRule):
    """kprune's Compactor: a (C, C) pointwise map on `layer.axis`, mask per output."""

    def propagate(self, ctx):
        layer = ctx.layer
        rank = len(ctx.shapes[0])
        spec = _input_on_axis(ctx, norm_axis(int(layer.axis), rank), "Compactor axis")
        out = ctx.fresh(int(ctx.out_shapes[0][norm_axis(int(layer.axis), rank)]))
        if spec is not None:
            ctx.consumer(spec.atoms)
        ctx.producer(out)
        return [ChannelSpec(norm_axis(int(layer.axis), rank), out)]

    def slice(self, layer, weights, keep_in, keep_out):
        w = dict(weights)
        w["kernel"] = w["kernel"][_idx(keep_in[0])][:, _idx(keep_out[0])]
        w["mask"] = w["mask"][_idx(keep_out[0])]
        return layer.get_config(), w

    zero = DenseRule.zero


class RNNRule(LayerRule):
    """SimpleRNN, GRU, LSTM read pruned input features; their units are kept."""

    def propagate(self, ctx):
        spec = _input_on_axis(ctx, len(ctx.shapes[0]) - 1, "RNN features are the last axis")
        if spec is not None:
            ctx.consumer(spec.atoms)
        for extra in ctx.inputs[1:]:
            if extra is not None:
                ctx.block(extra.atoms, f"initial state of '{ctx.layer.name}'")
        return ctx.unknown_outputs(f"recurrent units of '{ctx.layer.name}' are not pruned")

    def slice(self, layer, weights, keep_in, keep_out):
        w = dict(weights)
        w["kernel"] = w["kernel"][_idx(keep_in[0])]
        return layer.get_config(), w

    def zero(self, layer, weights, drop_in):
        w = dict(weights)
        kernel = w["kernel"].copy()
        kernel[_idx(drop_in[0])] = 0
        w["kernel"] = kernel
        return w


# --------------------------------------------------------------------------
# Per-channel parameters
# --------------------------------------------------------------------------
def _slice_vectors(weights, keep, names):
    w = dict(weights)
    for name in names:
        if name in w and w[name].ndim == 1 and len(w[name]) == len(keep):
            w[name] = w[name][_idx(keep)]
    return w


class BatchNormRule(LayerRule):
    """BatchNormalization: gamma, beta, moving mean and variance per channel."""

    VECTORS = ("gamma", "beta", "moving_mean", "moving_variance")

    def propagate(self, ctx):
        spec = ctx.inputs[0]
        if spec is None:
            return ctx.unknown_outputs(f"input of '{ctx.layer.name}' has unknown channels")
        axis = norm_axis(int(ctx.layer.axis), len(ctx.shapes[0]))
        if axis != spec.axis:
            reason = f"'{ctx.layer.name}' normalises axis {axis}, not the channel axis {spec.axis}"
            ctx.block(spec.atoms, reason)
            return [spec]
        ctx.param(spec.atoms)
        return [spec]

    def slice(self, layer, weights, keep_in, keep_out):
        return layer.get_config(), _slice_vectors(weights, keep_in[0], self.VECTORS)


class ChannelParamRule(LayerRule):
    """A layer that acts on each channel apart, with weights whose last axis is the channels.

    Fits per-channel scales, learned class tokens concatenated along the
    sequence, positional embeddings added to every position: the channels
    pass through, and every weight named in `weights` is sliced on its last
    axis. The layer's config must not hold its width (ConvNeXt's
    `LayerScale` does, and has a rule of its own in `kprune.graph.norms`).

    Args:
        weights: Names of the per-channel weights (as in `layer.weights`);
            default: every weight whose last axis has the channel count.

    Example:

    >>> register_rule(kprune.layers.ClassToken, ChannelParamRule(("token",)))
    """

    def __init__(self, weights: tuple | None = None):
        self.weights = tuple(weights) if weights is not None else None

    def propagate(self, ctx):
        spec = ctx.inputs[0] if ctx.inputs else None
        if spec is None:
            return ctx.unknown_outputs(f"input of '{ctx.layer.name}' has unknown channels")
        rank = len(ctx.shapes[0])
        if spec.axis != rank - 1 or any(len(s) != len(ctx.out_shapes[0]) for s in ctx.out_shapes):
            ctx.block(spec.atoms, f"'{ctx.layer.name}' ({type(ctx.layer).__name__}) holds "
                                  "per-channel weights on the last axis, not on the channels")
            return ctx.unknown_outputs(f"'{ctx.layer.name}' output channels are unknown")
        ctx.param(spec.atoms)
        return [ChannelSpec(len(shape) - 1, spec.atoms) for shape in ctx.out_shapes]

    def slice(self, layer, weights, keep_in, keep_out):
        keep = keep_in[0]
        w = dict(weights)
        for name, value in weights.items():
            wanted = name in self.weights if self.weights is not None else (
                value.ndim >= 1 and value.shape[-1] == len(keep))
            if wanted:
                if value.shape[-1] != len(keep):
                    raise KprunError(f"Layer '{layer.name}': weight '{name}' has {value.shape[-1]}"
                                     f" entries on its last axis for {len(keep)} channels.")
                w[name] = value[..., _idx(keep)]
        return None, w


class PReLURule(LayerRule):
    """PReLU: alpha has one entry per channel unless the channel axis is shared."""

    def propagate(self, ctx):
        spec = ctx.inputs[0]
        if spec is None:
            return ctx.unknown_outputs(f"input of '{ctx.layer.name}' has unknown channels")
        if ctx.shapes[0][spec.axis] == spec.size:
            ctx.param(spec.atoms)
        return [spec]

    def slice(self, layer, weights, keep_in, keep_out):
        w = dict(weights)
        alpha = w["alpha"]
        # alpha has the input's shape without the batch axis.
        ax = self._alpha_axis(layer, alpha, len(keep_in[0]))
        if ax is not None:
            w["alpha"] = np.take(alpha, _idx(keep_in[0]), axis=ax)
        return layer.get_config(), w

    @staticmethod
    def _alpha_axis(layer, alpha, size):
        shared = set(layer.shared_axes or [])
        for ax in range(alpha.ndim - 1, -1, -1):
            if alpha.shape[ax] == size and (ax + 1) not in shared:
                return ax
        return None


class NormalizationRule(LayerRule):
    """Normalization (preprocessing) adapted on the last axis."""

    def propagate(self, ctx):
        spec, layer = ctx.inputs[0], ctx.layer
        if spec is None:
            return ctx.unknown_outputs(f"input of '{layer.name}' has unknown channels")
        rank = len(ctx.shapes[0])
        axes = [norm_axis(int(a), rank) for a in (layer.axis or ())]
        if axes == [spec.axis] and layer.input_mean is None:
            ctx.param(spec.atoms)
        else:
            ctx.block(spec.atoms, f"'{layer.name}' (Normalization) cannot be sliced")
        return [spec]

    def slice(self, layer, weights, keep_in, keep_out):
        return layer.get_config(), _slice_vectors(weights, keep_in[0], ("mean", "variance"))


# --------------------------------------------------------------------------
# Merges
# --------------------------------------------------------------------------
class MergeRule(LayerRule):
    """Add, Subtract, Multiply, Average, Maximum, Minimum: inputs are one channel set.

    An input whose channel axis has size 1 broadcasts and is not tied.
    """

    def propagate(self, ctx):
        specs = ctx.inputs
        reason = f"inputs of merge '{ctx.layer.name}' have different channel layouts"
        if not specs or any(s is None for s in specs):
            return self._refuse(ctx, reason)
        from_end = [len(shape) - s.axis for s, shape in zip(specs, ctx.shapes)]
        full = [i for i, s in enumerate(specs) if s.size > 1] or [0]
        first = full[0]
        for i in full[1:]:
            if specs[i].size != specs[first].size or from_end[i] != from_end[first]:
                return self._refuse(ctx, reason)
        for i in full[1:]:
            ctx.tie(specs[first].atoms, specs[i].atoms)
        return [ChannelSpec(len(ctx.out_shapes[0]) - from_end[first], specs[first].atoms)]

    @staticmethod
    def _refuse(ctx, reason):
        ctx.block_all(reason)
        return ctx.unknown_outputs(reason)


class ConcatenateRule(LayerRule):
    """Concatenate: on the channel axis the output holds each input at an offset."""

    def propagate(self, ctx):
        specs = ctx.inputs
        if any(s is None for s in specs):
            return MergeRule().propagate(ctx)
        rank = len(ctx.shapes[0])
        axis = norm_axis(int(ctx.layer.axis), rank)
        if all(s.axis == axis for s in specs):
            return [ChannelSpec(axis, np.concatenate([s.atoms for s in specs]))]
        return MergeRule().propagate(ctx)


# --------------------------------------------------------------------------
# Pass-through and reshaping
# --------------------------------------------------------------------------
class PassThroughRule(LayerRule):
    """Element-wise or per-channel-independent layers (activations, dropout, ...)."""

    def propagate(self, ctx):
        spec = ctx.inputs[0] if ctx.inputs else None
        if spec is None:
            return ctx.unknown_outputs(f"input of '{ctx.layer.name}' has unknown channels")
        return [spec for _ in ctx.out_shapes]


class SpatialRule(PassThroughRule):
    """Pooling, padding, cropping, upsampling: spatial only, with a data_format."""

    def propagate(self, ctx):
        spec = _input_on_axis(ctx, channel_axis(ctx.layer, len(ctx.shapes[0])), "data_format")
        if spec is None:
            return ctx.unknown_outputs(f"'{ctx.layer.name}' mixes the channel axis")
        return [spec]


class GlobalPoolRule(LayerRule):
    """Global pooling: (B, *spatial, C) -> (B, C), or keeps dims."""

    def propagate(self, ctx):
        spec = _input_on_axis(ctx, channel_axis(ctx.layer, len(ctx.shapes[0])), "data_format")
        if spec is None:
            return ctx.unknown_outputs(f"'{ctx.layer.name}' pools over the channel axis")
        axis = spec.axis if getattr(ctx.layer, "keepdims", False) else 1
        return [ChannelSpec(axis, spec.atoms)]


class SoftmaxRule(PassThroughRule):
    """Softmax couples the channels when it runs over the channel axis."""

    def propagate(self, ctx):
        spec = ctx.inputs[0]
        axes = ctx.layer.axis if isinstance(ctx.layer.axis, (list, tuple)) else [ctx.layer.axis]
        if spec is not None and spec.axis in [norm_axis(a, len(ctx.shapes[0])) for a in axes]:
            ctx.block(spec.atoms, f"'{ctx.layer.name}' (Softmax) normalises over the channels")
        return super().propagate(ctx)


class ActivationRule(PassThroughRule):
    """Activation: element-wise, except softmax/log_softmax over the channels."""

    def propagate(self, ctx):
        name = getattr(ctx.layer.activation, "__name__", "")
        spec = ctx.inputs[0]
        if spec is not None and name in ("softmax", "log_softmax") \
                and spec.axis == len(ctx.shapes[0]) - 1:
            ctx.block(spec.atoms, f"'{ctx.layer.name}' ({name}) normalises over the channels")
        return super().propagate(ctx)


def _flat_positions(spec, shape, channels_first_order: bool) -> np.ndarray:
    """Channel (atom index) of every element of `shape[1:]`, flattened row-major."""
    dims = tuple(int(d) for d in shape[1:])
    ax = spec.axis - 1
    view = [1] * len(dims)
    view[ax] = dims[ax]
    grid = np.broadcast_to(np.arange(dims[ax]).reshape(view), dims)
    if channels_first_order:  # Flatten(data_format="channels_first") moves channels last first
        grid = np.moveaxis(grid, 0, -1)
    return grid.reshape(-1)


class FlattenRule(LayerRule):
    """Flatten: the output position of element (s, c) is a row of the next Dense."""

    def propagate(self, ctx):
        spec, shape = ctx.inputs[0], ctx.shapes[0]
        if spec is None or any(d is None for d in shape[1:]):
            if spec is not None:
                ctx.block(spec.atoms, f"'{ctx.layer.name}' flattens unknown spatial sizes")
            return ctx.unknown_outputs(f"'{ctx.layer.name}' flattens unknown channels")
        first = getattr(ctx.layer, "data_format", "channels_last") == "channels_first" and len(shape) > 2
        positions = _flat_positions(spec, shape, first)
        return [ChannelSpec(1, spec.atoms[positions])]

    def slice(self, layer, weights, keep_in, keep_out):
        return None, dict(weights)


class ReshapeRule(LayerRule):
    """Reshape that keeps the (last) channel axis whole, or flattens it."""

    def propagate(self, ctx):
        spec, shape = ctx.inputs[0], ctx.shapes[0]
        target = tuple(ctx.out_shapes[0][1:])
        if spec is not None and spec.axis == len(shape) - 1:
            if len(target) > 1 and target[-1] == spec.size and None not in target:
                return [ChannelSpec(len(target), spec.atoms)]
            if len(target) == 1 and None not in shape[1:]:
                return [ChannelSpec(1, spec.atoms[_flat_positions(spec, shape, False)])]
        if spec is not None:
            ctx.block(spec.atoms, f"'{ctx.layer.name}' reshapes across the channel axis")
        return ctx.unknown_outputs(f"'{ctx.layer.name}' reshapes across the channel axis")

    def slice(self, layer, weights, keep_in, keep_out):
        config = layer.get_config()
        target = list(config["target_shape"])
        if len(target) == 1:
            target[0] = int(keep_out[0].sum())
        else:
            target[-1] = int(keep_out[0].sum())
        config["target_shape"] = tuple(target)
        return config, dict(weights)


def _register_defaults():
    L = keras.layers
    for cls in (L.Conv1D, L.Conv2D, L.Conv3D):
        register_rule(cls, ConvRule())
    for cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
        register_rule(cls, ConvTransposeRule())
    for cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
        register_rule(cls, DepthwiseRule())
    for cls in (L.SeparableConv1D, L.SeparableConv2D):
        register_rule(cls, SeparableConvRule())
    register_rule(L.Dense, DenseRule())
    for cls in (L.SimpleRNN, L.GRU, L.LSTM):
        register_rule(cls, RNNRule())
    register_rule(L.BatchNormalization, BatchNormRule())
    # LayerNormalization, RMSNormalization, GroupNormalization: kprune.graph.norms.
    register_rule(L.PReLU, PReLURule())
    register_rule(L.Normalization, NormalizationRule())
    for cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum):
        register_rule(cls, MergeRule())
    # keras.ops operations (knp.Add, knp.Pad, ...) are registered by kprune.graph.ops.
    register_rule(L.Concatenate, ConcatenateRule())
    for cls in (L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.GaussianNoise, L.GaussianDropout,
                L.AlphaDropout, L.ActivityRegularization, L.Identity):
        register_rule(cls, PassThroughRule())
    register_rule(L.Activation, ActivationRule())
    register_rule(L.Softmax, SoftmaxRule())
    for cls in (L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
                L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
                L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
                L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
                L.Cropping1D, L.Cropping2D, L.Cropping3D,
                L.UpSampling1D, L.UpSampling2D, L.UpSampling3D):
        register_rule(cls, SpatialRule())
    for cls in (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
                L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D):
        register_rule(cls, GlobalPoolRule())
    register_rule(L.Flatten, FlattenRule())
    register_rule(L.Reshape, ReshapeRule())
    register_rule(Compactor, CompactorRule())
    register_rule(ClassToken, ChannelParamRule(("token",)))
    register_rule(PositionEmbedding, ChannelParamRule(("embedding",)))


_register_defaults()
