"""Small KerasHub image backbones and classifiers, built offline with random weights.

KerasHub presets need a download, so every model here is built from
constructor arguments, taken from (and usually shrunk from) keras-hub's own
`*_backbone_test.py` / `*_image_classifier_test.py` files. Each builder takes
an optional `size` (the image side; None: the family's default) and builds in
a few seconds on CPU.

    from tests.hub_archs import BACKBONES, CLASSIFIERS, KINDS, sample_input
    model = BACKBONES["resnet_v1_basic"]()
    y = model(sample_input(model))

Families built (keras-hub 0.32):
    CNN: ResNet v1 / v2 (pre-activation) / vd, each with basic and bottleneck
    blocks; MobileNetV3 (`MobileNetBackbone`); MobileNetV5; EfficientNet with
    fused + unfused blocks (V2 style), with a "cba" + fused + unfused stack
    (timm's V2-rw_t) and with "v1" blocks (B0 style);
    CSPNet; DenseNet; VGG; Xception; HGNetV2.
    Transformer: ViT, DeiT, DINOv2, DINOv3, MiT (SegFormer's encoder), Swin,
    ViTDet.
    Classifiers: every family above that has an `*ImageClassifier` (all CNNs,
    ViT, DeiT, MiT, Swin); DINOv2, DINOv3 and ViTDet have none.

Not built:
    - Other image families (CLIP / SigLIP / MetaCLIP vision towers, SAM,
      SAM3, D-FINE, RetinaNet, DeepLabV3, BASNet, SegFormer segmenter,
      Depth Anything, VideoPrism, PaliGemma, Gemma3/4 vision) are outside the
      list of image backbones and classifiers surveyed here (encoders of
      multimodal models, detectors, segmenters).

Shrinking limits met (keras-hub 0.32 constructor checks, see the builders):
    ResNet's first stack must have 64 filters (and v1/v2 basic blocks add the
    stem unprojected, so the stem is 64 too); Xception's middle block must
    change width (else no shortcut conv and a shape mismatch); VGG's "avg"
    head is a 7x7 valid conv (the small classifier uses "flatten"); the
    transformers need sides divisible by their patch (Swin: by
    patch * window * 2**(stages - 1) = 32); HGNetV2 wants 64 px.

Preprocessors: every classifier gets its family's
`*ImageClassifierPreprocessor(*ImageConverter(image_size=...))`; they build
offline. A task's `__call__` does not run the preprocessor (only `predict` /
`fit` do), so `sample_input` returns raw float images at the model's size.

Weights: `model.weights` of every model here is all float32, but
`model.variables` is not: EfficientNet V2-style (Dropout / stochastic depth
inside FusedMBConvBlock / MBConvBlock) and MiT (DropPath) hold int64
`seed_generator_state` variables. `kprune.tools.verify.randomize` walks
`model.weights` and skips non-float dtypes, so it is safe on all of them; a
hand-written randomizer that walks `model.variables` must skip non-floats
(assigning normal noise to a seed state fails or silently corrupts it).
Freshly built BatchNormalization layers are identities and ViT-style
position embeddings start near zero: randomize before any equivalence check.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

import keras
import keras_hub

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
M = keras_hub.models
Lh = keras_hub.layers


def _side(size: int | None, default: int, multiple: int = 1, least: int = 1) -> int:
    """`size` (or `default`), at least `least`, rounded up to a multiple of `multiple`."""
    s = max(least, default if size is None else int(size))
    return max(multiple, -(-s // multiple) * multiple)


def _preprocessor(family: str, side: int):
    """`<family>ImageClassifierPreprocessor` with its image converter at `side` px."""
    converter = getattr(Lh, f"{family}ImageConverter")(image_size=(side, side), scale=1 / 255.0)
    return getattr(M, f"{family}ImageClassifierPreprocessor")(image_converter=converter)


def _side_of(backbone) -> int:
    shape = backbone.inputs[0].shape
    return int(shape[1]) if shape[1] is not None else 32


# ---------------------------------------------------------------------------
# CNN backbones
# ---------------------------------------------------------------------------
def resnet(block_type: str = "basic_block", pre_activation: bool = False,
           size: int | None = None):
    """ResNet v1 (`pre_activation=False`), v2 (True) or vd (`block_type` `*_vd`)."""
    side = _side(size, 32)
    vd = block_type.endswith("_vd")
    return M.ResNetBackbone(
        # basic_block v1/v2 adds the stem to the first stack unprojected: 64 too
        input_conv_filters=[8, 8, 16] if vd else [64],
        input_conv_kernel_sizes=[3, 3, 3] if vd else [7],
        stackwise_num_filters=[64, 16, 16],  # keras-hub requires 64 first
        stackwise_num_blocks=[2, 1, 1],
        stackwise_num_strides=[1, 2, 2],
        block_type=block_type,
        use_pre_activation=pre_activation,
        image_shape=(side, side, 3),
    )


def mobilenet_v3(size: int | None = None):
    """MobileNetV3-style `MobileNetBackbone` (SE blocks, hard-swish)."""
    side = _side(size, 32)
    return M.MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32, 48]],
        stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[8, 8], [16, 16]],
        stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]],
        stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"], ["hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]],
        output_num_filters=64,
        input_activation="hard_swish",
        output_activation="hard_swish",
        input_num_filters=8,
        image_shape=(side, side, 3),
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        squeeze_and_excite=0.5,
        last_layer_filter=48,
    )


def mobilenet_v5(size: int | None = None):
    """MobileNetV5 with an edge-residual and two universal-inverted-residual blocks."""
    side = _side(size, 32)
    return M.MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "uir"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [24, 24]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]],
        stackwise_exp_ratios=[[4.0], [4.0, 4.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [5, 5]],
        stackwise_dw_start_kernel_sizes=[[0], [0, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 0]],
        stackwise_key_dims=[[0], [0, 0]],
        stackwise_value_dims=[[0], [0, 0]],
        stackwise_kv_strides=[[0], [0, 0]],
        stackwise_use_cpe=[[False], [False, False]],
        image_shape=(side, side, 3),
        stem_size=16,
        num_features=64,
        use_msfa=False,
    )


def efficientnet_v2(size: int | None = None, block_types=("fused", "fused", "unfused", "unfused")):
    """EfficientNetV2-style: fused MBConv stages, then unfused (MBConv + SE) stages.

    `block_types=("cba", "fused", "unfused", "unfused")` is timm's
    EfficientNetV2-rw_t layout (a conv-BN-act first stage).
    """
    side = _side(size, 32)
    return M.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3, 3],
        stackwise_num_repeats=[1, 2, 1, 2],
        stackwise_input_filters=[16, 16, 24, 32],
        stackwise_output_filters=[16, 24, 32, 40],
        stackwise_expansion_ratios=[1, 4, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 1],
        stackwise_block_types=list(block_types),
        stackwise_force_input_filters=[0] * 4,
        stackwise_nores_option=[False] * 4,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        num_features=64,
        input_shape=(side, side, 3),
    )


def efficientnet_b0(size: int | None = None):
    """EfficientNet-B0-style: "v1" MBConv blocks with squeeze-and-excite."""
    side = _side(size, 32)
    return M.EfficientNetBackbone(
        width_coefficient=1.0,
        depth_coefficient=1.0,
        stackwise_kernel_sizes=[3, 3, 5, 3],
        stackwise_num_repeats=[1, 2, 1, 2],
        stackwise_input_filters=[16, 8, 16, 24],
        stackwise_output_filters=[8, 16, 24, 32],
        stackwise_expansion_ratios=[1, 6, 6, 6],
        stackwise_strides=[1, 2, 2, 1],
        stackwise_block_types=["v1"] * 4,
        stackwise_squeeze_and_excite_ratios=[0.25] * 4,
        stackwise_force_input_filters=[0] * 4,
        stackwise_nores_option=[False] * 4,
        min_depth=None,
        include_stem_padding=True,
        use_depth_divisor_as_min_depth=True,
        cap_round_filter_decrease=True,
        stem_conv_padding="valid",
        dropout=0,
        num_features=64,
        input_shape=(side, side, 3),
    )


def cspnet(size: int | None = None):
    """CSPNet (CSP stages of dark blocks)."""
    side = _side(size, 32)
    return M.CSPNetBackbone(
        stem_filters=16,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_strides=2,
        stackwise_depth=[1, 2, 2],
        stackwise_num_filters=[16, 24, 32],
        image_shape=(side, side, 3),
        down_growth=True,
        bottle_ratio=(0.5,) + (1.0,),
        block_ratio=(1.0,) + (0.5,),
        expand_ratio=(2.0,) + (1.0,),
        block_type="dark_block",
        stage_type="csp",
        stem_padding="same",
    )


def densenet(size: int | None = None):
    """DenseNet (concatenating dense blocks, compressing transitions)."""
    side = _side(size, 32)
    return M.DenseNetBackbone(stackwise_num_repeats=[2, 2, 2, 2], compression_ratio=0.5,
                              growth_rate=4, image_shape=(side, side, 3))


def vgg(size: int | None = None):
    """VGG (plain conv stacks)."""
    side = _side(size, 32)
    return M.VGGBackbone(stackwise_num_repeats=[2, 2, 2], stackwise_num_filters=[8, 16, 16],
                         image_shape=(side, side, 3))


def xception(size: int | None = None):
    """Xception (separable convolutions, strided residual shortcuts).

    A middle block must change the width: keras-hub adds the strided 1x1
    shortcut conv only then, and a pooled block without it fails to build.
    """
    side = _side(size, 32, 1, least=32)
    return M.XceptionBackbone(stackwise_conv_filters=[[8, 16], [24, 24], [32, 32]],
                              stackwise_pooling=[False, True, False],
                              image_shape=(side, side, 3))


def hgnetv2(size: int | None = None):
    """HGNetV2 (stem + stages of concatenating conv blocks)."""
    side = _side(size, 64, 32)
    return M.HGNetV2Backbone(
        depths=[1, 1],
        embedding_size=16,
        hidden_sizes=[32, 64],
        stem_channels=[3, 8, 16],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[[16, 8, 32, 1, 1, 3], [32, 16, 64, 1, 1, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, False],
        image_shape=(side, side, 3),
    )


# ---------------------------------------------------------------------------
# Transformer backbones
# ---------------------------------------------------------------------------
def vit(size: int | None = None):
    """ViT (class token, patch 4)."""
    side = _side(size, 28, 4)
    return M.ViTBackbone(image_shape=(side, side, 3), patch_size=(4, 4), num_layers=2,
                         num_heads=2, hidden_dim=16, mlp_dim=32)


def deit(size: int | None = None):
    """DeiT (class + distillation tokens, patch 4)."""
    side = _side(size, 28, 4)
    return M.DeiTBackbone(image_shape=(side, side, 3), patch_size=4, num_layers=2, num_heads=2,
                          hidden_dim=16, intermediate_dim=32)


def dinov2(size: int | None = None):
    """DINOv2 (patch 14, layer scale, interpolated position embeddings)."""
    side = _side(size, 42, 14)
    return M.DINOV2Backbone(patch_size=14, num_layers=2, hidden_dim=16, num_heads=2,
                            intermediate_dim=32, layer_scale_init_value=1.0,
                            num_register_tokens=0, use_swiglu_ffn=False,
                            image_shape=(side, side, 3), position_embedding_shape=(42, 42, 3))


def dinov3(size: int | None = None):
    """DINOv3 (patch 16, register tokens, RoPE)."""
    side = _side(size, 32, 16)
    return M.DINOV3Backbone(patch_size=16, num_layers=2, hidden_dim=16, num_heads=2,
                            intermediate_dim=32, layer_scale_init_value=1.0,
                            num_register_tokens=4, use_gated_mlp=False,
                            image_shape=(side, side, 3))


def mit(size: int | None = None):
    """MiT, SegFormer's hierarchical encoder (overlapping patch embeddings)."""
    side = _side(size, 32, 8)
    return M.MiTBackbone(layerwise_depths=[1, 1], image_shape=(side, side, 3), hidden_dims=[8, 16],
                         num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[4, 2],
                         max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3],
                         layerwise_strides=[4, 2])


