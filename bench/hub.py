"""Every small KerasHub image backbone and classifier through kprune.

The models come from `tests/hub_archs.py` (built from constructor arguments
with random weights, so it runs offline), then `randomize`d. One row per
model, one cell per check; a check that fails does not stop the survey:

    groups   prunable/total dependency groups (`kprune.DependencyGraph`)
    conv     the same for groups with a Conv / Depthwise / Separable producer,
             leaving out those that reach a model output (whole by design)
    seen     conv layers the graph reaches / conv layers in the model (a conv
             hidden in an opaque composite layer is not seen), and `+Nop` for
             N composite layers the graph kept opaque
    r0.3     `kprune.prune(model, ratio=0.3)`
    f0.5     `kprune.prune(model, flops_target=0.5)`, with the MACs ratio
             `profile(pruned).macs / profile(model).macs`
    equiv    `check_equivalence` of `random_plan(graph, 0.3)` (rtol 1e-3,
             atol 1e-4); 'empty' when the plan removes nothing
    zero     the r0.3 model equals `zero_plan(model, prune_plan(model,
             ratio=0.3))` on every output leaf (rtol 1e-3, atol 1e-4 times
             the leaf's largest magnitude); where the plan prunes approximate
             groups (streams through a LayerNorm), its exact groups only
    struct   `keras.tree` structure of `pruned(x)` equals that of `model(x)`
    reload   `.keras` save, reload in a fresh process (safe_mode=True), same
             outputs (rtol/atol 1e-5)
    type     class of the model `prune` returns

A cell reads `ok`, `KErr` (a `kprune.KprunError`: kprune refused, cleanly),
`DIFF` (outputs or structures differ), `CRASH` (any other exception: a bug),
`TIME` (over `--cell-seconds`) or `-` (skipped: what it needs failed);
`reload` reads `CRASH*` / `DIFF*` when the unpruned model fails the same
round trip (a keras-hub problem, counted apart from kprune's crashes). The
messages of every non-ok cell, and kprune's warnings, follow the table. The
totals count the CNN models that meet the goal (more than 80% of conv groups prunable, the
flops_target=0.5 run at or under 0.5, equal to the masked original (`equiv`
and `zero`), same output structure) and the models with a CRASH.

    python bench/hub.py                                  # every model
    python bench/hub.py --models resnet_v1_basic vgg_classifier --size 64
    python bench/hub.py --no-reload                      # skip the subprocesses
    python bench/hub.py --timing                         # also time ResNet50, EfficientNetB7

Exits 0 even when rows fail (it is a survey); with `--strict`, 1 when a model
crashes or a CNN model misses the goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402
from kprune.pruning import prune_plan  # noqa: E402
from kprune.surgeon import apply_plan, zero_plan  # noqa: E402
from kprune.tools.verify import check_equivalence, random_plan, randomize  # noqa: E402
from tests.hub_archs import BACKBONES, CLASSIFIERS, KINDS, sample_input  # noqa: E402

CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
              keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
              keras.layers.Conv3DTranspose, keras.layers.DepthwiseConv1D,
              keras.layers.DepthwiseConv2D, keras.layers.SeparableConv1D,
              keras.layers.SeparableConv2D)
COLUMNS = ("groups", "conv", "seen", "r0.3", "f0.5", "equiv", "zero", "struct", "reload", "type")
WIDTHS = {"model": 32, "groups": 9, "conv": 8, "seen": 11, "r0.3": 7, "f0.5": 13, "equiv": 7,
          "zero": 6, "struct": 7, "reload": 7, "type": 30}
TOL = dict(rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    """One check of one model: a short status, a value to show, the full message."""

    status: str
    value: object = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def show(self) -> str:
        if self.value is None:
            return self.status
        return str(self.value) if self.ok else f"{self.status} {self.value}"


SKIP = Cell("-", message="skipped")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def classify(exc: BaseException) -> Cell:
    """The cell of a check that raised `exc`."""
    if isinstance(exc, _Timeout):
        return Cell("TIME", message="over the time limit")
    if isinstance(exc, kprune.KprunError):
        return Cell("KErr", message=f"KprunError: {exc}")
    if isinstance(exc, AssertionError):
        return Cell("DIFF", message=_squeeze(str(exc).split(" ACTUAL:")[0]))
    where = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in where if "/kprune/" in f.filename]
    frame = (ours or where or [None])[-1]
    at = ""
    if frame is not None:
        at = f" [at {os.path.relpath(frame.filename, ROOT)}:{frame.lineno} {frame.name}]"
    return Cell("CRASH", message=f"{type(exc).__name__}: {_squeeze(str(exc))}{at}")


def _squeeze(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def attempt(fn: Callable) -> Cell:
    """`fn()` (a Cell), or the classified cell of what it raised."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return classify(exc)


