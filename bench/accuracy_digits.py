"""ResRep against one-shot L1 pruning and the unpruned model on digits, same epoch budget.

Offline (scikit-learn's bundled digits, 8x8 upsampled to 16x16 RGB), on a
CIFAR ResNet (`kprune.models.cifar_resnet`, depth 20 by default). Every
method trains for `--base-epochs + --epochs` epochs in all, with SGD
(momentum 0.9, weight decay 1e-4) and cosine learning rates:

* unpruned: the model trained from scratch for the whole budget;
* ResRep: the base model (`--base-epochs`), then `--epochs` of ResRep
  (`kprune.resrep.attach`, `kprune.resrep.compile`, a `MaskScheduler`
  toward `--flops-target` of the MACs), then `kprune.resrep.convert`; no
  fine-tuning (the converted model computes what the masked one computes);
* L1 one-shot: the same base model, `kprune.prune(model,
  flops_target=..., criterion="l1")`, then `--epochs` of fine-tuning.

The table gives the test accuracy (mean, and spread of the final one over
`--seeds`) before the pruning step (the base model), right after it (for
ResRep: the converted model), and at the end, with the
final model's MACs and parameters (`kprune.profile`, means over the seeds).

Usage:

    TF_NUM_INTRAOP_THREADS=2 python bench/accuracy_digits.py     # about 4 minutes per seed on 2 cores
    python bench/accuracy_digits.py --seeds 0 1 2 --epochs 12
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

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def sgd(lr: float, steps: int) -> keras.optimizers.SGD:
    """SGD, momentum 0.9, weight decay 1e-4, cosine decay to 0 over `steps`."""
    rate = keras.optimizers.schedules.CosineDecay(lr, max(steps, 1))
    return keras.optimizers.SGD(rate, momentum=0.9, weight_decay=1e-4)


def accuracy(model, data) -> float:
    _, (xt, yt) = data
    return float(np.mean(np.argmax(model.predict(xt, batch_size=256, verbose=0), -1) == yt))


def train(model, data, epochs: int, lr: float, batch_size: int, callbacks=()) -> None:
    (x, y), _ = data
    steps = epochs * int(np.ceil(len(x) / batch_size))
    model.compile(optimizer=sgd(lr, steps), loss=LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=batch_size, epochs=epochs, callbacks=list(callbacks), verbose=0)


def run_seed(args, seed: int) -> dict:
    """Method -> (accuracy before pruning, right after, final, MACs, params)."""
    keras.utils.set_random_seed(seed)
    (x, y), (xt, yt) = digits(image_size=args.image_size, channels=3, seed=seed)
    mean, std = x.mean(), x.std()
    data = ((x - mean) / std, y), ((xt - mean) / std, yt)
    steps_per_epoch = int(np.ceil(len(x) / args.batch_size))
    shape = data[0][0].shape[1:]
    rows = {}

    def new_model():
        return cifar_resnet(args.depth, input_shape=shape, classifier_activation=None)

    full = new_model()
    train(full, data, args.base_epochs + args.epochs, args.lr, args.batch_size)
    prof = kprune.profile(full)
    acc = accuracy(full, data)
    rows["unpruned"] = (acc, acc, acc, prof.macs, prof.params)

    keras.utils.set_random_seed(seed)
    base = new_model()
    train(base, data, args.base_epochs, args.lr, args.batch_size)
    base_acc = accuracy(base, data)

    rr = kprune.resrep.attach(base, lam=args.lam)
    total = args.epochs * steps_per_epoch
    scheduler = kprune.resrep.MaskScheduler(
        args.flops_target, warmup_steps=steps_per_epoch, interval=args.interval,
        granularity=args.granularity)
    kprune.resrep.compile(rr, sgd(args.resrep_lr, total), LOSS, metrics=["accuracy"])
    rr.fit(data[0][0], data[0][1], batch_size=args.batch_size, epochs=args.epochs,
           callbacks=[scheduler], verbose=0)
    small = kprune.resrep.convert(rr)
    masked_out = rr.predict(data[1][0], batch_size=256, verbose=0)
    np.testing.assert_allclose(small.predict(data[1][0], batch_size=256, verbose=0), masked_out,
                               rtol=1e-4, atol=1e-5)
    prof = kprune.profile(small)
    acc = accuracy(small, data)
    rows["ResRep"] = (base_acc, acc, acc, prof.macs, prof.params)

    pruned = kprune.prune(base, flops_target=args.flops_target, criterion="l1")
    after = accuracy(pruned, data)
    train(pruned, data, args.epochs, args.resrep_lr, args.batch_size)
    prof = kprune.profile(pruned)
    rows["L1 one-shot + FT"] = (base_acc, after, accuracy(pruned, data), prof.macs, prof.params)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--base-epochs", type=int, default=6,
                        help="epochs of the base model ResRep and L1 start from")
    parser.add_argument("--epochs", type=int, default=8,
                        help="epochs of ResRep, and of fine-tuning after L1 pruning")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate from scratch")
    parser.add_argument("--resrep-lr", type=float, default=0.02,
                        help="learning rate of ResRep and of fine-tuning")
    parser.add_argument("--lam", type=float, default=1e-3,
                        help="Res rule strength (the paper's 1e-4 is for far longer runs)")
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--interval", type=int, default=4, help="steps between mask updates")
    parser.add_argument("--granularity", type=int, default=16,
                        help="most channels masked per update")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    start = time.time()
    results = [run_seed(args, seed) for seed in args.seeds]
    base = results[0]["unpruned"]
    print(f"digits {args.image_size}x{args.image_size}x3, CIFAR ResNet-{args.depth}, "
          f"{args.base_epochs} + {args.epochs} epochs for every method, MACs target "
          f"{args.flops_target:.0%}, seeds {args.seeds}, {time.time() - start:.0f} s")
    print(f"{'method':<18}{'acc base':>10}{'acc pruned':>12}{'acc final':>11}{'spread':>8}"
          f"{'MACs':>12}{'params':>10}{'MACs ratio':>12}")
    for name in results[0]:
        values = np.array([r[name] for r in results], dtype="float64")
        final = values[:, 2]
        before = ("-", "-") if name == "unpruned" else \
            (f"{values[:, 0].mean():.2%}", f"{values[:, 1].mean():.2%}")
        print(f"{name:<18}{before[0]:>10}{before[1]:>12}"
              f"{final.mean():>11.2%}{final.max() - final.min():>8.2%}"
              f"{int(values[:, 3].mean()):>12,}{int(values[:, 4].mean()):>10,}"
              f"{values[:, 3].mean() / base[3]:>12.1%}")


if __name__ == "__main__":
    main()
