"""Low-rank decomposition with ENC rank selection beside one-shot L1 channel pruning, on digits.

Offline (scikit-learn's bundled digits, upsampled, three identical channels,
split by `kprune.datasets.digits`; a fifth of the training images is held
out as the validation set `evaluate` reads, the test set is only reported).
Two models, each trained from scratch with SGD (momentum 0.9, weight decay
1e-4, cosine learning rate) for `--epochs`:

* VGG-16 in its CIFAR form (`kprune.models.vgg(16, cfg)`, 32x32 input),
  every width multiplied by `--vgg-width`;
* a CIFAR ResNet (`kprune.models.cifar_resnet`, depth `--depth`, first
  stage `--resnet-width`, 16x16 input).

For each MACs target in `--targets` (shares of the trained model's MACs,
`kprune.profile`), five compressed models start from the same trained one:

* `uniform`, `ENC-Map`, `ENC-Model`, `ENC-Inf`: `kprune.lowrank.select_ranks`
  with that method (per-layer metric `--metric`: singular-value energy, or
  the validation accuracy with one layer decomposed), then
  `kprune.lowrank.decompose` (Dense, Conv2D -> truncated SVD: channel or
  `k x 1 + 1 x k` spatial factors, whichever the method finds cheaper);
  ENC-Inf evaluates its `--candidates` best configurations on the
  validation set;
* `L1 prune`: `kprune.prune(model, flops_target=..., criterion="l1")`.

Each is then fine-tuned for `--finetune-epochs` (the same budget for all,
SGD at `--finetune-lr`). The table gives the test accuracy before
compression, right after it and after fine-tuning, MACs and parameters
(`kprune.profile`), the TFLite float32 latency at batch 1 over the trained
model's (timed as `bench/latency.py` times, with its helpers: every model of
an architecture converted by `kprune.export.tflite_bytes`, run by the
`ai_edge_litert` interpreter with `--threads` threads, in interleaved
rounds, medians), and the search time (`select_ranks`; for L1, the whole `prune` call).

The `--quick` models (VGG-16 at 1/8 width, 8 to 64 filters) have little
redundancy: any 25% cut costs most of their accuracy before fine-tuning, so
read its table for the mechanics (targets met, ranks chosen, latency,
search time) more than for the accuracy ranking.

Usage:

    TF_NUM_INTRAOP_THREADS=2 python bench/lowrank.py --quick    # about 8 minutes on 2 shared cores
    python bench/lowrank.py                     # full widths, 30 + 8 epochs: hours on a CPU
    python bench/lowrank.py --models vgg16 --targets 0.75 --metric accuracy --candidates 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow 2.21's oneDNN kernels corrupt the heap now and then while training the CIFAR
# ResNet at width 8 (double free, with plain Keras too); the portable kernels do not.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402
from bench.accuracy_digits import train  # noqa: E402
from bench.latency import set_threads, time_interleaved, tflite_runner  # noqa: E402
from kprune.models import cifar_resnet, vgg, vgg_cfg  # noqa: E402
from kprune.profile import format_count, profile  # noqa: E402
from kprune.tools.datasets import digits  # noqa: E402
from kprune.tools.export import tflite_bytes  # noqa: E402

METHODS = (("uniform", "uniform"), ("ENC-Map", "enc_map"), ("ENC-Model", "enc_model"),
           ("ENC-Inf", "enc_inf"))


def load(image_size: int, seed: int):
    """`(train, validation, test)` arrays, normalised with the training mean and spread."""
    (x, y), (xt, yt) = digits(image_size=image_size, channels=3, seed=seed)
    mean, std = x.mean(), x.std() + 1e-7
    x, xt = (x - mean) / std, (xt - mean) / std
    n_val = len(x) // 5
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val]), (xt, yt)


def accuracy(model, data) -> float:
    """Top-1 accuracy on `data[1]`, one eager call (no `predict` function traced per model)."""
    x, y = data[1]
    return float(np.mean(np.argmax(keras.ops.convert_to_numpy(model(x, training=False)), -1) == y))


def build(name: str, args, shape) -> keras.Model:
    if name == "vgg16":
        cfg = [v if v == "M" else max(1, int(round(v * args.vgg_width))) for v in vgg_cfg(16)]
        return vgg(cfg=cfg, input_shape=shape, classifier_activation=None)
    return cifar_resnet(args.depth, input_shape=shape, width=args.resnet_width,
                        classifier_activation=None)


def compress(label: str, method: str, model, target: float, args, evaluate):
    """(compressed model, search seconds)."""
    t0 = time.perf_counter()
    if method == "l1":
        return kprune.prune(model, flops_target=target, criterion="l1"), \
            time.perf_counter() - t0
    selection = kprune.lowrank.select_ranks(
        model, target, method, metric=args.metric, evaluate=evaluate,
        candidates=args.candidates, verbose=0)
    seconds = time.perf_counter() - t0
    small = kprune.lowrank.decompose(model, selection.ranks)
    kinds = [kind for kind, _ in selection.ranks.values()]
    print(f"    {label}: {len(selection.ranks)} layers decomposed ({kinds.count('spatial')} "
          f"spatial), metric {selection.score:.3f}, {seconds:.1f} s", flush=True)
    return small, seconds


def run_model(name: str, args) -> list:
    """One row per (target, method), after the trained model's row."""
    keras.utils.set_random_seed(args.seed)
    size = 32 if name == "vgg16" else 16
    train_set, val_set, test_set = load(size, args.seed)
    data = (train_set, test_set)
    model = build(name, args, train_set[0].shape[1:])
    t0 = time.perf_counter()
    train(model, data, args.epochs, args.lr, args.batch_size)
    base_acc = accuracy(model, data)
    print(f"  {name}: trained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s, "
          f"test accuracy {base_acc:.2%}", flush=True)

    def evaluate(m):  # validation accuracy: what ENC-Inf and the accuracy metric read
        return accuracy(m, (None, val_set))

    prof = profile(model)
    rows = [dict(model=name, target=None, method="trained", before=base_acc, after=base_acc,
                 final=base_acc, macs=prof.macs, params=prof.params, seconds=0.0, net=model)]
    for target in args.targets:
        for label, method in METHODS + (("L1 prune", "l1"),):
            small, seconds = compress(label, method, model, target, args, evaluate)
            after = accuracy(small, data)
            t0 = time.perf_counter()
            train(small, data, args.finetune_epochs, args.finetune_lr, args.batch_size)
            print(f"    {label}: fine-tuned in {time.perf_counter() - t0:.0f} s", flush=True)
            p = profile(small)
            assert p.macs <= target * prof.macs, (name, label, p.macs / prof.macs)
            rows.append(dict(model=name, target=target, method=label, before=base_acc,
                             after=after, final=accuracy(small, data), macs=p.macs,
                             params=p.params, seconds=seconds, net=small))
        print(f"  {name}: {target:.0%} of MACs done", flush=True)
    return rows


