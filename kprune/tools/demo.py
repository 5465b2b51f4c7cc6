"""`kprune demo`: train, prune to half the MACs, fine-tune, export, compare.

Runs offline in a few minutes on a laptop CPU: a small CNN learns
scikit-learn's bundled handwritten digits (upsampled to 24x24), then
`kprune.prune(model, flops_target=0.5, criterion="l1")` removes channels, a
short fine-tune recovers accuracy, and `kprune.export` writes and checks the
result. A before/after table closes the run.

Example:

>>> from kprune import demo
>>> results = demo.run("kprune-demo", epochs=8)
>>> results["pruned"]["macs"] <= 0.5 * results["original"]["macs"]
True
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
from keras import layers as L

from kprune.tools import datasets
from kprune.tools.export import export, tflite_interpreter
from kprune.profile import format_count, latency, profile
from kprune.pruning import prune

IMAGE_SIZE = 24
FLOPS_TARGET = 0.5


def small_cnn(input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1), classes: int = 10) -> keras.Model:
    """A VGG-style net of four conv-BN-ReLU blocks, the demo's starting model.

    Args:
        input_shape: Input shape without the batch axis.
        classes: Number of output classes (softmax).

    Returns:
        An uncompiled functional model.

    Example:

    >>> small_cnn().count_params()
    """
    inp = keras.Input(input_shape, name="image")
    x = inp
    for i, (filters, pool) in enumerate(((32, False), (32, True), (64, False), (64, True))):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = L.ReLU(name=f"relu{i + 1}")(x)
        if pool:
            x = L.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, activation="softmax", name="classifier")(x)
    return keras.Model(inp, out, name="digits_cnn")


def _compile(model: keras.Model, learning_rate: float, steps: int) -> None:
    """Adam with a cosine decay to zero, so the last epoch ends on a settled model."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, steps))
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.mean(np.argmax(probs, axis=-1) == y))


def _tflite_latency(path: str, sample: np.ndarray, runs: int = 50) -> float:
    """Median seconds of one TFLite `invoke` on a single sample."""
    interpreter = tflite_interpreter(path)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    interpreter.set_tensor(index, sample[None].astype("float32"))
    interpreter.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _latencies(models, reports, sample, rounds: int = 3) -> list:
    """Batch-1 latency (ms) of each model in Keras and TFLite.

    Models are timed in alternation and the best of `rounds` medians is
    kept, so a busy machine slows every model alike instead of one.
    """
    best = [[float("inf"), float("inf")] for _ in models]
    for _ in range(rounds):
        for i, (model, report) in enumerate(zip(models, reports)):
            keras_s = latency(model, batch_size=1, runs=30)
            tflite_s = _tflite_latency(report["tflite"]["path"], sample)
            best[i] = [min(best[i][0], 1000 * keras_s), min(best[i][1], 1000 * tflite_s)]
    return best


def _measure(model, x_test, y_test, report, latency_ms) -> dict:
    stats = profile(model)
    return {"accuracy": _accuracy(model, x_test, y_test), "macs": stats.macs,
            "params": stats.params, "latency_ms": latency_ms[0], "tflite_latency_ms": latency_ms[1],
            "keras_bytes": report["keras"]["size"], "tflite_bytes": report["tflite"]["size"],
            "int8_bytes": report["tflite_int8"]["size"]}


def _row(label: str, before, after, fmt) -> str:
    ratio = after / before if before else float("nan")
    return f"{label:<24}{fmt(before):>14}{fmt(after):>14}{ratio:>10.2f}x"


