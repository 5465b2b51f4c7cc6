"""A small vision transformer on digits: accuracy, MACs and latency before and after pruning.

Offline (scikit-learn's bundled 8x8 digits, scaled to [0, 1], one channel,
split by `kprune.datasets.digits` with a fixed seed). The model is a ViT of
core Keras layers and kprune's token layers:

    Conv2D(D, 2, strides=2) -> Reshape((16, D))      patch embedding, 4x4 patches of 2x2
    ClassToken -> PositionEmbedding                  17 tokens
    `--depth` pre-norm blocks:
        LayerNormalization -> MultiHeadAttention(`--heads`, key_dim=D // heads) -> Add
        LayerNormalization -> Dense(`--mlp-ratio` * D, gelu) -> Dense(D) -> Add
    LayerNormalization -> class token (x[:, 0]) -> Dense(10)

One run:

1. trains it with Adam (`--epochs`) and reports the test accuracy (the run
   warns when it stays under `--min-accuracy`);
2. prunes it once with `kprune.prune(model, flops_target=..., criterion=...)`:
   attention heads, per-head key/value widths, MLP widths and the residual
   stream (the channels every block reads and writes), whichever the
   dependency graph finds prunable; prints which groups lost channels, by
   kind, and the width of every block;
3. reports the test accuracy right after pruning, fine-tunes the pruned
   model (`--finetune-epochs`, Adam at a lower rate) and reports it again;
4. counts MACs and parameters (`kprune.profile`) of both models, and times
   both on four paths, as `bench/latency.py` does and with its helpers:
   Keras on TF (a `tf.function`, no XLA, the path `kprune.latency` times)
   and TFLite float32 (`kprune.export.tflite_bytes`, run by the
   `ai_edge_litert` interpreter), each at batch 1 and 32. The two models are
   timed alternately in the same run (`--repeats` rounds, medians); a ratio
   is pruned / original.

A short table closes the run.

Usage:

    python bench/vit.py                          # about 1.5 minutes on 2 CPU cores
    python bench/vit.py --criterion fpgm --flops-target 0.4
    python bench/vit.py --dim 96 --epochs 40 --finetune-epochs 10 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402
from bench.latency import (CALLS, PATHS, keras_runner, set_threads,  # noqa: E402
                           time_interleaved, tflite_runner)
from kprune.layers import ClassToken, PositionEmbedding  # noqa: E402
from kprune.profile import format_count as _fmt  # noqa: E402
from kprune.pruning import prune_plan  # noqa: E402
from kprune.tools.datasets import digits  # noqa: E402
from kprune.tools.export import tflite_bytes  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
KINDS = ("heads", "key dims", "value dims", "MLP", "stream", "other")


# ---------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------
def load(seed: int):
    """`((x, y), (x_test, y_test))`: 8x8x1 digits in [0, 1], split with `seed`."""
    return digits(image_size=8, channels=1, seed=seed)


def build_vit(dim: int, depth: int, heads: int, mlp_ratio: int) -> keras.Model:
    """The ViT of the module docstring; layer names say which block they belong to."""
    L = keras.layers
    if dim % heads:
        raise SystemExit(f"--dim {dim} is not a multiple of --heads {heads}")
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(dim, 2, strides=2, name="patch_embed")(inp)
    x = L.Reshape((16, dim), name="patches")(x)
    x = ClassToken(name="cls_token")(x)
    x = PositionEmbedding(name="pos_embed")(x)
    for i in range(depth):
        h = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        h = L.MultiHeadAttention(heads, dim // heads, name=f"block{i}_attn")(h, h)
        x = L.Add(name=f"block{i}_add1")([x, h])
        h = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        h = L.Dense(mlp_ratio * dim, activation="gelu", name=f"block{i}_mlp1")(h)
        h = L.Dense(dim, name=f"block{i}_mlp2")(h)
        x = L.Add(name=f"block{i}_add2")([x, h])
    x = L.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = x[:, 0]
    out = L.Dense(10, name="head")(x)
    return keras.Model(inp, out, name="vit_digits")


def train(model, data, epochs: int, lr: float, batch_size: int) -> None:
    """Adam with cosine decay to 0 over the run."""
    (x, y), _ = data
    steps = epochs * int(np.ceil(len(x) / batch_size))
    rate = keras.optimizers.schedules.CosineDecay(lr, max(steps, 1))
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)


def accuracy(model, data) -> float:
    """Test accuracy; one direct call (the test set is small), no `predict` retracing."""
    _, (xt, yt) = data
    logits = keras.ops.convert_to_numpy(model(xt, training=False))
    return float(np.mean(np.argmax(logits, -1) == yt))


# ---------------------------------------------------------------------------
# What was pruned
# ---------------------------------------------------------------------------
def group_kind(group) -> str:
    """'heads', 'key dims', 'value dims', 'MLP', 'stream' or 'other' for a dependency group.

    The attention rule marks the channels inside a MultiHeadAttention layer
    with the `slot` of their producer ('heads', 'key_dim', 'value_dim'); the
    residual stream is the group the patch embedding writes (with every
    block's output projections); an MLP group is produced by a hidden Dense.
    """
    slots = {m.slot for m in group.producers}
    for slot, kind in (("heads", "heads"), ("key_dim", "key dims"), ("value_dim", "value dims")):
        if slot in slots:
            return kind
    names = {m.name for m in group.producers}
    if "patch_embed" in names:
        return "stream"
    if any(n.endswith("_mlp1") for n in names):
        return "MLP"
    return "other"


def pruned_by_kind(graph, plan: dict) -> dict:
    """Kind -> [groups pruned, prunable groups, channels removed, channels in them]."""
    table = {kind: [0, 0, 0, 0] for kind in KINDS}
    for group in graph.prunable_groups():
        row = table[group_kind(group)]
        removed = len(plan.get(group.id, ()))
        row[0] += removed > 0
        row[1] += 1
        row[2] += removed
        row[3] += group.size
    return table


def widths(model, depth: int) -> list:
    """Per block: (heads, key_dim, value_dim, MLP width); and the stream width last."""
    rows = []
    for i in range(depth):
        attn = model.get_layer(f"block{i}_attn")
        rows.append((int(attn.num_heads), int(attn.key_dim), int(attn.value_dim or attn.key_dim),
                     int(model.get_layer(f"block{i}_mlp1").units)))
    return rows, int(model.get_layer("patch_embed").filters)


def print_pruned(graph, plan: dict, model, small, depth: int) -> None:
    print("\nPrunable groups by kind (groups that lost channels / prunable groups, "
          "channels removed / channels in them):")
    for kind, (hit, total, removed, size) in pruned_by_kind(graph, plan).items():
        if total:
            print(f"  {kind:<11}{hit:>3}/{total:<4}{removed:>6}/{size}")
    blocked = graph.describe_blockers()
    if blocked:
        print(f"  left whole by: {blocked}")
    approx = [g for g in graph.prunable_groups() if g.approximate and g.id in plan]
    if approx:
        print(f"  {len(approx)} pruned group(s) are approximate (a LayerNorm's statistics "
              "change): the pruned model is close to the masked one, not equal")
    (before, stream0), (after, stream1) = widths(model, depth), widths(small, depth)
    print(f"\nWidths (heads x key_dim / value_dim, MLP), original -> pruned; "
          f"stream {stream0} -> {stream1}:")
    for i, (b, a) in enumerate(zip(before, after)):
        print(f"  block{i}: {b[0]}x{b[1]}/{b[2]}, {b[3]}  ->  {a[0]}x{a[1]}/{a[2]}, {a[3]}")


# ---------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------
def time_both(models: list, args) -> dict:
    """(backend, batch) -> [median seconds per model], measured alternately."""
    t0 = time.perf_counter()
    contents = [tflite_bytes(m) for m in models]
    print(f"TFLite conversions: {time.perf_counter() - t0:.1f}s", flush=True)
    medians = {}
    for backend, batch in PATHS:
        if backend == "keras":
            runners = [keras_runner(m, batch) for m in models]
        else:
            runners = [tflite_runner(c, batch, args.threads) for c in contents]
        medians[backend, batch] = time_interleaved(runners, args.repeats, CALLS[batch],
                                                   args.warmup, seed=args.seed)
    return medians


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def print_table(rows: dict, medians: dict, args) -> None:
    cols = [f"{b} b{n}" for b, n in PATHS]
    print(f"\nViT D={args.dim}, depth {args.depth}, {args.heads} heads, MLP {args.mlp_ratio}D; "
          f"flops_target={args.flops_target}, criterion={args.criterion!r}; "
          f"{args.threads} threads, {args.repeats} timing rounds (median s per call)")
    head = (f"{'':<10}{'MACs':>9}{'params':>9}{'acc':>8}{'acc FT':>8}"
            + "".join(f"{c:>12}" for c in cols))
    print(head)
    print("-" * len(head))
    for i, name in enumerate(("original", "pruned")):
        r = rows[name]
        ft = f"{r['acc_ft']:.2%}" if r.get("acc_ft") is not None else "-"
        print(f"{name:<10}{_fmt(r['macs']):>9}{_fmt(r['params']):>9}{r['acc']:>8.2%}{ft:>8}"
              + "".join(f"{medians[p][i] * 1e3:>10.3f}ms" for p in PATHS))
    o, p = rows["original"], rows["pruned"]
    print(f"{'ratio':<10}{p['macs'] / o['macs']:>9.3f}{p['params'] / o['params']:>9.3f}"
          f"{'':>16}" + "".join(f"{medians[k][1] / medians[k][0]:>12.3f}" for k in PATHS))
    print("(acc: test accuracy of the trained model, and of the pruned one before fine-tuning; "
          "acc FT: after fine-tuning)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64, help="stream width D")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-ratio", type=int, default=2, help="MLP width in units of D")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-accuracy", type=float, default=0.9,
                        help="warn when the trained model's test accuracy stays below")
    parser.add_argument("--flops-target", type=float, default=0.5,
                        help="share of the original MACs the pruned model may keep")
    parser.add_argument("--criterion", default="l1",
                        choices=kprune.criteria.available_criteria())
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per runner")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()

    keras.utils.set_random_seed(args.seed)
    data = load(args.seed)
    model = build_vit(args.dim, args.depth, args.heads, args.mlp_ratio)
    t0 = time.perf_counter()
    train(model, data, args.epochs, args.lr, args.batch_size)
    acc = accuracy(model, data)
    print(f"trained {args.epochs} epochs ({time.perf_counter() - t0:.0f}s): "
          f"test accuracy {acc:.2%}", flush=True)
    if acc < args.min_accuracy:
        print(f"WARNING: test accuracy {acc:.2%} is under --min-accuracy "
              f"{args.min_accuracy:.0%}; try more --epochs")

    graph = kprune.DependencyGraph(model)
    kwargs = dict(flops_target=args.flops_target, criterion=args.criterion,
                  round_to=args.round_to, seed=args.seed)
    if kprune.criteria.get_criterion(args.criterion).needs_data:
        (x, y), _ = data
        kwargs["data"] = (x[:512], y[:512])
    t0 = time.perf_counter()
    small = kprune.prune(model, **kwargs)
    seconds = time.perf_counter() - t0
    plan = prune_plan(model, **kwargs)  # the same plan, for the report by kind
    acc_pruned = accuracy(small, data)
    print(f"pruned ({seconds:.1f}s): test accuracy {acc_pruned:.2%} before fine-tuning",
          flush=True)
    print_pruned(graph, plan, model, small, args.depth)

    t0 = time.perf_counter()
    train(small, data, args.finetune_epochs, args.finetune_lr, args.batch_size)
    acc_ft = accuracy(small, data)
    print(f"\nfine-tuned {args.finetune_epochs} epochs ({time.perf_counter() - t0:.0f}s): "
          f"test accuracy {acc_ft:.2%}", flush=True)

    profiles = [kprune.profile(m) for m in (model, small)]
    medians = time_both([model, small], args)
    rows = {"original": {"macs": profiles[0].macs, "params": profiles[0].params, "acc": acc,
                         "acc_ft": None},
            "pruned": {"macs": profiles[1].macs, "params": profiles[1].params,
                       "acc": acc_pruned, "acc_ft": acc_ft}}
    print_table(rows, medians, args)
    uncounted = profiles[0].uncounted
    if uncounted:  # the token layers only concatenate and add: they do no MACs
        print(f"(kprune.profile has no MACs counter for {', '.join(uncounted)}; "
              "they do no multiply-accumulates)")
    print(f"\nTotal {time.perf_counter() - start:.0f}s.")
    return {"rows": rows, "medians": {f"{b}_b{n}": v for (b, n), v in medians.items()}}


if __name__ == "__main__":
    main()
