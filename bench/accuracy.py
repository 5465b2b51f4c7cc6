"""Every kprune method at the same MACs targets and the same epoch budget.

One script, one table: for each MACs target (`--targets`, 50% and 25% by
default) and each seed (`--seeds`), every method trains for `--base-epochs`
+ `--epochs` epochs in all, with SGD (momentum 0.9, weight decay 1e-4) and
cosine learning rates (the helpers of `bench/accuracy_digits.py` and
`bench/slimming_digits.py`):

* unpruned: trained from scratch for the whole budget;
* L1 / Taylor one-shot + FT: the base model (`--base-epochs` of plain
  training), `kprune.prune(flops_target=..., criterion="l1" | "taylor")`
  (local scope, the same share of every group), then `--epochs` of
  fine-tuning; global L1: the same with `scope="global"`;
* ResRep: the base model, `--epochs` of ResRep, `convert`, no fine-tuning;
  "ResRep" ranks every channel against all others (the paper's
  `MaskScheduler(scope="global")`), "ResRep (local)" within its group.
  The schedule follows the budget as the paper does (warm-up, then masks
  every `interval` steps): warm-up `--resrep-warmup` of the ResRep steps,
  and `interval` / `granularity` chosen from the channels a global plan
  removes at the target so that the masks reach it at `--resrep-reach`
  (0.65) of the ResRep steps; the rest recovers. The step where the target
  was reached is printed;
* Network Slimming: `--base-epochs` with the L1 rule on BatchNormalization
  gammas instead of plain training, the global |gamma| threshold whose plan
  meets the MACs target (bisection on `percent`), `--epochs` of fine-tuning;
* SFP: the base model, 3/4 of `--epochs` with `SoftFilterPruning` at the
  per-group ratio that meets the target (`uniform_ratio`), `finalize` with
  the BatchNormalization statistics re-estimated on the training set
  (`finalize(data=x)`), the last 1/4 as plain fine-tuning;
* AGP (channel mode): the base model, `--epochs` with the cubic schedule
  reaching its final sparsity (the same ratio) at 60% of them, masks held
  to the end, `finalize`.

Data (`--data`):

* `mnist1d` (default): MNIST-1D generated offline (`kprune.datasets.mnist1d`,
  needs `pip install mnist1d`), `--n` sequences, 80/20 split, on a small
  Conv1D ResNet (`resnet1d`, about 20k parameters);
* `digits`: scikit-learn's digits at 16x16x3, `--folds`-fold (every image is
  tested once per seed: the accuracy is the mean over folds), on a CIFAR
  ResNet (`--depth`, 8 by default);
* `cifar10`: CIFAR-10 through `keras.datasets` (downloads once; needs
  network) on a CIFAR ResNet.

Columns: method, MACs target, test accuracy right after the pruning step
(for ResRep: the converted model; for SFP: after `finalize`) and at the end,
as mean ± spread (max - min over seeds and folds), MACs ratio to the unpruned
model, parameters. `--plot FILE.png` saves accuracy against MACs ratio when
matplotlib is importable.

Usage (times on 2 loaded CPU cores):

    python bench/accuracy.py --quick          # 1 seed, 50% and 25%, 5 + 8 epochs: ~6-10 minutes
    python bench/accuracy.py                  # 3 seeds, 50% and 25%, 10 + 20 epochs: ~3-3.5 hours
    python bench/accuracy.py --data digits --folds 5 --seeds 0
    python bench/accuracy.py --data cifar10 --seeds 0 1 2 --base-epochs 60 --epochs 100
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402
from accuracy_digits import LOSS, accuracy, sgd, train  # noqa: E402
from slimming_digits import compile_for  # noqa: E402
from kprune import slimming  # noqa: E402
from kprune.methods.agp import AGP  # noqa: E402
from kprune.methods.sfp import SoftFilterPruning  # noqa: E402
from kprune.models import cifar_resnet  # noqa: E402
from kprune.pruning import plan_macs, prune_plan  # noqa: E402
from kprune.graph.dependency import DependencyGraph  # noqa: E402
from kprune.surgeon import copy_model  # noqa: E402
from kprune.surgeon.plan import apply_plan  # noqa: E402
from kprune.tools import datasets  # noqa: E402
from kprune.train.masking import uniform_ratio  # noqa: E402

METHODS = ["unpruned", "L1 one-shot + FT", "Taylor one-shot + FT", "global L1 + FT", "ResRep",
           "ResRep (local)", "Network Slimming", "SFP", "AGP"]


# ---------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------
def resnet1d(input_shape=(40, 1), widths=(16, 32, 48), num_classes: int = 10,
             name: str = "resnet1d") -> keras.Model:
    """A small Conv1D ResNet: stem, one basic block per stage, global pooling.

    Stages after the first halve the length and use a 1x1 projection
    shortcut (with BatchNormalization). About 20k parameters with the
    default widths.
    """
    L = keras.layers
    inputs = keras.Input(shape=tuple(input_shape), name="input")

    def conv_bn(x, filters, kernel, strides, label):
        x = L.Conv1D(filters, kernel, strides=strides, padding="same", use_bias=False,
                     name=f"{label}_conv")(x)
        return L.BatchNormalization(name=f"{label}_bn")(x)

    x = L.ReLU(name="stem_relu")(conv_bn(inputs, widths[0], 5, 1, "stem"))
    for i, filters in enumerate(widths):
        strides = 1 if i == 0 else 2
        y = L.ReLU(name=f"s{i}_relu1")(conv_bn(x, filters, 3, strides, f"s{i}_a"))
        y = conv_bn(y, filters, 3, 1, f"s{i}_b")
        shortcut = x if strides == 1 and x.shape[-1] == filters else \
            conv_bn(x, filters, 1, strides, f"s{i}_proj")
        x = L.ReLU(name=f"s{i}_out")(L.Add(name=f"s{i}_add")([y, shortcut]))
    x = L.GlobalAveragePooling1D(name="pool")(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def splits(args, seed: int) -> list:
    """[(data, new_model)] for one seed: one entry, or one per fold for digits."""
    if args.data == "mnist1d":
        data = datasets.mnist1d(n=args.n, seed=seed)
        shape = data[0][0].shape[1:]
        return [(data, lambda: resnet1d(shape))]
    if args.data == "digits":
        out = []
        for (x, y), (xt, yt) in datasets.digits_folds(args.folds, image_size=16, channels=3,
                                                      seed=seed):
            mean, std = x.mean(), x.std() + 1e-7
            data = ((x - mean) / std, y), ((xt - mean) / std, yt)
            out.append((data, lambda: cifar_resnet(args.depth, input_shape=(16, 16, 3),
                                                   classifier_activation=None)))
        return out
    data = datasets.cifar10()
    return [(data, lambda: cifar_resnet(args.depth, input_shape=(32, 32, 3),
                                        classifier_activation=None))]


# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------
def slimming_to(model, target: float):
    """Network Slimming's global |gamma| threshold whose plan keeps <= `target` of the MACs."""
    graph = DependencyGraph(model)
    base = plan_macs(graph, {})
    lo, hi = 0.0, 0.99
    for _ in range(14):
        mid = (lo + hi) / 2
        plan, _ = slimming.plan(model, mid, graph=graph)
        lo, hi = (lo, mid) if plan_macs(graph, plan) <= target * base else (mid, hi)
    plan, _ = slimming.plan(model, hi, graph=graph)
    return apply_plan(model, plan, graph), hi


