"""KerasHub vision transformers through kprune: residual streams before and after `hub_rules`.

The small ViT, DeiT, DINOv2 and Swin backbones of `tests/hub_archs.py` (and
the ViT / DeiT / Swin image classifiers), built offline with random weights.
`before` counts run with the rules, tracing functions and MAC counters of
`kprune.tools.hub_rules` taken out (the state without them), `after` with
them. One row per model:

    exact     prunable groups with `DependencyGraph(model, approximate=False)`
              (exact groups only), before -> after
    all       the same with approximate groups (streams through LayerNorm)
    stream    the residual stream (the patch embedding's output group):
              `ok` prunable; `out` prunable once `prune_outputs=True` (on a
              backbone the stream is the model's output, kept whole by
              default); else why not
    f0.5      MACs ratio `profile(pruned) / profile(model)` of
              `kprune.prune(model, flops_target=0.5)`
    params    parameters before -> after that prune
    reload    `.keras` save, reload in a fresh process (safe_mode=True), same
              outputs (bench/hub.py's check)
    time      seconds for the row

`dinov2_p4` is DINOv2 with 4 px patches: in hub_archs' DINOv2 (14 px patches,
9 of them, width 16) the patch convolution is 64% of the MACs, and its
output, the stream, is the backbone's output, so 0.5 is out of reach there by
construction. Cells read as in bench/hub.py (`KErr`: kprune refused,
cleanly; messages follow the table).

    python bench/hub_vit.py                       # about 2 minutes on 2 CPU cores
    python bench/hub_vit.py --models vit deit --no-reload   # no fresh-process reloads
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import importlib  # noqa: E402

import kprune  # noqa: E402  (before keras_hub: what hub_rules adds is seen below)

_TABLES = tuple(getattr(importlib.import_module(module), table) for module, table in (
    ("kprune.graph.rules", "_RULES"), ("kprune.graph.walk", "_TRACERS"),
    ("kprune.profile", "_COUNTERS")))
_WITHOUT = [dict(t) for t in _TABLES]

import keras  # noqa: E402
import keras_hub  # noqa: E402,F401  (registers kprune.tools.hub_rules)

from bench.hub import Cell, _squeeze, cell, check_reload  # noqa: E402
from kprune.tools.verify import randomize  # noqa: E402
from tests.hub_archs import BACKBONES, CLASSIFIERS, sample_input  # noqa: E402

COLUMNS = ("exact", "all", "stream", "f0.5", "params", "reload")
WIDTHS = {"model": 20, "exact": 9, "all": 9, "stream": 8, "f0.5": 8, "params": 15, "reload": 8}
EMBEDDINGS = {"ViTPatchingAndEmbedding", "DeiTEmbeddings", "DINOV2Embedding", "PatchEmbedding"}


def dinov2_p4(size=None):
    """DINOv2 with 4 px patches on 28 px images (the patch convolution 14% of the MACs)."""
    return keras_hub.models.DINOV2Backbone(
        patch_size=4, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
        layer_scale_init_value=1.0, num_register_tokens=2, use_swiglu_ffn=False,
        image_shape=(28, 28, 3), position_embedding_shape=(28, 28, 3))


MODELS = {"vit": BACKBONES["vit"], "deit": BACKBONES["deit"], "swin": BACKBONES["swin"],
          "dinov2": BACKBONES["dinov2"], "dinov2_p4": dinov2_p4,
          "vit_classifier": CLASSIFIERS["vit_classifier"],
          "deit_classifier": CLASSIFIERS["deit_classifier"],
          "swin_classifier": CLASSIFIERS["swin_classifier"]}


@contextlib.contextmanager
def without_hub_rules():
    """The rule, trace and MAC-counter tables as they were before keras_hub was imported."""
    saved = [dict(t) for t in _TABLES]
    try:
        for table, old in zip(_TABLES, _WITHOUT):
            table.clear()
            table.update(old)
        yield
    finally:
        for table, new in zip(_TABLES, saved):
            table.clear()
            table.update(new)


def build(name: str) -> keras.Model:
    """The model with random weights; DINOv2's saved position embeddings kept in step
    with the interpolated ones it uses (it re-interpolates them on load)."""
    model = MODELS[name]()
    randomize(model, seed=0)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer).__name__ == "DINOV2Embedding":
            layer.position_embeddings.assign(layer.interpolated_position_embeddings)
    return model


def counts(model) -> tuple:
    """(exact, all) prunable group counts."""
    exact = len(kprune.DependencyGraph(model, approximate=False).prunable_groups())
    return exact, len(kprune.DependencyGraph(model).prunable_groups())


def stream_state(model) -> Cell:
    """Whether the group of the patch embedding's output is prunable (see the docstring)."""
    for graph, tag in ((kprune.DependencyGraph(model), "ok"),
                       (kprune.DependencyGraph(model, prune_outputs=True), "out")):
        calls = [c for c in graph.flat.calls if type(c.layer).__name__ in EMBEDDINGS]
        if not calls:
            return Cell("none", message="no patch embedding in the flat graph")
        group = graph.group_of(calls[0].layer.name)
        if group.prunable:
            return Cell("ok", tag)
    return Cell("KErr", message=f"stream: {group.reason}")


