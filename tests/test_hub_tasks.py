"""KerasHub in, KerasHub out: `kprune.prune` on KerasHub backbones and image classifiers.

A pruned backbone is a `kprune.surgeon.hub.PrunedBackbone` (a KerasHub
Backbone whose config is its functional graph); a pruned task is an instance
of the original task class built on it. Both must compute exactly what the
zero-weight reference computes, keep their output structure, leave the
caller's model alone and survive `.keras` (safe_mode=True) and presets.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is the optional `kprune[hub]` extra (CI installs it)")

import keras  # noqa: E402

import kprune  # noqa: E402
from kprune.graph import DependencyGraph  # noqa: E402
from kprune.pruning import prune_plan  # noqa: E402
from kprune.surgeon import apply_plan, copy_model, drop_masks, hub, zero_plan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = 0.3


def tiny_backbone(**kwargs):
    # ResNetBackbone needs 64 filters in its first stack, fed by 64 input filters.
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3), **kwargs)


def tiny_preprocessor():
    converter = keras_hub.layers.ResNetImageConverter(image_size=(32, 32), scale=1 / 255.0)
    return keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter)


def tiny_task(num_classes=3):
    return keras_hub.models.ResNetImageClassifier(
        backbone=tiny_backbone(), num_classes=num_classes, preprocessor=tiny_preprocessor(),
        activation="softmax")


def images(n=4, size=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype("float32")


def raw_images(n=4, size=40, seed=0):
    """uint8-valued images of another size: the preprocessor resizes and rescales them."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("uint8")


def numpy(x):
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), x)


def snapshot(model):
    return [np.array(w) for w in model.get_weights()], model.count_params()


def assert_same_snapshot(model, before):
    weights, count = before
    assert model.count_params() == count
    now = model.get_weights()
    assert len(now) == len(weights)
    for a, b in zip(now, weights):
        np.testing.assert_array_equal(a, b)


def conv_widths(model):
    from kprune.graph.walk import walk

    return {c.layer.name: c.layer.filters for c in walk(model).calls
            if isinstance(c.layer, keras.layers.Conv2D)}


# --------------------------------------------------------------------------
# Fixtures: one tiny backbone and one tiny task, pruned once
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone_case():
    keras.utils.set_random_seed(1)
    original = tiny_backbone()
    before = snapshot(original)
    nodes = len(original._inbound_nodes)
    small = kprune.prune(original, ratio=RATIO)
    return original, small, before, nodes


@pytest.fixture(scope="module")
def task_case():
    keras.utils.set_random_seed(2)
    original = tiny_task()
    before = snapshot(original)
    small = kprune.prune(original, ratio=RATIO)
    return original, small, before


# --------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------
def test_pruned_backbone_keeps_its_kind(backbone_case):
    original, small, _, _ = backbone_case
    assert isinstance(small, keras_hub.models.Backbone)
    assert type(small) is hub.PrunedBackbone
    assert small.original_class == "keras_hub>ResNetBackbone"
    assert small.name == original.name
    assert small.dtype_policy.name == original.dtype_policy.name
    assert small.data_format == original.data_format
    assert tuple(small.image_shape) == tuple(original.image_shape)
    assert keras.saving.get_registered_name(type(small)) == "kprune>PrunedBackbone"


def test_pruned_backbone_has_fewer_channels_and_the_same_outputs(backbone_case):
    original, small, _, _ = backbone_case
    assert small.count_params() < original.count_params()
    before, after = conv_widths(original), conv_widths(small)
    assert set(before) == set(after)
    assert any(after[n] < before[n] for n in before)
    # The model output is not pruned: same structure and shape.
    assert tuple(small.output.shape) == tuple(original.output.shape)
    assert isinstance(small.output, keras.KerasTensor)


def test_pruned_backbone_keeps_pyramid_outputs(backbone_case):
    original, small, _, _ = backbone_case
    assert sorted(small.pyramid_outputs) == sorted(original.pyramid_outputs)
    for level, t in small.pyramid_outputs.items():
        name = original.pyramid_outputs[level]._keras_history.operation.name
        assert t._keras_history.operation.name == name
        assert hub.tensor_at(small, hub.tensor_ref(small, t)) is t
    # A pruned pyramid level (P2 feeds the next stack) really is narrower.
    assert small.pyramid_outputs["P2"].shape[-1] < original.pyramid_outputs["P2"].shape[-1]


