"""Choosing channels from scores: guards, evenness, local vs global, exclusion."""

import keras
import numpy as np
import pytest
from keras import layers as L

from kprune import pruners
from kprune.errors import KprunError
from kprune.graph import DependencyGraph, Group, Member


def _group(gid, size, partitions=(), names=("conv",)):
    layers = [L.Dense(size, name=n) for n in names]
    producers = [Member(layer, "producer", np.arange(size)) for layer in layers]
    return Group(id=gid, size=size, producers=producers,
                 partitions=[np.asarray(p) for p in partitions])


# drop_count -------------------------------------------------------------------
def test_drop_count_follows_the_desired_count():
    g = _group(0, 10)
    assert pruners.drop_count(g, 3) == 3
    assert pruners.drop_count(g, 0) == 0


def test_drop_count_caps_by_max_ratio_and_min_channels():
    g = _group(0, 10)
    assert pruners.drop_count(g, 10, max_ratio=0.5) == 5
    assert pruners.drop_count(g, 10, max_ratio=1.0, min_channels=4) == 6
    # never empties a group, whatever is asked
    assert pruners.drop_count(g, 10, max_ratio=1.0) == 9
    assert pruners.drop_count(_group(0, 1), 1, max_ratio=1.0) == 0
    assert pruners.drop_count(g, 10, min_channels=20) == 0


def test_drop_count_rounds_the_kept_count():
    g = _group(0, 64)
    for desired in range(0, 57):
        n = pruners.drop_count(g, desired, round_to=8)
        assert (64 - n) % 8 == 0
        assert abs(n - desired) <= 4
    # a size that no multiple fits keeps the plain count
    assert pruners.drop_count(_group(0, 5), 2, round_to=8) == 2


def test_drop_count_is_even_over_conv_groups():
    g = _group(0, 12, partitions=[np.repeat(np.arange(3), 4)])
    counts = {pruners.drop_count(g, d, max_ratio=1.0) for d in range(13)}
    assert counts == {0, 3, 6, 9}  # every conv group keeps at least one channel


def test_uneven_partitions_are_left_whole():
    # conv groups of 4 and of 6 over 12 channels: blocks of unequal shares
    g = _group(0, 12, partitions=[np.repeat(np.arange(3), 4), np.repeat(np.arange(2), 6)])
    assert pruners.drop_count(g, 6) == 0


# lowest ---------------------------------------------------------------------
def test_lowest_takes_the_weakest_channels():
    g = _group(0, 6)
    assert pruners.lowest(g, [5, 1, 4, 0, 3, 2], 3) == [1, 3, 5]
    assert pruners.lowest(g, np.arange(6), 0) == []


def test_lowest_spreads_over_conv_groups():
    g = _group(0, 8, partitions=[np.repeat([0, 1], 4)])
    scores = [0, 1, 2, 3, 10, 11, 12, 13]  # the four weakest are all in conv group 0
    assert pruners.lowest(g, scores, 4) == [0, 1, 4, 5]
    with pytest.raises(KprunError, match="evenly"):
        pruners.lowest(g, scores, 3)


def test_lowest_checks_the_scores_shape():
    with pytest.raises(KprunError, match="8 channels but got scores of shape \\(3,\\)"):
        pruners.lowest(_group(0, 8), [1, 2, 3], 1)


# plans ------------------------------------------------------------------------
def _two_groups():
    weak = _group(0, 8, names=("a",))
    even = _group(1, 8, names=("b",))
    scores = {0: np.array([0.01, 0.02, 0.03, 0.04, 1, 1, 1, 1]), 1: np.full(8, 5.0) + np.arange(8)}
    return [weak, even], scores


def test_local_plan_drops_the_same_share_of_every_group():
    groups, scores = _two_groups()
    assert pruners.local_plan(groups, scores, 0.25) == {0: [0, 1], 1: [0, 1]}
    assert pruners.local_plan(groups, scores, {1: 0.5}) == {1: [0, 1, 2, 3]}


def test_global_plan_prunes_where_channels_are_relatively_weakest():
    groups, scores = _two_groups()
    # after division by the group mean, group 0's first four are far below everything
    assert pruners.global_plan(groups, scores, 0.25) == {0: [0, 1, 2, 3]}
    plan = pruners.global_plan(groups, scores, 0.5)
    assert sum(map(len, plan.values())) == 8
    assert plan[0][:4] == [0, 1, 2, 3]


