"""Pictures of a pruning run: widths, MACs, schedules, sensitivity, trade-offs.

Every function returns a `matplotlib.figure.Figure` built directly (no
`pyplot`): nothing is shown, the global backend is left as the user set it,
and the figure renders headless, e.g. `fig.savefig("channels.png")`. In a
notebook, `display(fig)` shows it.

matplotlib is an optional dependency: `pip install kprune[plot]`.

Example:

>>> fig = kprune.plot.channels(model, small)
>>> fig.savefig("channels.png", dpi=120)
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kprune.errors import KprunError

__all__ = ["channels", "macs_share", "mask_schedule", "overview", "sensitivity", "tradeoff"]


# --------------------------------------------------------------------------
# matplotlib, lazily
# --------------------------------------------------------------------------
def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise KprunError("kprune.plot needs matplotlib: pip install kprune[plot] "
                         f"(or pip install matplotlib); importing it failed: {exc}") from None
    return Figure


def _new_figure(width: float, height: float, rows: int = 1):
    figure = _figure_class()(figsize=(width, height), layout="constrained")
    axes = [figure.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return figure, axes


# --------------------------------------------------------------------------
# Per-layer rows
# --------------------------------------------------------------------------
def _profile(model_or_profile):
    from kprune.profile import Profile, profile

    if isinstance(model_or_profile, Profile):
        return model_or_profile
    if not hasattr(model_or_profile, "layers"):
        raise KprunError(f"expected a Keras model or a kprune Profile, got "
                         f"{type(model_or_profile).__name__}.")
    return profile(model_or_profile)


def _width_rows(prof) -> dict:
    """`{layer name: output channels}` of the layers that do MACs, in model order."""
    rows = {}
    for row in prof.layers:
        shape = tuple(row.output_shape or ())
        if row.macs > 0 and shape and shape[-1] is not None and row.name not in rows:
            rows[row.name] = int(shape[-1])
    return rows


def _label_ticks(ax, names: list, max_labels: int = 40) -> None:
    step = max(1, int(np.ceil(len(names) / max_labels)))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_xlim(-0.75, len(names) - 0.25)


def _draw_channels(ax, original, pruned=None) -> None:
    before = _width_rows(_profile(original))
    if not before:
        raise KprunError("the model has no layers with MACs to draw.")
    names = list(before)
    x = np.arange(len(names))
    if pruned is None:
        ax.bar(x, [before[n] for n in names], color="tab:blue", label="channels")
        ax.set_title("Output channels per layer")
    else:
        after = _width_rows(_profile(pruned))
        kept = [after.get(n, 0) for n in names]
        ax.bar(x, [before[n] for n in names], color="lightgray", label="original")
        ax.bar(x, kept, color="tab:blue", width=0.6, label="pruned")
        total_before, total_after = sum(before.values()), sum(after.get(n, 0) for n in names)
        ax.set_title(f"Output channels per layer: {total_after:,} of {total_before:,} kept "
                     f"({total_after / max(total_before, 1):.0%})")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("output channels")
    _label_ticks(ax, names)


def _draw_macs_share(ax, model, top: int) -> None:
    prof = _profile(model)
    rows = [(r.name, r.macs) for r in prof.layers if r.macs > 0]
    if not rows or prof.macs <= 0:
        raise KprunError("the model has no layers with MACs to draw.")
    shares = [(name, 100.0 * macs / prof.macs) for name, macs in rows]
    if top and len(shares) > top:
        ranked = sorted(range(len(shares)), key=lambda i: -shares[i][1])
        keep = sorted(ranked[:top - 1])
        rest = sum(shares[i][1] for i in ranked[top - 1:])
        shares = [shares[i] for i in keep] + [(f"{len(ranked) - top + 1} others", rest)]
    names = [n for n, _ in shares]
    ax.bar(np.arange(len(shares)), [s for _, s in shares], color="tab:orange")
    from kprune.profile import format_count

    ax.set_title(f"Share of the MACs per layer ({format_count(prof.macs)} MACs in all)")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the MACs (%)")
    _label_ticks(ax, names)


# --------------------------------------------------------------------------
# Public figures
# --------------------------------------------------------------------------
def channels(original, pruned=None, title: str | None = None):
    """Output channels of every layer with MACs, before and after pruning.

    Layers are matched by name; a layer the pruned model lacks counts 0.

    Args:
        original: The unpruned Keras model (or its `kprune.profile`).
        pruned: The pruned model (or its profile); None draws one model.
        title: Replaces the axes' title.

    Returns:
        A matplotlib Figure with one axes.

    Example:

    >>> kprune.plot.channels(model, kprune.prune(model, flops_target=0.5)).savefig("c.png")
    """
    figure, (ax,) = _new_figure(*_size(original))
    _draw_channels(ax, original, pruned)
    if title:
        ax.set_title(title)
    return figure


def macs_share(model, top: int = 40, title: str | None = None):
    """Each layer's share of the model's MACs, in percent.

    Args:
        model: A Keras model or its `kprune.profile`.
        top: Most bars; the smallest layers beyond `top - 1` are summed into
            one "others" bar (0: every layer).
        title: Replaces the axes' title.

    Returns:
        A matplotlib Figure with one axes.
    """
    figure, (ax,) = _new_figure(*_size(model, top))
    _draw_macs_share(ax, model, top)
    if title:
        ax.set_title(title)
    return figure


def overview(model, top: int = 40):
    """`macs_share` above `channels` for one model (what `kprune profile --plot` writes)."""
    width, height = _size(model)
    figure, (top_ax, bottom_ax) = _new_figure(width, 2 * height, rows=2)
    _draw_macs_share(top_ax, model, top)
    _draw_channels(bottom_ax, model)
    return figure


def _size(model, top: int = 0):
    layers = len(_width_rows(_profile(model)))
    if top:
        layers = min(layers, top)
    return float(np.clip(2.5 + 0.22 * layers, 6.0, 16.0)), 4.0


def _history(scheduler) -> list:
    history = getattr(scheduler, "history", scheduler)
    try:
        rows = [tuple(row) for row in history]
    except TypeError:
        raise KprunError("mask_schedule needs a MaskScheduler (its `history`) or a list of "
                         "(step, macs_ratio, masked) tuples.") from None
    if not rows:
        raise KprunError("the schedule has no updates yet: train with the MaskScheduler first "
                         "(updates start after `warmup_steps`).")
    if any(len(row) != 3 for row in rows):
        raise KprunError("every history row must be (step, macs_ratio, masked channels).")
    return rows


def mask_schedule(scheduler, title: str | None = None):
    """MACs ratio and masked channels over the training steps of a ResRep run.

    Args:
        scheduler: A `kprune.resrep.MaskScheduler` after training (its
            `history`), or a list of `(step, macs_ratio, masked)` tuples.
        title: Replaces the axes' title.

    Returns:
        A matplotlib Figure; `axes[0]` holds the MACs ratio, `axes[1]` (its
        twin, right-hand scale) the masked channels.
    """
    rows = _history(scheduler)
    steps = [r[0] for r in rows]
    figure, (ax,) = _new_figure(7.0, 4.0)
    ax.plot(steps, [100.0 * r[1] for r in rows], color="tab:blue", marker=".",
            label="MACs after conversion")
    target = getattr(scheduler, "flops_target", None)
    if target is not None:
        ax.axhline(100.0 * target, color="tab:blue", linestyle=":", label="target")
    ax.set_xlabel("training step")
    ax.set_ylabel("MACs after conversion (% of original)")
    ax.set_title(title or "ResRep mask schedule")
    twin = ax.twinx()
    twin.plot(steps, [r[2] for r in rows], color="tab:red", marker=".", label="masked channels")
    twin.set_ylabel("masked channels")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    return figure


def _sensitivity_table(result):
    if isinstance(result, dict):
        if "table" in result:
            return dict(result["table"]), result.get("baseline"), result.get("labels") or {}
        return dict(result), None, {}
    if hasattr(result, "table") and hasattr(result, "baseline"):
        return dict(result.table), result.baseline, dict(getattr(result, "labels", None) or {})
    raise KprunError("sensitivity needs a result with `table` ({group: {ratio: score}}) and "
                     f"`baseline`, or a plain dict; got {type(result).__name__}.")


def sensitivity(result, max_groups: int = 20, ylabel: str = "accuracy",
                title: str | None = None):
    """Score against pruning ratio, one line per group pruned alone.

    Args:
        result: A `kprune.search.sensitivity` result (any object with
            `table = {group id: {ratio: score}}` and `baseline`), a dict with
            those keys, or the table itself as a plain dict.
        max_groups: Most lines; the groups that lose most at the largest
            ratio are drawn.
        ylabel: What the score is.
        title: Replaces the axes' title.

    Returns:
        A matplotlib Figure with one axes.
    """
    table, baseline, labels = _sensitivity_table(result)
    table = {gid: row for gid, row in table.items() if row}
    if not table:
        raise KprunError("the sensitivity table is empty.")
    figure, (ax,) = _new_figure(7.0, 4.5)

    def worst(gid):
        row = table[gid]
        return row[max(row)]

    groups = sorted(table, key=worst)[:max_groups] if max_groups else list(table)
    for gid in sorted(groups, key=lambda g: str(g)):
        row = table[gid]
        ratios = sorted(row)
        ax.plot(ratios, [row[r] for r in ratios], marker=".", label=str(labels.get(gid, gid)))
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("share of the group's channels removed")
    ax.set_ylabel(ylabel)
    shown = f" ({len(groups)} of {len(table)} groups)" if len(groups) < len(table) else ""
    ax.set_title(title or f"Sensitivity: each group pruned alone{shown}")
    ax.legend(fontsize=7, ncol=2 if len(groups) > 8 else 1, loc="lower left")
    return figure


def _tradeoff_points(results: Iterable) -> dict:
    series: dict = {}
    for item in results:
        if isinstance(item, dict):
            try:
                name, cost, score = item["name"], item["cost"], item["accuracy"]
            except KeyError as exc:
                raise KprunError(f"tradeoff: every dict needs 'name', 'cost' and 'accuracy'; "
                                 f"missing {exc}.") from None
        else:
            try:
                name, cost, score = item
            except (TypeError, ValueError):
                raise KprunError("tradeoff: every result is a dict or a (name, cost, accuracy) "
                                 f"tuple; got {item!r}.") from None
        series.setdefault(str(name), []).append((float(cost), float(score)))
    if not series:
        raise KprunError("tradeoff: no results to draw.")
    return series


def tradeoff(results, cost: str = "MACs", ylabel: str = "accuracy", title: str | None = None):
    """Accuracy against cost (MACs, latency...) for several named results.

    Points that share a name are joined in order of cost, so one method at
    several targets draws one curve.

    Args:
        results: Dicts `{"name", "cost", "accuracy"}` or `(name, cost,
            accuracy)` tuples.
        cost: The x axis label, e.g. `"MACs"`, `"MACs (% of original)"` or
            `"latency (ms)"`.
        ylabel: What the score is.
        title: Replaces the axes' title.

    Returns:
        A matplotlib Figure with one axes.
    """
    series = _tradeoff_points(results)
    figure, (ax,) = _new_figure(6.5, 4.5)
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        if len(points) == 1:
            ax.annotate(name, points[0], textcoords="offset points", xytext=(0, 7), fontsize=8,
                        ha="center")
    ax.set_xlabel(cost)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel.capitalize()} against {cost}")
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.1)
    ax.legend(fontsize=8)
    return figure
