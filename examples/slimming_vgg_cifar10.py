"""Network Slimming on a CIFAR VGG: sparse training, one global threshold, fine-tuning.

Network Slimming (Liu et al., ICCV 2017) trains with an L1 penalty on the
BatchNorm scales (`grad(gamma) += s * sign(gamma)`), removes the channels
whose |gamma| falls below one threshold chosen over the whole network, and
fine-tunes the narrower network. The paper's VGG-19 on CIFAR-10: 160 epochs
with s = 1e-4, prune 70% of the channels, fine-tune 160 epochs; 20.04M ->
2.30M parameters at the same accuracy (93.66% -> 93.80%).

Usage:

    # CIFAR-10 through keras.datasets (downloads it), VGG-19
    python examples/slimming_vgg_cifar10.py --depth 19 --percent 0.7

    # offline, on scikit-learn's bundled digits (16x16 RGB), a small VGG
    python examples/slimming_vgg_cifar10.py --data digits

The script prints accuracy, MACs and parameters before pruning, after
pruning and after fine-tuning, the pruned `cfg` (so
`kprune.models.vgg(cfg=cfg)` rebuilds the narrow architecture), and saves
the fine-tuned model as a `.keras` file.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kprune import slimming  # noqa: E402
from kprune.models import vgg  # noqa: E402
from kprune.profile import format_count, profile  # noqa: E402

DIGITS_CFG = "16,16,M,32,32,M,64,64,M,128,128"


def load_data(name: str, seed: int) -> tuple:
    """`((x_train, y_train), (x_test, y_test))`, normalised images."""
    if name == "cifar10":
        from kprune.tools.datasets import cifar10

        return cifar10()
    from kprune.tools.datasets import digits

    (x, y), (xt, yt) = digits(image_size=16, channels=3, seed=seed)
    mean, std = x.mean(), x.std() + 1e-7
    return ((x - mean) / std, y), ((xt - mean) / std, yt)


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 4-pixel shifts and horizontal flips (CIFAR-10 only)."""
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    out = np.empty_like(x)
    h, w = x.shape[1:3]
    for i in range(len(x)):
        dy, dx = rng.integers(0, 9, size=2)
        image = padded[i, dy:dy + h, dx:dx + w]
        out[i] = image[:, ::-1] if rng.random() < 0.5 else image
    return out


def train(model, data, epochs: int, lr: float, batch_size: int, rules=(), augment_data=False,
          seed: int = 0) -> None:
    """SGD with momentum 0.9 and weight decay 1e-4; lr / 10 at 50% and 75% of the epochs."""
    from kprune.train import RuleOptimizer

    (x, y), _ = data
    steps = int(np.ceil(len(x) / batch_size))
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [steps * epochs // 2, steps * epochs * 3 // 4], [lr, lr / 10, lr / 100])
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-4)
    if rules:
        optimizer = RuleOptimizer(optimizer, list(rules))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        xe = augment(x, rng) if augment_data else x
        model.fit(xe, y, batch_size=batch_size, epochs=epoch + 1, initial_epoch=epoch,
                  verbose=2)


def accuracy(model, data) -> float:
    _, (xt, yt) = data
    return float(np.mean(np.argmax(model.predict(xt, batch_size=256, verbose=0), -1) == yt))


def parse_cfg(text: str) -> list:
    return [v if v == "M" else int(v) for v in text.split(",")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--depth", type=int, default=19, choices=(11, 13, 16, 19))
    parser.add_argument("--cfg", default=None,
                        help=f"VGG layer list instead of --depth (digits default: {DIGITS_CFG})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="sparse-training epochs (default 160 cifar10, 20 digits)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="fine-tuning epochs (default 160 cifar10, 10 digits)")
    parser.add_argument("--s", type=float, default=None,
                        help="L1 strength on gamma (default 1e-4 cifar10; 1e-2 digits, whose "
                             "run is 100x shorter)")
    parser.add_argument("--percent", type=float, default=0.7, help="share of channels removed")
    parser.add_argument("--lr", type=float, default=None, help="default 0.1 cifar10, 0.05 digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="vgg_slimmed.keras")
    args = parser.parse_args(argv)
    cifar = args.data == "cifar10"
    epochs = args.epochs or (160 if cifar else 20)
    finetune = args.finetune_epochs or (160 if cifar else 10)
    s = args.s if args.s is not None else (1e-4 if cifar else 1e-2)
    lr = args.lr or (0.1 if cifar else 0.05)
    keras.utils.set_random_seed(args.seed)

    data = load_data(args.data, args.seed)
    shape = data[0][0].shape[1:]
    cfg = parse_cfg(args.cfg) if args.cfg else (None if cifar else parse_cfg(DIGITS_CFG))
    model = vgg(args.depth, cfg=cfg, num_classes=10, input_shape=shape,
                classifier_activation=None)

    print(f"Sparse training: {epochs} epochs, s = {s:g}")
    train(model, data, epochs, lr, args.batch_size, rules=[slimming.rule(model, s)],
          augment_data=cifar, seed=args.seed)
    before = (accuracy(model, data), profile(model))

    small, new_cfg = slimming.prune(model, percent=args.percent)
    pruned = (accuracy(small, data), profile(small))
    print(f"Pruned cfg: {new_cfg}")

    print(f"Fine-tuning: {finetune} epochs")
    train(small, data, finetune, lr, args.batch_size, augment_data=cifar, seed=args.seed)
    tuned = (accuracy(small, data), profile(small))

    print(f"\n{'':<16}{'accuracy':>10}{'MACs':>12}{'params':>12}")
    for name, (acc, prof) in (("before", before), ("after pruning", pruned),
                              ("after fine-tune", tuned)):
        print(f"{name:<16}{acc:>10.2%}{format_count(prof.macs):>12}{format_count(prof.params):>12}")
    small.save(args.out)
    print(f"Saved {args.out}")
    return {"before": before[0], "pruned": pruned[0], "tuned": tuned[0], "cfg": new_cfg}


if __name__ == "__main__":
    main()
