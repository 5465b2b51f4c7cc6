"""Searches against a measured-latency budget, beside uniform and global L1, on digits.

Offline (scikit-learn's bundled digits, 8x8 upsampled to `--image-size` RGB,
normalised; 15% of the training split held out for the searches' evaluator),
on two trained models:

* `resnet20`: the CIFAR ResNet-20 of `kprune.models.cifar_resnet`;
* `mobilenetv2`: a MobileNetV2-style net (`mobilenet_v2_style` below: a
  stem, inverted residual blocks of expand 1x1 / depthwise 3x3 / linear
  project 1x1 with residual adds, global pooling, one Dense), small enough
  for digits.

Each model is trained `--base-epochs` (SGD, momentum 0.9, weight decay 1e-4,
cosine learning rate: `bench/accuracy_digits.py`'s `train`), then pruned to
keep `--target` of its measured latency (`--runtime`: Keras, a
`tf.function`, or TFLite on `ai_edge_litert`, steadier on small models;
batch `--batch`, `--threads` threads) by each method, each followed by the
same `--ft-epochs` of fine-tuning (the searches' `long_finetune`):

* NetAdapt: `kprune.search.netadapt(model, evaluate, kprune.search.latency(
  target, ...), finetune=..., long_finetune=..., step=--step)`; `evaluate`
  is the held-out accuracy, `finetune` runs `--short-steps` eager SGD steps
  on each candidate (0: none) in every search;
* annealing: `kprune.search.simulated_annealing` (temperatures `--sa-start`
  to `--sa-stop`, cool-down `--sa-rate`, in units of accuracy);
* AutoCompress: `kprune.autocompress` (`--ac-iterations` iterations, each an
  annealing walk at `--ac-sa-rate`, then `--admm-iterations` x
  `--admm-epochs` ADMM epochs at `--rho`; its ADMM epochs are training the
  other methods do not get);
* AMC: `kprune.search.amc` (`--episodes`, `--amc-warmup` of them random);
* uniform L1: `kprune.prune(model, latency_target=t, criterion="l1")`,
  the same share of every group, where `t` is the latency share the first
  search measured on its own model (at most the target). `prune` settles
  anywhere in a band 0.01-0.04 under its target, so by default (`--match
  measured`) each baseline is also pruned at `t + 0.02` and `t + 0.04` (at
  most the target), every candidate is timed in the final rounds, and the
  one measured closest to the first search's model is kept and fine-tuned,
  so the methods compare at equal measured latency (`--match search`: `t`
  only; `--match target`: the target itself);
* global L1: the same with `scope="global"`, one ranking over all groups.

Where `kprune.prune(latency_target=...)` is missing or finds the target out
of reach on its measurements, the L1 baselines take `flops_target` equal to
the first search's MACs share instead; the table marks it with `*`.

The table gives, per model and method, the test accuracy over `--seeds`
(mean, sample standard deviation and range), the MACs ratio
(`kprune.profile`), the latency ratio measured at the end for every model of
a seed in alternating rounds (`kprune.latency.measure_interleaved`, so load
changes touch all alike; mean and std), the share the search itself
measured, and the wall time of the search (without the long fine-tune,
which every method gets; `prune` for L1). A last line compares NetAdapt with
uniform L1: the difference of mean accuracy, the larger of their seed
standard deviations, the per-seed differences, and whether NetAdapt is
ahead by more than that spread.

Usage:

    python bench/search.py --quick          # ResNet-20, 3 seeds, short schedules
    python bench/search.py                  # both models, 3 seeds
    python bench/search.py --models resnet20 --seeds 0 1 2 3 4 --methods NetAdapt "uniform L1"
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
SEARCHES = ("NetAdapt", "annealing", "AutoCompress", "AMC")
METHODS = SEARCHES + ("uniform L1", "global L1")


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
    timing = {"runtime": args.runtime, "batch_size": args.batch, "threads": args.threads}

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

    def budget():
        return kprune.search.latency(args.target, cache_dir=args.cache_dir, runs=args.runs,
                                     warmup=args.warmup, **timing)

    common = {"finetune": short_finetune if args.short_steps else None,
              "long_finetune": long_finetune, "verbose": args.verbose,
              "time_limit": args.time_limit}
    anneal = {"start_temperature": args.sa_start, "stop_temperature": args.sa_stop,
              "cool_down_rate": args.sa_rate, "perturbation_magnitude": args.sa_magnitude}
    searches = {
        "NetAdapt": lambda: kprune.search.netadapt(
            base, lambda m: eager_accuracy(m, xv, yv), budget(), step=args.step, **common),
        "annealing": lambda: kprune.search.simulated_annealing(
            base, lambda m: eager_accuracy(m, xv, yv), budget(), **anneal, seed=seed, **common),
        "AutoCompress": lambda: kprune.autocompress(
            base, lambda m: eager_accuracy(m, xv, yv), budget(), (x, y), loss=LOSS,
            optimizer=lambda: keras.optimizers.SGD(args.ft_lr, momentum=0.9),
            batch_size=args.batch_size, num_iterations=args.ac_iterations,
            admm_num_iterations=args.admm_iterations, admm_training_epochs=args.admm_epochs,
            rho=args.rho, **{**anneal, "cool_down_rate": args.ac_sa_rate}, seed=seed, **common),
        "AMC": lambda: kprune.search.amc(
            base, lambda m: eager_accuracy(m, xv, yv), budget(), episodes=args.episodes,
            warmup=args.amc_warmup, seed=seed, **common),
    }
    models, notes = {}, {}
    for method in args.methods:
        if method not in searches:
            continue
        long_seconds.clear()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kprune.KprunWarning)
            result = searches[method]()
        searched = time.perf_counter() - t0 - sum(long_seconds)
        if not long_seconds:  # stopped, or the budget not met: the common fine-tune anyway
            fine_tune(result.model, args.ft_epochs)
        models[method] = (result.model, searched, result.budget)
        print(f"  {name} seed {seed}: {method} {len(result.history)} trials, {searched:.0f}s, "
              f"measured {result.budget:.3f} of the latency"
              + (f" (stopped: {result.reason})" if result.stopped else ""), flush=True)
    first = next((m for m in SEARCHES if m in models), None)
    ref = models[first][0] if first else None
    macs_share = (kprune.profile(ref).macs / kprune.profile(base).macs) if ref is not None \
        else args.target
    # "The same measured latency": the baselines aim at what the first search measured on
    # its model (at most the target), on the same runtime, so that the comparison is not
    # between a model at the target and one well under it. With `--match measured`, each
    # baseline is pruned at that target and two higher ones (up to the target), all are timed
    # in the final interleaved rounds, and the one measured closest to the first search's
    # model is kept (and fine-tuned): `prune` settles anywhere in a 0.04 band under its target.
    l1_target = args.target
    if args.match != "target" and first and models[first][2] is not None:
        l1_target = min(args.target, models[first][2])
    aims = [l1_target]
    if args.match == "measured":
        aims = sorted({round(min(args.target, l1_target + d), 4) for d in (0.0, 0.02, 0.04)})
    candidates = {}
    for method, scope in (("uniform L1", "local"), ("global L1", "global")):
        if method not in args.methods:
            continue
        candidates[method] = []
        for aim in aims:
            small, spent = prune_baseline(base, aim, scope, macs_share, timing, notes, method)
            candidates[method].append((small, spent, aim))
            if method in notes:  # out of reach by latency: one MACs-matched model
                break
    methods = [m for m in METHODS if m in models or m in candidates]
    timed = [base] + [models[m][0] for m in methods if m in models] + [
        c[0] for m in methods if m in candidates for c in candidates[m]]
    times = dict(zip(map(id, timed), measure_interleaved(timed, runs=args.repeats, **timing)))
    ratio = {k: v / times[id(base)] for k, v in times.items()}
    goal = ratio[id(ref)] if ref is not None else args.target
    for method, options in candidates.items():
        small, spent, aim = min(options, key=lambda c: abs(ratio[id(c[0])] - goal))
        fine_tune(small, args.ft_epochs)
        models[method] = (small, spent, None)
        print(f"  {name} seed {seed}: {method} pruned to latency_target={aim:.3f} ({spent:.0f}s"
              + (f"; flops_target={macs_share:.3f}, as the first search's MACs: {notes[method]}"
                 if method in notes else "")
              + (f"; of targets {', '.join(f'{c[2]:.3f}' for c in options)}, measured "
                 f"{', '.join(f'{ratio[id(c[0])]:.3f}' for c in options)}, the closest to "
                 f"{goal:.3f}" if len(options) > 1 else "") + ") and fine-tuned", flush=True)
    base_prof = kprune.profile(base)
    rows = {"unpruned": {"acc": eager_accuracy(base, xt, yt), "macs": 1.0, "latency": 1.0,
                         "own": None, "seconds": 0.0, "note": False}}
    for method in methods:
        model, seconds, own = models[method]
        rows[method] = {"acc": eager_accuracy(model, xt, yt),
                        "macs": kprune.profile(model).macs / base_prof.macs,
                        "latency": ratio[id(model)], "own": own, "seconds": seconds,
                        "note": method in notes}
    return rows


def prune_baseline(base, aim: float, scope: str, macs_share: float, timing: dict,
                   notes: dict, method: str):
    """(L1-pruned model, seconds): `latency_target=aim`, else the first search's MACs share."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kprune.KprunWarning)
        small = None
        if has_latency_target():
            try:
                small = kprune.prune(base, latency_target=aim, criterion="l1", scope=scope,
                                     verbose=0, **timing)
            except kprune.KprunError as exc:  # measured out of reach: match a search's MACs
                notes[method] = str(exc).split(". `")[0].split(": ", 1)[-1]
        else:
            notes[method] = "no latency_target in kprune.prune"
        if small is None:
            small = kprune.prune(base, flops_target=macs_share, criterion="l1", scope=scope)
    return small, time.perf_counter() - t0


