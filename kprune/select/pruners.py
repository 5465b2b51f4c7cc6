"""Which channels go: from per-channel scores and a target to a pruning plan.

A plan is `{group id: sorted list of channel indices to drop}`, the input of
`kprune.surgeon.apply_plan`. Every plan respects the guards:

* at least `min_channels` channels of every group are kept (never fewer than 1);
* at most `max_ratio` of a group's channels are dropped;
* the kept count is a multiple of `round_to` wherever the other guards allow;
* groups feeding grouped convolutions lose the same number of channels in
  every convolution group (`Group.partitions`);
* excluded groups are left whole.

Example:

>>> graph = DependencyGraph(model)
>>> scores = kprune.criteria.score_groups(model, criterion="l1", graph=graph)
>>> plan = global_plan(graph.prunable_groups(), scores, 0.3, round_to=8)
>>> small = kprune.surgeon.apply_plan(model, plan, graph)
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import keras
import numpy as np

from kprune.errors import KprunError


# --------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------
def check_guards(max_ratio: float = 0.9, min_channels: int = 1, round_to: int = 1) -> None:
    """Raise a clear `KprunError` for a guard value out of range."""
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) \
            or not 0.0 <= max_ratio <= 1.0:
        raise KprunError(f"`max_ratio` must be a number in [0, 1], got {max_ratio!r}.")
    if isinstance(min_channels, bool) or not isinstance(min_channels, (int, np.integer)) \
            or min_channels < 1:
        raise KprunError(f"`min_channels` must be an int >= 1 (a group is never emptied), "
                         f"got {min_channels!r}.")
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise KprunError(f"`round_to` must be an int >= 1, got {round_to!r}.")


def _matches(layer, entry) -> bool:
    if isinstance(entry, str):
        return layer.name == entry or type(layer).__name__ == entry
    if isinstance(entry, type):
        return isinstance(layer, entry)
    return layer is entry


def check_exclude(exclude) -> tuple:
    """`exclude` as a tuple of names, classes or layers (a single entry is wrapped)."""
    if exclude is None:
        return ()
    if isinstance(exclude, (str, type, keras.layers.Layer)):
        return (exclude,)
    try:
        entries = tuple(exclude)
    except TypeError:
        raise KprunError(f"`exclude` must be layer names, layer classes or class names, "
                         f"got {exclude!r}.") from None
    for entry in entries:
        if not isinstance(entry, (str, type, keras.layers.Layer)):
            raise KprunError(f"`exclude` entries must be layer names, layer classes or class "
                             f"names, got {entry!r}.")
    return entries


def is_excluded(group, exclude) -> bool:
    """Whether any layer on `group` (producer, parameter or consumer) is excluded.

    Args:
        group: A `kprune.graph.Group`.
        exclude: Layer names, class names (`"Dense"`) or classes (`keras.layers.Dense`).

    Returns:
        True if the group must stay whole, so every excluded layer keeps its shape.

    Example:

    >>> is_excluded(graph.group_of("conv1"), ["conv1"])
    True
    """
    entries = check_exclude(exclude)
    return any(_matches(m.layer, e) for m in group.members for e in entries)


# --------------------------------------------------------------------------
# Even removal for grouped convolutions
# --------------------------------------------------------------------------
def _cells(group):
    """The blocks that must lose equal numbers of channels, and the free channels.

    Returns:
        `(cells, free)`: a list of index arrays and an index array, or None when
        no even removal exists (partitions that do not nest).
    """
    if not group.partitions:
        return [np.arange(group.size)], np.zeros(0, dtype=np.int64)
    keys = np.stack(group.partitions, axis=1)  # (channels, partitions)
    free_mask = (keys < 0).all(axis=1)
    uniq, inverse = np.unique(keys[~free_mask], axis=0, return_inverse=True)
    constrained = np.flatnonzero(~free_mask)
    cells = [constrained[inverse.reshape(-1) == i] for i in range(len(uniq))]
    if len({len(c) for c in cells}) > 1:
        return None
    for p in range(keys.shape[1]):  # each conv group must hold the same number of cells
        ids = uniq[:, p]
        counts = np.unique(ids[ids >= 0], return_counts=True)[1]
        if len(set(counts.tolist())) > 1:
            return None
    return cells, np.flatnonzero(free_mask)


def _split(d: int, cells: list, free: np.ndarray, size: int):
    """(per-cell count, free count) summing to `d`, or None if impossible."""
    n, per = len(cells), len(cells[0]) if cells else 0
    if not cells:
        return (0, d) if d <= len(free) else None
    target = d * (size - len(free)) / max(size, 1) / n
    for q in sorted(range(per), key=lambda q: (abs(q - target), q)):
        f = d - q * n
        if 0 <= f <= len(free):
            return q, f
    return None


def drop_count(group, desired: int, *, max_ratio: float = 0.9, min_channels: int = 1,
               round_to: int = 1) -> int:
    """The number of channels to drop from `group` closest to `desired` the guards allow.

    Args:
        group: A `kprune.graph.Group`.
        desired: How many channels the target asks for.
        max_ratio, min_channels, round_to: The guards (see the module docstring).

    Returns:
        An int in `[0, desired_max]`: even over convolution groups, leaving a
        kept count that is a multiple of `round_to` when one is reachable.

    Example:

    >>> drop_count(group_of_64, 30, round_to=8)   # keeps 32
    32
    """
    size = group.size
    cap = min(int(math.floor(max_ratio * size + 1e-9)), size - min_channels)
    structure = _cells(group)
    if cap <= 0 or structure is None:
        return 0
    cells, free = structure
    ok = np.zeros(cap + 1, dtype=bool)
    per = len(cells[0]) if cells else 1
    for q in range(per):  # q channels from each cell plus up to len(free) free ones
        start = q * len(cells)
        ok[start:start + len(free) + 1] = True
    feasible = np.flatnonzero(ok)
    rounded = feasible[(size - feasible) % round_to == 0]
    pool = rounded if round_to > 1 and len(rounded) else feasible
    return int(pool[np.argmin(np.abs(pool - desired) * 2 + (pool > desired))])


def lowest(group, scores: np.ndarray, n: int) -> list:
    """The `n` lowest-scoring channels of `group`, as many from each conv group.

    Args:
        group: A `kprune.graph.Group`.
        scores: One score per channel of the group.
        n: How many to drop (a count `drop_count` returned).

    Returns:
        Sorted list of channel indices.

    Raises:
        KprunError: if `n` cannot be spread evenly over the conv groups.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (group.size,):
        raise KprunError(f"Group {group.id} ({', '.join(group.layer_names()[:2])}) has "
                         f"{group.size} channels but got scores of shape {scores.shape}.")
    if n <= 0:
        return []
    structure = _cells(group)
    split = None if structure is None else _split(n, *structure, group.size)
    if split is None:
        raise KprunError(f"Cannot drop {n} channels from the group of layer "
                         f"'{group.layer_names()[0]}' evenly over its convolution groups.")
    (cells, free), (q, f) = structure, split
    chosen = [c[np.argsort(scores[c], kind="stable")[:q]] for c in cells]
    chosen.append(free[np.argsort(scores[free], kind="stable")[:f]])
    return sorted(int(i) for i in np.concatenate(chosen))