def swin(size: int | None = None):
    """Swin Transformer (shifted windows, patch merging)."""
    side = _side(size, 32, 32)
    return M.SwinTransformerBackbone(image_shape=(side, side, 3), embed_dim=16, depths=(2, 2),
                                     num_heads=(2, 4), window_size=4, drop_path=0.0)


def vitdet(size: int | None = None):
    """ViTDet (windowed + global attention, relative positions, conv neck)."""
    side = _side(size, 16, 4)
    return M.ViTDetBackbone(image_shape=(side, side, 3), patch_size=2, hidden_size=8,
                            num_layers=2, global_attention_layer_indices=[1],
                            intermediate_dim=16, num_heads=2, num_output_channels=8,
                            window_size=2)


# ---------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------
def classifier(family: str, backbone_fn: Callable, size: int | None = None, **kwargs):
    """`<family>ImageClassifier` on `backbone_fn(size)` with its preprocessor, 3 classes."""
    backbone = backbone_fn(size=size)
    preprocessor = _preprocessor(family, _side_of(backbone))
    task = getattr(M, f"{family}ImageClassifier")
    return task(backbone=backbone, preprocessor=preprocessor, num_classes=3, **kwargs)


def _task(family: str, backbone_fn: Callable, **kwargs) -> Callable:
    def build(size: int | None = None):
        return classifier(family, backbone_fn, size=size, **kwargs)

    build.__name__ = f"{backbone_fn.__name__}_classifier"
    build.__doc__ = f"`{family}ImageClassifier` on a small `{backbone_fn.__name__}` backbone."
    return build