def flops_cell(state: dict) -> Cell:
    model = state["model"]
    small = kprune.prune(model, flops_target=0.5)
    state["small"] = small
    before, after = kprune.profile(model), kprune.profile(small)
    state["params"] = f"{before.params}->{after.params}"
    return Cell("ok", f"{after.macs / before.macs:.3f}")


def run_one(name: str, reload: bool, seconds: int) -> dict:
    t0 = time.perf_counter()
    state = {}

    def make():
        state["model"] = build(name)
        state["x"] = sample_input(state["model"])
        return Cell("ok")

    row = {"build": cell(make, seconds)}

    def before():
        with without_hub_rules():
            return counts(state["model"])

    old = cell(before, seconds, row["build"])
    new = cell(lambda: counts(state["model"]), seconds, row["build"])
    for i, col in enumerate(("exact", "all")):
        row[col] = (Cell("ok", f"{old.value[i]}->{new.value[i]}") if old.ok and new.ok
                    else old if not old.ok else new)
    row["stream"] = cell(lambda: stream_state(state["model"]), seconds, row["build"])
    row["f0.5"] = cell(lambda: flops_cell(state), seconds, row["build"])
    row["params"] = Cell("ok", state["params"]) if row["f0.5"].ok else Cell("-")
    row["reload"] = (cell(lambda: check_reload(state["small"], state["model"], state["x"],
                                               seconds), 2 * seconds + 10, row["f0.5"])
                     if reload else Cell("off", message="--no-reload"))
    row["seconds"] = time.perf_counter() - t0
    return row


def line(name: str, row: dict) -> str:
    if not row["build"].ok:
        return f"{name:<{WIDTHS['model']}}BUILD {row['build'].status}: {row['build'].message}"
    cells = "".join(f"{row[c].show():<{WIDTHS[c]}}" for c in COLUMNS)
    return f"{name:<{WIDTHS['model']}}{cells}{row['seconds']:.1f}s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all")
    parser.add_argument("--no-reload", action="store_true", help="skip the fresh-process reload")
    parser.add_argument("--cell-seconds", type=int, default=300, help="time limit of one check")
    args = parser.parse_args(argv)
    names = args.models or list(MODELS)
    print("".join(f"{c:<{WIDTHS[c]}}" for c in ("model",) + COLUMNS) + "time", flush=True)
    rows = {}
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows[name] = run_one(name, not args.no_reload, args.cell_seconds)
        print(line(name, rows[name]), flush=True)
        keras.backend.clear_session()
    print("\nNotes (every cell that is not ok):")
    for name, row in rows.items():
        for col in ("build",) + COLUMNS:
            c = row.get(col)
            if c is not None and c.status not in ("ok", "-", "off"):
                print(f"  {name} {col}: {_squeeze(c.message or c.status)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
