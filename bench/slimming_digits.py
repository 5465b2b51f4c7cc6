"""Network Slimming, SFP and AGP on digits at the same MACs; RePr against plain training.

Offline (scikit-learn's bundled digits, 8x8 upsampled to 16x16 RGB), on a
small CIFAR-style VGG (`kprune.models.vgg` with CFG below). One run prints:

* Network Slimming: train with the L1 rule on BatchNorm gammas, prune 50% and
  70% of the channels with one global |gamma| threshold, fine-tune;
* SFP and AGP (channel mode), starting from a plainly trained model, with the
  per-layer ratio whose MACs match each slimmed model (`uniform_ratio`);
* RePr: train from scratch with the RePr schedule, same epochs as the plain
  baseline.

Columns: accuracy before pruning (the trained model the method starts
from), right after pruning, after fine-tuning, and MACs / parameters of the
final model (`kprune.profile`). What "after pruning" means per method:

* slimming: the narrow model right after surgery, before fine-tuning;
* SFP: the pruned model after half of the fine-tuning epochs with SFP
  (soft masks, L2 per layer, zeroed at each epoch end, then `finalize`);
  "after fine-tune" after the remaining half, trained as a plain model;
* AGP: the model when the schedule reaches its final sparsity (half of the
  fine-tuning epochs); "after fine-tune" after the remaining half with the
  masks held, pruned.

Every method gets the same epochs: `--epochs` to train, `--finetune-epochs`
after. Usage:

    python bench/slimming_digits.py                 # about 10 minutes on 2 CPU cores
    python bench/slimming_digits.py --epochs 10 --finetune-epochs 6 --seeds 0
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kprune import slimming  # noqa: E402
from kprune.methods.agp import AGP  # noqa: E402
from kprune.tools.datasets import digits  # noqa: E402
from kprune.train.masking import uniform_ratio  # noqa: E402
from kprune.models import vgg  # noqa: E402
from kprune.profile import profile  # noqa: E402
from kprune.methods.repr import RePr  # noqa: E402
from kprune.methods.sfp import SoftFilterPruning  # noqa: E402
from kprune.surgeon import copy_model  # noqa: E402

CFG = [16, 16, "M", 32, 32, "M", 64, 64, "M", 128, 128]
BATCH = 64


def load(seed: int):
    (x, y), (xt, yt) = digits(image_size=16, channels=3, seed=seed)
    mean, std = x.mean(), x.std() + 1e-7
    return ((x - mean) / std, y), ((xt - mean) / std, yt)


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return vgg(cfg=CFG, input_shape=(16, 16, 3), classifier_activation=None)


def compile_for(model, lr: float, steps: int, rules=()) -> None:
    """SGD with momentum, cosine decay over `steps`, and the given update rules."""
    optimizer = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr, max(steps, 1)),
                                     momentum=0.9, weight_decay=1e-4)
    if rules:
        from kprune.train import RuleOptimizer

        optimizer = RuleOptimizer(optimizer, list(rules))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def fit(model, data, epochs: int, lr: float, callbacks=(), rules=(), seed: int = 0) -> None:
    (x, y), _ = data
    steps = epochs * int(np.ceil(len(x) / BATCH))
    compile_for(model, lr, steps, rules)
    keras.utils.set_random_seed(seed)
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=list(callbacks))


def accuracy(model, data) -> float:
    _, (xt, yt) = data
    logits = model.predict(xt, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == yt))


def row(method, before, after, tuned, model, base, seconds):
    p = profile(model)
    return dict(method=method, before=before, after=after, tuned=tuned, macs=p.macs,
                macs_share=p.macs / base.macs, params=p.params,
                params_share=p.params / base.params, seconds=seconds)


def run(seed: int, args) -> list:
    data = load(seed)
    rows = []
    e, f, lr, ft_lr = args.epochs, args.finetune_epochs, args.lr, args.finetune_lr

    t = time.time()
    plain = build(seed)
    fit(plain, data, e, lr, seed=seed)
    base = profile(plain)
    acc_plain = accuracy(plain, data)
    rows.append(row("plain training", acc_plain, None, None, plain, base, time.time() - t))

    t = time.time()
    sparse = build(seed)
    fit(sparse, data, e, lr, rules=[slimming.rule(sparse, s=args.s)], seed=seed)
    acc_sparse = accuracy(sparse, data)
    rows.append(row(f"L1 on gamma (s={args.s:g})", acc_sparse, None, None, sparse, base,
                    time.time() - t))

    if args.repr:
        t = time.time()
        model = build(seed)
        per = max(e // (6 * args.repr_cycles), 1)  # the cycles take the first half
        cb = RePr(s1=2 * per, s2=per, cycles=args.repr_cycles, ratio=0.3, unit="epoch",
                  seed=seed)
        fit(model, data, e, lr, callbacks=[cb], seed=seed)
        rows.append(row(f"RePr (S1={2 * per}, S2={per} epochs, N={args.repr_cycles}, p=0.3)",
                        accuracy(model, data), None, None, model, base, time.time() - t))

    for percent in args.percents:
        t = time.time()
        small, cfg = slimming.prune(sparse, percent)
        after = accuracy(small, data)
        fit(small, data, f, ft_lr, seed=seed)
        slim = row(f"slimming {percent:.0%}", acc_sparse, after, accuracy(small, data), small,
                   base, time.time() - t)
        slim["cfg"] = cfg
        rows.append(slim)
        ratio = uniform_ratio(plain, slim["macs_share"])

        t = time.time()
        model = copy_model(plain)
        half = max(f // 2, 1)
        sfp = SoftFilterPruning(ratio)
        fit(model, data, half, ft_lr, callbacks=[sfp], seed=seed)
        pruned = sfp.finalize()
        after = accuracy(pruned, data)
        fit(pruned, data, f - half, ft_lr, seed=seed)
        rows.append(row(f"SFP ratio {ratio:.3f}", acc_plain, after, accuracy(pruned, data),
                        pruned, base, time.time() - t))

        t = time.time()
        model = copy_model(plain)
        steps = int(np.ceil(len(data[0][0]) / BATCH))
        n_steps = 8
        cb = AGP(ratio, start_step=0, n_steps=n_steps, frequency=max(half * steps // n_steps, 1))
        fit(model, data, half, ft_lr, callbacks=[cb], seed=seed)
        after = accuracy(model, data)
        fit(model, data, f - half, ft_lr, callbacks=[cb], seed=seed)
        pruned = cb.finalize()
        rows.append(row(f"AGP to {ratio:.3f}", acc_plain, after, accuracy(pruned, data), pruned,
                        base, time.time() - t))
    return rows


def fmt(value, pct=True):
    if value is None:
        return "-"
    return f"{value:.2%}" if pct else f"{value:,}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--s", type=float, default=1e-2,
                        help="L1 strength on gamma (the paper's 1e-4 assumes ~60k steps)")
    parser.add_argument("--percents", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repr-cycles", type=int, default=3)
    parser.add_argument("--no-repr", dest="repr", action="store_false")
    args = parser.parse_args(argv)

    print(f"digits 16x16, VGG cfg {CFG}, {args.epochs} epochs + {args.finetune_epochs} "
          f"fine-tune, batch {BATCH}, SGD momentum 0.9, cosine lr {args.lr} / "
          f"{args.finetune_lr}, weight decay 1e-4")
    header = (f"{'seed':>4}  {'method':<44} {'before':>8} {'pruned':>8} {'tuned':>8} "
              f"{'MACs':>11} {'MACs %':>7} {'params':>9} {'params %':>8} {'s':>6}")
    print(header)
    print("-" * len(header))
    for seed in args.seeds:
        for r in run(seed, args):
            print(f"{seed:>4}  {r['method']:<44} {fmt(r['before']):>8} {fmt(r['after']):>8} "
                  f"{fmt(r['tuned']):>8} {r['macs']:>11,} {r['macs_share']:>7.1%} "
                  f"{r['params']:>9,} {r['params_share']:>8.1%} {r['seconds']:>6.0f}")
            if "cfg" in r:
                print(f"{'':>6}cfg {r['cfg']}")


if __name__ == "__main__":
    main()
