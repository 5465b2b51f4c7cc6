"""Measured latency of one-shot pruned ResNet-50 and MobileNetV2 beside their MACs.

Each architecture (`keras.applications`, weights=None, so it runs offline) is
pruned by `kprune.prune(model, flops_target=t, criterion="l1", round_to=r)`
for every target `t` (the pruned model keeps at most `t` of the original MACs)
and every `round_to` `r`. One run then times the original and every pruned
model on four paths, and prints, per pruned model, its latency divided by the
original's beside its MACs and parameter ratios (`kprune.profile`):

* Keras on TF, batch 1 and 32: the model called in a `tf.function`
  (`model(x, training=False)`, no XLA), the lowest-overhead Keras path and the
  one `kprune.latency` times; the output is fetched with `.numpy()` so the
  timing covers the whole computation.
* TFLite float32, batch 1 and 32: `kprune.export.tflite_bytes` converts the
  model; the `ai_edge_litert` interpreter (XNNPACK on CPU) runs it with
  `--threads` threads and its input resized to the batch.

Timing: every runner makes `--warmup` untimed calls; then, in each of
`--repeats` rounds, each model of the architecture (original first, then the
pruned models, in a shuffled order) is called a few times, so the original and
the pruned models are measured alternately under the same machine load. The
figure per model and path is the median of its timed calls; a ratio is the
pruned model's median over the original's.

The `x8` column counts the Conv/Dense layers whose output width is a multiple
of 8 (all of them in the originals), which is what `round_to=8` keeps.

Usage:

    python bench/latency.py                  # both models, 224x224, about 15 min on 2 cores
    python bench/latency.py --quick          # 96x96, 2 repeats: a fast check
    python bench/latency.py --models ResNet50 --targets 0.5 --round-to 1 8 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kprune  # noqa: E402
from kprune.tools.export import tflite_bytes  # noqa: E402

PATHS = (("keras", 1), ("keras", 32), ("tflite", 1), ("tflite", 32))
CALLS = {1: 5, 32: 1}  # timed calls per model and round, by batch size


def set_threads(threads: int) -> None:
    """Fix the TF and OpenMP thread pools (before TF runs any op)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def build(name: str, size: int) -> keras.Model:
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))


def multiple_of_8(model: keras.Model) -> str:
    """`'k/n'`: how many of the n Conv/Dense layers have an output width divisible by 8."""
    widths = [layer.filters if hasattr(layer, "filters") else layer.units
              for layer in model.layers
              if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
              and not isinstance(layer, keras.layers.DepthwiseConv2D)]
    return f"{sum(w % 8 == 0 for w in widths)}/{len(widths)}"


def keras_runner(model: keras.Model, batch: int):
    """A callable that runs `model` once on a fixed random batch, as `kprune.latency` does."""
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    x = tf.constant(np.random.default_rng(0).normal(size=shape).astype("float32"))
    fn = tf.function(lambda t: model(t, training=False), jit_compile=False)
    return lambda: fn(x).numpy()


