"""kprune on each Keras backend: one-shot prune time and ResRep training step time.

For every backend installed (tensorflow, jax, torch) one subprocess is
started with `KERAS_BACKEND` set (the backend is fixed when Keras is first
imported). Each one:

* prunes keras.applications MobileNetV2 and ResNet50 (random weights,
  `--size` pixels) with `kprune.prune(model, flops_target=0.5,
  criterion="l1")` and reports the wall time of that call (the model is
  built before the clock starts);
* trains a CIFAR ResNet-20 (`kprune.models.cifar_resnet`) on random
  32x32 inputs with plain `model.fit`, and the ResRep-attached
  copy with `kprune.resrep.compile` (the Res rule through
  `kprune.train.RuleOptimizer`) in `model.fit`; after one untimed epoch
  (tracing and compilation), `--epochs` epochs are timed per variant and the
  median step time is reported.

The table shows the times, each backend's prune time over TensorFlow's, and
ResRep's step time over plain training on the same backend.

Usage:

    python bench/backends.py                      # 2 to 15 minutes on 2 cores: torch trains eagerly
    python bench/backends.py --backends jax --size 64 --steps 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")


def _child(args) -> dict:
    """Run inside one backend's subprocess; return the measurements."""
    import keras
    import numpy as np

    import kprune

    out = {"backend": keras.backend.backend(), "prune": {}}
    shape = (args.size, args.size, 3)
    for name in ("MobileNetV2", "ResNet50"):
        model = getattr(keras.applications, name)(weights=None, input_shape=shape)
        start = time.perf_counter()
        small = kprune.prune(model, flops_target=0.5, criterion="l1")
        out["prune"][name] = time.perf_counter() - start
        out.setdefault("kept_macs", {})[name] = kprune.profile(small).macs / kprune.profile(
            model).macs
        keras.backend.clear_session()

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    x = rng.random((n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    loss = keras.losses.SparseCategoricalCrossentropy()

    class Steps(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self._t = [], 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    def timed(model):
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)  # trace and compile
        steps = Steps()
        model.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0, callbacks=[steps])
        return float(np.median(steps.times))

    plain = kprune.models.cifar_resnet(20)
    plain.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=loss)
    out["plain_step"] = timed(plain)
    rr = kprune.resrep.attach(kprune.models.cifar_resnet(20))
    kprune.resrep.compile(rr, keras.optimizers.SGD(0.01, momentum=0.9), loss)
    out["resrep_step"] = timed(rr)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--size", type=int, default=96, help="input size of the applications")
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)))
        return

    results = {}
    for backend in args.backends:
        module = "tensorflow" if backend == "tensorflow" else backend
        if importlib.util.find_spec(module) is None:
            print(f"{backend}: not installed (pip install -e '.[backends]'), skipped")
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(args.size),
                   "--steps", str(args.steps), "--batch", str(args.batch),
                   "--epochs", str(args.epochs)]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not line:
            print(f"{backend}: failed\n{done.stderr[-2000:]}")
            continue
        results[backend] = json.loads(line[-1][len("RESULT "):])
        print(f"{backend}: done in {time.perf_counter() - start:.0f} s")

    if not results:
        return
    base = results.get("tensorflow")
    print(f"\nOne-shot prune, flops_target=0.5, l1, {args.size}x{args.size} (wall seconds; "
          "ratio to TensorFlow)")
    print(f"{'backend':<11} {'MobileNetV2':>18} {'ResNet50':>18}")
    for backend, r in results.items():
        cells = []
        for name in ("MobileNetV2", "ResNet50"):
            ratio = f" ({r['prune'][name] / base['prune'][name]:.2f}x)" if base else ""
            cells.append(f"{r['prune'][name]:.2f}{ratio}")
        print(f"{backend:<11} {cells[0]:>18} {cells[1]:>18}")
    print(f"\nCIFAR ResNet-20 training step, batch {args.batch} (median ms; ResRep / plain)")
    print(f"{'backend':<11} {'plain':>8} {'ResRep':>8} {'ratio':>7}")
    for backend, r in results.items():
        print(f"{backend:<11} {1e3 * r['plain_step']:>8.1f} {1e3 * r['resrep_step']:>8.1f} "
              f"{r['resrep_step'] / r['plain_step']:>6.2f}x")


if __name__ == "__main__":
    main()
