"""The README's figures, drawn by kprune.plot from a real run (offline, about a minute on a CPU).

Trains the `kprune demo` CNN on scikit-learn's bundled digits, prunes it with three criteria at
several MACs targets, fine-tunes each pruned model for one epoch, and writes

    docs/channels.png   output channels per layer, original against 50% MACs (l1)
    docs/tradeoff.png   test accuracy against MACs for l1, fpgm and random

Usage:

    python bench/figures.py [--out docs] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402

BATCH = 64
TARGETS = (0.3, 0.5, 0.7)
CRITERIA = ("l1", "fpgm", "random")


def _fit(model, x, y, learning_rate, epochs):
    steps = epochs * int(np.ceil(len(x) / BATCH))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)


def _accuracy(model, x, y):
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.mean(np.argmax(logits, -1) == y))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = kprune.datasets.digits(image_size=16, channels=3, seed=args.seed)
    model = kprune.demo.small_cnn(input_shape=x.shape[1:])
    _fit(model, x, y, 3e-3, args.epochs)
    base = kprune.profile(model).macs
    results = [("original", 100.0, _accuracy(model, x_test, y_test))]
    half = None
    for criterion in CRITERIA:
        for target in TARGETS:
            keras.utils.set_random_seed(args.seed)
            small = kprune.prune(model, flops_target=target, criterion=criterion)
            if criterion == "l1" and target == 0.5:
                half = small
            _fit(small, x, y, 1e-3, 1)
            share = 100.0 * kprune.profile(small).macs / base
            results.append((f"{criterion} + 1 epoch fine-tuning", share,
                            _accuracy(small, x_test, y_test)))
            print(f"{criterion:>6} at {target:.0%}: MACs {share:.1f}%, "
                  f"accuracy {results[-1][2]:.2%}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    kprune.plot.channels(model, half, title="Output channels per layer: l1 pruning to 50% MACs") \
        .savefig(os.path.join(args.out, "channels.png"), dpi=100)
    kprune.plot.tradeoff(results, cost="MACs (% of the original)", ylabel="test accuracy",
                         title="Digits CNN: accuracy against MACs after one-shot pruning") \
        .savefig(os.path.join(args.out, "tradeoff.png"), dpi=100)
    print(f"wrote channels.png and tradeoff.png under {os.path.abspath(args.out)} "
          f"in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
