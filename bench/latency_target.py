"""Latency targets against FLOPs targets: predicted and measured latency of pruned ResNet-50 and MobileNetV2.

Each architecture (`keras.applications`, weights=None, so it runs offline) is
pruned, for every target `t` and every runtime (Keras and TFLite, batch 1),
by `kprune.prune_plan(model, latency_target=t, runtime=...)`, and once per
target by `flops_target=t` (the same plan serves both runtimes). For each
runtime a `kprune.latency.LatencyModel` (the per-layer tables `prune` uses,
cached per machine) predicts the latency ratio of every pruned model; one run
then times the original and all its pruned models interleaved, with the
helpers of `bench/latency.py` (`keras_runner`, `tflite_runner`,
`time_interleaved`), and the table prints, per pruned model, its MACs ratio,
the predicted and the measured latency ratio (pruned / original, median of
timed calls) and the prediction error (predicted / measured - 1).

The time each per-layer table took to build is printed too: it is spent once
per machine (a second run reads the cache; pass `--cache-dir` to a fresh
folder to measure it again).

Usage:

    python bench/latency_target.py                  # 224x224, both models (long on 2 cores)
    python bench/latency_target.py --quick          # 96x96, 2 rounds: a check that it works
    python bench/latency_target.py --models MobileNetV2 --targets 0.5 --runtimes tflite
    python bench/latency_target.py --quick --steps  # also round_to="latency" beside each

With `--steps`, each latency target is also pruned with `round_to="latency"`
(every group widened to the top of its measured latency step) and a line per
target compares its MACs and measured latency with the plain latency target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import kprune  # noqa: E402
from bench.latency import (CALLS, build, keras_runner, set_threads,  # noqa: E402
                           time_interleaved, tflite_runner)
from kprune.latency import LatencyModel, tflite_bytes  # noqa: E402
from kprune.pruning import prune_plan  # noqa: E402

RUNTIMES = ("keras", "tflite")
BATCH = 1


def runners_for(runtime: str, models: list, threads: int) -> list:
    """One zero-argument runner per model, as `bench/latency.py` times them."""
    if runtime == "keras":
        return [keras_runner(m, BATCH) for m in models]
    return [tflite_runner(tflite_bytes(m), BATCH, threads) for m in models]


def bench_model(name: str, args) -> tuple:
    """(rows, tables): one row per pruned model and runtime; one table note per runtime."""
    model = build(name, args.size)
    base_macs = kprune.profile(model).macs
    flops = {}
    for t in args.targets:
        t0 = time.perf_counter()
        plan = prune_plan(model, flops_target=t, criterion="l1")
        flops[t] = (plan, kprune.apply_plan(model, plan))
        print(f"  {name}: flops_target={t} ({time.perf_counter() - t0:.1f}s)", flush=True)
    rows, tables = [], []
    for runtime in args.runtimes:
        unreachable = []
        lm = LatencyModel(model, runtime=runtime, batch_size=BATCH, threads=args.threads,
                          cache_dir=args.cache_dir, verbose=args.verbose)
        tables.append({"model": name, "runtime": runtime, "seconds": lm.seconds,
                       "measurements": lm.measurements, "timed_calls": len(lm.calls),
                       "untimed": list(lm.untimed), "unreachable": unreachable,
                       "scale": lm.scale})
        print(f"  {name}: {runtime} table: {lm.measurements} layers measured in "
              f"{lm.seconds:.0f}s ({len(lm.calls)} timed calls)", flush=True)
        variants = []
        for t in args.targets:
            t0 = time.perf_counter()
            try:
                plan = prune_plan(model, latency_target=t, runtime=runtime, batch_size=BATCH,
                                  threads=args.threads, criterion="l1")
            except kprune.KprunError as exc:  # the guards cannot reach it on this runtime
                print(f"  {name}: latency_target={t} on {runtime}: {exc}", flush=True)
                unreachable.append(t)
            else:
                print(f"  {name}: latency_target={t} on {runtime} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
                variants.append(("latency_target", t, plan, kprune.apply_plan(model, plan)))
                if args.steps:
                    t0 = time.perf_counter()
                    wide = prune_plan(model, latency_target=t, runtime=runtime, batch_size=BATCH,
                                      threads=args.threads, criterion="l1", round_to="latency")
                    print(f"  {name}: latency_target={t}, round_to='latency' on {runtime} "
                          f"({time.perf_counter() - t0:.1f}s)", flush=True)
                    variants.append(("latency+steps", t, wide, kprune.apply_plan(model, wide)))
            variants.append(("flops_target", t) + flops[t])
        t0 = time.perf_counter()
        runners = runners_for(runtime, [model] + [v[3] for v in variants], args.threads)
        medians = time_interleaved(runners, args.repeats, CALLS[BATCH], args.warmup)
        del runners
        print(f"  {name}: timed {runtime} batch {BATCH} ({time.perf_counter() - t0:.1f}s)",
              flush=True)
        for i, (method, t, plan, small) in enumerate(variants, start=1):
            predicted = lm.ratio(plan)
            measured = medians[i] / medians[0]
            rows.append({"model": name, "runtime": runtime, "method": method, "target": t,
                         "macs_ratio": kprune.profile(small).macs / base_macs,
                         "params_ratio": small.count_params() / model.count_params(),
                         "predicted": predicted, "measured": measured,
                         "error": predicted / measured - 1.0, "base_s": medians[0],
                         "predicted_base_s": lm.base})
    return rows, tables


def print_table(rows: list, tables: list, args) -> None:
    print(f"\nInput {args.size}x{args.size}, batch {BATCH}, {args.threads} threads (TF intra-op "
          f"and TFLite), {args.repeats} interleaved rounds; ratios are pruned / original.")
    print("\nPer-layer tables (built once per machine, then read from the cache):")
    for t in tables:
        print(f"  {t['model']:<12} {t['runtime']:<7} {t['measurements']:>5} layers measured in "
              f"{t['seconds']:>6.0f}s, {t['timed_calls']} timed calls, calibrated scale "
              f"{t['scale']:.3f}"
              + (f", untimed: {', '.join(t['untimed'])}" if t["untimed"] else "")
              + (f"; latency_target {t['unreachable']} unreachable" if t["unreachable"] else ""))
    head = (f"{'model':<13}{'runtime':<8}{'target':>7}  {'method':<15}{'MACs':>7}{'params':>8}"
            f"{'predicted':>11}{'measured':>10}{'error':>8}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<13}{r['runtime']:<8}{r['target']:>7.2f}  {r['method']:<15}"
              f"{r['macs_ratio']:>7.3f}{r['params_ratio']:>8.3f}{r['predicted']:>11.3f}"
              f"{r['measured']:>10.3f}{r['error']:>+8.1%}")
    lat = [r for r in rows if r["method"] != "flops_target"]
    if lat:
        errors = np.abs([r["error"] for r in rows])
        met = sum(r["measured"] <= r["target"] for r in lat)
        close = sum(r["target"] - 0.05 <= r["measured"] <= r["target"] for r in lat)
        print(f"\nPrediction error |predicted / measured - 1|: median {np.median(errors):.1%}, "
              f"max {errors.max():.1%} over {len(rows)} pruned models; latency targets met "
              f"in this run's timing by {met} of {len(lat)}, within 0.05 under the target by "
              f"{close}.")
    for r in [r for r in rows if r["method"] == "latency+steps"]:
        same = next(q for q in rows if q["method"] == "latency_target" and
                    (q["model"], q["runtime"], q["target"]) == (r["model"], r["runtime"],
                                                                r["target"]))
        print(f"  steps: {r['model']} {r['runtime']} {r['target']:.2f}: MACs "
              f"{same['macs_ratio']:.3f} -> {r['macs_ratio']:.3f}, measured latency "
              f"{same['measured']:.3f} -> {r['measured']:.3f}")
    bases = {(r["model"], r["runtime"]): r["base_s"] for r in rows}
    print("Originals (median seconds per call): " + ", ".join(
        f"{m} {rt} {s * 1e3:.2f} ms" for (m, rt), s in bases.items()))


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ResNet50", "MobileNetV2"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3],
                        help="shares of the original latency (and MACs) to keep")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per runner")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--quick", action="store_true", help="96x96 input and 2 rounds")
    parser.add_argument("--cache-dir", default=None,
                        help="per-layer table cache (default: kprune's, ~/.cache/kprune/latency)")
    parser.add_argument("--verbose", type=int, default=0, help="1: progress bar per table")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--steps", action="store_true",
                        help="also prune with round_to='latency' (widths at latency steps)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.warmup = 96, 2, 1
    if args.cache_dir:
        os.environ["KPRUNE_CACHE"] = args.cache_dir  # prune's own tables read the same cache
    set_threads(args.threads)
    t0 = time.perf_counter()
    rows, tables = [], []
    for name in args.models:
        r, t = bench_model(name, args)
        rows, tables = rows + r, tables + t
    print_table(rows, tables, args)
    print(f"\nTotal {time.perf_counter() - t0:.0f}s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "tables": tables}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