def cell(fn: Callable, seconds: int, *needs: Cell) -> Cell:
    """Run `fn() -> Cell | value`; any exception becomes its classified cell.

    Skipped (`-`) when one of `needs` is not ok; stopped after `seconds`.
    """
    if any(not n.ok for n in needs):
        return SKIP
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        out = fn()
        return out if isinstance(out, Cell) else Cell("ok", out)
    except BaseException as exc:  # noqa: BLE001 - a survey classifies everything
        if isinstance(exc, KeyboardInterrupt):
            raise
        return classify(exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
def is_conv_group(group) -> bool:
    """Whether one of `group`'s producers is a Conv, Depthwise or Separable layer."""
    return any(isinstance(m.layer, CONV_TYPES) for m in group.producers)


def group_counts(graph) -> tuple:
    """(prunable, total) over all groups, and over conv groups in play.

    A conv group is in play unless the model itself keeps it whole (it
    reaches a model input or output): those stay whole by design.
    """
    conv = [g for g in graph.groups if is_conv_group(g) and (g.prunable or g.blocker is not None)]
    return ((len(graph.prunable_groups()), len(graph.groups)),
            (sum(g.prunable for g in conv), len(conv)))


def seen_convs(model, graph) -> str:
    """'reached/all' conv layers, plus '+Nop' for composite layers kept opaque."""
    every = {id(layer) for layer in model._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, CONV_TYPES) and layer.built}  # unbuilt: created, never called
    reached = {id(c.layer) for c in graph.flat.calls if isinstance(c.layer, CONV_TYPES)}
    opaque = sum(1 for c in graph.flat.calls if getattr(c, "opaque", None))
    return f"{len(reached & every)}/{len(every)}" + (f"+{opaque}op" if opaque else "")


def leaves(y) -> list:
    return [np.asarray(t) for t in keras.tree.flatten(y)]


def check_equiv(model, graph, x) -> Cell:
    plan = random_plan(graph, 0.3, seed=0)
    if not plan:
        return Cell("empty", message="random_plan removes nothing (no prunable group)")
    check_equivalence(model, plan, x, graph=graph, **TOL)
    return Cell("ok")


def check_zero(model, pruned, x) -> Cell:
    """The r0.3 model against `zero_plan` of the same plan.

    `atol` is 1e-4 times each leaf's largest magnitude (at least 1): randomized
    weights grow activations to ~1e3, where float32 round-off alone passes 1e-4.
    """
    plan = prune_plan(model, ratio=0.3)
    graph = kprune.DependencyGraph(model)
    if any(graph.groups[gid].approximate for gid in plan):
        # Streams through a LayerNorm: close to the masked model, not equal, by nature.
        plan = {gid: ch for gid, ch in plan.items() if not graph.groups[gid].approximate}
        pruned = apply_plan(model, plan, graph)
    ref = zero_plan(model, plan)
    got, want = leaves(pruned(x, training=False)), leaves(ref(x, training=False))
    assert len(got) == len(want), f"{len(got)} output leaves, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"leaf {i}: shape {g.shape}, expected {w.shape}"
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=TOL["rtol"], atol=TOL["atol"] * scale,
                                   err_msg=f"leaf {i} (largest |value| {scale:.3g})")
    return Cell("ok")


def check_structure(model, pruned, x) -> Cell:
    want, got = model(x, training=False), pruned(x, training=False)
    skeleton = [keras.tree.map_structure(lambda t: 0, y) for y in (got, want)]
    nested = keras.tree.is_nested(got) or keras.tree.is_nested(want)
    assert type(got) is type(want) or not nested, \
        f"output is a {type(got).__name__}, expected a {type(want).__name__}"
    keras.tree.assert_same_structure(got, want)
    assert skeleton[0] == skeleton[1], f"output structure {skeleton[0]}, expected {skeleton[1]}"
    return Cell("ok")


def ratio_run(state: dict) -> Cell:
    """`prune(ratio=0.3)`; the pruned model goes to `state['pruned']`."""
    state["pruned"] = kprune.prune(state["model"], ratio=0.3)
    return Cell("ok")


def flops_run(model) -> Cell:
    small = kprune.prune(model, flops_target=0.5)
    before, after = kprune.profile(model).macs, kprune.profile(small).macs
    if before == 0:
        return Cell("DIFF", "0MACs", f"profile(model).macs is 0 (pruned: {after}): nothing "
                                     f"counted, yet prune(flops_target=0.5) returned a model")
    ratio = after / before
    status = "ok" if ratio <= 0.5 + 1e-9 else "DIFF"
    return Cell(status, f"{ratio:.3f}", "" if status == "ok" else f"MACs ratio {ratio:.3f} > 0.5")