def resrep(args, base, data, target: float, steps_per_epoch: int, scope: str = "global") -> tuple:
    """ResRep scheduled on the budget; returns (converted model, step the target was met)."""
    total = args.epochs * steps_per_epoch
    warmup = max(int(args.resrep_warmup * total), 1)
    reach = max(int(args.resrep_reach * total), warmup + 1)
    # Channels a global magnitude plan drops at the target: what ResRep must mask.
    plan = prune_plan(base, flops_target=target, criterion="l2", scope="global")
    needed = float(max(sum(len(c) for c in plan.values()), 1))
    granularity = max(int(math.ceil(needed / 40)), 1)  # at most ~40 updates
    interval = max(int((reach - warmup) * granularity / needed), 1)
    rr = kprune.resrep.attach(base, lam=args.lam)
    scheduler = kprune.resrep.MaskScheduler(target, warmup_steps=warmup, interval=interval,
                                            granularity=granularity, scope=scope)
    met = {}

    class Reached(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ratio = scheduler.macs_ratio
            if "step" not in met and ratio is not None and ratio <= target + 1e-9:
                met["step"] = scheduler.step()

    kprune.resrep.compile(rr, sgd(args.ft_lr, total), LOSS, metrics=["accuracy"])
    (x, y), _ = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rr.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
               callbacks=[scheduler, Reached()], verbose=0)
    for w in caught:
        if "MaskScheduler" in str(w.message):
            print(f"  ResRep warning: {w.message}")
    small = kprune.resrep.convert(rr, verbose=0)
    return small, met.get("step", -1) / max(total, 1)


