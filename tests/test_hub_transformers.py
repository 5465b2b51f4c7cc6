"""KerasHub vision transformers: residual streams through `kprune.tools.hub_rules`.

ViT, DeiT and DINOv2 embed the image with a layer kprune cannot inline (it
holds tokens and position embeddings of its own): its rule makes it the
producer of the embedding channels, so the residual stream is one group. The
stream passes LayerNorms everywhere, so in the full models it is an
approximate group; the embedding rules themselves are checked exactly on a
small functional model (embedding -> Dense). On a backbone the stream is the
model's output, kept whole unless `prune_outputs=True`; on a classifier the
head reads it and it is pruned. Swin is kept whole, for a stated reason.

keras-hub is an optional extra (`pip install kprune[hub]`).
"""

import sys

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is the optional [hub] extra")

import hub_archs  # noqa: E402
import kprune  # noqa: E402
from kprune.tools import hub_rules  # noqa: E402
from kprune.surgeon import apply_plan, zero_plan  # noqa: E402
from kprune.surgeon.hub import loadable_config  # noqa: E402
from kprune.tools.verify import random_plan, randomize  # noqa: E402

from keras_hub.src.models.deit.deit_layers import DeiTEmbeddings  # noqa: E402
from keras_hub.src.models.dinov2.dinov2_layers import (DINOV2Embedding,  # noqa: E402
                                                       DINOV2LayerScale)
from keras_hub.src.models.vit.vit_layers import ViTPatchingAndEmbedding  # noqa: E402

EMBEDDING = {"vit": "vit_patching_and_embedding", "deit": "deit_patching_and_embedding",
             "dinov2": "embeddings"}


def dinov2_patch4(size=None):
    """DINOv2 with 4 px patches: hub_archs' (14 px, 9 patches) spends 64% of its MACs in the
    patch convolution, whose output is the backbone's output, kept whole: 0.5 is out of reach."""
    return keras_hub.models.DINOV2Backbone(
        patch_size=4, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
        layer_scale_init_value=1.0, num_register_tokens=2, use_swiglu_ffn=False,
        image_shape=(28, 28, 3), position_embedding_shape=(28, 28, 3))


BUILDERS = {**hub_archs.BACKBONES, **hub_archs.CLASSIFIERS, "dinov2_patch4": dinov2_patch4}


def build(name):
    """A small model with random weights (DINOv2's saved position embeddings in step)."""
    model = BUILDERS[name]()
    randomize(model, seed=0)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, DINOV2Embedding):
            # DINOv2 saves `position_embeddings` and re-interpolates the ones it uses from
            # them on load: random, unrelated values would not survive a round trip.
            layer.position_embeddings.assign(layer.interpolated_position_embeddings)
    return model


def leaves(y):
    return [np.asarray(t) for t in keras.tree.flatten(y)]


def assert_same(got, want, rtol=1e-5):
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-5 * max(1.0, np.abs(w).max()))


def stream(graph, name):
    return graph.group_of(EMBEDDING[name.removesuffix("_classifier")])


# --------------------------------------------------------------------------
# The stream is one group
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit", "deit", "dinov2"])
def test_backbone_stream_is_a_prunable_group(name):
    model = build(name)
    graph = kprune.DependencyGraph(model, prune_outputs=True)
    assert not [c.layer.name for c in graph.flat.calls if c.opaque]
    group = stream(graph, name)
    assert group.prunable and group.approximate, graph.summary()
    assert group.size == 16 and EMBEDDING[name] in [m.name for m in group.producers]
    # On a backbone the stream is the output: kept whole by default ...
    default = stream(kprune.DependencyGraph(model), name)
    assert not default.prunable and "reaches model output" in default.reason
    # ... and through LayerNorms it is approximate: blocked when only exact groups are asked.
    exact = stream(kprune.DependencyGraph(model, approximate=False, prune_outputs=True), name)
    assert not exact.prunable and "LayerNormalization" in exact.reason
    # Pruning it slices the embedding layer and every reader of the stream.
    plan = {group.id: [1, 4, 9]}
    small = apply_plan(model, plan, graph)
    x = hub_archs.sample_input(model)
    assert small(x).shape == model(x).shape[:-1] + (13,)
    assert small.get_layer(EMBEDDING[name]).hidden_dim == 13


@pytest.mark.parametrize("name", ["vit_classifier", "deit_classifier"])
def test_classifier_stream_is_prunable_by_default(name):
    graph = kprune.DependencyGraph(build(name))
    group = stream(graph, name)
    assert group.prunable and group.approximate, graph.summary()


# --------------------------------------------------------------------------
# Exact: the groups that pass no LayerNorm, and the embedding rules alone
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit", "deit", "dinov2"])
def test_exact_groups_equal_zero_plan(name):
    model = build(name)
    graph = kprune.DependencyGraph(model, approximate=False)
    plan = random_plan(graph, 0.4, seed=1)
    assert len(plan) == len(graph.prunable_groups()) == 8  # 2 blocks: heads, key/value, MLP
    x = hub_archs.sample_input(model)
    assert_same(apply_plan(model, plan, graph)(x), zero_plan(model, plan, graph)(x))


