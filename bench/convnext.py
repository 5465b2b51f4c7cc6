"""ConvNeXt's residual streams through kprune: groups, MACs at flops_target=0.5, TFLite.

`keras.applications.ConvNeXtTiny` (weights=None, so it runs offline) passes
its four residual streams through LayerNormalization and `LayerScale`. With
`approximate=False` kprune leaves them whole (only the MLP widths and the
depthwise stages between them prune); by default they are approximate
groups (a LayerNorm's statistics are taken over the kept channels). One run
prints, for each setting:

    groups    prunable / all groups with a producer
    streams   prunable groups that are approximate (the residual streams)
    macs      profile(pruned).macs / profile(model).macs at flops_target=0.5
    params    the same for parameters
    prune     seconds of `kprune.prune`
    tflite    `kprune.export(pruned, formats="tflite")`: converted, run by
              `ai_edge_litert`, outputs within the export check's tolerance
              of the Keras model ('ok'), or the error

Usage:

    python bench/convnext.py                 # ConvNeXtTiny at 224 px, about 2 minutes on 2 cores
    python bench/convnext.py --size 64 --model ConvNeXtSmall
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import kprune  # noqa: E402


def survey(model: keras.Model, approximate: bool) -> dict:
    """One row of the table for `model` under `approximate`."""
    graph = kprune.DependencyGraph(model, approximate=approximate)
    groups = [g for g in graph.groups if g.producers]
    prunable = [g for g in groups if g.prunable]
    t0 = time.perf_counter()
    small = kprune.prune(model, flops_target=0.5, approximate=approximate)
    seconds = time.perf_counter() - t0
    before, after = kprune.profile(model), kprune.profile(small)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = kprune.export(small, tmp, formats="tflite")
            tflite = f"ok ({report['tflite']['size'] / 1e6:.1f} MB)"
        except Exception as exc:  # a survey: report the error, keep going
            tflite = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return {"approximate": approximate, "groups": f"{len(prunable)}/{len(groups)}",
            "streams": sum(g.approximate for g in prunable),
            "macs": after.macs / before.macs, "params": after.params / before.params,
            "prune": seconds, "tflite": tflite}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ConvNeXtTiny")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    model = getattr(keras.applications, args.model)(weights=None,
                                                    input_shape=(args.size, args.size, 3))
    print(f"{args.model} at {args.size} px: {kprune.profile(model).macs / 1e9:.2f} GMACs, "
          f"{model.count_params() / 1e6:.2f}M params")
    rows = [survey(model, approximate) for approximate in (False, True)]
    print(f"{'approximate':>11} {'groups':>7} {'streams':>7} {'macs':>6} {'params':>6} "
          f"{'prune':>7}  tflite")
    for r in rows:
        print(f"{str(r['approximate']):>11} {r['groups']:>7} {r['streams']:>7} {r['macs']:6.3f} "
              f"{r['params']:6.3f} {r['prune']:6.1f}s  {r['tflite']}")
    return rows


if __name__ == "__main__":
    main()