RELOAD = r"""
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, keras, keras_hub, kprune
path, xin, yout = sys.argv[1:4]
model = keras.saving.load_model(path, safe_mode=True)
xs = dict(np.load(xin))
x = xs["__array__"] if "__array__" in xs else xs
got = [np.asarray(t) for t in keras.tree.flatten(model(x, training=False))]
want = np.load(yout)
want = [want[f"y{i}"] for i in range(len(want.files))]
assert len(got) == len(want), f"{len(got)} output leaves after reload, expected {len(want)}"
for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
print(type(model).__name__)
"""


def check_reload(pruned, original, x, seconds: int) -> Cell:
    """Save `pruned`, reload it in a fresh Python process and compare outputs.

    When that fails, the original model goes through the same round trip: if
    it fails too, the cell reads `CRASH*` (keras-hub's own save/load breaks).
    """
    got = attempt(lambda: reload_round_trip(pruned, x, seconds))
    if got.ok:
        return got
    control = attempt(lambda: reload_round_trip(original, x, seconds))
    if not control.ok:
        return Cell(got.status + "*", message=f"{got.message} (the original model fails too: "
                                              f"{control.message})")
    return got


def reload_round_trip(pruned, x, seconds: int) -> Cell:
    """One `.keras` save and fresh-process reload of `pruned`, outputs compared."""
    with tempfile.TemporaryDirectory() as tmp:
        path, xin, yout = (os.path.join(tmp, n) for n in ("m.keras", "x.npz", "y.npz"))
        pruned.save(path)
        np.savez(xin, **(x if isinstance(x, dict) else {"__array__": x}))
        np.savez(yout, **{f"y{i}": t for i, t in enumerate(leaves(pruned(x, training=False)))})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", RELOAD, path, xin, yout], env=env,
                              capture_output=True, text=True, timeout=seconds)
    if proc.returncode == 0:
        return Cell("ok", message=proc.stdout.strip())
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit {proc.returncode}"
    status = "DIFF" if last.startswith("AssertionError") else "CRASH"
    return Cell(status, message=f"fresh process: {_squeeze(last)}")


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------
def run_one(name: str, size: int | None, reload: bool, seconds: int) -> dict:
    """Every check on one model: {column: Cell}, plus 'build' and 'seconds'."""
    t0 = time.perf_counter()
    registry = BACKBONES if name in BACKBONES else CLASSIFIERS
    state = {}

    def build():
        model = registry[name](size=size)
        randomize(model, seed=0)
        state["model"], state["x"] = model, sample_input(model, batch=2, seed=0)
        return Cell("ok")

    row = {"build": cell(build, seconds)}
    row["graph"] = cell(lambda: state.setdefault("graph", kprune.DependencyGraph(state["model"])),
                        seconds, row["build"])
    counts = cell(lambda: group_counts(state["graph"]), seconds, row["graph"])
    counts = counts if row["graph"].ok else row["graph"]
    row["groups"] = _ratio_cell(counts, 0)
    row["conv"] = _ratio_cell(counts, 1)
    row["seen"] = cell(lambda: seen_convs(state["model"], state["graph"]), seconds, row["graph"])
    row["r0.3"] = cell(lambda: ratio_run(state), seconds, row["build"])
    row["f0.5"] = cell(lambda: flops_run(state["model"]), seconds, row["build"])
    row["equiv"] = cell(lambda: check_equiv(state["model"], state["graph"], state["x"]), seconds,
                        row["graph"])
    row["zero"] = cell(lambda: check_zero(state["model"], state["pruned"], state["x"]), seconds,
                       row["r0.3"])
    row["struct"] = cell(lambda: check_structure(state["model"], state["pruned"], state["x"]),
                         seconds, row["r0.3"])
    row["reload"] = (cell(lambda: check_reload(state["pruned"], state["model"], state["x"],
                                               seconds), 2 * seconds + 10,
                          row["r0.3"]) if reload else Cell("off", message="--no-reload"))
    row["type"] = (Cell("ok", type(state["pruned"]).__name__) if row["r0.3"].ok else SKIP)
    row["seconds"] = time.perf_counter() - t0
    return row


def _ratio_cell(counts: Cell, i: int) -> Cell:
    if not counts.ok:
        return counts
    done, total = counts.value[i]
    return Cell("ok", f"{done}/{total}")