def test_pruned_backbone_matches_the_zero_plan(backbone_case):
    original, small, _, _ = backbone_case
    plan = prune_plan(original, ratio=RATIO)
    reference = zero_plan(original, plan)
    x = images()
    np.testing.assert_allclose(numpy(small(x)), numpy(reference(x)), rtol=1e-5, atol=1e-5)
    # Every pyramid level equals the reference's on the channels kept.
    graph = DependencyGraph(original)
    drop = drop_masks(graph, plan)
    ref_map = hub._TensorMap(original, reference)
    for level, t in original.pyramid_outputs.items():
        keep = graph.keep_mask(t, drop)
        ref = keras.Model(reference.input, ref_map.tensor(t))(x)
        got = keras.Model(small.input, small.pyramid_outputs[level])(x)
        ref = numpy(ref) if keep is None else numpy(ref)[..., keep]
        np.testing.assert_allclose(numpy(got), ref, rtol=1e-5, atol=1e-5)


def test_callers_backbone_is_untouched(backbone_case):
    original, _, before, nodes = backbone_case
    assert_same_snapshot(original, before)
    assert len(original._inbound_nodes) == nodes
    assert type(original) is keras_hub.models.ResNetBackbone


def test_pruned_backbone_keras_round_trip(backbone_case, tmp_path):
    _, small, _, _ = backbone_case
    path = str(tmp_path / "backbone.keras")
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is hub.PrunedBackbone
    assert loaded.original_class == small.original_class
    assert loaded.dtype_policy.name == small.dtype_policy.name
    x = images()
    np.testing.assert_allclose(numpy(loaded(x)), numpy(small(x)), rtol=1e-6, atol=1e-6)
    assert sorted(loaded.pyramid_outputs) == sorted(small.pyramid_outputs)
    got = keras.Model(loaded.input, loaded.pyramid_outputs)(x)
    want = keras.Model(small.input, small.pyramid_outputs)(x)
    for level in want:
        np.testing.assert_allclose(numpy(got[level]), numpy(want[level]), rtol=1e-6, atol=1e-6)


def test_pruned_backbone_goes_back_into_its_task_class(backbone_case):
    _, small, _, _ = backbone_case
    task = keras_hub.models.ResNetImageClassifier(backbone=small, num_classes=3)
    assert task.predict(images(), verbose=0).shape == (4, 3)
    task = keras_hub.models.ResNetImageClassifier(backbone=small, num_classes=3,
                                                  preprocessor=tiny_preprocessor())
    assert task.predict(raw_images(), verbose=0).shape == (4, 3)


def test_pruned_backbone_preset(backbone_case, tmp_path):
    _, small, _, _ = backbone_case
    small.save_to_preset(str(tmp_path))
    x = images()
    for loaded in (keras_hub.models.Backbone.from_preset(str(tmp_path)),
                   hub.from_preset(str(tmp_path))):
        assert type(loaded) is hub.PrunedBackbone
        np.testing.assert_allclose(numpy(loaded(x)), numpy(small(x)), rtol=1e-6, atol=1e-6)


def test_backbone_dtype_policy_is_kept():
    original = tiny_backbone(dtype="mixed_bfloat16")
    small = kprune.prune(original, ratio=RATIO)
    assert type(small) is hub.PrunedBackbone
    assert small.dtype_policy.name == "mixed_bfloat16"
    assert small.get_layer("conv1_conv").dtype_policy.name == "mixed_bfloat16"
    config = small.get_config()
    again = hub.PrunedBackbone.from_config(config)
    assert again.dtype_policy.name == "mixed_bfloat16"


class DictBackbone(keras_hub.models.Backbone):
    """A backbone returning a dict: its structure must survive pruning."""

    def __init__(self, **kwargs):
        inputs = keras.Input((16, 16, 3), name="pixels")
        a = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
        a = keras.layers.ReLU(name="r1")(a)
        b = keras.layers.Conv2D(6, 3, padding="same", name="c2")(a)
        super().__init__(inputs=inputs, outputs={"deep": b, "pooled": keras.layers.
                                                 GlobalAveragePooling2D(name="gap")(b)},
                         **kwargs)