def time_tflite(rows: list, args) -> None:
    """Set `row["latency"]`: TFLite batch-1 latency over the trained model's, per architecture."""
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        t0 = time.perf_counter()
        runners = [tflite_runner(tflite_bytes(r["net"]), 1, args.threads) for r in mine]
        medians = time_interleaved(runners, args.repeats, 5, args.warmup)
        del runners
        for r, m in zip(mine, medians):
            r["latency"] = m / medians[0]
            del r["net"]
        print(f"  {name}: {len(mine)} TFLite models converted and timed in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


def print_table(rows: list, args) -> None:
    print(f"\ndigits, {args.epochs} epochs of training, {args.finetune_epochs} of fine-tuning "
          f"for every method, per-layer metric '{args.metric}', seed {args.seed}; latency = "
          f"TFLite fp32 batch 1, {args.threads} threads, / the trained model's")
    head = (f"{'model':<9}{'target':>7}  {'method':<11}{'acc before':>11}{'after':>8}"
            f"{'after FT':>9}{'MACs':>9}{'ratio':>7}{'params':>9}{'ratio':>7}{'latency':>8}"
            f"{'search s':>9}")
    print(head)
    print("-" * len(head))
    base = {}
    for r in rows:
        if r["target"] is None:
            base[r["model"]] = r
        b = base[r["model"]]
        target = "-" if r["target"] is None else f"{r['target']:.0%}"
        print(f"{r['model']:<9}{target:>7}  {r['method']:<11}{r['before']:>11.2%}"
              f"{r['after']:>8.2%}{r['final']:>9.2%}{format_count(r['macs']):>9}"
              f"{r['macs'] / b['macs']:>7.3f}{format_count(r['params']):>9}"
              f"{r['params'] / b['params']:>7.3f}{r['latency']:>8.3f}{r['seconds']:>9.1f}")
    print("\nENC paper (Kim et al., CVPR 2019), VGG-16: 25% fewer FLOPs at +0.7% accuracy over "
          "the uncompressed baseline (ENC-Inf, after fine-tuning).")


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("vgg16", "resnet"),
                        default=["vgg16", "resnet"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.75, 0.5],
                        help="shares of the trained model's MACs to keep")
    parser.add_argument("--metric", choices=("energy", "accuracy"), default="energy",
                        help="per-layer metric of the ENC methods")
    parser.add_argument("--candidates", type=int, default=8,
                        help="configurations ENC-Inf evaluates")
    parser.add_argument("--vgg-width", type=float, default=1.0,
                        help="multiplier of VGG-16's widths (64 ... 512)")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n + 2)")
    parser.add_argument("--resnet-width", type=int, default=16,
                        help="filters of the ResNet's first stage")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=8,
                        help="fine-tuning epochs after compression, for every method")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="VGG-16 at 1/8 width, ResNet-20 at width 8, 10 + 2 epochs, "
                             "6 candidates, 3 timing rounds (other options still apply)")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(vgg_width=0.125, resnet_width=8, epochs=10, finetune_epochs=2,
                            candidates=6, repeats=3, warmup=1)
        args = parser.parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows += run_model(name, args)
    time_tflite(rows, args)
    print_table(rows, args)
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
