"""Write a model as `.keras`, SavedModel and TFLite files, and check each one.

Every artifact is run once on sample inputs after it is written and its
outputs are compared with the Keras model's, so a broken conversion is caught
where it happens rather than on a device.

Example:

>>> report = kprune.export(small, "out/", representative_data=x_train[:200])
>>> report["tflite_int8"]["max_abs_diff"]
0.0123
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import keras
import numpy as np

from kprune.errors import KprunError
# The TFLite helpers live in kprune.latency (a lower layer, which times TFLite models too).
from kprune.latency import _quiet, _samples, tflite_bytes, tflite_interpreter  # noqa: F401

FORMATS = ("keras", "saved_model", "tflite")

# Float artifacts run the same float32 graph; only op fusion and summation
# order differ, so they agree to a few float32 ulps of the output's scale.
FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-5

# Full-integer models round every activation to one of 256 levels of its
# calibrated range (TFLite ranges always include 0), so each layer adds an
# error of up to half a step (range / 510) and a deep net accumulates several
# steps; a softmax output alone is fixed to steps of 1/256. An error above this
# share of the outputs' range (taken, like TFLite's, to include 0) means a
# broken conversion, not rounding: 0.1 allows about 25 output steps.
INT8_TOLERANCE = 0.1


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _size(path: str) -> int:
    """Bytes of a file, or of every file under a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def _zero_span(values: np.ndarray) -> float:
    """Width of the smallest interval holding `values` and 0 (a TFLite quantisation range)."""
    if not values.size:
        return 0.0
    return float(max(values.max(), 0.0) - min(values.min(), 0.0))


def _compare(name: str, fmt: str, out: np.ndarray, ref: np.ndarray, rtol: float,
             atol: float, int8_tolerance: float) -> float:
    """Max abs difference of `out` from `ref`; KprunError if past the format's tolerance."""
    out = np.asarray(out, dtype="float64").reshape(ref.shape)
    diff = float(np.max(np.abs(out - ref))) if ref.size else 0.0
    if fmt == "tflite_int8":
        span = _zero_span(ref)
        ok = diff <= int8_tolerance * max(span, 1e-6)
        allowed = f"{int8_tolerance:g} x output range {span:.4g}"
    else:
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        ok = bool(np.allclose(out, ref, rtol=rtol, atol=atol * max(scale, 1.0)))
        allowed = f"rtol={rtol:g}, atol={atol:g} x max(|output|, 1)"
    if not ok:
        raise KprunError(f"Model '{name}': the {fmt} artifact's outputs differ from the Keras "
                         f"model's by up to {diff:.4g} (allowed: {allowed}).")
    return diff


def _numpy(value) -> np.ndarray:
    """Model outputs of any backend as one float64 array."""
    return np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")


# Keras writes SavedModel (and so TFLite) from these backends: TensorFlow
# natively, JAX through jax2tf.
GRAPH_BACKENDS = ("tensorflow", "jax")


def _check_backend(model: keras.Model, fmt: str) -> None:
    """KprunError when the running Keras backend cannot write `fmt`."""
    backend = keras.backend.backend()
    if backend not in GRAPH_BACKENDS:
        raise KprunError(f"Model '{model.name}': exporting {fmt} is not supported on the Keras "
                         f"'{backend}' backend (Keras writes SavedModel and TFLite from the "
                         f"tensorflow or jax backend). Save it as .keras here "
                         f"(kprune.export(model, path, formats=['keras'])), then export the "
                         f"file under KERAS_BACKEND=tensorflow or jax.")


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------
def save_keras(model: keras.Model, path: str) -> str:
    """Save `model` as a `.keras` file loadable by plain `keras.saving.load_model`.

    Args:
        model: The model to save.
        path: Target file; must end in `.keras`.

    Returns:
        `path`.

    Example:

    >>> save_keras(small, "out/model.keras")
    'out/model.keras'
    """
    if not str(path).endswith(".keras"):
        raise KprunError(f"Model '{model.name}': a Keras file must end in '.keras', got '{path}'.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save(path)
    return str(path)


def save_saved_model(model: keras.Model, path: str) -> str:
    """Export `model` as a TensorFlow SavedModel directory (`serve` endpoint).

    Args:
        model: The model to export.
        path: Target directory.

    Returns:
        `path`.

    Example:

    >>> save_saved_model(small, "out/saved_model")
    'out/saved_model'
    """
    _check_backend(model, "a SavedModel")
    with _quiet():
        model.export(str(path), format="tf_saved_model", verbose=False)
    return str(path)


def save_tflite(model: keras.Model, path: str, representative_data=None) -> str:
    """Write `tflite_bytes(model, representative_data)` to `path`.

    Returns:
        `path`.

    Example:

    >>> save_tflite(small, "out/model_int8.tflite", representative_data=x_train[:100])
    'out/model_int8.tflite'
    """
    _check_backend(model, "TFLite")
    content = tflite_bytes(model, representative_data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


# --------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------
def run_tflite(path: str, x: np.ndarray) -> np.ndarray:
    """Run the single-input TFLite model at `path` on every sample of `x`.

    Args:
        path: A `.tflite` file.
        x: A batch of inputs; the model runs one sample at a time.

    Returns:
        The outputs stacked on a batch axis, as float32 (dequantised if the
        model's output is integer).

    Example:

    >>> y = run_tflite("out/model.tflite", x_test[:8])
    """
    interpreter = tflite_interpreter(path)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], (1,) + tuple(x.shape[1:]))
    with _quiet():
        interpreter.allocate_tensors()
    results = []
    for sample in x:
        value = sample[None].astype("float32")
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            value = np.round(value / scale + zero).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], value)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype("float32") - zero) * scale
        results.append(y[0])
    return np.stack(results).astype("float32")