def test_global_plan_ignores_the_scale_of_a_group():
    a, b = _group(0, 6, names=("a",)), _group(1, 6, names=("b",))
    base = np.array([1.0, 2, 3, 4, 5, 6])
    plan = pruners.global_plan([a, b], {0: base * 1000, 1: base}, 1 / 3)
    assert plan == {0: [0, 1], 1: [0, 1]}


def test_global_plan_respects_the_guards():
    groups, scores = _two_groups()
    plan = pruners.global_plan(groups, scores, 0.8, max_ratio=0.5)
    assert all(len(v) <= 4 for v in plan.values())
    plan = pruners.global_plan(groups, scores, 0.5, round_to=4)
    assert all((8 - len(v)) % 4 == 0 for v in plan.values())


def test_plans_skip_groups_without_scores_or_blocked():
    groups, scores = _two_groups()
    groups[1].prunable = False
    assert pruners.local_plan(groups, scores, 0.5).keys() == {0}
    assert pruners.local_plan(groups, {}, 0.5) == {}


# exclusion --------------------------------------------------------------------
def _model():
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Conv2D(8, 3, name="c2")(x)
    x = L.Flatten()(x)
    x = L.Dense(6, name="fc")(x)
    return keras.Model(inp, L.Dense(2, name="head")(x))


def test_exclusion_by_name_class_and_class_name():
    graph = DependencyGraph(_model())
    g1, g2, g3 = graph.group_of("c1"), graph.group_of("c2"), graph.group_of("fc")
    assert pruners.is_excluded(g1, "c1") and not pruners.is_excluded(g2, "c1")
    assert pruners.is_excluded(g1, ["BatchNormalization"])
    assert pruners.is_excluded(g1, [L.BatchNormalization])
    assert not pruners.is_excluded(g3, [L.BatchNormalization])
    # a consumer counts: excluding 'fc' keeps its input and its output whole
    assert pruners.is_excluded(g2, ["fc"]) and pruners.is_excluded(g3, ["fc"])
    assert not pruners.is_excluded(g1, ())


def test_make_plan_leaves_excluded_groups_whole():
    graph = DependencyGraph(_model())
    groups = graph.prunable_groups()
    scores = {g.id: np.arange(g.size, dtype=float) for g in groups}
    plan = pruners.make_plan(groups, scores, 0.5, exclude=["c1"])
    assert graph.group_of("c1").id not in plan and graph.group_of("c2").id in plan


@pytest.mark.parametrize("kwargs, message", [
    (dict(scope="layer"), "Unknown scope 'layer'"),
    (dict(exclude=[3]), "exclude"),
    (dict(max_ratio=1.5), "max_ratio"),
    (dict(min_channels=0), "min_channels"),
    (dict(round_to=0), "round_to"),
])
def test_bad_arguments(kwargs, message):
    groups, scores = _two_groups()
    with pytest.raises(KprunError, match=message):
        pruners.make_plan(groups, scores, 0.5, **kwargs)


def test_take_lowest_follows_one_ranking_within_caps():
    from types import SimpleNamespace

    groups = [SimpleNamespace(id=0, size=3), SimpleNamespace(id=1, size=2)]
    values = {0: [0.1, 0.9, 0.3], 1: [0.2, 0.05]}
    # Ranking: g1 0.05, g0 0.1, g1 0.2, g0 0.3, g0 0.9.
    assert pruners.take_lowest(groups, values, {0: 3, 1: 2}, 3) == {0: 1, 1: 2}
    # Group 1 capped at one channel: the ranking moves on to group 0.
    assert pruners.take_lowest(groups, values, {0: 3, 1: 1}, 3) == {0: 2, 1: 1}
    # Caps smaller than the total: every group gives its cap, no more.
    assert pruners.take_lowest(groups, values, {0: 1, 1: 1}, 5) == {0: 1, 1: 1}
    assert pruners.take_lowest(groups, values, {0: 3, 1: 2}, 0) == {0: 0, 1: 0}