def meets_goal(row: dict) -> bool:
    """More than 80% of conv groups prunable, flops reached, equal to masked, same structure."""
    if not row["conv"].ok:
        return False
    done, total = (int(v) for v in row["conv"].value.split("/"))
    return (total > 0 and done > 0.8 * total and row["f0.5"].ok and row["equiv"].ok
            and row["zero"].ok and row["struct"].ok)


def crashed(row: dict) -> bool:
    """Whether a check of `row` raised something other than KprunError (in kprune's part)."""
    return any(isinstance(c, Cell) and c.status == "CRASH" for c in row.values())


def hub_crashed(row: dict) -> bool:
    """Whether the unpruned model itself fails the reload round trip."""
    return row["reload"].status.endswith("*")


# ---------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------
def header() -> str:
    return "".join(f"{c:<{WIDTHS[c]}}" for c in ("model",) + COLUMNS) + "time"


def line(name: str, row: dict) -> str:
    if not row["build"].ok:
        return f"{name:<{WIDTHS['model']}}BUILD {row['build'].status}: {row['build'].message}"
    cells = "".join(f"{row[c].show():<{WIDTHS[c]}}" for c in COLUMNS)
    return f"{name:<{WIDTHS['model']}}{cells}{row['seconds']:.1f}s"


def notes(name: str, row: dict) -> list:
    """'model column: message' for every cell that is not ok (or has something to say)."""
    out = []
    if not row["build"].ok:
        return out
    for col in COLUMNS:
        c = row[col]
        if c.status in ("ok", "-", "off", "empty") or col == "conv" and not row["graph"].ok:
            continue
        out.append(f"{name} {col}: {c.message or c.status}")
    out += [f"{name} warning: {w}" for w in row.get("warnings", ())]
    return out


def totals(rows: dict) -> list:
    """Summary lines: goal met per CNN kind, crashes."""
    out = []
    for label, registry in (("backbones", BACKBONES), ("classifiers", CLASSIFIERS)):
        cnn = [n for n in rows if n in registry and KINDS[n] == "cnn"]
        good = [n for n in cnn if meets_goal(rows[n])]
        out.append(f"CNN {label} meeting the goal: {len(good)}/{len(cnn)}"
                   + (f" ({', '.join(good)})" if good else ""))
    bad = [n for n in rows if crashed(rows[n])]
    out.append(f"models raising something other than KprunError: {len(bad)}/{len(rows)}"
               + (f" ({', '.join(bad)})" if bad else ""))
    hub = [n for n in rows if hub_crashed(rows[n])]
    if hub:
        out.append(f"models whose unpruned original fails the reload too: {len(hub)} "
                   f"({', '.join(hub)})")
    return out


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def prune_time(name: str, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of `kprune.prune(<keras.applications name>, ratio=0.3)`."""
    model = getattr(keras.applications, name)(weights=None)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        kprune.prune(model, ratio=0.3)
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="names from tests/hub_archs.py (default: all)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side (default: each family's own small size)")
    parser.add_argument("--no-reload", action="store_true", help="skip the fresh-process reload")
    parser.add_argument("--timing", action="store_true",
                        help="time prune(ratio=0.3) of ResNet50 and EfficientNetB7 (best of 3)")
    parser.add_argument("--cell-seconds", type=int, default=300, help="time limit of one check")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a model crashes or a CNN model misses the goal")
    args = parser.parse_args(argv)
    names = args.models or list(BACKBONES) + list(CLASSIFIERS)
    unknown = [n for n in names if n not in BACKBONES and n not in CLASSIFIERS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(BACKBONES) + list(CLASSIFIERS)}")
    rows = {}
    print(header(), flush=True)
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows[name] = run_one(name, args.size, not args.no_reload, args.cell_seconds)
        rows[name]["warnings"] = list(dict.fromkeys(
            _squeeze(str(w.message)) for w in caught if "kprune" in str(w.message)))
        print(line(name, rows[name]), flush=True)
        keras.backend.clear_session()
    print("\nNotes (every cell that is not ok):")
    for name in names:
        for note in notes(name, rows[name]):
            print(f"  {note}")
    print()
    for text in totals(rows):
        print(text)
    if args.timing:
        for name in ("ResNet50", "EfficientNetB7"):
            print(f"prune(ratio=0.3) {name}: {prune_time(name):.2f}s (best of 3)", flush=True)
            keras.backend.clear_session()
    if args.strict:
        missed = [n for n in names if KINDS[n] == "cnn" and not meets_goal(rows[n])]
        return 1 if missed or any(crashed(r) for r in rows.values()) else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
