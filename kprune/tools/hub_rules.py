"""Channel rules for the KerasHub layers that kprune cannot inline.

`kprune.graph.walk` inlines KerasHub's composite layers (encoder blocks,
MLPs) by tracing their `call`. The vision transformers of KerasHub hold a
few layers that cannot be inlined, and they would leave the residual stream
(the embedding axis) whole. This module gives them rules:

* The patch embeddings of ViT (`ViTPatchingAndEmbedding`), DeiT
  (`DeiTEmbeddings`) and DINOv2 (`DINOV2Embedding`) use weights of their own
  (class, distillation, mask and register tokens, position embeddings)
  beside their patch convolution. `PatchEmbeddingRule` makes such a layer the
  *producer* of the embedding channels: removing channel `c` removes output
  filter `c` of the patch convolution (kernel and bias) and entry `c` of
  every token and position embedding (all on their last axis), and the
  layer's `hidden_dim` shrinks. It is exact. The image channels it reads
  are consumed like a convolution's inputs (a model input is never pruned).
* DINOv2's `DINOV2LayerScale` scales each channel: the channels pass
  through and `lambda1` is sliced (`WidthParamRule`).
* DeiT's `DeiTEncoder` cannot be traced as written: its blocks return
  `(x, None)`, which a symbolic call refuses. A tracing function
  (`kprune.graph.walk.register_trace`) computes the same from the blocks'
  sub-layers, so the encoder is inlined like ViT's.
* Swin (`SwinTransformerBlock`, `SwinTransformerStage`, `PatchEmbedding`,
  `PatchMerging`): its window attention folds the windows into the batch
  axis and reads its relative position bias from a table of its own, which
  kprune cannot follow yet. `BlockedRule` keeps each such layer whole and
  says so, naming the layer (instead of a tracing error), and MAC counters
  make `kprune.profile` count Swin, so `prune(flops_target=...)` fails with
  a `KprunError` that names the blocking layers rather than doing nothing.

The residual stream of every one of these models passes LayerNorms
(`kprune.graph.norms`): it is an *approximate* group, pruned unless
`DependencyGraph(model, approximate=False)` / `prune(..., approximate=False)`.

Rules (and MAC counters) are registered once keras_hub is imported: at once
when it already is as kprune is imported, else right after `import keras_hub`
(a one-shot import hook). kprune never imports keras_hub itself, so
`import kprune` stays as light, and works without keras-hub installed.

Example:

>>> backbone = keras_hub.models.ViTBackbone(...)
>>> graph = kprune.DependencyGraph(backbone)
>>> graph.group_of("vit_patching_and_embedding").prunable
True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import math
import sys
import warnings

import keras
import numpy as np

from kprune.errors import KprunError, KprunWarning
from kprune.graph.channels import ChannelSpec
from kprune.graph.rules import ChannelParamRule, LayerRule, _idx, channel_axis, register_rule

_REGISTERED = False


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _attr_path(layer, path: str):
    """`layer.a.b` for `path` 'a.b'."""
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def _weight_name(layer, weights: dict, variable) -> str | None:
    """The key of `variable` in `weights` (named as `weights_of(layer)` names them)."""
    for key, other in zip(weights, layer.weights):
        if other is variable:
            return key
    return None


def _constructor_config(layer, config: dict) -> dict:
    """`config` without the keys that `type(layer)(**config)` refuses.

    Some KerasHub layers write keys their constructor does not take
    (`ViTPatchingAndEmbedding` writes `num_patches` and `num_positions`).
    """
    from kprune.surgeon.hub import loadable_config

    return loadable_config(type(layer), config)


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------
class PatchEmbeddingRule(LayerRule):
    """A patch embedding that produces the embedding channels of a transformer.

    The layer turns an image into tokens (batch, tokens, width): a patch
    convolution, tokens of its own prepended, position embeddings added. Its
    output channels are a new group, produced by the layer: every weight of
    the layer holds the width on its last axis (the convolution's kernel
    `(kh, kw, in, width)` and bias, the tokens `(1, n, width)`, the position
    embeddings `(positions, width)` or `(1, positions, width)`), so removing
    channels slices every weight on its last axis and sets `width` in the
    config. Its image input is read like a convolution's: its channels are
    consumed (the kernel's input axis).

    Args:
        conv: Attribute path of the patch convolution (`"patch_embedding"`,
            `"patch_embeddings.projection"`): its kernel gives the filters
            that weight criteria rank, and its input axis the image channels.
        width: Config key (and attribute) of the embedding width.
        channels_key: Config key of the image channel count, if any.

    Example:

    >>> register_rule(ViTPatchingAndEmbedding, PatchEmbeddingRule("patch_embedding"))
    """

    def __init__(self, conv: str, width: str = "hidden_dim", channels_key: str | None = None):
        self.conv = conv
        self.width = width
        self.channels_key = channels_key

    def propagate(self, ctx):
        layer = ctx.layer
        kind = type(layer).__name__
        image = ctx.inputs[0] if ctx.inputs else None
        rank = len(ctx.shapes[0]) if ctx.shapes else 0
        for spec in ctx.inputs[1:]:  # masks of the tokens: read whole
            if spec is not None:
                ctx.block(spec.atoms, f"'{layer.name}' ({kind}) reads this tensor as a mask")
        if image is not None:
            if image.axis == channel_axis(layer, rank) and rank == 4:
                ctx.consumer(image.atoms)
            else:
                ctx.block(image.atoms, f"'{layer.name}' ({kind}) reads the image channels on "
                                       f"axis {channel_axis(layer, rank)}, not {image.axis}")
        width = int(getattr(layer, self.width))
        shape = ctx.out_shapes[0]
        if len(ctx.out_shapes) != 1 or len(shape) != 3 or shape[-1] != width:
            return ctx.unknown_outputs(f"'{layer.name}' ({kind}) returns {ctx.out_shapes}, not "
                                       f"tokens of width {width}")
        out = ctx.fresh(width)
        ctx.producer(out)
        return [ChannelSpec(2, out)]

    def _kernel_name(self, layer, weights):
        name = _weight_name(layer, weights, _attr_path(layer, self.conv).kernel)
        if name is None:
            raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}): the kernel of "
                             f"'{self.conv}' is not among its weights.")
        return name

    def slice(self, layer, weights, keep_in, keep_out):
        kout = keep_out[0]
        kin = keep_in[0] if keep_in and len(keep_in[0]) else None
        kernel = self._kernel_name(layer, weights)
        w = {}
        for name, value in weights.items():
            if value.ndim == 0 or value.shape[-1] != len(kout):
                raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}): weight "
                                 f"'{name}' {value.shape} has no embedding channels on its last "
                                 f"axis ({len(kout)}).")
            value = value[..., _idx(kout)]
            if name == kernel and kin is not None:
                value = value[..., _idx(kin), :]
            w[name] = value
        config = layer.get_config()
        config[self.width] = int(kout.sum())
        if kin is not None and self.channels_key in config:
            config[self.channels_key] = int(kin.sum())
        for attr in ("data_format", "use_patch_bias"):  # not in ViT's get_config
            if attr not in config and hasattr(layer, attr):
                config[attr] = getattr(layer, attr)
        return _constructor_config(layer, config), w

    def zero(self, layer, weights, drop_in):
        w = dict(weights)
        if drop_in and len(drop_in[0]) and drop_in[0].any():
            kernel = self._kernel_name(layer, weights)
            value = w[kernel].copy()
            value[..., _idx(drop_in[0]), :] = 0
            w[kernel] = value
        return w

    def rows(self, layer, slot, weights):
        kernel = weights.get(self._kernel_name(layer, weights))
        if kernel is None:
            return None
        return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)


class WidthParamRule(ChannelParamRule):
    """A per-channel layer whose config holds its width (DINOv2's `DINOV2LayerScale`).

    As `ChannelParamRule`, and the config key `width` is set to the kept
    channel count (the layer builds its weights from it).

    Args:
        weights: Names of the per-channel weights.
        width: Config key of the channel count.

    Example:

    >>> register_rule(DINOV2LayerScale, WidthParamRule(("lambda1",), "hidden_dim"))
    """

    def __init__(self, weights: tuple, width: str = "hidden_dim"):
        super().__init__(weights)
        self.width = width

    def slice(self, layer, weights, keep_in, keep_out):
        _, w = super().slice(layer, weights, keep_in, keep_out)
        config = layer.get_config()
        config[self.width] = int(keep_in[0].sum())
        return config, w


class BlockedRule(LayerRule):
    """A layer kprune keeps whole, for a stated reason: its inputs and outputs are blocked.

    The layer is recorded as the producer of its outputs, so
    `DependencyGraph.blockers()` (and the error of an unreachable
    `flops_target`) name it.

    Args:
        reason: Why the layer cannot be pruned through.
    """

    def __init__(self, reason: str):
        self.reason = reason

    def propagate(self, ctx):
        layer = ctx.layer
        reason = f"layer '{layer.name}' ({type(layer).__name__}) is kept whole: {self.reason}"
        ctx.block_all(reason)
        specs = ctx.unknown_outputs(reason)
        for spec in specs:
            if spec is not None:
                ctx.producer(spec.atoms)
        return specs


# --------------------------------------------------------------------------
# DeiT's encoder
# --------------------------------------------------------------------------
def trace_deit_encoder(layer, hidden_states, attention_masks=None, output_hidden_states=False,
                       return_attention_scores=False):
    """`DeiTEncoder.call` from the blocks' sub-layers (the blocks return `(x, None)`).

    Each block becomes a small functional model of its sub-layers (the
    blocks' layers share names, `ln_1`, `mha`, ..., so they cannot sit in one
    graph side by side), which the walk inlines. Returns the encoder's
    `(hidden states, all hidden states, attention scores)` with the last two
    None: the backbone reads the first only.
    """
    if attention_masks is not None or output_hidden_states or return_attention_scores:
        raise KprunError("kprune traces DeiTEncoder without attention masks, hidden states "
                         "or attention scores")
    x = hidden_states
    for block in layer.encoder_layers:
        x = _deit_block(block, x)
    return layer.layer_norm(x), None, None


def _deit_block(block, x):
    """`DeiTEncoderBlock.call(x)[0]`: a functional model of the block's sub-layers, called on x."""
    inputs = keras.Input(batch_shape=tuple(x.shape), dtype=x.dtype)
    y = block.layer_norm_1(inputs)
    y = block.mha(y, y)
    h = keras.ops.add(y, inputs)
    y = block.mlp(block.layer_norm_2(h))
    y = block.output_layer(y, h)
    return keras.Model(inputs, y, name=f"{block.name}_traced")(x)


# --------------------------------------------------------------------------
# MACs
# --------------------------------------------------------------------------
def _patch_conv_macs(conv_path: str):
    """MACs of a patch embedding: those of its patch convolution."""

    def count(layer, ins, outs):
        conv = _attr_path(layer, conv_path)
        image = ins[0]
        first = getattr(conv, "data_format", "channels_last") == "channels_first"
        spatial, cin = (image[2:], image[1]) if first else (image[1:-1], image[-1])
        grid = [(int(s) - int(k)) // int(st) + 1
                for s, k, st in zip(spatial, conv.kernel_size, conv.strides)]
        return math.prod(conv.kernel_size) * int(cin) * int(outs[0][-1]) * math.prod(grid)

    return count


def _no_macs(layer, ins, outs):
    return 0


def _swin_block_macs(layer, ins, outs):
    """Window attention (qkv, scores, weighted sum, projection) and MLP of a Swin block."""
    tokens, dim = int(ins[0][1]), int(ins[0][-1])
    window = int(layer.window_size) ** 2
    attn = layer.attn
    inner = int(attn.head_dim) * int(attn.num_heads)
    hidden = int(layer.mlp.hidden_features)
    return tokens * (dim * 3 * inner + 2 * window * inner + inner * dim + 2 * dim * hidden)


def _patch_merging_macs(layer, ins, outs):
    tokens_out, dim = int(outs[0][1]), int(ins[0][-1])
    return tokens_out * 4 * dim * 2 * dim


def _swin_stage_macs(layer, ins, outs):
    total = sum(_swin_block_macs(block, [ins[0]], [ins[0]]) for block in layer.blocks)
    if layer.downsample is not None:
        total += _patch_merging_macs(layer.downsample, [ins[0]], outs)
    return total


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------
_SWIN_REASON = ("Swin's window attention folds its windows into the batch axis and adds a "
                "relative position bias from a table of its own; kprune cannot prune through "
                "it yet")


def _vit(m, macs, trace):
    register_rule(m.ViTPatchingAndEmbedding,
                  PatchEmbeddingRule("patch_embedding", "hidden_dim", "num_channels"))
    macs(m.ViTPatchingAndEmbedding, _patch_conv_macs("patch_embedding"))


def _deit(m, macs, trace):
    register_rule(m.DeiTEmbeddings,
                  PatchEmbeddingRule("patch_embedding", "hidden_dim", "num_channels"))
    macs(m.DeiTEmbeddings, _patch_conv_macs("patch_embedding"))
    trace(m.DeiTEncoder, trace_deit_encoder)


def _dinov2(m, macs, trace):
    register_rule(m.DINOV2Embedding, PatchEmbeddingRule("patch_embeddings.projection"))
    macs(m.DINOV2Embedding, _patch_conv_macs("patch_embeddings.projection"))
    register_rule(m.DINOV2LayerScale, WidthParamRule(("lambda1",), "hidden_dim"))
    macs(m.DINOV2LayerScale, _no_macs)  # a scale, like a norm's gamma


def _swin(m, macs, trace):
    for cls in (m.SwinTransformerBlock, m.SwinTransformerStage, m.PatchMerging):
        register_rule(cls, BlockedRule(_SWIN_REASON))
    register_rule(m.PatchEmbedding, BlockedRule(
        "Swin's patch embedding feeds window attention that kprune cannot prune through yet"))
    macs(m.SwinTransformerBlock, _swin_block_macs)
    macs(m.SwinTransformerStage, _swin_stage_macs)
    macs(m.PatchMerging, _patch_merging_macs)
    macs(m.PatchEmbedding, _patch_conv_macs("proj"))


_FAMILIES = (("keras_hub.src.models.vit.vit_layers", _vit),
             ("keras_hub.src.models.deit.deit_layers", _deit),
             ("keras_hub.src.models.dinov2.dinov2_layers", _dinov2),
             ("keras_hub.src.models.swin_transformer.swin_transformer_layers", _swin))


def register() -> None:
    """Register the KerasHub rules, tracing functions and MAC counters (once).

    Called by itself when keras_hub is imported; calling it again does
    nothing. A family whose layers this keras-hub version lacks (moved or
    renamed) is skipped with a `KprunWarning`: its layers are then traced,
    or kept whole with a reason, as any other.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from kprune.graph.walk import register_trace
    from kprune.profile import register_macs

    for module, family in _FAMILIES:
        try:
            family(importlib.import_module(module), register_macs, register_trace)
        except (ImportError, AttributeError) as exc:
            warnings.warn(f"kprune: no KerasHub rules from {module} ({type(exc).__name__}: "
                          f"{exc})", KprunWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `callback()` once `import <name>` has finished, then leaves `sys.meta_path`.

    It finds the module with the other finders and wraps its loader's
    `exec_module`; it does nothing for any other module.
    """

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name != self.name or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                self.callback()
            except Exception as exc:  # noqa: BLE001 - never break the user's import
                warnings.warn(f"kprune: could not register its rules for {self.name} "
                              f"({type(exc).__name__}: {exc})", KprunWarning, stacklevel=2)

        spec.loader.exec_module = exec_then_call
        return spec


def _install() -> None:
    if sys.modules.get("keras_hub") is not None:
        register()
    elif not any(isinstance(f, _AfterImport) and f.name == "keras_hub" for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("keras_hub", register))


_install()

__all__ = ["BlockedRule", "PatchEmbeddingRule", "WidthParamRule", "register",
           "trace_deit_encoder"]