def _bind(fn: Callable, **kwargs) -> Callable:
    def build(size: int | None = None):
        return fn(size=size, **kwargs)

    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build


# ---------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------
BACKBONES: dict[str, Callable] = {
    "resnet_v1_basic": _bind(resnet, block_type="basic_block"),
    "resnet_v1_bottleneck": _bind(resnet, block_type="bottleneck_block"),
    "resnet_v2_basic": _bind(resnet, block_type="basic_block", pre_activation=True),
    "resnet_v2_bottleneck": _bind(resnet, block_type="bottleneck_block", pre_activation=True),
    "resnet_vd_basic": _bind(resnet, block_type="basic_block_vd"),
    "resnet_vd_bottleneck": _bind(resnet, block_type="bottleneck_block_vd"),
    "mobilenet_v3": mobilenet_v3,
    "mobilenet_v5": mobilenet_v5,
    "efficientnet_v2": efficientnet_v2,
    "efficientnet_v2_rw": _bind(efficientnet_v2,
                                block_types=("cba", "fused", "unfused", "unfused")),
    "efficientnet_b0": efficientnet_b0,
    "cspnet": cspnet,
    "densenet": densenet,
    "vgg": vgg,
    "xception": xception,
    "hgnetv2": hgnetv2,
    "vit": vit,
    "deit": deit,
    "dinov2": dinov2,
    "dinov3": dinov3,
    "mit": mit,
    "swin": swin,
    "vitdet": vitdet,
}

