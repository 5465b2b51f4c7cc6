"""The `kprune` command line: profile, prune, decompose, export, demo.

Example:

    $ kprune profile MobileNetV2 --input-shape 96,96,3
    $ kprune profile model.keras --plot profile.png
    $ kprune prune model.keras -o small.keras --flops-target 0.5 --criterion l1 \
          --report channels.png
    $ kprune decompose model.keras small.keras --flops-target 0.5 --method enc_map
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
    _check_image_path(args.plot, "--plot")
    is_file = os.path.exists(args.model)
    model = load_model(args.model, None if is_file else shape)
    result = profile(model, input_shape=shape if is_file else None)
    print(json.dumps(result.to_dict(), default=list) if args.json else result)
    if args.plot:
        from kprune.tools import plot

        _write_figure(plot.overview(result), args.plot, quiet=args.json)


def _prune(args) -> None:
    import kprune
    from kprune.profile import format_count, profile

    _check_image_path(args.report, "--report")
    model = load_model(args.model)
    timing = args.latency_target is not None
    small = kprune.prune(model, ratio=args.ratio, flops_target=args.flops_target,
                         params_target=args.params_target, latency_target=args.latency_target,
                         runtime=args.runtime, batch_size=args.batch_size, threads=args.threads,
                         criterion=args.criterion, scope=args.scope, round_to=args.round_to,
                         exclude=tuple(args.exclude), verbose=int(timing))
    _save(small, args.output)
    before, after = profile(model), profile(small)
    print(f"{args.output}: MACs {format_count(before.macs)} -> {format_count(after.macs)} "
          f"({after.macs / max(before.macs, 1):.1%}), params {format_count(before.params)} -> "
          f"{format_count(after.params)} ({after.params / max(before.params, 1):.1%})")
    if args.report:
        from kprune.tools import plot

        _write_figure(plot.channels(before, after), args.report)


def _check_image_path(path, flag: str) -> None:
    """Fail before any work when `path` is no image file or matplotlib is missing."""
    if not path:
        return
    if os.path.splitext(path)[1].lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise ValueError(f"{flag} writes a picture: give a file ending in .png, .svg, .pdf or "
                         f".jpg; got '{path}'.")
    from kprune.tools import plot

    plot._figure_class()  # raises KprunError "pip install kprune[plot]" without matplotlib


def _write_figure(figure, path: str, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    if not quiet:
        print(f"wrote {path}")


def _decompose(args) -> None:
    import numpy as np

    import kprune
    from kprune.profile import format_count, profile

    model = load_model(args.model)
    evaluate = None
    if args.data or args.labels:
        if not (args.data and args.labels):
            raise ValueError("--data and --labels go together (inputs and integer labels).")
        x, y = np.load(args.data), np.load(args.labels)

        def evaluate(m):  # top-1 accuracy on the given samples
            return float(np.mean(np.argmax(m.predict(x, batch_size=256, verbose=0), -1) == y))
    needs = [what for what, on in (("--metric accuracy", args.metric == "accuracy"),
                                   ("--method enc_inf", args.method == "enc_inf")) if on]
    if needs and evaluate is None:
        raise ValueError(f"{' and '.join(needs)} evaluate the model: give --data X.npy and "
                         "--labels Y.npy.")
    kinds = ("channel",) if args.no_spatial else ("channel", "spatial")
    selection = kprune.lowrank.select_ranks(
        model, args.flops_target, args.method, metric=args.metric, evaluate=evaluate,
        kinds=kinds, exclude=tuple(args.exclude), verbose=0)
    small = kprune.lowrank.decompose(model, selection.ranks)
    _save(small, args.output)
    before, after = profile(model), profile(small)
    print(selection)
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
    """The `kprune` argument parser with its subcommands."""
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
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw each layer's MACs share and output channels to this picture "
                        "(needs matplotlib: pip install kprune[plot])")
    p.set_defaults(run=_profile)

    p = sub.add_parser("prune", help="remove channels to a MACs, parameter or latency target, or a ratio",
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
    target.add_argument("--params-target", type=float, metavar="P",
                        help="share of the original parameters to keep, e.g. 0.5")
    target.add_argument("--latency-target", type=float, metavar="T",
                        help="share of the original latency to keep, measured on --runtime "
                             "at --batch-size and --threads, e.g. 0.5")
    p.add_argument("--runtime", choices=("keras", "tflite"), default="keras",
                   help="where --latency-target is timed (default: keras)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="batch size --latency-target is timed at (default: 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads --latency-target is timed with (default: the runtime's)")
    p.add_argument("--criterion", default="l1",
                   help="channel importance: l1, l2, fpgm, bn_scale, orthogonality, random "
                        "(default: l1)")
    p.add_argument("--scope", choices=("local", "global"), default="local",
                   help="same share in every group, or one ranking over all (default: local)")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="keep a multiple of N channels per group (default: 1)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="layer name or class to leave whole (repeatable)")
    p.add_argument("--report", metavar="FILE.png",
                   help="also draw the output channels per layer before and after to this "
                        "picture (needs matplotlib: pip install kprune[plot])")
    p.set_defaults(run=_prune)

    p = sub.add_parser("decompose", help="replace layers by low-rank factors to a MACs target",
                       description="Choose a rank for every Dense and convolution layer (ENC "
                                   "rank selection) and replace each by its truncated SVD, two "
                                   "plain Keras layers (kprune.lowrank).")
    p.add_argument("model", metavar="IN", help="the .keras model to decompose")
    p.add_argument("output", metavar="OUT", help="where to save the decomposed .keras model")
    p.add_argument("--flops-target", type=float, required=True, metavar="F",
                   help="share of the original MACs to keep, e.g. 0.5")
    p.add_argument("--method", choices=("uniform", "enc_map", "enc_model", "enc_inf"),
                   default="enc_map",
                   help="rank selection: uniform, enc_map, enc_model or enc_inf (default: "
                        "enc_map)")
    p.add_argument("--metric", choices=("energy", "accuracy"), default="energy",
                   help="per-layer metric: singular-value energy kept, or measured accuracy "
                        "(needs --data and --labels) (default: energy)")
    p.add_argument("--data", metavar="X.npy",
                   help="held-out inputs, for --metric accuracy and --method enc_inf")
    p.add_argument("--labels", metavar="Y.npy", help="their integer labels (top-1 accuracy)")
    p.add_argument("--no-spatial", action="store_true",
                   help="only channel decompositions (no k x 1 + 1 x k convolutions)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="layer name or class to leave whole (repeatable)")
    p.set_defaults(run=_decompose)

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
