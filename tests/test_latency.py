"""kprune.latency: per-layer tables, the latency model, and latency / params targets of prune.

Timing is never asserted on: the measuring function is replaced by a
deterministic cost (proportional to MACs), and the tests check structure,
caching and bookkeeping. One test times for real and checks shapes only.
"""

import importlib.util

import keras
import numpy as np
import pytest
from keras import layers as L

import kprune
import kprune.latency as kl
from kprune.errors import KprunError
from kprune.graph import DependencyGraph
from kprune.profile import profile
from kprune.pruning import plan_params, prune_plan
from kprune.surgeon import apply_plan
from kprune.tools.verify import randomize


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every table of these tests lives in a temporary folder, never in the user's cache."""
    monkeypatch.setenv("KPRUNE_CACHE", str(tmp_path / "cache"))


def _cost(model) -> float:
    """The fake seconds of a model: 1 ns per MAC plus 1 us."""
    return 1e-9 * profile(model).macs + 1e-6


def _single(model) -> bool:
    """Whether `model` is one of the table's single-layer models."""
    return len([l for l in model.layers if not isinstance(l, L.InputLayer)]) == 1


class _Fake:
    """Stands in for `measure_interleaved`: counts calls, returns `_cost` (plus `extra`)."""

    def __init__(self, extra=None):
        self.layers, self.models, self.extra = 0, 0, extra

    def __call__(self, models, runtime="keras", batch_size=1, threads=None, warmup=3, runs=20,
                 **kwargs):
        out = []
        for m in models:
            single = _single(m)
            self.layers += single
            self.models += not single
            out.append(_cost(m) + (self.extra(m) if self.extra and not single else 0.0))
        return out


@pytest.fixture
def fake(monkeypatch):
    f = _Fake()
    monkeypatch.setattr(kl, "measure_interleaved", f)
    return f