def spread(values) -> float:
    """The sample standard deviation (0 for one value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def print_table(name: str, results: list, args) -> None:
    print(f"\n{name}: digits {args.image_size}x{args.image_size}x3, latency target "
          f"{args.target:.0%} ({args.runtime}, batch {args.batch}, {args.threads} threads), "
          f"{args.base_epochs} base + {args.ft_epochs} fine-tune epochs, "
          f"{args.short_steps} short fine-tune batches per candidate, NetAdapt step {args.step}, "
          f"annealing T {args.sa_start}->{args.sa_stop} x{args.sa_rate}, AMC {args.episodes} "
          f"episodes ({args.amc_warmup} warm-up), AutoCompress {args.ac_iterations} x "
          f"{args.admm_iterations} x {args.admm_epochs} ADMM epochs, seeds {args.seeds}")
    print(f"{'method':<14}{'acc':>8}{'± std':>8}{'range':>8}{'MACs':>8}{'latency':>9}"
          f"{'± std':>7}{'own meas.':>11}{'search s':>10}")
    for method in ("unpruned",) + METHODS:
        vals = [r[method] for r in results if method in r]
        if not vals:
            continue
        acc = np.array([v["acc"] for v in vals])
        lat = [v["latency"] for v in vals]
        own = [v["own"] for v in vals if v["own"] is not None]
        label = method + ("*" if any(v["note"] for v in vals) else "")
        print(f"{label:<14}{acc.mean():>8.2%}{spread(acc):>8.2%}{acc.max() - acc.min():>8.2%}"
              f"{np.mean([v['macs'] for v in vals]):>8.3f}{np.mean(lat):>9.3f}"
              f"{spread(lat):>7.3f}{(f'{np.mean(own):.3f}' if own else '-'):>11}"
              f"{np.mean([v['seconds'] for v in vals]):>10.1f}")
    if any(r[m]["note"] for r in results for m in METHODS if m in r):
        print("* in some seeds, pruned with flops_target = the first search's MACs share: "
              "`kprune.prune(latency_target=...)` could not reach the target (or is missing)")
    if all("NetAdapt" in r and "uniform L1" in r for r in results):
        a = np.array([r["NetAdapt"]["acc"] for r in results])
        u = np.array([r["uniform L1"]["acc"] for r in results])
        la = np.mean([r["NetAdapt"]["latency"] for r in results])
        lu = np.mean([r["uniform L1"]["latency"] for r in results])
        margin = max(spread(a), spread(u))
        diff = a.mean() - u.mean()
        lat_margin = max(spread([r["NetAdapt"]["latency"] for r in results]),
                         spread([r["uniform L1"]["latency"] for r in results]))
        equal = abs(la - lu) <= lat_margin
        print(f"NetAdapt - uniform L1: {diff:+.2%} accuracy (seed spread {margin:.2%}; per-seed "
              f"differences {', '.join(f'{d:+.2%}' for d in a - u)}), at latency {la:.3f} vs "
              f"{lu:.3f} ({'within' if equal else 'beyond'} the latency spread {lat_margin:.3f}):"
              f" NetAdapt ahead beyond the spread: "
              f"{'yes' if len(results) > 1 and diff > margin else 'no'}"
              + ("" if equal else "; not at equal measured latency"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"],
                        choices=["resnet20", "mobilenetv2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.5,
                        help="share of the measured latency to keep")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--runtime", choices=["keras", "tflite"], default="keras",
                        help="runtime of every latency measurement")
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
                        help="every search: seconds after which it returns its best so far")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sa-start", type=float, default=0.02,
                        help="annealing: start temperature (units of validation accuracy)")
    parser.add_argument("--sa-stop", type=float, default=0.002, help="annealing: stop temperature")
    parser.add_argument("--sa-rate", type=float, default=0.8, help="annealing: cool-down rate")
    parser.add_argument("--sa-magnitude", type=float, default=0.35,
                        help="annealing: perturbation magnitude")
    parser.add_argument("--episodes", type=int, default=30, help="AMC: episodes")
    parser.add_argument("--amc-warmup", type=int, default=10, help="AMC: warm-up episodes")
    parser.add_argument("--ac-iterations", type=int, default=2, help="AutoCompress: iterations")
    parser.add_argument("--ac-sa-rate", type=float, default=0.6,
                        help="AutoCompress: cool-down rate of each annealing walk")
    parser.add_argument("--admm-iterations", type=int, default=3,
                        help="AutoCompress: ADMM iterations per iteration")
    parser.add_argument("--admm-epochs", type=int, default=1,
                        help="AutoCompress: training epochs per ADMM iteration")
    parser.add_argument("--rho", type=float, default=1e-3, help="AutoCompress: ADMM rho")
    parser.add_argument("--runs", type=int, default=20,
                        help="timed calls of each latency measurement during the search")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls before each latency measurement during the search")
    parser.add_argument("--repeats", type=int, default=30, help="rounds of the final timing")
    parser.add_argument("--cache-dir", default=None, help="latency tables' cache")
    parser.add_argument("--match", choices=["measured", "search", "target"],
                        default="measured",
                        help="latency_target of the L1 baselines: 'search', the latency the "
                             "first search measured on its model; 'measured', that and two "
                             "higher targets, keeping the model the final timing puts closest "
                             "to the first search's (equal measured latency); 'target', the "
                             "target itself")
    parser.add_argument("--verbose", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="3 seeds of ResNet-20, fewer epochs, NetAdapt step 0.25, 3-step "
                             "short fine-tunes, short annealing, AMC and AutoCompress "
                             "schedules, shorter timings (options given still apply)")
    args = parser.parse_args(argv)
    if args.quick:  # new defaults: what is given on the command line still wins
        parser.set_defaults(
            models=["resnet20"], seeds=[0, 1, 2], base_epochs=3, ft_epochs=2, short_steps=3,
            step=0.25, runs=8, warmup=1, repeats=10, sa_rate=0.5, episodes=6, amc_warmup=2,
            ac_iterations=1, ac_sa_rate=0.3, admm_iterations=2)
        args = parser.parse_args(argv)
    set_threads(args.threads)
    tf.get_logger().setLevel("ERROR")  # retracing notes of the many timed models
    start = time.perf_counter()
    out = {}
    for name in args.models:
        out[name] = [run_seed(args, name, seed) for seed in args.seeds]
        if len(args.models) > 1:
            print_table(name, out[name], args)  # as soon as one model is done
    print("\nAll models:" if len(args.models) > 1 else "")
    for name in args.models:
        print_table(name, out[name], args)
    print(f"\nTotal {time.perf_counter() - start:.0f}s.")
    return out


if __name__ == "__main__":
    main()