def table(original: dict, pruned: dict) -> str:
    """The before/after table printed at the end of `run`.

    Args:
        original: Measurements of the trained model (keys as `run` returns).
        pruned: Measurements of the pruned, fine-tuned model.

    Returns:
        A printable multi-line string.
    """
    def size(n):
        return f"{n / 1024:.1f} KiB"

    head = f"{'':<24}{'original':>14}{'pruned':>14}{'ratio':>11}"
    lines = [head, "-" * len(head),
             _row("test accuracy", original["accuracy"], pruned["accuracy"], lambda v: f"{v:.2%}"),
             _row("MACs", original["macs"], pruned["macs"], format_count),
             _row("parameters", original["params"], pruned["params"], format_count),
             _row("Keras latency, batch 1", original["latency_ms"], pruned["latency_ms"],
                  lambda v: f"{v:.3f} ms"),
             _row("TFLite latency, batch 1", original["tflite_latency_ms"],
                  pruned["tflite_latency_ms"], lambda v: f"{v:.3f} ms"),
             _row(".keras (+ optimizer)", original["keras_bytes"], pruned["keras_bytes"], size),
             _row(".tflite file", original["tflite_bytes"], pruned["tflite_bytes"], size),
             _row(".tflite int8 file", original["int8_bytes"], pruned["int8_bytes"], size)]
    return "\n".join(lines)


def run(out_dir: str = "kprune-demo", epochs: int = 8, finetune_epochs: int | None = None,
        seed: int = 0, verbose: int = 1) -> dict:
    """Train a digits CNN, prune it to half its MACs, fine-tune, export, compare.

    Args:
        out_dir: Directory for the exported artifacts (`original/`, `pruned/`).
        epochs: Training epochs of the original model.
        finetune_epochs: Fine-tuning epochs after pruning (default: half of
            `epochs`, at least 1).
        seed: Seed of the data split, initialisation and shuffling.
        verbose: 1 prints progress bars and the table; 0 prints nothing.

    Returns:
        `{"original": {...}, "pruned": {...}, "export": report, "seconds": s}`
        where each measurement dict has `accuracy`, `macs`, `params`,
        `latency_ms`, `tflite_latency_ms`, `keras_bytes`, `tflite_bytes`, `int8_bytes`, and
        `report` is `kprune.export`'s for the pruned model.

    Example:

    >>> results = run("kprune-demo", epochs=8)
    """
    if int(epochs) < 1:
        raise ValueError(f"demo: epochs must be at least 1, got {epochs}.")
    if finetune_epochs is None:
        finetune_epochs = max(1, int(epochs) // 2)
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    say = print if verbose else (lambda *a, **k: None)

    (x_train, y_train), (x_test, y_test) = datasets.digits(IMAGE_SIZE, channels=1, seed=seed)
    batch_size = 32
    say(f"Digits: {len(x_train)} training and {len(x_test)} test images, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}x1.\n\n[1/4] Training the original model")
    model = small_cnn()
    steps = -(-len(x_train) // batch_size)
    _compile(model, 3e-3, steps * int(epochs))
    model.fit(x_train, y_train, batch_size=batch_size, epochs=int(epochs), verbose=verbose)

    say(f"\n[2/4] Pruning to {FLOPS_TARGET:.0%} of the MACs (criterion l1)")
    small = prune(model, flops_target=FLOPS_TARGET, criterion="l1")
    say(f"      accuracy right after pruning: {_accuracy(small, x_test, y_test):.2%}")

    say("\n[3/4] Fine-tuning the pruned model")
    _compile(small, 1e-3, steps * int(finetune_epochs))
    small.fit(x_train, y_train, batch_size=batch_size, epochs=int(finetune_epochs),
              verbose=verbose)

    say(f"\n[4/4] Exporting to {out_dir}/ and checking every artifact")
    calibration = x_train[:100]
    original_report = export(model, os.path.join(out_dir, "original"),
                             representative_data=calibration)
    pruned_report = export(small, os.path.join(out_dir, "pruned"), representative_data=calibration)
    for fmt, entry in pruned_report.items():
        say(f"      {entry['path']:<44} max |diff| vs Keras {entry['max_abs_diff']:.2e}")

    times = _latencies([model, small], [original_report, pruned_report], x_test[0])
    original = _measure(model, x_test, y_test, original_report, times[0])
    pruned = _measure(small, x_test, y_test, pruned_report, times[1])
    seconds = time.perf_counter() - start
    say("\n" + table(original, pruned))
    say("Keras at batch 1 on a net this small is mostly per-call overhead; TFLite shows the "
        "compute.")
    say(f"\nDone in {seconds:.0f} s.")
    return {"original": original, "pruned": pruned, "export": pruned_report, "seconds": seconds}


__all__ = ["run", "small_cnn", "table"]