def test_dict_output_backbone_keeps_its_structure(tmp_path):
    original = DictBackbone()
    small = kprune.prune(original, ratio=0.5)
    assert type(small) is hub.PrunedBackbone
    assert small.original_class == keras.saving.get_registered_name(DictBackbone)
    assert sorted(small.output) == ["deep", "pooled"]
    assert small.get_layer("c1").filters == 4
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    reference = zero_plan(original, prune_plan(original, ratio=0.5))
    got, want = numpy(small(x)), numpy(reference(x))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "dict.keras")
    small.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for k, v in numpy(loaded(x)).items():
        np.testing.assert_allclose(v, got[k], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------
def test_pruned_task_keeps_its_class_and_config(task_case):
    original, small, _ = task_case
    assert type(small) is keras_hub.models.ResNetImageClassifier
    assert type(small.backbone) is hub.PrunedBackbone
    assert small.backbone.original_class == "keras_hub>ResNetBackbone"
    assert small.preprocessor is original.preprocessor
    for key in ("num_classes", "pooling", "activation", "dropout"):
        assert getattr(small, key) == getattr(original, key)
    assert small.name == original.name
    assert small.dtype_policy.name == original.dtype_policy.name
    assert tuple(small.output.shape) == tuple(original.output.shape)
    assert sorted(small.backbone.pyramid_outputs) == sorted(original.backbone.pyramid_outputs)


def test_pruned_task_has_fewer_channels(task_case):
    original, small, _ = task_case
    assert small.count_params() < original.count_params()
    # Inside a task the backbone's output is no model output: it is pruned
    # with the last stage, and the head's input follows.
    width = small.backbone.output.shape[-1]
    assert width < original.backbone.output.shape[-1]
    assert small.get_layer("predictions").kernel.shape == (width, 3)


def test_pruned_task_equals_the_rebuilt_model_and_the_zero_plan(task_case):
    original, small, _ = task_case
    plan = prune_plan(original, ratio=RATIO)
    flat = apply_plan(original, plan)
    assert not isinstance(flat, keras_hub.models.Task)
    x = images()
    got = numpy(small(x, training=False))
    np.testing.assert_allclose(got, numpy(flat(x, training=False)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, numpy(zero_plan(original, plan)(x)), rtol=1e-5, atol=1e-6)


def test_callers_task_is_untouched(task_case):
    original, _, before = task_case
    assert_same_snapshot(original, before)
    assert type(original.backbone) is keras_hub.models.ResNetBackbone
    assert original.backbone.output.shape[-1] == 16


def test_pruned_task_predicts_raw_images_through_its_preprocessor(task_case):
    _, small, _ = task_case
    raw = raw_images()
    probs = small.predict(raw, verbose=0)
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # predict() preprocesses inside tf.data (graph resize): float noise, not a change.
    direct = numpy(small(small.preprocessor(raw), training=False))
    np.testing.assert_allclose(probs, direct, rtol=1e-4, atol=1e-4)


def test_pruned_task_fits_one_step():
    small = kprune.prune(tiny_task(), ratio=RATIO)
    kernel = np.array(small.get_layer("predictions").kernel)
    small.compile(optimizer=keras.optimizers.SGD(0.1))  # the task's default loss
    history = small.fit(raw_images(), np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(np.array(small.get_layer("predictions").kernel), kernel)


def test_pruned_task_keras_round_trip(task_case, tmp_path):
    _, small, _ = task_case
    path = str(tmp_path / "task.keras")
    small.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # KerasHub tasks' custom compile()
        loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is keras_hub.models.ResNetImageClassifier
    assert type(loaded.backbone) is hub.PrunedBackbone
    raw = raw_images()
    np.testing.assert_allclose(loaded.predict(raw, verbose=0), small.predict(raw, verbose=0),
                               rtol=1e-6, atol=1e-7)


def test_pruned_task_preset(task_case, tmp_path):
    _, small, _ = task_case
    small.save_to_preset(str(tmp_path))
    loaded = hub.from_preset(str(tmp_path))
    assert type(loaded) is keras_hub.models.ResNetImageClassifier
    assert type(loaded.backbone) is hub.PrunedBackbone
    raw = raw_images()
    np.testing.assert_allclose(loaded.predict(raw, verbose=0), small.predict(raw, verbose=0),
                               rtol=1e-6, atol=1e-7)
    assert type(keras_hub.models.Backbone.from_preset(str(tmp_path))) is hub.PrunedBackbone


def test_flops_target_on_a_task():
    original = tiny_task()
    small = kprune.prune(original, flops_target=0.5)
    assert type(small) is keras_hub.models.ResNetImageClassifier
    assert kprune.profile(small).macs <= 0.5 * kprune.profile(original).macs


def test_fresh_process_loads_after_importing_kprune(backbone_case, task_case, tmp_path):
    _, backbone, _, _ = backbone_case
    _, task, _ = task_case
    x = images()
    backbone.save(str(tmp_path / "backbone.keras"))
    task.save(str(tmp_path / "task.keras"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "backbone.npy", numpy(backbone(x)))
    np.save(tmp_path / "task.npy", numpy(task(x, training=False)))
    script = textwrap.dedent(f"""
        import sys, warnings
        import numpy as np
        import kprune, keras
        assert "keras_hub" not in sys.modules, "import kprune must not import keras_hub"
        warnings.simplefilter("ignore")
        d = {str(tmp_path)!r}
        x = np.load(d + "/x.npy")
        b = keras.saving.load_model(d + "/backbone.keras", safe_mode=True)
        assert type(b).__name__ == "PrunedBackbone", type(b)
        assert isinstance(b, sys.modules["keras_hub"].models.Backbone)
        np.testing.assert_allclose(np.asarray(b(x)), np.load(d + "/backbone.npy"), atol=1e-6)
        assert sorted(b.pyramid_outputs) == ["P2", "P3"]
        t = keras.saving.load_model(d + "/task.keras", safe_mode=True)
        assert type(t).__name__ == "ResNetImageClassifier", type(t)
        assert type(t.backbone).__name__ == "PrunedBackbone"
        np.testing.assert_allclose(np.asarray(t(x, training=False)), np.load(d + "/task.npy"),
                                   atol=1e-6)
        print("fresh-ok")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0 and "fresh-ok" in out.stdout, out.stderr[-3000:]


def test_kprune_works_without_keras_hub(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["keras_hub"] = None  # `import keras_hub` now raises ImportError
        import numpy as np
        import keras, kprune
        from kprune.surgeon import hub
        inputs = keras.Input((8, 8, 3))
        y = keras.layers.Conv2D(8, 3, name="c1")(inputs)
        y = keras.layers.Conv2D(4, 3, name="c2")(y)
        model = keras.Model(inputs, y)
        small = kprune.prune(model, ratio=0.5)
        assert type(small) is keras.Model or type(small).__name__ == "Functional", type(small)
        assert small.get_layer("c1").filters == 4
        assert hub.repackage(model, small) is small
        assert not hub.is_hub_model(model)
        try:
            hub.pruned_backbone_class()
        except kprune.KprunError as e:
            assert "kprune[hub]" in str(e)
        else:
            raise AssertionError("expected KprunError")
        print("nohub-ok")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0 and "nohub-ok" in out.stdout, out.stderr[-3000:]


# --------------------------------------------------------------------------
# What kprune does not repackage: a warning and the plain model
# --------------------------------------------------------------------------
class TinyRegressor(keras_hub.models.Task):
    """A Task kind kprune does not know (not an ImageClassifier)."""

    def __init__(self, backbone, **kwargs):
        self.backbone = backbone
        self.preprocessor = None
        x = backbone(backbone.input)
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        super().__init__(inputs=backbone.input, outputs=keras.layers.Dense(1, name="out")(x),
                         **kwargs)


def test_unknown_task_kind_warns_and_returns_the_plain_model():
    original = TinyRegressor(tiny_backbone())
    with pytest.warns(UserWarning, match="TinyRegressor.*ImageClassifier tasks only"):
        small = kprune.prune(original, ratio=RATIO)
    assert not isinstance(small, keras_hub.models.Task)
    assert isinstance(small, keras.Model)
    x = images()
    reference = zero_plan(original, prune_plan(original, ratio=RATIO))
    np.testing.assert_allclose(numpy(small(x)), numpy(reference(x)), rtol=1e-5, atol=1e-6)


def test_repackage_refuses_a_rebuild_that_does_not_fit():
    original = tiny_task(num_classes=3)
    other = copy_model(tiny_task(num_classes=4))
    with pytest.warns(UserWarning, match="ResNetImageClassifier"):
        out = hub.repackage(original, other)
    assert out is other


def test_repackage_leaves_plain_models_alone():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    rebuilt = copy_model(model)
    assert hub.repackage(model, rebuilt) is rebuilt
    assert not hub.is_hub_model(model)
    assert hub.is_hub_model(tiny_backbone())
