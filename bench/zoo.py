"""Every keras.applications model through the graph and the surgeon.

For each architecture (weights=None, so it runs offline): build the dependency
graph, drop a share of every prunable group, check the pruned outputs against
the masked original (allclose), round-trip the pruned model through `.keras`,
and convert it to TFLite. Prints one row per model and a pass count, then the
surgery time (graph + rebuild) of ResNet50 and EfficientNetB7 at full size.

    python bench/zoo.py                       # all 40 architectures
    python bench/zoo.py --models MobileNetV2 ResNet50 --size 64
    python bench/zoo.py --timing-only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kprune.graph import DependencyGraph  # noqa: E402
from kprune.surgeon import apply_plan  # noqa: E402
from kprune.tools.verify import check_equivalence, random_plan, randomize  # noqa: E402

FIXED_SIZE = {"NASNetLarge": 331, "NASNetMobile": 224, "InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def all_models() -> list:
    return sorted(n for n in dir(keras.applications) if n[0].isupper())


def build(name: str, size: int):
    ctor = getattr(keras.applications, name)
    size = FIXED_SIZE.get(name, size)
    return ctor(weights=None, input_shape=(size, size, 3))


def tflite_ok(model) -> bool:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return len(converter.convert()) > 0


def run_one(name: str, size: int, fraction: float) -> dict:
    row = {"model": name}
    t0 = time.perf_counter()
    model = build(name, size)
    randomize(model, seed=0)
    graph = DependencyGraph(model)
    row["groups"] = f"{len(graph.prunable_groups())}/{len(graph.groups)}"
    plan = random_plan(graph, fraction, seed=0)
    x = np.random.default_rng(0).normal(size=(2,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    small = check_equivalence(model, plan, x, graph=graph, rtol=1e-3, atol=1e-4)
    row["params"] = f"{model.count_params() / 1e6:.2f}M->{small.count_params() / 1e6:.2f}M"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        small.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(small(x)), rtol=1e-5, atol=1e-5)
    row["tflite"] = tflite_ok(small)
    row["seconds"] = time.perf_counter() - t0
    return row


def surgery_time(name: str, repeats: int = 3) -> float:
    model = keras.applications.__dict__[name](weights=None)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph = DependencyGraph(model)
        apply_plan(model, random_plan(graph, 0.5, seed=0), graph)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="architectures (default: all)")
    parser.add_argument("--size", type=int, default=64, help="input size (default 64)")
    parser.add_argument("--fraction", type=float, default=0.3, help="share dropped per group")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(argv)
    failures = 0
    if not args.timing_only:
        names = args.models or all_models()
        print(f"{'model':<22}{'groups':>10}  {'params':<22}{'tflite':>7}{'time':>8}  status", flush=True)
        for name in names:
            try:
                r = run_one(name, args.size, args.fraction)
                print(f"{name:<22}{r['groups']:>10}  {r['params']:<22}{str(r['tflite']):>7}"
                      f"{r['seconds']:>7.1f}s  ok", flush=True)
            except Exception as exc:  # report and go on: this is a survey
                failures += 1
                print(f"{name:<22}  FAIL {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            keras.backend.clear_session()
        print(f"passed {len(names) - failures}/{len(names)}")
    if not args.no_timing:
        for name, goal in (("ResNet50", 3.0), ("EfficientNetB7", 20.0)):
            t = surgery_time(name)
            print(f"surgery time {name}: {t:.2f}s (goal < {goal:.0f}s)", flush=True)
            keras.backend.clear_session()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
