"""NetAdapt against a measured-latency budget, beside uniform and global L1, on digits.

Offline (scikit-learn's bundled digits, 8x8 upsampled to `--image-size` RGB,
normalised; 15% of the training split held out for the search's evaluator),
on two trained models:

* `resnet20`: the CIFAR ResNet-20 of `kprune.models.cifar_resnet`;
* `mobilenetv2`: a MobileNetV2-style net (`mobilenet_v2_style` below: a
  stem, inverted residual blocks of expand 1x1 / depthwise 3x3 / linear
  project 1x1 with residual adds, global pooling, one Dense), small enough
  for digits.

Each model is trained `--base-epochs` (SGD, momentum 0.9, weight decay 1e-4,
cosine learning rate: `bench/accuracy_digits.py`'s `train`), then pruned to
keep `--target` of its measured latency (runtime Keras, a `tf.function`,
batch `--batch`, `--threads` threads) by three methods, each followed by the
same `--ft-epochs` of fine-tuning:

* NetAdapt: `kprune.search.netadapt(model, evaluate, kprune.search.latency(
  target, ...), finetune=..., long_finetune=..., step=--step)`; `evaluate`
  is the held-out accuracy, `finetune` runs `--short-steps` eager SGD steps
  on each proposal (0: none), `long_finetune` is the common fine-tune;
* uniform L1: `kprune.prune(model, latency_target=target, criterion="l1")`,
  the same share of every group;
* global L1: the same with `scope="global"`, one ranking over all groups.

Where `kprune.prune(latency_target=...)` is missing or finds the target out
of reach on its measurements, the L1 baseline takes `flops_target` equal to
NetAdapt's MACs share instead; the table marks it with `*`.

The table gives, per model and method, the test accuracy (mean over
`--seeds`, and the spread), the MACs ratio (`kprune.profile`), the latency
ratio measured at the end for every model of a seed in alternating rounds
(`kprune.latency.measure_interleaved`, so load changes touch all alike), the
share NetAdapt itself measured, and the wall time of the search (NetAdapt
without its long fine-tune, which every method gets; `prune` for L1).

Usage:

    python bench/search.py --quick          # one seed, short schedules: ~6 CPU-minutes on 2 cores
    python bench/search.py                  # both models, 2 seeds, short fine-tunes in the search
    python bench/search.py --models resnet20 --seeds 0 1 2 --step 0.05 --short-steps 20
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kprune  # noqa: E402
from accuracy_digits import LOSS, train  # noqa: E402
from latency import set_threads  # noqa: E402
from kprune.latency import measure_interleaved  # noqa: E402
from kprune.models import cifar_resnet  # noqa: E402
from kprune.tools.datasets import digits  # noqa: E402

L = keras.layers
METHODS = ("NetAdapt", "uniform L1", "global L1")


def mobilenet_v2_style(input_shape, num_classes: int = 10, width: int = 16) -> keras.Model:
    """A small MobileNetV2: (expansion, filters, blocks, stride) stages of inverted residuals."""
    stages = ((1, width, 1, 1), (6, int(1.5 * width), 2, 2), (6, 2 * width, 2, 2),
              (6, 4 * width, 2, 1))

    def conv_bn(x, filters, kernel, strides, name, relu=True):
        x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                     name=name)(x)
        x = L.BatchNormalization(momentum=0.9, name=name + "_bn")(x)
        return L.ReLU(6.0, name=name + "_relu")(x) if relu else x

    inputs = keras.Input(input_shape, name="input")
    x = conv_bn(inputs, 2 * width, 3, 1, "stem")
    for s, (t, filters, n, stride) in enumerate(stages):
        for b in range(n):
            name, cin = f"block{s + 1}_{b + 1}", x.shape[-1]
            y = conv_bn(x, t * cin, 1, 1, name + "_expand") if t != 1 else x
            y = L.DepthwiseConv2D(3, strides=stride if b == 0 else 1, padding="same",
                                  use_bias=False, name=name + "_dw")(y)
            y = L.BatchNormalization(momentum=0.9, name=name + "_dw_bn")(y)
            y = L.ReLU(6.0, name=name + "_dw_relu")(y)
            y = conv_bn(y, filters, 1, 1, name + "_project", relu=False)
            x = L.Add(name=name + "_add")([x, y]) if b > 0 or (stride == 1 and cin == filters) \
                else y
    x = conv_bn(x, 8 * width, 1, 1, "head")
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, L.Dense(num_classes, name="predictions")(x), name="mobilenetv2")


def build(name: str, shape) -> keras.Model:
    if name == "resnet20":
        return cifar_resnet(20, input_shape=shape, classifier_activation=None)
    return mobilenet_v2_style(shape)


def load(seed: int, size: int):
    """`(train, val, test)` arrays: digits normalised by the training mean and spread."""
    (x, y), (xt, yt) = digits(image_size=size, channels=3, seed=seed)
    mean, std = x.mean(), x.std() + 1e-7
    x, xt = (x - mean) / std, (xt - mean) / std
    n_val = int(round(0.15 * len(x)))
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val]), (xt, yt)


def eager_accuracy(model, x, y, batch: int = 512) -> float:
    """Accuracy from plain model calls (no `predict` function to trace per model)."""
    hits = 0
    for i in range(0, len(x), batch):
        logits = keras.ops.convert_to_numpy(model(x[i:i + batch], training=False))
        hits += int(np.sum(np.argmax(logits, -1) == y[i:i + batch]))
    return hits / len(x)


def has_latency_target() -> bool:
    return "latency_target" in inspect.signature(kprune.prune).parameters


def run_seed(args, name: str, seed: int) -> dict:
    """Method -> row of one seed, plus the base model's row."""
    keras.utils.set_random_seed(seed)
    (x, y), (xv, yv), (xt, yt) = load(seed, args.image_size)
    shape = x.shape[1:]
    base = build(name, shape)
    t0 = time.perf_counter()
    train(base, ((x, y), None), args.base_epochs, args.lr, args.batch_size)
    print(f"  {name} seed {seed}: trained {args.base_epochs} epochs "
          f"({time.perf_counter() - t0:.0f}s), test accuracy {eager_accuracy(base, xt, yt):.2%}",
          flush=True)
    rng = np.random.default_rng(seed)
    timing = dict(runtime="keras", batch_size=args.batch, threads=args.threads)

    def fine_tune(model, epochs):
        train(model, ((x, y), None), epochs, args.ft_lr, args.batch_size)

    def short_finetune(model):  # eager steps: a `fit` would trace a train step per proposal
        optimizer = keras.optimizers.SGD(args.ft_lr, momentum=0.9)
        for _ in range(args.short_steps):
            take = rng.choice(len(x), args.batch_size, replace=False)
            with tf.GradientTape() as tape:
                loss = LOSS(y[take], model(x[take], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

    long_seconds = []

    def long_finetune(model):
        t = time.perf_counter()
        fine_tune(model, args.ft_epochs)
        long_seconds.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kprune.KprunWarning)
        result = kprune.search.netadapt(
            base, lambda m: eager_accuracy(m, xv, yv),
            kprune.search.latency(args.target, cache_dir=args.cache_dir, runs=args.runs,
                                  warmup=args.warmup, **timing),
            finetune=short_finetune if args.short_steps else None, long_finetune=long_finetune,
            step=args.step, verbose=args.verbose, time_limit=args.time_limit)
    searched = time.perf_counter() - t0 - sum(long_seconds)
    print(f"  {name} seed {seed}: NetAdapt {len(result.history)} trials, {searched:.0f}s, "
          f"measured {result.budget:.3f} of the latency"
          + (f" (stopped: {result.reason})" if result.stopped else ""), flush=True)
    models = {"NetAdapt": (result.model, searched, result.budget)}
    macs_share = kprune.profile(result.model).macs / kprune.profile(base).macs
    notes = {}
    for method, scope in (("uniform L1", "local"), ("global L1", "global")):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kprune.KprunWarning)
            small = None
            if has_latency_target():
                try:
                    small = kprune.prune(base, latency_target=args.target, criterion="l1",
                                         scope=scope, verbose=0, **timing)
                except kprune.KprunError as exc:  # measured out of reach: match NetAdapt's MACs
                    notes[method] = str(exc).split(". `")[0].split(": ", 1)[-1]
            else:
                notes[method] = "no latency_target in kprune.prune"
            if small is None:
                small = kprune.prune(base, flops_target=macs_share, criterion="l1", scope=scope)
        spent = time.perf_counter() - t0
        fine_tune(small, args.ft_epochs)
        models[method] = (small, spent, None)
        print(f"  {name} seed {seed}: {method} pruned ({spent:.0f}s"
              + (f"; flops_target={macs_share:.3f}, as NetAdapt's MACs: {notes[method]}"
                 if method in notes else "") + ") and fine-tuned", flush=True)
    order = [base] + [models[m][0] for m in METHODS]
    times = measure_interleaved(order, runs=args.repeats, **timing)
    base_prof = kprune.profile(base)
    rows = {"unpruned": dict(acc=eager_accuracy(base, xt, yt), macs=1.0, latency=1.0,
                             own=None, seconds=0.0, note=False)}
    for i, method in enumerate(METHODS):
        model, seconds, own = models[method]
        rows[method] = dict(acc=eager_accuracy(model, xt, yt),
                            macs=kprune.profile(model).macs / base_prof.macs,
                            latency=times[i + 1] / times[0], own=own, seconds=seconds,
                            note=method in notes)
    return rows