def run_split(args, data, new_model, seed: int, targets) -> dict:
    """{(method, target): (acc after pruning, final acc, MACs, params)} for one split."""
    (x, y), _ = data
    spe = int(np.ceil(len(x) / args.batch_size))
    budget = args.base_epochs + args.epochs
    out = {}

    def record(name, target, model, after):
        prof = kprune.profile(model)
        out[(name, target)] = (after, accuracy(model, data), prof.macs, prof.params)

    def timed(label):
        print(f"  seed {seed} {label}: {time.time() - start:.0f} s", flush=True)

    start = time.time()
    keras.utils.set_random_seed(seed)
    full = new_model()
    train(full, data, budget, args.lr, args.batch_size)
    record("unpruned", None, full, None)
    timed("unpruned")

    keras.utils.set_random_seed(seed)
    base = new_model()
    train(base, data, args.base_epochs, args.lr, args.batch_size)

    keras.utils.set_random_seed(seed)
    sparse = new_model()
    compile_for(sparse, args.lr, args.base_epochs * spe, [slimming.rule(sparse, s=args.s)])
    sparse.fit(x, y, batch_size=args.batch_size, epochs=args.base_epochs, verbose=0)

    probe = (x[:512], y[:512])
    for target in targets:
        for name, kwargs in (("L1 one-shot + FT", dict(criterion="l1")),
                             ("Taylor one-shot + FT", dict(criterion="taylor", data=probe,
                                                           loss=LOSS)),
                             ("global L1 + FT", dict(criterion="l1", scope="global"))):
            keras.utils.set_random_seed(seed)
            pruned = kprune.prune(base, flops_target=target, **kwargs)
            after = accuracy(pruned, data)
            train(pruned, data, args.epochs, args.ft_lr, args.batch_size)
            record(name, target, pruned, after)
            timed(f"{name} {target:.0%}")

        for name, scope in (("ResRep", "global"), ("ResRep (local)", "local")):
            keras.utils.set_random_seed(seed)
            small, reached = resrep(args, copy_model(base), data, target, spe, scope)
            acc = accuracy(small, data)
            out[(name, target)] = (acc, acc, kprune.profile(small).macs,
                                   kprune.profile(small).params)
            out[(f"{name} reach", target)] = reached
            timed(f"{name} {target:.0%} (target met at {reached:.0%} of its steps)")

        keras.utils.set_random_seed(seed)
        slim, percent = slimming_to(sparse, target)
        after = accuracy(slim, data)
        train(slim, data, args.epochs, args.ft_lr, args.batch_size)
        record("Network Slimming", target, slim, after)
        timed(f"Network Slimming {target:.0%} (percent {percent:.3f})")

        ratio = uniform_ratio(base, target)
        keras.utils.set_random_seed(seed)
        model = copy_model(base)
        soft = max(int(round(0.75 * args.epochs)), 1)
        sfp = SoftFilterPruning(ratio)
        train(model, data, soft, args.ft_lr, args.batch_size, callbacks=[sfp])
        pruned = sfp.finalize(data=x, batch_size=args.batch_size)  # statistics re-estimated
        after = accuracy(pruned, data)
        if args.epochs - soft > 0:
            train(pruned, data, args.epochs - soft, args.ft_lr / 4, args.batch_size)
        record("SFP", target, pruned, after)
        timed(f"SFP {target:.0%} (ratio {ratio:.3f})")

        keras.utils.set_random_seed(seed)
        model = copy_model(base)
        n_steps = 8
        frequency = max(int(0.6 * args.epochs * spe) // n_steps, 1)
        agp = AGP(ratio, start_step=0, n_steps=n_steps, frequency=frequency)
        train(model, data, args.epochs, args.ft_lr, args.batch_size, callbacks=[agp])
        pruned = agp.finalize()
        record("AGP", target, pruned, accuracy(pruned, data))
        timed(f"AGP {target:.0%}")
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def summarise(results: list, targets) -> list:
    """Rows (method, target, after mean, after spread, final mean, spread, MACs ratio, params)."""
    rows = []
    base_macs = np.mean([r[("unpruned", None)][2] for r in results])
    for name in METHODS:
        for target in ([None] if name == "unpruned" else targets):
            values = [r[(name, target)] for r in results]
            after = [v[0] for v in values if v[0] is not None]
            final = np.array([v[1] for v in values])
            reach = [r[(f"{name} reach", target)] for r in results] \
                if name.startswith("ResRep") else []
            rows.append(dict(
                method=name, target=target,
                after=(np.mean(after), np.ptp(after)) if after else None,
                final=(final.mean(), np.ptp(final)),
                macs=np.mean([v[2] for v in values]) / base_macs,
                params=int(np.mean([v[3] for v in values])),
                reach=np.mean(reach) if reach else None,
                seeds=[float(v) for v in final]))
    return rows


def print_table(rows) -> None:
    header = (f"{'method':<22}{'target':>7}{'acc after pruning':>20}{'acc final':>18}"
              f"{'MACs ratio':>12}{'params':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:.0%}"
        after = "-" if r["after"] is None else f"{r['after'][0]:.2%} ± {r['after'][1]:.2%}"
        final = f"{r['final'][0]:.2%} ± {r['final'][1]:.2%}"
        note = "" if r["reach"] is None else f"  (target met at {r['reach']:.0%} of its steps)"
        runs = "  runs: " + " ".join(f"{v:.2%}" for v in r["seeds"]) if len(r["seeds"]) > 1 else ""
        print(f"{r['method']:<22}{target:>7}{after:>20}{final:>18}{r['macs']:>12.1%}"
              f"{r['params']:>9,}{runs}{note}")


def plot(rows, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in METHODS:
        mine = [r for r in rows if r["method"] == name]
        xs = [r["macs"] for r in mine]
        ys = [r["final"][0] for r in mine]
        errs = [r["final"][1] / 2 for r in mine]
        ax.errorbar(xs, ys, yerr=errs, marker="*" if name == "unpruned" else "o",
                    capsize=3, label=name, linestyle="-" if len(xs) > 1 else "none")
    ax.set_xlabel("MACs ratio to the unpruned model")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["mnist1d", "digits", "cifar10"], default="mnist1d")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 5 + 8 epochs, 4,000 sequences (mnist1d), 2 folds (digits)")
    parser.add_argument("--n", type=int, default=10000, help="mnist1d sequences (train + test)")
    parser.add_argument("--folds", type=int, default=5, help="digits folds")
    parser.add_argument("--depth", type=int, default=8, help="CIFAR ResNet depth (digits, cifar10)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20,
                        help="epochs after the base model: ResRep, SFP, AGP, fine-tuning")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate from scratch")
    parser.add_argument("--ft-lr", type=float, default=0.02,
                        help="learning rate of ResRep, SFP, AGP and fine-tuning")
    parser.add_argument("--lam", type=float, default=1e-3, help="ResRep's Res rule strength")
    parser.add_argument("--resrep-warmup", type=float, default=0.1,
                        help="share of the ResRep steps before the first mask")
    parser.add_argument("--resrep-reach", type=float, default=0.65,
                        help="share of the ResRep steps by which the target should be met")
    parser.add_argument("--s", type=float, default=1e-3, help="Network Slimming's L1 on gamma")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--plot", default=None, help="save accuracy against MACs to this PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.base_epochs, args.epochs, args.n, args.folds = 5, 8, 4000, 2
    start = time.time()
    results = []
    for seed in args.seeds:
        for data, new_model in splits(args, seed):
            results.append(run_split(args, data, new_model, seed, args.targets))
    rows = summarise(results, args.targets)
    title = (f"{args.data}, {args.base_epochs} + {args.epochs} epochs for every method, "
             f"seeds {args.seeds}")
    print(f"\n{title}, {len(results)} run(s), {time.time() - start:.0f} s")
    print_table(rows)
    if args.plot:
        plot(rows, args.plot, title)


if __name__ == "__main__":
    main()
