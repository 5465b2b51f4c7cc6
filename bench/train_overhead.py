"""Step time of ResRep training against plain `model.fit`, measured in one run.

One base model (`kprune.models.cifar_resnet`, digits upsampled to 16x16 RGB,
offline) is trained five ways, with the same SGD (momentum 0.9) and batch:

* plain: the base model, `model.compile(SGD)` and `model.fit`; a second
  copy trained the same way shows how much timings drift between variants
  on a shared machine;
* compactors: `kprune.resrep.attach(model)` compiled with the same plain SGD
  (the cost of the compactor layers alone);
* resrep.compile: the attached model under `kprune.resrep.compile` (the Res
  rule and the compactors' own SGD, through `kprune.train.RuleOptimizer`) in
  `model.fit`: the ResRep training step;
* Trainer: the attached model in `kprune.Trainer` with the same rule and
  compactor optimizer;
* + MaskScheduler: resrep.compile with a `MaskScheduler` updating the masks
  every `--interval` steps inside the timed window.

Every variant first trains one epoch that is not timed (tracing and
compilation), then the variants take turns, one epoch each, for `--rounds`
rounds. A callback times every step from `on_train_batch_begin` to
`on_train_batch_end`; the table shows the median step over all rounds, the
median epoch time divided by its steps (data feeding included), and both
ratios to plain training. The issue's goal: ResRep at most 1.10x plain.
The cost of one `MaskScheduler.update()` is timed on its own as well, with
its share of a step at the paper's interval (200 steps).

Usage:

    TF_NUM_INTRAOP_THREADS=2 python bench/train_overhead.py            # about 3 minutes on 2 cores
    python bench/train_overhead.py --depth 56 --rounds 8
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402
from kprune.tools.datasets import digits  # noqa: E402
from kprune.models import cifar_resnet  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step and every epoch, while `record` is set."""

    def __init__(self):
        super().__init__()
        self.record = False
        self.steps: list = []
        self.epochs: list = []  # (seconds, steps)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start, self._count = time.perf_counter(), 0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.record:
            self.steps.append(time.perf_counter() - self._start)
        self._count += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.record:
            self.epochs.append((time.perf_counter() - self._epoch_start, self._count))


def sgd(lr: float = 0.01) -> keras.optimizers.SGD:
    return keras.optimizers.SGD(lr, momentum=0.9)


LOSS = "sparse_categorical_crossentropy"


def build(args, x, y) -> dict:
    """Variant name -> `fit(epochs_done)` training one more epoch with its callbacks."""
    keras.utils.set_random_seed(0)
    base = cifar_resnet(args.depth, input_shape=x.shape[1:])
    variants = {}

    def keras_fit(model, timer, extra=()):
        def fit(epoch):
            model.fit(x, y, batch_size=args.batch_size, epochs=epoch + 1, initial_epoch=epoch,
                      callbacks=[timer, *extra], verbose=0)
        return fit

    # The second plain copy is the same again: it shows how far timings drift.
    for name in ("plain model.fit", "plain, second copy"):
        plain = keras.models.clone_model(base)
        plain.set_weights(base.get_weights())
        plain.compile(optimizer=sgd(), loss=LOSS)
        timer = StepTimer()
        variants[name] = (timer, keras_fit(plain, timer), None)

    attached = kprune.resrep.attach(base)
    attached.compile(optimizer=sgd(), loss=LOSS)
    timer = StepTimer()
    variants["compactors, plain SGD"] = (timer, keras_fit(attached, timer), None)

    rr = kprune.resrep.attach(base)
    kprune.resrep.compile(rr, sgd(), LOSS)
    timer = StepTimer()
    variants["resrep.compile + fit"] = (timer, keras_fit(rr, timer), None)

    tr_model = kprune.resrep.attach(base)
    rule = kprune.resrep.rule(tr_model)
    optimizer = sgd()
    trainer = kprune.Trainer(tr_model, optimizer, LOSS, rules=[rule],
                             extra_optimizers=[(rule, kprune.resrep.compactor_optimizer(optimizer))])
    timer = StepTimer()

    def trainer_fit(epoch, trainer=trainer, timer=timer):
        trainer.fit(x, y, batch_size=args.batch_size, epochs=epoch + 1, initial_epoch=epoch,
                    callbacks=[timer], verbose=0)
    variants["kprune.Trainer + rule"] = (timer, trainer_fit, None)

    sched_model = kprune.resrep.attach(base)
    kprune.resrep.compile(sched_model, sgd(), LOSS)
    # Masks toward a target that is never reached in this run, so every update does full work.
    scheduler = TimedScheduler(0.05, warmup_steps=0, interval=args.interval, granularity=1)
    timer = StepTimer()
    variants["+ MaskScheduler"] = (timer, keras_fit(sched_model, timer, [scheduler]), scheduler)
    return variants


class TimedScheduler(kprune.resrep.MaskScheduler):
    """A MaskScheduler that records how long each `update` takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = False
        self.seconds: list = []

    def update(self):
        start = time.perf_counter()
        out = super().update()
        if self.record:
            self.seconds.append(time.perf_counter() - start)
        return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n + 2)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per variant")
    parser.add_argument("--interval", type=int, default=10,
                        help="steps between mask updates of the '+ MaskScheduler' variant")
    args = parser.parse_args(argv)
    (x, y), _ = digits(image_size=args.image_size, channels=3, seed=0)
    n = len(x) // args.batch_size * args.batch_size  # full batches only: no retracing
    x, y = x[:n], y[:n]
    variants = build(args, x, y)
    names = list(variants)
    start = time.time()
    for name in names:  # warm-up epoch: tracing and compilation, not timed
        variants[name][1](0)
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            timer, fit, scheduler = variants[name]
            timer.record = True
            if scheduler is not None:
                scheduler.record = True
            fit(round_ + 1)
            timer.record = False
            if scheduler is not None:
                scheduler.record = False

    print(f"CIFAR ResNet-{args.depth}, {args.image_size}x{args.image_size}x3, batch "
          f"{args.batch_size}, {n // args.batch_size} steps per epoch, {args.rounds} timed "
          f"epochs per variant (interleaved), {time.time() - start:.0f} s")
    print(f"{'variant':<24}{'median step':>13}{'ratio':>8}{'epoch/step':>12}{'ratio':>8}")
    ref_step = ref_epoch = None
    for name in names:
        timer = variants[name][0]
        step = float(np.median(timer.steps))
        epoch = float(np.median([s / c for s, c in timer.epochs]))
        ref_step, ref_epoch = ref_step or step, ref_epoch or epoch
        print(f"{name:<24}{step * 1e3:>10.1f} ms{step / ref_step:>7.3f}x"
              f"{epoch * 1e3:>9.1f} ms{epoch / ref_epoch:>7.3f}x")
    scheduler = variants["+ MaskScheduler"][2]
    if scheduler.seconds:
        update = float(np.median(scheduler.seconds))
        print(f"MaskScheduler.update(): median {update * 1e3:.1f} ms over {len(scheduler.seconds)} "
              f"updates in the timed window (every {args.interval} steps); at the paper's "
              f"interval of 200 steps that is {update / 200 / ref_step:.2%} of a plain step")


if __name__ == "__main__":
    main()
