"""The `kprune` command line: every subcommand, help texts and one-line errors."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers as L

import archs
import kprune
from kprune import datasets
from kprune.tools.cli import build_parser, main

COMMANDS = ("profile", "prune", "export", "demo")


def _saved(model, tmp_path, name="model.keras"):
    path = str(tmp_path / name)
    model.save(path)
    return path


def _error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kprune: error: ")
    return lines[0]


def test_help_for_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    for command in COMMANDS:
        assert command in top
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: kprune {command}")
        actions = build_parser()._subparsers._group_actions[0].choices[command]._actions
        assert all(action.help for action in actions), command


def test_profile_an_application_by_name(capsys):
    assert main(["profile", "MobileNetV2", "--input-shape", "32,32,3"]) == 0
    out = capsys.readouterr().out
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    expected = kprune.profile(model)
    total = [line for line in out.splitlines() if line.startswith("total")]
    assert total == [line for line in str(expected).splitlines() if line.startswith("total")]
    assert f"{model.count_params():,}" in total[0]


def test_profile_a_keras_file_as_json(tmp_path, capsys):
    model = archs.vgg()
    assert main(["profile", _saved(model, tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = kprune.profile(model)
    assert (result["macs"], result["params"]) == (expected.macs, expected.params)
    assert [row["macs"] for row in result["layers"]] == [row.macs for row in expected.layers]


def test_profile_a_file_with_unknown_sizes_needs_input_shape(tmp_path, capsys):
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, L.Conv2D(4, 3, padding="same")(inp), name="fcn")
    path = _saved(model, tmp_path)
    assert main(["profile", path]) == 2
    assert "input_shape" in _error_line(capsys)
    assert main(["profile", path, "--input-shape", "8,8,3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == 9 * 3 * 4 * 64


@pytest.mark.parametrize("flag", ["--flops-target", "--params-target"])
def test_prune_to_a_macs_or_params_target(tmp_path, capsys, flag):
    model = archs.vgg()
    out = str(tmp_path / "small.keras")
    assert main(["prune", _saved(model, tmp_path), "-o", out, flag, "0.4"]) == 0
    assert out in capsys.readouterr().out
    small = keras.saving.load_model(out)
    share = (small.count_params() / model.count_params() if flag == "--params-target"
             else kprune.profile(small).macs / kprune.profile(model).macs)
    assert 0.3 <= share <= 0.4
    assert small.count_params() < model.count_params()


@pytest.fixture
def seen(monkeypatch):
    """The keyword arguments the CLI hands to `kprune.prune` (which returns the model as is)."""
    kwargs_seen = {}

    def fake_prune(model, **kwargs):
        kwargs_seen.update(kwargs)
        return model

    monkeypatch.setattr(kprune, "prune", fake_prune)
    return kwargs_seen


def test_prune_options_reach_kprune_prune(tmp_path, seen):
    path = _saved(archs.vgg(), tmp_path)
    argv = ["prune", path, "-o", str(tmp_path / "o.keras"), "--ratio", "0.25", "--criterion",
            "fpgm", "--scope", "global", "--round-to", "8", "--exclude", "conv1",
            "--exclude", "Dense"]
    assert main(argv) == 0
    assert seen == dict(ratio=0.25, flops_target=None, params_target=None, latency_target=None,
                        runtime="keras", batch_size=None, threads=None, criterion="fpgm",
                        scope="global", round_to=8, exclude=("conv1", "Dense"), verbose=0)


def test_latency_target_options_reach_kprune_prune(tmp_path, seen):
    path = _saved(archs.vgg(), tmp_path)
    argv = ["prune", path, "-o", str(tmp_path / "o.keras"), "--latency-target", "0.6",
            "--runtime", "tflite", "--batch-size", "4", "--threads", "2"]
    assert main(argv) == 0
    assert (seen["latency_target"], seen["runtime"], seen["batch_size"], seen["threads"],
            seen["verbose"]) == (0.6, "tflite", 4, 2, 1)
    assert seen["flops_target"] is seen["params_target"] is seen["ratio"] is None


def test_bad_runtime_is_refused(tmp_path, capsys):
    path = _saved(archs.vgg(), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", path, "-o", str(tmp_path / "o.keras"), "--latency-target", "0.5",
              "--runtime", "onnx"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_prune_needs_exactly_one_target(tmp_path, capsys):
    path = _saved(archs.vgg(), tmp_path)
    for extra in ([], ["--ratio", "0.3", "--flops-target", "0.5"],
                  ["--params-target", "0.3", "--latency-target", "0.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["prune", path, "-o", str(tmp_path / "o.keras")] + extra)
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_export_writes_and_checks_every_artifact(tmp_path, capsys):
    model = archs.vgg()
    x = np.random.default_rng(0).uniform(size=(16,) + tuple(model.inputs[0].shape[1:]))
    np.save(tmp_path / "x.npy", x.astype("float32"))
    argv = ["export", _saved(model, tmp_path), "--keras", str(tmp_path / "e" / "m.keras"),
            "--saved-model", str(tmp_path / "e" / "sm"), "--tflite", str(tmp_path / "e" / "m.tflite"),
            "--tflite-int8", str(tmp_path / "e" / "q.tflite"), "--data", str(tmp_path / "x.npy")]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["keras", "saved_model", "tflite", "tflite_int8"]
    assert all("max |diff| vs Keras" in line for line in lines)
    for name in ("m.keras", "sm/saved_model.pb", "m.tflite", "q.tflite"):
        assert os.path.getsize(tmp_path / "e" / name) > 0
    loaded = keras.saving.load_model(tmp_path / "e" / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["profile", "NoSuchNet"], "neither a model file nor a keras.applications"),
    (["profile", "missing.keras"], "'missing.keras' is neither a model file"),
    (["profile", "MobileNetV2", "--input-shape", "32,x"], "--input-shape must be"),
    (["export", "MobileNetV2"], "nothing to write"),
    (["export", "MobileNetV2", "--tflite-int8", "q.tflite"], "needs --data"),
])
def test_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in _error_line(capsys)


def test_errors_from_kprune_are_one_line(tmp_path, capsys):
    path = _saved(archs.vgg(), tmp_path)
    assert main(["prune", path, "-o", str(tmp_path / "o.keras"), "--ratio", "1.5"]) == 2
    assert "ratio" in _error_line(capsys)
    assert main(["prune", path, "-o", str(tmp_path / "o.h5"), "--ratio", "0.5"]) == 2
    assert ".keras" in _error_line(capsys)


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", "kprune", "profile", "missing.keras"],
                            capture_output=True, text=True, cwd=str(tmp_path), env=env,
                            timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kprune: error: 'missing.keras'")


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("test accuracy", "MACs", "parameters", "latency", ".tflite int8 file"):
        assert row in text
    original = keras.saving.load_model(out / "original" / "model.keras")
    pruned = keras.saving.load_model(out / "pruned" / "model.keras")
    assert kprune.profile(pruned).macs <= 0.5 * kprune.profile(original).macs
    for name in ("model.keras", "saved_model", "model.tflite", "model_int8.tflite"):
        assert os.path.exists(out / "pruned" / name)
    _, (x_test, y_test) = datasets.digits(pruned.inputs[0].shape[1], channels=1, seed=0)
    accuracy = np.mean(np.argmax(np.asarray(pruned(x_test)), axis=-1) == y_test)
    assert accuracy > 0.8