# --------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------
def _scored(groups, scores: Mapping) -> list:
    return [g for g in groups if g.id in scores and g.prunable]


def local_plan(groups: Iterable, scores: Mapping, ratio, *, max_ratio: float = 0.9,
               min_channels: int = 1, round_to: int = 1) -> dict:
    """Drop the same share of every group, lowest scores first.

    Args:
        groups: Candidate `Group`s (groups without scores are skipped).
        scores: `{group id: scores}`.
        ratio: Share of channels to drop in [0, 1), or `{group id: share}`.
        max_ratio, min_channels, round_to: The guards.

    Returns:
        The plan `{group id: sorted channel indices}` (groups losing nothing omitted).

    Example:

    >>> plan = local_plan(graph.prunable_groups(), scores, 0.5)
    """
    check_guards(max_ratio, min_channels, round_to)
    plan = {}
    for g in _scored(groups, scores):
        share = ratio.get(g.id, 0.0) if isinstance(ratio, Mapping) else ratio
        desired = int(math.floor(share * g.size + 0.5 + 1e-9))
        n = drop_count(g, desired, max_ratio=max_ratio, min_channels=min_channels,
                       round_to=round_to)
        if n:
            plan[g.id] = lowest(g, scores[g.id], n)
    return plan


def _normalised(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    mean = np.abs(values).mean() if len(values) else 0.0
    return values / mean if mean > 0 else values


def global_plan(groups: Iterable, scores: Mapping, ratio: float, *, max_ratio: float = 0.9,
                min_channels: int = 1, round_to: int = 1) -> dict:
    """Drop `ratio` of all candidate channels together, lowest normalised scores first.

    Each group's scores are divided by their mean so groups of different scales
    compare; channels are then taken from the bottom of one global ranking while
    each group stays within its guards.

    Args:
        groups: Candidate `Group`s (groups without scores are skipped).
        scores: `{group id: scores}`.
        ratio: Share of all candidate channels to drop, in [0, 1).
        max_ratio, min_channels, round_to: The guards.

    Returns:
        The plan `{group id: sorted channel indices}`.

    Example:

    >>> plan = global_plan(graph.prunable_groups(), scores, 0.5)
    """
    check_guards(max_ratio, min_channels, round_to)
    cands = _scored(groups, scores)
    total = int(math.floor(ratio * sum(g.size for g in cands) + 0.5 + 1e-9))
    if not cands or total <= 0:
        return {}
    caps = {g.id: drop_count(g, g.size, max_ratio=max_ratio, min_channels=min_channels)
            for g in cands}
    values = {g.id: _normalised(scores[g.id]) for g in cands}
    return ranked_plan(cands, scores, take_lowest(cands, values, caps, total),
                       max_ratio=max_ratio, min_channels=min_channels, round_to=round_to)


def take_lowest(groups: list, values: Mapping, caps: Mapping, total: int) -> dict:
    """How many channels each group gives when `total` come off one global ranking.

    All channels of `groups` are ranked together by `values`, lowest first;
    they are taken in that order, skipping a group once it has given
    `caps[id]`, until `total` are taken.

    Args:
        groups: The candidate `Group`s.
        values: `{group id: one value per channel}`, comparable across groups.
        caps: `{group id: most channels the group may give}`.
        total: Channels to take in all.

    Returns:
        `{group id: count}`.

    Example:

    >>> take_lowest(groups, {0: [0.1, 0.9], 1: [0.5, 0.2]}, {0: 1, 1: 1}, 2)
    {0: 1, 1: 1}
    """
    ranked = np.concatenate([np.asarray(values[g.id], dtype=np.float64) for g in groups])
    owner = np.concatenate([np.full(g.size, g.id) for g in groups])
    counts = {g.id: 0 for g in groups}
    taken = 0
    for i in np.argsort(ranked, kind="stable"):
        if taken >= total:
            break
        gid = int(owner[i])
        if counts[gid] < caps[gid]:
            counts[gid] += 1
            taken += 1
    return counts


def ranked_plan(groups: list, scores: Mapping, counts: Mapping, *, max_ratio: float = 0.9,
                min_channels: int = 1, round_to: int = 1) -> dict:
    """The plan that drops `counts[id]` lowest-scored channels of each group, within the guards.

    Args:
        groups: The candidate `Group`s.
        scores: `{group id: scores}`.
        counts: `{group id: channels wanted}` (from `take_lowest`).
        max_ratio, min_channels, round_to: The guards (see `drop_count`).

    Returns:
        The plan `{group id: sorted channel indices}`.
    """
    plan = {}
    for g in groups:
        n = drop_count(g, counts[g.id], max_ratio=max_ratio, min_channels=min_channels,
                       round_to=round_to)
        if n:
            plan[g.id] = lowest(g, scores[g.id], n)
    return plan


def make_plan(groups: Iterable, scores: Mapping, ratio, scope: str = "local",
              exclude=(), **guards) -> dict:
    """A plan for `scope` 'local' or 'global', leaving excluded groups whole.

    Args:
        groups: Candidate `Group`s.
        scores: `{group id: scores}`.
        ratio: The share to drop (per group for 'local', overall for 'global').
        scope: 'local' or 'global'.
        exclude: Layer names, class names or classes whose groups stay whole.
        **guards: `max_ratio`, `min_channels`, `round_to`.

    Returns:
        The plan `{group id: sorted channel indices}`.

    Example:

    >>> make_plan(graph.prunable_groups(), scores, 0.3, scope="global", exclude=["Dense"])
    """
    entries = check_exclude(exclude)
    kept = [g for g in groups if not is_excluded(g, entries)]
    if scope == "local":
        return local_plan(kept, scores, ratio, **guards)
    if scope == "global":
        return global_plan(kept, scores, ratio, **guards)
    raise KprunError(f"Unknown scope {scope!r}; valid scopes: 'local', 'global'.")


__all__ = ["check_exclude", "check_guards", "drop_count", "global_plan", "is_excluded",
           "local_plan", "lowest", "make_plan"]
