"""Export: every artifact runs and agrees with the Keras model; pruned models load without kprune."""

import importlib
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers as L

import kprune
from kprune import KprunError
from kprune.tools.export import export, run_saved_model, run_tflite

export_module = importlib.import_module("kprune.export")  # `kprune.export` is the function


def _net():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(12, 3, strides=2, padding="same", activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(4)(x), name="net")


def _randomized(model):
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    return model


def _data(n=40):
    return np.random.default_rng(0).uniform(0, 1, size=(n, 8, 8, 3)).astype("float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = _randomized(_net())
    out = tmp_path_factory.mktemp("export")
    report = export(model, str(out), representative_data=_data())
    return model, out, report


def test_writes_every_format(exported):
    _, out, report = exported
    assert sorted(report) == ["keras", "saved_model", "tflite", "tflite_int8"]
    assert report["keras"]["path"] == str(out / "model.keras")
    assert report["saved_model"]["path"] == str(out / "saved_model")
    assert report["tflite"]["path"] == str(out / "model.tflite")
    assert report["tflite_int8"]["path"] == str(out / "model_int8.tflite")
    for entry in report.values():
        assert os.path.exists(entry["path"])
        assert entry["size"] > 0
        assert entry["max_abs_diff"] is not None
    assert os.path.exists(out / "saved_model" / "saved_model.pb")
    assert report["tflite_int8"]["size"] < report["tflite"]["size"]


def test_float_artifacts_equal_keras(exported):
    model, out, report = exported
    x = _data(6)
    ref = np.asarray(model(x, training=False))
    loaded = keras.saving.load_model(out / "model.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run_saved_model(out / "saved_model", x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_tflite(out / "model.tflite", x), ref, rtol=1e-4, atol=1e-5)
    assert report["keras"]["max_abs_diff"] == 0.0
    assert report["tflite"]["max_abs_diff"] < 1e-4


def test_int8_artifact_is_integer_and_close(exported):
    model, out, report = exported
    interpreter = export_module.tflite_interpreter(out / "model_int8.tflite")
    kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.int8 in kinds
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    x = _data(6)
    ref = np.asarray(model(x, training=False))
    span = max(ref.max(), 0) - min(ref.min(), 0)  # TFLite ranges include 0
    np.testing.assert_allclose(run_tflite(out / "model_int8.tflite", x), ref, rtol=0,
                               atol=export_module.INT8_TOLERANCE * span)
    assert 0.0 < report["tflite_int8"]["max_abs_diff"] <= export_module.INT8_TOLERANCE * span


def test_selected_formats_only(tmp_path):
    report = export(_net(), str(tmp_path), formats="keras")
    assert list(report) == ["keras"]
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]


def test_accepts_a_dataset_as_representative_data(tmp_path):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((_data(), np.zeros(40))).batch(16)
    report = export(_net(), str(tmp_path), formats=["tflite"], representative_data=ds)
    assert sorted(report) == ["tflite", "tflite_int8"]


def test_converter_output_is_silenced(tmp_path, capfd):
    export(_net(), str(tmp_path), formats=["saved_model", "tflite"])
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_progress_bar_over_writes_and_checks_only_when_verbose(tmp_path, capsys):
    quiet = export(_net(), str(tmp_path / "a"), formats=["keras", "tflite"])
    assert capsys.readouterr().out == ""
    loud = export(_net(), str(tmp_path / "b"), formats=["keras", "tflite"], verbose=1)
    out = capsys.readouterr().out
    assert "4/4" in out and "checked: 2" in out  # two writes, two checks
    assert sorted(loud) == sorted(quiet) == ["keras", "tflite"]
    assert all(entry["max_abs_diff"] is not None for entry in loud.values())


def test_check_raises_on_mismatch(tmp_path, monkeypatch):
    def broken(path, x):
        return run_tflite(path, x) + 0.5

    monkeypatch.setattr(export_module, "run_tflite", broken)
    with pytest.raises(KprunError, match="net.*tflite artifact.*differ"):
        export(_net(), str(tmp_path), formats=["tflite"])


def test_tolerances_are_arguments(exported, tmp_path):
    model, out, report = exported
    with pytest.raises(KprunError, match="tflite_int8 artifact.*differ"):
        export_module.check_artifacts(model, {"tflite_int8": out / "model_int8.tflite"},
                                      _data(), int8_tolerance=0.0)
    loose = export(model, str(tmp_path), formats=["tflite"], rtol=1e-2, atol=1e-2)
    assert loose["tflite"]["max_abs_diff"] < 1e-4


def test_check_artifacts_catches_an_artifact_of_another_model(exported):
    model, out, _ = exported
    keras.utils.set_random_seed(7)
    other = _randomized(_net())  # same architecture, other random weights
    with pytest.raises(KprunError, match="net.*keras artifact.*differ"):
        export_module.check_artifacts(other, {"keras": out / "model.keras"})
    assert export_module.check_artifacts(model, {"keras": out / "model.keras"}) == {"keras": 0.0}
    with pytest.raises(KprunError, match="unknown artifact kind"):
        export_module.check_artifacts(model, {"onnx": out / "model.onnx"})


def test_check_false_skips_comparison(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "run_tflite", lambda path, x: 1 / 0)
    report = export(_net(), str(tmp_path), formats=["tflite"], check=False)
    assert report["tflite"]["max_abs_diff"] is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(formats=["onnx"]), "unknown export format"),
    (dict(formats=["tflite"], representative_data=np.zeros((4, 5, 5, 3))), r"shape \(5, 5, 3\)"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(KprunError, match=message):
        export(_net(), str(tmp_path), **kwargs)


def test_unknown_input_size_is_refused_for_checks(tmp_path):
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, L.Conv2D(2, 1)(inp), name="fcn")
    with pytest.raises(KprunError, match="fcn.*unknown sizes"):
        export(model, str(tmp_path), formats=["keras"])


def test_pruned_model_loads_without_kprune(tmp_path):
    model = _randomized(_net())
    small = kprune.prune(model, ratio=0.5)
    assert small.count_params() < model.count_params()
    report = export(small, str(tmp_path), formats=["keras"])
    x = _data(5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", np.asarray(small(x, training=False)))
    script = (
        "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
        "import keras, numpy as np\n"
        f"m = keras.saving.load_model({report['keras']['path']!r}, safe_mode=True)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.testing.assert_allclose(np.asarray(m(x)), np.load({str(tmp_path / 'ref.npy')!r}),"
        " rtol=1e-6, atol=1e-6)\n"
        "assert not any(n == 'kprune' or n.startswith('kprune.') for n in sys.modules), 'kprune'\n"
        "print('loaded', m.count_params())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"loaded {small.count_params()}" in result.stdout