_FAMILY = {
    "resnet_v1_basic": "ResNet", "resnet_v1_bottleneck": "ResNet", "resnet_v2_basic": "ResNet",
    "resnet_v2_bottleneck": "ResNet", "resnet_vd_basic": "ResNet", "resnet_vd_bottleneck": "ResNet",
    "mobilenet_v3": "MobileNet", "mobilenet_v5": "MobileNetV5",
    "efficientnet_v2": "EfficientNet", "efficientnet_v2_rw": "EfficientNet",
    "efficientnet_b0": "EfficientNet", "cspnet": "CSPNet",
    "densenet": "DenseNet", "vgg": "VGG", "xception": "Xception", "hgnetv2": "HGNetV2",
    "vit": "ViT", "deit": "DeiT", "mit": "MiT", "swin": "SwinTransformer",
}
# VGG's "avg"/"max" heads start with a 7x7 valid conv (needs a >= 7 px map):
# the small model uses the "flatten" head (Dense fc1, fc2) as keras-hub's test.
_TASK_KWARGS = {"vgg": {"pooling": "flatten", "pooling_hidden_dim": 16},
                "mobilenet_v3": {"num_features": 32}, "mobilenet_v5": {"head_hidden_size": 32},
                "hgnetv2": {"head_filters": 32}}

CLASSIFIERS: dict[str, Callable] = {
    f"{name}_classifier": _task(family, BACKBONES[name], **_TASK_KWARGS.get(name, {}))
    for name, family in _FAMILY.items()
}

_TRANSFORMERS = {"vit", "deit", "dinov2", "dinov3", "mit", "swin", "vitdet"}

KINDS: dict[str, str] = {
    name: ("transformer" if name.removesuffix("_classifier") in _TRANSFORMERS else "cnn")
    for name in list(BACKBONES) + list(CLASSIFIERS)
}


def sample_input(model: keras.Model, batch: int = 2, seed: int = 0):
    """A random float batch for `model`: an array, or a dict/list matching its inputs.

    Images are uniform in [0, 1) (what a converter with `scale=1/255` yields).
    Unknown spatial sizes (None) become 32.
    """
    rng = np.random.default_rng(seed)

    def one(tensor):
        shape = tuple(32 if d is None else int(d) for d in tensor.shape[1:])
        return rng.random((batch,) + shape).astype("float32")

    return keras.tree.map_structure(one, model.input)


__all__ = ["BACKBONES", "CLASSIFIERS", "KINDS", "sample_input", "classifier"]
