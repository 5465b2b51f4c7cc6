"""The `kprune` command line: profile, prune, export, demo.

Example:

    $ kprune profile MobileNetV2 --input-shape 96,96,3
    $ kprune prune model.keras -o small.keras --flops-target 0.5 --criterion l1
    $ kprune export small.keras --tflite small.tflite
    $ kprune demo
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Sequence

from kprune.errors import KprunError

_EXPECTED_ERRORS = (KprunError, ValueError, FileNotFoundError)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------
def parse_shape(text: str) -> tuple:
    """`"96,96,3"` -> `(96, 96, 3)`; raises ValueError for anything else."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"--input-shape must be positive integers like 96,96,3; got '{text}'.")
    return shape


def load_model(spec: str, input_shape: Sequence[int] | None = None):
    """A model from a `.keras` file, or a `keras.applications` architecture by name.

    Architectures are built with `weights=None` (random weights, no download).

    Args:
        spec: A path to a `.keras` file, or a name such as `"MobileNetV2"`.
        input_shape: Input shape without the batch axis, for architectures.

    Returns:
        A Keras model.

    Raises:
        FileNotFoundError: when `spec` is neither an existing file nor an
            architecture name.

    Example:

    >>> load_model("ResNet50", (64, 64, 3)).name
    'resnet50'
    """
    import keras

    import kprune  # noqa: F401  (registers kprune's layers for loading)

    if os.path.exists(spec):
        return keras.saving.load_model(spec)
    builder = getattr(keras.applications, spec, None)
    if spec.endswith(".keras") or not callable(builder) or not spec[:1].isupper():
        raise FileNotFoundError(f"'{spec}' is neither a model file nor a keras.applications "
                                "architecture (e.g. MobileNetV2, ResNet50).")
    kwargs = {"weights": None}
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    return builder(**kwargs)


def _save(model, path: str) -> None:
    if not path.endswith(".keras"):
        raise ValueError(f"the output file must end in '.keras'; got '{path}'.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save(path)


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------
def _profile(args) -> None:
    from kprune.profile import profile

    shape = parse_shape(args.input_shape) if args.input_shape else None
    is_file = os.path.exists(args.model)
    model = load_model(args.model, None if is_file else shape)
    result = profile(model, input_shape=shape if is_file else None)
    print(json.dumps(result.to_dict(), default=list) if args.json else result)


def _prune(args) -> None:
    import kprune
    from kprune.profile import format_count, profile

    model = load_model(args.model)
    small = kprune.prune(model, ratio=args.ratio, flops_target=args.flops_target,
                         criterion=args.criterion, scope=args.scope, round_to=args.round_to,
                         exclude=tuple(args.exclude))
    _save(small, args.output)
    before, after = profile(model), profile(small)
    print(f"{args.output}: MACs {format_count(before.macs)} -> {format_count(after.macs)} "
          f"({after.macs / max(before.macs, 1):.1%}), params {format_count(before.params)} -> "
          f"{format_count(after.params)} ({after.params / max(before.params, 1):.1%})")


def _export(args) -> None:
    import numpy as np

    # `kprune.export` is the function at package level; the module holds the writers.
    export_module = importlib.import_module("kprune.export")
    if not (args.keras or args.saved_model or args.tflite or args.tflite_int8):
        raise ValueError("nothing to write: give at least one of --keras, --saved-model, "
                         "--tflite, --tflite-int8.")
    if args.tflite_int8 and not args.data:
        raise ValueError("--tflite-int8 needs --data, a .npy file of calibration inputs.")
    data = np.load(args.data) if args.data else None
    model = load_model(args.model)
    written = {}
    if args.keras:
        written["keras"] = export_module.save_keras(model, args.keras)
    if args.saved_model:
        written["saved_model"] = export_module.save_saved_model(model, args.saved_model)
    if args.tflite:
        written["tflite"] = export_module.save_tflite(model, args.tflite)
    if args.tflite_int8:
        written["tflite_int8"] = export_module.save_tflite(model, args.tflite_int8, data)
    diffs = {} if args.no_check else export_module.check_artifacts(model, written, data)
    for kind, path in written.items():
        checked = f"max |diff| vs Keras {diffs[kind]:.2e}" if kind in diffs else "not checked"
        print(f"{kind:<12} {path}  ({checked})")


def _demo(args) -> None:
    from kprune.tools import demo
    demo.run(args.out, epochs=args.epochs, seed=args.seed)


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `kprune` argument parser with its four subcommands."""
    parser = argparse.ArgumentParser(
        prog="kprune", description="Structured channel pruning for Keras 3 models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="print MACs and parameters per layer",
                       description="Print MACs (one multiply-accumulate = 1) and parameters of "
                                   "every layer, with totals.")
    p.add_argument("model", metavar="MODEL",
                   help="a .keras file, or a keras.applications name built with random weights "
                        "(e.g. MobileNetV2)")
    p.add_argument("--input-shape", metavar="H,W,C",
                   help="input shape without batch axis (architectures, or files with unknown "
                        "sizes)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(run=_profile)

    p = sub.add_parser("prune", help="remove channels to a MACs target or ratio",
                       description="Score channels, remove the weakest for real and save the "
                                   "smaller model (kprune.prune).")
    p.add_argument("model", metavar="IN", help="the .keras model to prune")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="where to save the pruned .keras model")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-target", type=float, metavar="F",
                        help="share of the original MACs to keep, e.g. 0.5")
    target.add_argument("--ratio", type=float, metavar="R",
                        help="share of channels to remove, e.g. 0.3")
    p.add_argument("--criterion", default="l1",
                   help="channel importance: l1, l2, fpgm, bn_scale, orthogonality, random "
                        "(default: l1)")
    p.add_argument("--scope", choices=("local", "global"), default="local",
                   help="same share in every group, or one ranking over all (default: local)")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="keep a multiple of N channels per group (default: 1)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="layer name or class to leave whole (repeatable)")
    p.set_defaults(run=_prune)

    p = sub.add_parser("export", help="write .keras, SavedModel and TFLite files, checked",
                       description="Write the model in the chosen formats, run every artifact "
                                   "once and compare its outputs with the Keras model's.")
    p.add_argument("model", metavar="MODEL", help="a .keras file or a keras.applications name")
    p.add_argument("--keras", metavar="P", help="write a .keras file")
    p.add_argument("--saved-model", metavar="DIR", help="write a TensorFlow SavedModel")
    p.add_argument("--tflite", metavar="P", help="write a float32 .tflite file")
    p.add_argument("--tflite-int8", metavar="P",
                   help="write a full-integer .tflite file (needs --data)")
    p.add_argument("--data", metavar="X.npy",
                   help="input samples for int8 calibration and for the checks")
    p.add_argument("--no-check", action="store_true", help="skip running the artifacts")
    p.set_defaults(run=_export)

    p = sub.add_parser("demo", help="train, prune, fine-tune and export a digits CNN",
                       description="Offline end-to-end run on scikit-learn's digits: train a "
                                   "small CNN, prune to 50%% MACs, fine-tune, export, compare.")
    p.add_argument("--epochs", type=int, default=8, metavar="N",
                   help="training epochs (default: 8)")
    p.add_argument("--out", default="kprune-demo", metavar="DIR",
                   help="output directory (default: kprune-demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `kprune` command line; returns the exit status.

    Expected failures (bad arguments or models, missing files) print one
    line, `kprune: error: ...`, on stderr and return 2.

    Example:

    >>> main(["profile", "MobileNetV2", "--input-shape", "96,96,3"])
    0
    """
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except _EXPECTED_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"kprune: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