def run_saved_model(path: str, x: np.ndarray) -> np.ndarray:
    """Call the `serve` endpoint of the SavedModel at `path` on `x`."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return np.asarray(loaded.serve(tf.constant(x, dtype=tf.float32)))


def _run_keras_file(path: str, x: np.ndarray) -> np.ndarray:
    loaded = keras.saving.load_model(path, safe_mode=True)
    return _numpy(loaded(x, training=False))


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------
# Lambdas look the runners up when called, so a replaced module attribute is used.
_RUNNERS = {"keras": lambda p, x: _run_keras_file(p, x),
            "saved_model": lambda p, x: run_saved_model(p, x),
            "tflite": lambda p, x: run_tflite(p, x),
            "tflite_int8": lambda p, x: run_tflite(p, x)}
ARTIFACTS = tuple(_RUNNERS)


def check_artifacts(model: keras.Model, artifacts: Mapping[str, str], data=None,
                    rtol: float = FLOAT_RTOL, atol: float = FLOAT_ATOL,
                    int8_tolerance: float = INT8_TOLERANCE) -> dict:
    """Run written artifacts on sample inputs and compare them with `model`.

    Float artifacts must satisfy `allclose(out, ref, rtol, atol * max(|ref|, 1))`;
    the int8 TFLite artifact must stay within `int8_tolerance` times the
    range of the reference outputs and 0 (`max(ref, 0) - min(ref, 0)`).

    Args:
        model: The Keras model the artifacts were written from (one input,
            one output, fixed input shape).
        artifacts: `{kind: path}` with kinds from `"keras"`, `"saved_model"`,
            `"tflite"`, `"tflite_int8"`.
        data: Input samples (array, `tf.data.Dataset` or iterable of batches);
            the first 8 are used. Random inputs in [0, 1) when `None`.
        rtol: Relative tolerance of float artifacts.
        atol: Absolute tolerance of float artifacts, per unit of the largest
            absolute reference output (at least 1).
        int8_tolerance: Allowed error of the int8 artifact, as a share of the
            range of the reference outputs and 0.

    Returns:
        `{kind: max abs difference}`.

    Raises:
        KprunError: for an unknown kind or an artifact beyond tolerance.

    Example:

    >>> check_artifacts(model, {"tflite": "out/model.tflite"})
    {'tflite': 2.3e-07}
    """
    return dict(_checked(model, artifacts, data, rtol, atol, int8_tolerance))


def _checked(model, artifacts: Mapping[str, str], data, rtol, atol, int8_tolerance):
    """Yield `(kind, max |diff|)` per artifact, as `check_artifacts` computes them."""
    unknown = [k for k in artifacts if k not in _RUNNERS]
    if unknown:
        raise KprunError(f"Model '{model.name}': unknown artifact kind(s) {unknown}; "
                         f"choose from {list(ARTIFACTS)}.")
    x = _samples(model, data, 8)
    ref = _numpy(model(x, training=False))
    for kind, path in artifacts.items():
        yield kind, _compare(model.name, kind, _RUNNERS[kind](path, x), ref, rtol, atol,
                             int8_tolerance)


def export(model: keras.Model, path: str, formats: Sequence[str] | str = FORMATS,
           representative_data: np.ndarray | Iterable | None = None,
           check: bool = True, rtol: float = FLOAT_RTOL, atol: float = FLOAT_ATOL,
           int8_tolerance: float = INT8_TOLERANCE, verbose: int = 0) -> dict:
    """Write `model` in several formats under `path` and check each artifact.

    Files written (each only when its format is asked for):
    `path/model.keras`; `path/saved_model/` (through `model.export`);
    `path/model.tflite` (float32); and `path/model_int8.tflite` (full-integer
    quantisation calibrated on `representative_data`, float input and output)
    when `"tflite"` is asked for and `representative_data` is given.

    Args:
        model: A Keras model (pruned models are plain Keras and need nothing
            from kprune to load).
        path: Output directory, created if missing.
        formats: Any of `"keras"`, `"saved_model"`, `"tflite"`.
        representative_data: Input samples (array, `tf.data.Dataset` or
            iterable of batches) for int8 calibration; the first 8 also
            serve as check inputs. Up to 100 samples are used.
        check: Run every artifact on sample inputs and compare with
            `model(x)` (see `check_artifacts`).
        rtol: Relative tolerance of the float artifacts.
        atol: Absolute tolerance of the float artifacts, per unit of the
            largest absolute output (at least 1).
        int8_tolerance: Allowed int8 error as a share of the outputs' range.
        verbose: 1 shows a progress bar over the writes and checks.

    Returns:
        A dict keyed by artifact (`"keras"`, `"saved_model"`, `"tflite"`,
        `"tflite_int8"`), each `{"path", "size", "max_abs_diff"}` (the
        difference is `None` when `check=False`).

    `"keras"` works on every Keras backend; `"saved_model"` and `"tflite"`
    need the tensorflow or jax backend (Keras's own export path, jax2tf on
    JAX) and raise a `KprunError` on torch.

    Raises:
        KprunError: for an unknown format, a format the running backend
            cannot write, or an artifact whose outputs differ from the Keras
            model's beyond tolerance.

    Example:

    >>> report = export(small, "out", formats=["keras", "tflite"], representative_data=x[:100])
    >>> sorted(report)
    ['keras', 'tflite', 'tflite_int8']
    """
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise KprunError(f"Model '{model.name}': unknown export format(s) {unknown or formats}; "
                         f"choose from {list(FORMATS)}.")
    for fmt, what in (("saved_model", "a SavedModel"), ("tflite", "TFLite")):
        if fmt in formats:
            _check_backend(model, what)  # refuse before writing anything
    if check:
        _samples(model, representative_data, 8)  # refuse bad shapes before writing anything
    os.makedirs(path, exist_ok=True)
    jobs = []
    if "keras" in formats:
        jobs.append(("keras", lambda: save_keras(model, os.path.join(path, "model.keras"))))
    if "saved_model" in formats:
        jobs.append(("saved_model",
                     lambda: save_saved_model(model, os.path.join(path, "saved_model"))))
    if "tflite" in formats:
        jobs.append(("tflite", lambda: save_tflite(model, os.path.join(path, "model.tflite"))))
        if representative_data is not None:
            jobs.append(("tflite_int8", lambda: save_tflite(
                model, os.path.join(path, "model_int8.tflite"), representative_data)))
    bar = keras.utils.Progbar(len(jobs) * (2 if check else 1), unit_name="step",
                              stateful_metrics=["wrote", "checked"]) \
        if verbose else None
    written, diffs = {}, {}
    for kind, write in jobs:
        written[kind] = write()
        if bar is not None:
            bar.add(1, [("wrote", len(written))])
    checks = _checked(model, written, representative_data, rtol, atol, int8_tolerance) \
        if check else ()
    for kind, diff in checks:
        diffs[kind] = diff
        if bar is not None:
            bar.add(1, [("checked", len(diffs))])
    return {kind: {"path": artifact, "size": _size(artifact), "max_abs_diff": diffs.get(kind)}
            for kind, artifact in written.items()}


__all__ = ["check_artifacts", "export", "run_saved_model", "run_tflite", "save_keras", "save_saved_model",
           "save_tflite", "tflite_bytes", "tflite_interpreter"]