def _embedding_model(kind):
    """Input -> Conv2D stem (8 channels) -> embedding (width 16) -> Dense: no LayerNorm."""
    inputs = keras.Input((28, 28, 3))
    if kind == "vit":
        layer = ViTPatchingAndEmbedding((28, 28), (4, 4), 16, num_channels=8, name="emb")
    elif kind == "deit":
        layer = DeiTEmbeddings((28, 28), (4, 4), 16, num_channels=8, name="emb")
    else:
        layer = DINOV2Embedding(16, 4, (28, 28), num_register_tokens=2,
                                position_embedding_shape=(28, 28), name="emb")
    x = layer(keras.layers.Conv2D(8, 1, name="stem")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(5, name="head")(x))
    randomize(model, seed=0)
    return model


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
def test_embedding_rule_is_exact(kind):
    model = _embedding_model(kind)
    graph = kprune.DependencyGraph(model, approximate=False)
    tokens, image = graph.group_of("emb"), graph.group_of("stem")
    assert tokens.prunable and not tokens.approximate
    assert image.prunable and "emb" in [m.name for m in image.consumers]
    plan = {tokens.id: [0, 5, 6, 15], image.id: [2, 3]}
    small = apply_plan(model, plan, graph)
    x = hub_archs.sample_input(model)
    assert_same(small(x), zero_plan(model, plan, graph)(x))
    emb = small.get_layer("emb")
    assert emb.hidden_dim == 12 and all(w.shape[-1] == 12 for w in emb.weights)
    assert emb.weights[[w.path.split("/")[-1] for w in emb.weights].index("kernel")].shape[-2] == 6
    assert kprune.profile(small).macs < kprune.profile(model).macs  # the patch conv is counted


def test_dinov2_layer_scale_is_exact():
    inputs = keras.Input((10, 8))
    x = keras.layers.Dense(16, name="d1")(inputs)
    x = DINOV2LayerScale(16, name="scale")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    randomize(model, seed=0)
    graph = kprune.DependencyGraph(model)
    group = graph.group_of("d1")
    assert group.prunable and "scale" in [m.name for m in group.params]
    plan = {group.id: [2, 3, 11]}
    x = np.random.default_rng(0).normal(size=(2, 10, 8)).astype("float32")
    small = apply_plan(model, plan, graph)
    assert_same(small(x), zero_plan(model, plan, graph)(x))
    assert small.get_layer("scale").hidden_dim == 13


# --------------------------------------------------------------------------
# prune(flops_target=0.5), and the .keras round trip
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit", "deit", "dinov2_patch4", "vit_classifier",
                                  "deit_classifier"])
def test_flops_target_and_keras_round_trip(name, tmp_path):
    model = build(name)
    small = kprune.prune(model, flops_target=0.5)
    assert kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
    if name.endswith("_classifier"):
        assert type(small) is type(model)
        assert small.backbone.get_layer(EMBEDDING[name[:-11]]).hidden_dim < 16  # the stream
    else:
        assert type(small).__name__ == "PrunedBackbone"
    x = hub_archs.sample_input(model)
    path = str(tmp_path / "small.keras")
    small.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    assert type(again) is type(small)
    assert_same(again(x, training=False), small(x, training=False), rtol=1e-6)


def test_dinov2_tiny_patch14_says_why_half_is_out_of_reach():
    model = build("dinov2")
    with pytest.raises(kprune.KprunError, match="cannot reach 50.0%"):
        kprune.prune(model, flops_target=0.5)


def test_loadable_config_drops_keys_the_constructor_refuses():
    layer = _embedding_model("vit").get_layer("emb")
    config = layer.get_config()
    assert {"num_patches", "num_positions"} <= set(config)
    with pytest.raises(Exception):
        ViTPatchingAndEmbedding.from_config(config)
    clean = loadable_config(ViTPatchingAndEmbedding, config)
    assert not {"num_patches", "num_positions"} & set(clean)
    assert ViTPatchingAndEmbedding.from_config(clean).hidden_dim == 16


# --------------------------------------------------------------------------
# Swin: kept whole, with the reason
# --------------------------------------------------------------------------
def test_swin_is_kept_whole_with_a_reason():
    model = build("swin")
    graph = kprune.DependencyGraph(model)
    assert not graph.prunable_groups()
    assert {"SwinTransformerStage", "PatchEmbedding"} <= set(graph.blockers())
    assert any("window attention" in (g.reason or "") for g in graph.groups)
    with pytest.raises(kprune.KprunError, match="SwinTransformerStage"):
        kprune.prune(model, flops_target=0.5)


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------
def test_rules_are_registered():
    layer = ViTPatchingAndEmbedding((28, 28), (4, 4), 16)
    assert hub_rules._REGISTERED
    assert isinstance(kprune.graph.get_rule(layer), hub_rules.PatchEmbeddingRule)


def test_registration_waits_for_the_import(tmp_path, monkeypatch):
    # kprune never imports keras_hub itself: imported later, the hook registers the rules.
    (tmp_path / "late_package.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    finder = hub_rules._AfterImport("late_package", lambda: calls.append(
        sys.modules["late_package"].VALUE))
    sys.meta_path.insert(0, finder)
    try:
        import importlib.util
        assert importlib.util.find_spec("late_package") is not None and not calls
        import late_package  # noqa: F401
        assert calls == [1] and finder not in sys.meta_path
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        sys.modules.pop("late_package", None)


def test_a_failing_registration_never_breaks_the_import(tmp_path, monkeypatch):
    (tmp_path / "late_package_2.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def fail():
        raise AttributeError("no such layer")

    finder = hub_rules._AfterImport("late_package_2", fail)
    sys.meta_path.insert(0, finder)
    try:
        with pytest.warns(kprune.KprunWarning, match="no such layer"):
            import late_package_2
        assert late_package_2.VALUE == 2
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        sys.modules.pop("late_package_2", None)