def print_table(name: str, results: list, args) -> None:
    print(f"\n{name}: digits {args.image_size}x{args.image_size}x3, latency target "
          f"{args.target:.0%} (keras, batch {args.batch}, {args.threads} threads), "
          f"{args.base_epochs} base + {args.ft_epochs} fine-tune epochs, NetAdapt step "
          f"{args.step}, {args.short_steps} short fine-tune batches, seeds {args.seeds}")
    print(f"{'method':<12}{'acc':>8}{'spread':>8}{'MACs':>8}{'latency':>9}{'own meas.':>11}"
          f"{'search s':>10}")
    for method in ("unpruned",) + METHODS:
        vals = [r[method] for r in results]
        acc = np.array([v["acc"] for v in vals])
        own = [v["own"] for v in vals if v["own"] is not None]
        flagged = sum(v["note"] for v in vals)
        label = method + ("*" if flagged else "")
        print(f"{label:<12}{acc.mean():>8.2%}{acc.max() - acc.min():>8.2%}"
              f"{np.mean([v['macs'] for v in vals]):>8.3f}"
              f"{np.mean([v['latency'] for v in vals]):>9.3f}"
              f"{(f'{np.mean(own):.3f}' if own else '-'):>11}"
              f"{np.mean([v['seconds'] for v in vals]):>10.1f}")
    if any(r[m]["note"] for r in results for m in METHODS):
        print("* in some seeds, pruned with flops_target = NetAdapt's MACs share: "
              "`kprune.prune(latency_target=...)` could not reach the target (or is missing)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"],
                        choices=["resnet20", "mobilenetv2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--target", type=float, default=0.5,
                        help="share of the measured latency to keep")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128,
                        help="batch of the timed calls (large enough that compute, not the "
                             "runtime's fixed overhead, dominates at 16x16)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--base-epochs", type=int, default=8)
    parser.add_argument("--ft-epochs", type=int, default=4,
                        help="fine-tune epochs after pruning, the same for every method")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ft-lr", type=float, default=0.02,
                        help="learning rate of every fine-tune (short and long)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--step", type=float, default=0.1,
                        help="NetAdapt: share of the original latency removed per iteration")
    parser.add_argument("--short-steps", type=int, default=10,
                        help="NetAdapt: SGD steps (eager) of each proposal's short fine-tune")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="NetAdapt: seconds after which it returns its best so far")
    parser.add_argument("--runs", type=int, default=20,
                        help="timed calls of each latency measurement during the search")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls before each latency measurement during the search")
    parser.add_argument("--repeats", type=int, default=30, help="rounds of the final timing")
    parser.add_argument("--cache-dir", default=None, help="latency tables' cache")
    parser.add_argument("--verbose", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, fewer epochs, step 0.2, 3-step short fine-tunes, "
                             "shorter timings")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.base_epochs, args.ft_epochs, args.short_steps = [0], 3, 2, 3
        args.step, args.runs, args.warmup, args.repeats = 0.2, 10, 1, 10
    set_threads(args.threads)
    tf.get_logger().setLevel("ERROR")  # retracing notes of the many timed models
    start = time.perf_counter()
    out = {}
    for name in args.models:
        out[name] = [run_seed(args, name, seed) for seed in args.seeds]
    for name in args.models:
        print_table(name, out[name], args)
    print(f"\nTotal {time.perf_counter() - start:.0f}s.")
    return out


if __name__ == "__main__":
    main()
