"""Check that a pruned model computes what the masked original computes."""

from __future__ import annotations

from typing import Mapping

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.dependency import DependencyGraph
from kprune.surgeon.plan import apply_plan, zero_plan


def random_plan(graph: DependencyGraph, fraction: float = 0.5, seed: int | None = None,
                approximate: bool = False) -> dict:
    """Drop a random `fraction` of every prunable group, evenly per conv group.

    Args:
        graph: A model's dependency graph.
        fraction: Share of each group's channels to drop (at least one channel
            is always kept).
        seed: Seed for the random choice.
        approximate: Also drop channels of approximate groups (streams through
            a LayerNorm); by default they are left out, so that the plan's
            pruned model equals `zero_plan`'s (`check_equivalence`).

    Returns:
        A plan `{group id: channel indices}` that `apply_plan` accepts.
    """
    rng = np.random.default_rng(seed)
    plan = {}
    for group in graph.prunable_groups():
        if group.approximate and not approximate:
            continue
        blocks = _blocks(group)
        per_block = min(len(b) for b in blocks)
        n = min(int(round(fraction * per_block)), per_block - 1)
        if n <= 0:
            continue
        chosen = [rng.choice(b, n, replace=False) for b in blocks]
        plan[group.id] = sorted(_keep_every_producer(group, set(np.concatenate(chosen).tolist())))
    return plan


def _keep_every_producer(group, dropped: set) -> set:
    """Give back one channel to each producer the plan would empty (a Concatenate's part)."""
    for member in group.producers:
        own = sorted(set(member.index[member.index >= 0].tolist()))
        if own and dropped.issuperset(own):
            dropped.discard(own[0])
    return dropped


def _blocks(group) -> list:
    """The channel blocks of a group that must lose equal numbers of channels."""
    if not group.partitions:
        return [np.arange(group.size)]
    part = group.partitions[0]
    blocks = [np.flatnonzero(part == p) for p in np.unique(part) if p >= 0]
    free = np.flatnonzero(part < 0)
    return blocks + ([free] if len(free) else [])


def randomize(model: keras.Model, seed: int = 0) -> None:
    """Give every weight of `model` random values (BN variances positive), in place.

    Useful before an equivalence check: freshly initialised BatchNormalization
    layers are identities and would hide slicing mistakes.
    """
    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape = tuple(var.shape)
        if not np.issubdtype(np.dtype(var.dtype), np.floating):
            continue
        value = rng.normal(0.0, 0.5, size=shape)
        if "variance" in var.path:
            value = np.abs(value) + 0.5
        var.assign(value.astype(var.dtype))


def check_equivalence(model: keras.Model, plan: Mapping, x, rtol: float = 1e-5,
                      atol: float = 1e-5, graph: DependencyGraph | None = None) -> keras.Model:
    """Prune `model` by `plan` and assert its outputs equal the masked original's.

    Args:
        model: The original model (left untouched).
        plan: Group id -> channels to drop.
        x: A batch of inputs (or a list of them).
        rtol, atol: Tolerances of `np.testing.assert_allclose`.
        graph: The model's dependency graph, if already built.

    Returns:
        The pruned model.

    Raises:
        AssertionError: if any output differs, or the pruned model's output
            structure is not the original's.
        KprunError: if the plan prunes an approximate group (its pruned model
            is close to the masked one by nature, not equal).
    """
    graph = graph or DependencyGraph(model)
    approximate = [gid for gid, channels in plan.items()
                   if len(channels) and graph.groups[int(getattr(gid, "id", gid))].approximate]
    if approximate:
        notes = graph.groups[int(getattr(approximate[0], "id", approximate[0]))].notes
        raise KprunError(f"Plan prunes approximate group(s) {approximate} ({notes[0]}): the "
                         "pruned model is not the masked one; compare against a reference of "
                         "your own, or leave them out (`random_plan(..., approximate=False)`).")
    small = apply_plan(model, plan, graph)
    ref = zero_plan(model, plan, graph)
    got, want = small(x, training=False), model(x, training=False)
    keras.tree.assert_same_structure(got, want)
    got, want = keras.tree.flatten(got), keras.tree.flatten(ref(x, training=False))
    for g, w in zip(got, want):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(g), keras.ops.convert_to_numpy(w),
                                   rtol=rtol, atol=atol)
    return small