def tflite_runner(content: bytes, batch: int, threads: int):
    """A callable that invokes the TFLite model once on a fixed random batch."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=threads)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    shape = (batch,) + tuple(inp["shape"][1:])
    interpreter.resize_tensor_input(inp["index"], shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"],
                           np.random.default_rng(0).normal(size=shape).astype("float32"))

    def run():
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])

    return run


def time_interleaved(runners: list, repeats: int, calls: int, warmup: int,
                     seed: int = 0) -> list:
    """Median seconds per call of each runner, measured round-robin.

    Args:
        runners: Zero-argument callables, one per model.
        repeats: Rounds; in each, every runner is called `calls` times.
        calls: Timed calls per runner and round.
        warmup: Untimed calls per runner before the first round.
        seed: Seed of the per-round shuffle of the runners' order.

    Returns:
        One median per runner.
    """
    for run in runners:
        for _ in range(warmup):
            run()
    rng = np.random.default_rng(seed)
    times = [[] for _ in runners]
    for _ in range(repeats):
        for i in rng.permutation(len(runners)):
            for _ in range(calls):
                t0 = time.perf_counter()
                runners[i]()
                times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def prune_all(name: str, size: int, targets, round_tos) -> list:
    """`[(label, model, profile)]`: the original, then every (target, round_to) pruned model."""
    model = build(name, size)
    variants = [(("original", None, None), model, kprune.profile(model))]
    for t in targets:
        for r in round_tos:
            t0 = time.perf_counter()
            small = kprune.prune(model, flops_target=t, criterion="l1", round_to=r)
            print(f"  {name}: pruned to keep {t:.0%} of MACs, round_to={r} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
            variants.append(((name, t, r), small, kprune.profile(small)))
    return variants


def bench_model(name: str, args) -> list:
    """Rows of the table for one architecture."""
    variants = prune_all(name, args.size, args.targets, args.round_to)
    t0 = time.perf_counter()
    contents = [tflite_bytes(model) for _, model, _ in variants]
    print(f"  {name}: {len(contents)} TFLite conversions ({time.perf_counter() - t0:.1f}s)",
          flush=True)
    medians = {}
    for backend, batch in PATHS:
        t0 = time.perf_counter()
        if backend == "keras":
            runners = [keras_runner(model, batch) for _, model, _ in variants]
        else:
            runners = [tflite_runner(c, batch, args.threads) for c in contents]
        medians[backend, batch] = time_interleaved(runners, args.repeats, CALLS[batch],
                                                   args.warmup)
        del runners
        print(f"  {name}: timed {backend} batch {batch} ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    base = variants[0][2]
    rows = []
    for i, ((_, target, round_to), model, prof) in enumerate(variants):
        row = {"model": name, "target": target, "round_to": round_to,
               "macs": prof.macs, "params": prof.params,
               "macs_ratio": prof.macs / base.macs, "params_ratio": prof.params / base.params,
               "x8": multiple_of_8(model)}
        for backend, batch in PATHS:
            row[f"{backend}_b{batch}_s"] = medians[backend, batch][i]
            row[f"{backend}_b{batch}_ratio"] = medians[backend, batch][i] / medians[backend, batch][0]
        rows.append(row)
    return rows


def print_table(rows: list, args) -> None:
    cols = [f"{b} b{n}" for b, n in PATHS]
    print(f"\nInput {args.size}x{args.size}, {args.threads} threads (TF intra-op and TFLite), "
          f"{args.repeats} rounds; latency ratio = pruned / original, median of timed calls.")
    print("\nOriginal models (median seconds per call):")
    print(f"{'model':<13}{'MACs':>10}{'params':>10}" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        if r["target"] is None:
            print(f"{r['model']:<13}{_fmt(r['macs']):>10}"
                  f"{_fmt(r['params']):>10}"
                  + "".join(f"{r[f'{b}_b{n}_s']:>13.4f}" for b, n in PATHS))
    print("\nPruned / original:")
    head = (f"{'model':<13}{'keeps':>16}{'round_to':>9}{'x8':>8}{'MACs':>7}{'params':>8}"
            + "".join(f"{c:>11}" for c in cols) + f"{'worst/MACs':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["target"] is None:
            continue
        lat = [r[f"{b}_b{n}_ratio"] for b, n in PATHS]
        keeps = f"{r['target']:.0%} of MACs"
        print(f"{r['model']:<13}{keeps:>16}{r['round_to']:>9}{r['x8']:>8}"
              f"{r['macs_ratio']:>7.3f}{r['params_ratio']:>8.3f}"
              + "".join(f"{v:>11.3f}" for v in lat) + f"{max(lat) / r['macs_ratio']:>12.2f}")


def _fmt(n: float) -> str:
    from kprune.profile import format_count

    return format_count(n)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ResNet50", "MobileNetV2"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3],
                        help="shares of the original MACs the pruned models may keep")
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per runner")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--quick", action="store_true", help="96x96 input and 2 rounds")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.warmup = 96, 2, 1
    set_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    print_table(rows, args)
    print(f"\nTotal {time.perf_counter() - t0:.0f}s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