def _net(name="net"):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(32, 3, padding="same", name="c2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(64, activation="relu", name="fc")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(x), name=name)
    randomize(model, seed=0)
    return model


# Module and helpers ----------------------------------------------------------------
def test_tflite_helpers_live_in_latency_and_export_keeps_the_names():
    from kprune.tools import export

    assert export.tflite_bytes is kl.tflite_bytes
    assert export.tflite_interpreter is kl.tflite_interpreter


def test_the_module_still_times_a_model_when_called():
    model = _net()
    assert kprune.latency is kl
    assert kprune.latency(model, runs=2, warmup=1) > 0  # kprune.profile.latency


# Table -------------------------------------------------------------------------------
def test_a_second_table_on_the_same_cache_measures_nothing(fake, tmp_path):
    first = kl.LatencyTable(cache_dir=tmp_path / "t")
    a = first.layer(L.Dense(8), (None, 4), (None, 8))
    assert first.layer(L.Dense(8), (None, 4), (None, 8)) == a
    first.layer(L.Conv2D(4, 3), (None, 6, 6, 2), (None, 4, 4, 4))
    assert (first.measured, fake.layers, len(first)) == (2, 2, 2)
    second = kl.LatencyTable(cache_dir=tmp_path / "t")
    assert second.layer(L.Dense(8, name="other_name"), (None, 4), (None, 8)) == a
    second.layer(L.Conv2D(4, 3), (None, 6, 6, 2), (None, 4, 4, 4))
    assert (second.measured, fake.layers) == (0, 2)


def test_the_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KPRUNE_CACHE", str(tmp_path / "env"))
    assert kl.LatencyTable().cache_dir == str(tmp_path / "env")


def test_signatures_differ_by_width_runtime_batch_and_threads():
    keras_t, tflite_t = kl.LatencyTable(), kl.LatencyTable(runtime="tflite")
    keys = {
        keras_t.signature(L.Dense(8), (None, 4), (None, 8)),
        keras_t.signature(L.Dense(16), (None, 4), (None, 16)),
        keras_t.signature(L.Dense(8), (None, 5), (None, 8)),
        keras_t.signature(L.Dense(8, activation="relu"), (None, 4), (None, 8)),
        tflite_t.signature(L.Dense(8), (None, 4), (None, 8)),
        kl.LatencyTable(batch_size=8).signature(L.Dense(8), (None, 4), (None, 8)),
        kl.LatencyTable(runtime="tflite", threads=2).signature(L.Dense(8), (None, 4), (None, 8)),
    }
    assert len(keys) == 7
    assert (keras_t.signature(L.Dense(8, name="a"), (None, 4), (None, 8))
            == keras_t.signature(L.Dense(8, name="b"), (None, 4), (None, 8)))


# Latency model -----------------------------------------------------------------------
def test_prediction_without_a_plan_is_the_measured_base(fake):
    lm = kl.LatencyModel(_net(), verbose=0)
    assert {c.name for c in lm.calls} == {"c1", "c2", "fc", "head"}
    assert lm.base == pytest.approx(_cost(lm.model))
    assert lm.remainder + sum(c.full for c in lm.calls) == pytest.approx(lm.base, rel=1e-12)
    assert lm.predict() == pytest.approx(lm.base, rel=1e-12)
    assert lm.predict({}) == lm.predict() and lm.ratio() == pytest.approx(1.0)
    assert lm.measurements == fake.layers > 0
    assert fake.models == 3  # the base and its two anchors, timed together
    assert lm.scale == pytest.approx(1.0)  # the tables add up exactly here: nothing to correct
    assert sum(lm.layers().values()) == pytest.approx(sum(c.full for c in lm.calls))


def test_the_table_is_filled_once_per_machine(fake):
    kl.LatencyModel(_net(), verbose=0)
    again = kl.LatencyModel(_net("other"), verbose=0)
    assert again.measurements == 0 and again.seconds >= 0


def test_prediction_follows_the_cost_of_the_pruned_model(fake):
    model = _net()
    lm = kl.LatencyModel(model, verbose=0)
    predicted = []
    for ratio in (0.0, 0.25, 0.5, 0.75, 0.8, 0.9):
        plan = prune_plan(model, ratio=ratio)
        predicted.append(lm.predict(plan))
        cost = _cost(apply_plan(model, plan))
        if ratio <= 0.75:  # on the grid: the cost is bilinear in each layer's widths, exact
            assert predicted[-1] == pytest.approx(cost, rel=1e-9)
        else:  # under the smallest share the table holds its value: never optimistic
            assert predicted[-1] >= cost
    assert all(b <= a for a, b in zip(predicted, predicted[1:]))
    assert predicted[-1] < 0.5 * predicted[0]


class _Standalone(_Fake):
    """A runtime where a layer alone takes `factor` times what it takes inside the model."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def __call__(self, models, *args, **kwargs):
        out = super().__call__(models, *args, **kwargs)
        return [t * self.factor if _single(m) else t for m, t in zip(models, out)]


@pytest.mark.parametrize("factor", [0.5, 3.0])
def test_anchors_calibrate_what_layers_alone_get_wrong(monkeypatch, factor):
    monkeypatch.setattr(kl, "measure_interleaved", _Standalone(factor))
    model = _net()
    lm = kl.LatencyModel(model, verbose=0)
    raw = kl.LatencyModel(model, anchors=None, verbose=0)
    assert lm.scale == pytest.approx(1.0 / factor, rel=1e-9) and raw.scale == 1.0
    assert [c["share"] for c in lm.calibration] == [0.75, 0.5]
    for c in lm.calibration:  # the anchors are the evenly pruned models, timed
        assert c["measured"] == pytest.approx(
            _cost(apply_plan(model, lm._anchor_plan(c["share"]))), rel=1e-12)
    for ratio in (0.25, 0.6, 0.75):
        plan = prune_plan(model, ratio=ratio)
        cost = _cost(apply_plan(model, plan))
        assert lm.predict(plan) == pytest.approx(cost, rel=1e-9)
        assert abs(raw.predict(plan) / cost - 1.0) > 0.05  # uncalibrated: off
    assert lm.predict() == pytest.approx(lm.base, rel=1e-12)


@pytest.mark.parametrize("anchors", [(0.0,), (1.0,), ("half",), 0.5])
def test_bad_anchors_are_refused(anchors):
    with pytest.raises(KprunError, match="anchors"):
        kl.LatencyModel(_net(), anchors=anchors, verbose=0)


def test_noisy_tables_are_made_monotone():
    noisy = np.array([[3.0, 2.0, 4.0], [1.0, 5.0, 4.5], [2.0, 6.0, 7.0]])
    fit = kl._monotone(noisy)
    assert (np.diff(fit, axis=0) >= 0).all() and (np.diff(fit, axis=1) >= 0).all()
    grid = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(kl._monotone(grid), grid)


def test_one_layers_grid_is_timed_interleaved(fake, monkeypatch):
    calls = []

    def spy(models, *args, **kwargs):
        calls.append(len(models))
        return fake(models, *args, **kwargs)

    monkeypatch.setattr(kl, "measure_interleaved", spy)
    lm = kl.LatencyModel(_net(), verbose=0)
    assert sorted(calls[:-1]) == sorted(c.values.size for c in lm.calls)
    assert calls[-1] == 3  # last: the base beside its two anchors


def test_a_plan_on_one_wide_layer_lowers_the_prediction(fake):
    model = _net()
    lm = kl.LatencyModel(model, verbose=0)
    group = lm.graph.group_of("fc")
    assert lm.ratio({group.id: list(range(40))}) < 1.0
    assert lm.ratio({group.id: list(range(40))}) < lm.ratio({group.id: list(range(8))})


def test_groups_limit_what_is_measured(fake):
    model = _net()
    graph = DependencyGraph(model)
    only = [graph.group_of("c1").id]
    lm = kl.LatencyModel(model, graph=graph, groups=only, verbose=0)
    assert [c.name for c in lm.calls] == ["c1", "c2"]
    assert all(d == only for c in lm.calls for d in c.dims)


def test_progress_bar_only_when_verbose(fake, capsys):
    kl.LatencyModel(_net(), verbose=0)
    assert capsys.readouterr().out == ""
    kl.LatencyModel(_net(), verbose=1, grid=(0.3, 1.0))  # new grid points: misses
    assert "layer" in capsys.readouterr().out


def test_latency_model_refuses_a_table_of_other_settings():
    with pytest.raises(KprunError, match="table times runtime='tflite'"):
        kl.LatencyModel(_net(), table=kl.LatencyTable(runtime="tflite"), batch_size=4)
    with pytest.raises(KprunError, match="grid"):
        kl.LatencyModel(_net(), grid=(0.0, 1.0))


def test_real_timing_fills_every_grid_point():
    lm = kl.LatencyModel(_net(), grid=(0.5, 1.0), runs=2, warmup=1, verbose=0)
    assert lm.base > 0 and not lm.untimed
    assert all(c.values.shape == tuple(len(x) for x in c.coords) for c in lm.calls)
    assert all((c.values > 0).all() for c in lm.calls)
    assert lm.predict() == pytest.approx(lm.base, rel=1e-9)


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                    reason="ai_edge_litert is the optional [litert] extra; it is not installed")
def test_tflite_measure_smoke():
    model = _net()
    assert kl.measure(model, runtime="tflite", threads=1, warmup=1, runs=2) > 0
    assert len(kl.measure_interleaved([model, model], runtime="tflite", batch_size=2,
                                      warmup=0, runs=2)) == 2


# prune targets -----------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_latency_target_is_reached(fake, target):
    model = _net()
    small = kprune.prune(model, latency_target=target)
    # It aims a margin under the target, so that timing it again stays within the target.
    assert _cost(small) <= (target - kprune.pruning._LATENCY_MARGIN) * _cost(model)
    assert _cost(small) >= (target - 0.15) * _cost(model)


def test_a_target_only_the_most_pruned_model_meets_within_the_margin_is_met(fake):
    model = _net()
    smallest = _cost(apply_plan(model, prune_plan(model, ratio=0.99))) / _cost(model)
    target = smallest + 0.5 * kprune.pruning._LATENCY_MARGIN
    small = kprune.prune(model, latency_target=target)
    assert _cost(small) / _cost(model) == pytest.approx(smallest)
    with pytest.raises(KprunError, match="cannot reach"):
        kprune.prune(model, latency_target=smallest - 0.01)


def test_latency_target_goes_on_measuring_when_slower_than_predicted(monkeypatch):
    model = _net()
    penalty = 0.2 * _cost(model)  # every pruned model runs slower than its layers add up to
    fake = _Fake(extra=lambda m: 0.0 if m is model else penalty)
    monkeypatch.setattr(kl, "measure_interleaved", fake)
    small = kprune.prune(model, latency_target=0.5)
    assert _cost(small) + penalty <= 0.5 * _cost(model)
    assert fake.models > 3  # the base, then pruned models timed beside the original


def test_prune_plan_takes_the_latency_target(fake):
    model = _net()
    plan = prune_plan(model, latency_target=0.5, runtime="tflite", threads=1)
    assert plan and _cost(apply_plan(model, plan)) <= 0.5 * _cost(model)


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_params_target_is_reached(target):
    model = _net()
    small = kprune.prune(model, params_target=target)
    share = small.count_params() / model.count_params()
    assert target - 0.1 <= share <= target


def test_plan_params_counts_the_pruned_model():
    model = _net()
    graph = DependencyGraph(model)
    assert plan_params(graph, {}) == model.count_params()
    for ratio in (0.3, 0.7):
        plan = prune_plan(model, ratio=ratio)
        assert plan_params(graph, plan) == apply_plan(model, plan, graph).count_params()


# Errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(latency_target=0.5, flops_target=0.5), "got flops_target, latency_target"),
    (dict(params_target=0.5, ratio=0.2), "got ratio, params_target"),
    (dict(latency_target=0.0), "`latency_target` .* in \\(0, 1\\]; got 0.0"),
    (dict(latency_target=1.5), "latency_target"),
    (dict(params_target=-1), "`params_target` .* in \\(0, 1\\]"),
    (dict(latency_target=0.5, runtime="onnx"), "Unknown runtime 'onnx'; valid runtimes: "
                                                "'keras', 'tflite'"),
    (dict(latency_target=0.5, batch_size=0), "batch_size"),
    (dict(latency_target=0.5, threads=0), "threads"),
])
def test_bad_targets_raise_a_clear_error(kwargs, message):
    with pytest.raises(KprunError, match=message):
        kprune.prune(_net(), **kwargs)


def test_unreachable_latency_target_is_refused(fake):
    with pytest.raises(KprunError, match="cannot reach 5.0% of its latency \\(keras, batch 1\\)"):
        kprune.prune(_net(), latency_target=0.05, max_ratio=0.5)


def test_unreachable_params_target_names_the_blockers():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same")(inp)
    x = L.Lambda(lambda t: t * 2.0, name="opaque")(x)
    x = L.Conv2D(16, 3, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(3)(x))
    with pytest.raises(KprunError, match="cannot reach 10.0% of its parameters: .*Lambda"):
        kprune.prune(model, params_target=0.1)


# Latency steps (round_to="latency") ------------------------------------------------
def _up8(n: int) -> int:
    return -(-int(n) // 8) * 8


def _stepped(model) -> float:
    """Fake seconds with steps: every Conv2D / Dense costs as if its widths were multiples of 8."""
    total = 1e-6
    for layer in model.layers:
        if isinstance(layer, (L.Conv2D, L.Dense)):
            cin, cout = int(layer.input.shape[-1]), int(layer.output.shape[-1])
            spatial = int(np.prod(layer.output.shape[1:-1])) if len(layer.output.shape) > 2 else 1
            kernel = int(np.prod(layer.kernel_size)) if isinstance(layer, L.Conv2D) else 1
            total += 1e-9 * spatial * kernel * _up8(cin) * _up8(cout)
    return total


class _SteppedFake(_Fake):
    def __init__(self, penalise=None):
        super().__init__()
        self.penalise = penalise

    def __call__(self, models, *args, **kwargs):
        return [_stepped(m) + (1.0 if self.penalise and self.penalise(m) else 0.0)
                for m in models]


def _widths(model) -> dict:
    return {l.name: int(l.output.shape[-1]) for l in model.layers
            if isinstance(l, (L.Conv2D, L.Dense)) and l.name != "head"}


def test_snap_widens_each_group_to_the_top_of_its_step(monkeypatch):
    monkeypatch.setattr(kl, "measure_interleaved", _SteppedFake())
    model = _net()
    graph = DependencyGraph(model)
    lm = kl.LatencyModel(model, graph=graph, verbose=0)
    plan = prune_plan(model, ratio=0.45)
    rng = np.random.default_rng(0)
    scores = {g.id: rng.uniform(size=g.size) for g in graph.groups}
    wider = lm.snap(plan, scores)
    for gid, dropped in plan.items():
        size = graph.groups[gid].size
        kept = size - len(dropped)
        assert size - len(wider.get(gid, ())) == min(size, _up8(kept))
        back = sorted(set(dropped) - set(wider.get(gid, ())), key=lambda c: -scores[gid][c])
        best = sorted(dropped, key=lambda c: -scores[gid][c])[:len(back)]
        assert sorted(back) == sorted(best)  # the strongest dropped channels come back
    assert _stepped(apply_plan(model, wider)) <= _stepped(apply_plan(model, plan)) * 1.02


def test_round_to_latency_keeps_more_channels_at_the_same_target(monkeypatch):
    monkeypatch.setattr(kl, "measure_interleaved", _SteppedFake())
    model = _net()
    plain = kprune.prune(model, latency_target=0.5)
    snapped = kprune.prune(model, latency_target=0.5, round_to="latency")
    assert _stepped(snapped) <= 0.5 * _stepped(model)
    full = _widths(model)
    for name, width in _widths(snapped).items():
        assert width % 8 == 0 or width == full[name]
        assert width >= _widths(plain)[name]
    assert sum(_widths(snapped).values()) > sum(_widths(plain).values())


def test_round_to_latency_keeps_the_found_plan_when_the_wider_model_is_slower(monkeypatch):
    model = _net()
    full = _widths(model)

    def on_steps(m):  # a whole pruned model with every width on a step runs slow
        widths = _widths(m)
        return len(m.layers) > 2 and widths != full and all(w % 8 == 0 for w in widths.values())

    monkeypatch.setattr(kl, "measure_interleaved", _SteppedFake(penalise=on_steps))
    snapped = kprune.prune(model, latency_target=0.5, round_to="latency")
    assert not on_steps(snapped)
    assert _stepped(snapped) <= 0.5 * _stepped(model)


def test_round_to_latency_needs_a_latency_target():
    with pytest.raises(KprunError, match="round_to='latency'.*latency_target"):
        kprune.prune(_net(), flops_target=0.5, round_to="latency")


def test_snap_refuses_bad_steps(fake):
    lm = kl.LatencyModel(_net(), verbose=0)
    with pytest.raises(KprunError, match="`step` must be an int >= 1"):
        lm.snap({}, {}, step=0)
