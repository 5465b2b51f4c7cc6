"""ResRep on a CIFAR ResNet-56: train compactors, mask to a MACs target, convert.

ResRep (Ding et al., ICCV 2021) starts from a trained network, inserts a
compactor (an identity-initialised pointwise map) after every prunable
BatchNormalization, and trains on: the Res rule pushes whole compactor
channels to zero with a group-lasso gradient, and a schedule masks the
weakest channels every few hundred steps until the network's MACs reach a
target. `kprune.resrep.convert` then folds the compactors into the
convolutions before them and removes the masked channels for real; the
result computes what the masked network computes.

The paper's ResNet-56 on CIFAR-10 (official settings): a trained base
model, then 480 epochs of ResRep at batch 64, SGD momentum 0.9 with cosine
learning rate from 0.01, weight decay 1e-4, lambda 1e-4, compactors on
momentum 0.99 without weight decay, masks after 5 epochs and every 200
steps, at most 4 more channels per update; 52.9% of the FLOPs removed
(target 0.471) at 93.71% accuracy.

Usage:

    # CIFAR-10 through keras.datasets (downloads it): train the base model
    # (160 epochs), then ResRep with the paper's settings (480 epochs)
    python examples/resrep_resnet56_cifar10.py

    # start from a trained ResNet-56 saved as .keras (logits or softmax output)
    python examples/resrep_resnet56_cifar10.py --base resnet56.keras --flops-target 0.471

    # offline, on scikit-learn's bundled digits (8x8 upsampled to 16x16 RGB);
    # a few minutes on a CPU (--depth 20: faster)
    python examples/resrep_resnet56_cifar10.py --data digits --epochs 2

The script prints accuracy, MACs and parameters of the base model, of the
trained model with its masks, of the converted model (same accuracy as the
masked one) and, with `--finetune-epochs`, after fine-tuning; it saves the
converted model as a `.keras` file that loads without kprune.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402
from kprune.models import cifar_resnet  # noqa: E402
from kprune.profile import format_count, profile  # noqa: E402

# name: (base epochs, ResRep epochs, base lr, ResRep lr, lambda)
DEFAULTS = {"cifar10": (160, 480, 0.1, 0.01, 1e-4),
            "digits": (4, 20, 0.05, 0.02, 1e-3)}


def load_data(name: str, image_size: int, seed: int) -> tuple:
    """`((x_train, y_train), (x_test, y_test))`, normalised images."""
    if name == "cifar10":
        from kprune.tools.datasets import cifar10

        return cifar10()
    from kprune.tools.datasets import digits

    (x, y), (xt, yt) = digits(image_size=image_size, channels=3, seed=seed)
    mean, std = x.mean(), x.std() + 1e-7
    return ((x - mean) / std, y), ((xt - mean) / std, yt)


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crops of the 4-pixel reflect-padded images and horizontal flips."""
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    shifts = rng.integers(0, 9, size=(len(x), 2))
    flips = rng.random(len(x)) < 0.5
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(shifts):
        image = padded[i, dy:dy + h, dx:dx + w]
        out[i] = image[:, ::-1] if flips[i] else image
    return out


class Augmented(keras.utils.PyDataset):
    """Shuffled batches of `(augment(x), y)`, reshuffled every epoch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index: int) -> tuple:
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return augment(self.x[rows], self.rng), self.y[rows]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))


def sgd(lr: float, total_steps: int, schedule: str, warmup_steps: int = 0) -> keras.optimizers.SGD:
    """SGD, momentum 0.9, weight decay 1e-4.

    `schedule` "cosine": cosine decay to 0, after a linear warm-up from 0 over
    `warmup_steps`; "step": lr / 10 at 50% and 75% of the steps (no warm-up).
    """
    if schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else lr, max(total_steps - warmup_steps, 1),
            warmup_target=lr if warmup_steps else None, warmup_steps=warmup_steps)
    else:
        rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            [max(total_steps // 2, 1), max(total_steps * 3 // 4, 2)], [lr, lr / 10, lr / 100])
    return keras.optimizers.SGD(rate, momentum=0.9, weight_decay=1e-4)


def fit(model, data, epochs: int, batch_size: int, augment_data: bool, seed: int,
        callbacks=()) -> None:
    """`model.fit` for `epochs` epochs, with fresh augmentation every epoch if asked."""
    (x, y), _ = data
    if augment_data:
        model.fit(Augmented(x, y, batch_size, seed), epochs=epochs, callbacks=list(callbacks),
                  verbose=2)
    else:
        model.fit(x, y, batch_size=batch_size, epochs=epochs, callbacks=list(callbacks),
                  verbose=2)


def logits_of(model, data) -> np.ndarray:
    _, (xt, _) = data
    return model.predict(xt, batch_size=256, verbose=0)


def accuracy(logits: np.ndarray, data) -> float:
    _, (_, yt) = data
    return float(np.mean(np.argmax(logits, axis=-1) == yt))


def mask_schedule(args, epochs: int, steps_per_epoch: int, channels: int) -> dict:
    """MaskScheduler settings: the paper's on CIFAR-10, scaled to a short run otherwise.

    The paper masks after 5 epochs, then every 200 steps, at most 4 more
    channels per update. A run too short for that starts masking after 10%
    of its steps, updates about 40 times, and raises the per-update limit so
    that the target can be met by the middle of the run.
    """
    total = epochs * steps_per_epoch
    paper = args.data == "cifar10"
    warmup = args.warmup_epochs if args.warmup_epochs is not None else (5 if paper else None)
    warmup_steps = int(round(warmup * steps_per_epoch)) if warmup is not None \
        else int(round(0.1 * total))
    interval = args.interval or (200 if paper else max(1, total // 40))
    if args.granularity:
        granularity = args.granularity
    elif paper:
        granularity = 4
    else:
        updates = max(1, (total // 2 - warmup_steps) // interval)
        granularity = max(4, math.ceil(channels / updates))
    return {"warmup_steps": warmup_steps, "interval": interval, "granularity": granularity}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--depth", type=int, default=56, help="6n + 2: 20, 32, 44, 56, 110")
    parser.add_argument("--image-size", type=int, default=16, help="digits image size")
    parser.add_argument("--base", default=None,
                        help="a trained model (.keras) to start from instead of training one")
    parser.add_argument("--base-epochs", type=int, default=None,
                        help="epochs of the base model (default 160 cifar10, lr / 10 at 50%% "
                             "and 75%%; 4 digits, one warm-up epoch then cosine)")
    parser.add_argument("--base-lr", type=float, default=None, help="default 0.1 cifar10, 0.05 digits")
    parser.add_argument("--epochs", type=int, default=None,
                        help="ResRep epochs (default 480 cifar10, 20 digits)")
    parser.add_argument("--lr", type=float, default=None,
                        help="ResRep learning rate (default 0.01 cifar10, 0.02 digits)")
    parser.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                        help="ResRep learning-rate schedule")
    parser.add_argument("--lam", type=float, default=None,
                        help="Res rule strength (default 1e-4 cifar10; 1e-3 digits, whose run is "
                             "far shorter)")
    parser.add_argument("--flops-target", type=float, default=0.5,
                        help="share of the base MACs to keep (the paper's ResNet-56: 0.471)")
    parser.add_argument("--warmup-epochs", type=float, default=None,
                        help="epochs before the first mask update (default 5 cifar10, 10%% of the "
                             "run digits)")
    parser.add_argument("--interval", type=int, default=None,
                        help="steps between mask updates (default 200 cifar10)")
    parser.add_argument("--granularity", type=int, default=None,
                        help="most channels added per mask update (default 4 cifar10)")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="epochs of plain training after conversion (lr / 10, cosine)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="resnet_resrep.keras")
    args = parser.parse_args(argv)
    cifar = args.data == "cifar10"
    base_epochs, epochs, base_lr, lr, lam = DEFAULTS[args.data]
    base_epochs = base_epochs if args.base_epochs is None else args.base_epochs
    epochs = epochs if args.epochs is None else args.epochs
    base_lr, lr = args.base_lr or base_lr, args.lr or lr
    lam = lam if args.lam is None else args.lam
    keras.utils.set_random_seed(args.seed)
    start = time.time()

    data = load_data(args.data, args.image_size, args.seed)
    (x, _), _ = data
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    if args.base:
        model = keras.saving.load_model(args.base)
        print(f"Base model: {args.base}")
    else:
        model = cifar_resnet(args.depth, input_shape=x.shape[1:], classifier_activation=None)
        # CIFAR-10: the ResNet paper's steps; digits: so short a run needs a warm-up epoch
        # (a ResNet-56 started at full rate does not learn in a few epochs) and cosine decay.
        schedule, warmup = ("step", 0) if cifar else ("cosine", steps_per_epoch)
        print(f"Base model: {base_epochs} epochs, lr {base_lr:g} ({schedule}"
              f"{f', {warmup} warm-up steps' if warmup else ''})")
        model.compile(optimizer=sgd(base_lr, base_epochs * steps_per_epoch, schedule, warmup),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        fit(model, data, base_epochs, args.batch_size, cifar, args.seed)
    from_logits = model.layers[-1].get_config().get("activation") in (None, "linear")
    rows = {"base": (accuracy(logits_of(model, data), data), profile(model))}

    rr = kprune.resrep.attach(model, lam=lam)
    sets = kprune.resrep.compactor_sets(rr)
    channels = sum(rr.get_layer(names[0]).channels for names in sets)
    settings = mask_schedule(args, epochs, steps_per_epoch, channels)
    print(f"ResRep: {len(kprune.resrep.compactors(rr))} compactors in {len(sets)} sets "
          f"({channels} channels), {epochs} epochs, lr {lr:g} ({args.schedule}), lambda {lam:g}, "
          f"target {args.flops_target:.1%} of the MACs, masks after {settings['warmup_steps']} "
          f"steps, every {settings['interval']}, at most {settings['granularity']} more each")
    kprune.resrep.compile(rr, sgd(lr, epochs * steps_per_epoch, args.schedule),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                          metrics=["accuracy"])
    scheduler = kprune.resrep.MaskScheduler(args.flops_target, **settings)
    fit(rr, data, epochs, args.batch_size, cifar, args.seed + 1, callbacks=[scheduler])
    masked_logits = logits_of(rr, data)
    rows["masked"] = (accuracy(masked_logits, data), None)
    macs = kprune.resrep.converted_macs(rr)
    print(f"Masks: {macs:,} MACs after conversion "
          f"({macs / kprune.resrep.original_macs(rr):.1%} of the base)")

    small = kprune.resrep.convert(rr)
    small_logits = logits_of(small, data)
    rows["converted"] = (accuracy(small_logits, data), profile(small))
    diff = float(np.max(np.abs(small_logits - masked_logits)))
    # In inference mode the converted model computes what the masked model computes.
    np.testing.assert_allclose(small_logits, masked_logits, rtol=1e-4, atol=1e-5)
    print(f"Converted vs masked model: max |output difference| {diff:.2e}, test predictions "
          f"{'identical' if rows['converted'][0] == rows['masked'][0] else 'DIFFERENT'}")

    if args.finetune_epochs:
        print(f"Fine-tuning: {args.finetune_epochs} epochs")
        small.compile(optimizer=sgd(lr / 10, args.finetune_epochs * steps_per_epoch, "cosine"),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                      metrics=["accuracy"])
        fit(small, data, args.finetune_epochs, args.batch_size, cifar, args.seed + 2)
        rows["fine-tuned"] = (accuracy(logits_of(small, data), data), profile(small))

    base = rows["base"][1]
    print(f"\n{'':<12}{'accuracy':>10}{'MACs':>10}{'MACs %':>8}{'params':>10}{'params %':>10}")
    for name, (acc, prof) in rows.items():
        prof = prof or rows["converted"][1]
        print(f"{name:<12}{acc:>10.2%}{format_count(prof.macs):>10}{prof.macs / base.macs:>8.1%}"
              f"{format_count(prof.params):>10}{prof.params / base.params:>10.1%}")
    foreign = [layer.name for layer in small.layers if type(layer).__module__.startswith("kprune")]
    if foreign:
        raise SystemExit(f"The converted model still has kprune layers: {foreign}")
    small.save(args.out)
    reloaded = keras.saving.load_model(args.out, safe_mode=True)  # plain Keras layers only
    np.testing.assert_allclose(logits_of(reloaded, data), logits_of(small, data),
                               rtol=1e-5, atol=1e-6)
    print(f"Saved {args.out}; it reloads with the same outputs ({time.time() - start:.0f} s in all)")
    return {name: acc for name, (acc, _) in rows.items()} | {"max_abs_diff": diff}


if __name__ == "__main__":
    main()
