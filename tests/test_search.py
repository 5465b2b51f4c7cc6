"""kprune.search: budgets, the core, sensitivity and NetAdapt on a three-conv model.

The evaluator is a deterministic function of the remaining widths, so every
search is fast and its choices are reproducible.
"""

import math
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import kprune
from kprune import KprunError, KprunWarning
from kprune.pruning import plan_macs
from kprune.search import budget as budget_module
from kprune.search.core import Search


def tiny():
    inp = keras.Input((8, 8, 3))
    x = inp
    for i, filters in enumerate((8, 12, 16)):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="fc")(x), name="tiny")


def widths(model):
    return {layer.name: layer.filters for layer in model.layers if isinstance(layer, L.Conv2D)}


class Evaluator:
    """Score = sum of weight * log(width); counts its calls; can raise on one of them."""

    def __init__(self, interrupt_at=None):
        self.calls, self.interrupt_at = 0, interrupt_at

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        w = widths(model)
        return sum((i + 1) * math.log(w[f"conv{i}"]) for i in range(3))


def macs_share(small, model):
    return kprune.profile(small).macs / kprune.profile(model).macs


@pytest.fixture
def model():
    return tiny()


# --------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------
@pytest.mark.parametrize("make, target", [(kprune.search.macs, 0), (kprune.search.macs, 1.5),
                                          (kprune.search.params, -0.1),
                                          (kprune.search.latency, 0.0),
                                          (kprune.search.macs, "0.5"),
                                          (kprune.search.macs, float("nan"))])
def test_bad_targets(make, target):
    with pytest.raises(KprunError, match=r"in \(0, 1\]"):
        make(target)


def test_bad_budget_kind_and_options(model):
    with pytest.raises(KprunError, match="Unknown budget kind 'flops'"):
        kprune.search.Budget("flops", 0.5)
    with pytest.raises(KprunError, match="takes no options"):
        kprune.search.Budget("macs", 0.5, runtime="tflite")
    with pytest.raises(KprunError, match="batch_size"):
        kprune.search.latency(0.5, batch_size=0)
    with pytest.raises(KprunError, match="`budget` must be kprune.search.macs"):
        kprune.search.netadapt(model, Evaluator(), budget=0.5, verbose=0)


def test_bound_estimates_equal_measurements(model):
    graph = kprune.DependencyGraph(model)
    plan = {graph.group_of("conv1").id: [0, 3, 5], graph.group_of("conv2").id: list(range(8))}
    small = kprune.apply_plan(model, plan, graph)
    for budget in (kprune.search.macs(0.5), kprune.search.params(0.5)):
        bound = budget.bind(model, graph)
        assert bound.estimate({}) == 1.0
        assert bound.estimate(plan) == pytest.approx(bound.measure(small))


# --------------------------------------------------------------------------
# NetAdapt
# --------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [kprune.search.macs(0.5), kprune.search.params(0.5)])
def test_netadapt_meets_the_budget(model, budget):
    evaluate = Evaluator()
    result = kprune.search.netadapt(model, evaluate, budget, step=0.15, verbose=0)
    assert result.met and not result.stopped and result.budget <= 0.5
    cost = (macs_share(result.model, model) if budget.kind == "macs"
            else result.model.count_params() / model.count_params())
    assert cost == pytest.approx(result.budget) and cost <= 0.5
    assert len(result.history) == evaluate.calls  # one record per trial
    assert [r.trial for r in result.history] == list(range(len(result.history)))
    iterations = sorted({r.step for r in result.history})
    assert [sum(r.accepted for r in result.history if r.step == i) for i in iterations] == \
        [1] * len(iterations)
    last = [r for r in result.history if r.accepted][-1]
    assert result.ratios == last.ratios and result.score == last.score
    for r in result.history:
        assert r.estimated == pytest.approx(r.measured) and r.seconds >= 0
    assert result.score == evaluate(result.model)


def test_netadapt_decay_shrinks_the_step(model):
    plain = kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.5), step=0.2,
                                   verbose=0)
    decayed = kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.5), step=0.2,
                                     decay=0.5, verbose=0)
    assert decayed.met and decayed.budget <= 0.5
    assert len({r.step for r in decayed.history}) > len({r.step for r in plain.history})
    with pytest.raises(KprunError, match="`decay`"):
        kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.5), decay=0, verbose=0)
    with pytest.raises(KprunError, match="`step`"):
        kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.5), step=1.0, verbose=0)


def test_config_list_reproduces_the_plan(model):
    result = kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.4), step=0.2,
                                    verbose=0)
    assert all(set(e) == {"op_names", "sparsity"} for e in result.config_list)
    again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
    assert widths(again) == widths(result.model)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), result.model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)  # no fine-tune: the very same channels


def test_finetune_chains_and_keeps_widths(model):
    tuned = []

    def finetune(m):  # perturb the kernels in place, as a short training would
        for layer in m.layers:
            if isinstance(layer, L.Conv2D):
                k = layer.kernel.numpy()
                noise = np.random.default_rng(len(tuned)).normal(size=k.shape)
                layer.kernel.assign(k + 0.1 * noise)
        tuned.append(m)

    def long_finetune(m):
        return keras.models.clone_model(m)

    evaluate = Evaluator()
    result = kprune.search.netadapt(model, evaluate, kprune.search.macs(0.5), finetune=finetune,
                                    long_finetune=long_finetune, step=0.2, verbose=0)
    assert len(tuned) == len(result.history) - 1  # every proposal tuned, then the long fine-tune
    assert result.history[-1].step == "long_finetune" and result.history[-1].accepted
    assert len(result.history) == evaluate.calls
    again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
    assert widths(again) == widths(result.model)
    with pytest.raises(KprunError, match="`finetune` must return a keras.Model or None"):
        kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.5),
                               finetune=lambda m: 3, verbose=0)


def test_keyboard_interrupt_returns_the_best_so_far(model):
    evaluate = Evaluator(interrupt_at=5)
    result = kprune.search.netadapt(model, evaluate, kprune.search.macs(0.3), step=0.1,
                                    verbose=0)
    assert result.stopped and result.reason == "interrupted" and not result.met
    assert len(result.history) == 4  # the interrupted trial leaves no record
    # iteration 0 was kept; of iteration 1 only trial 3 finished, so it is the best so far
    assert result.history[3].accepted and result.ratios == result.history[3].ratios
    assert macs_share(result.model, model) == pytest.approx(result.budget)
    again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
    assert widths(again) == widths(result.model)


def test_max_trials_and_time_limit_stop(model):
    result = kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.3), max_trials=2,
                                    verbose=0)
    assert result.stopped and "max_trials=2" in result.reason and len(result.history) == 2
    assert result.ratios == max(result.history, key=lambda r: r.score).ratios
    early = kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.3), time_limit=1e-9,
                                   verbose=0)
    assert early.stopped and early.history == [] and early.score is None
    assert widths(early.model) == widths(model) and early.ratios == {}
    with pytest.raises(KprunError, match="max_trials"):
        kprune.search.netadapt(model, Evaluator(), kprune.search.macs(0.3), max_trials=0)


@pytest.mark.parametrize("value, shown", [("0.9", "'0.9' (str)"), (None, "None (NoneType)"),
                                          (float("nan"), "nan"), ([0.1, 0.9], "list"),
                                          (True, "True (bool)")])
def test_evaluator_must_return_a_real_number(model, value, shown):
    with pytest.raises(KprunError, match="`evaluate`") as info:
        kprune.search.netadapt(model, lambda m: value, kprune.search.macs(0.5), verbose=0)
    assert shown in str(info.value)


def test_unreachable_budget_is_refused_up_front(model):
    evaluate = Evaluator()
    with pytest.raises(KprunError, match=r"cannot reach 10% of the MACs.*max_ratio=0.5"):
        kprune.search.netadapt(model, evaluate, kprune.search.macs(0.1), max_ratio=0.5,
                               verbose=0)
    with pytest.raises(KprunError, match="no group can be pruned"):
        kprune.search.netadapt(model, evaluate, kprune.search.macs(0.5),
                               exclude=["Conv2D"], verbose=0)
    assert evaluate.calls == 0


def test_budget_already_met(model):
    result = kprune.search.netadapt(model, Evaluator(), kprune.search.macs(1.0), verbose=0)
    assert result.met and result.ratios == {} and result.config_list == []
    assert len(result.history) == 1 and widths(result.model) == widths(model)


# --------------------------------------------------------------------------
# Latency budgets (a fake LatencyModel: MACs plus a fixed overhead)
# --------------------------------------------------------------------------
class FakeLatencyModel:
    made = []
    overhead = 20_000

    def __init__(self, model, table=None, runtime="keras", batch_size=1, threads=None, grid=None,
                 cache_dir=None, *, graph=None, groups=None, verbose=1):
        self.model, self.graph = model, graph or kprune.DependencyGraph(model)
        self.settings = dict(runtime=runtime, batch_size=batch_size, threads=threads,
                             groups=groups, verbose=verbose)
        self.base = self.measure()
        FakeLatencyModel.made.append(self)

    def predict(self, plan=None):
        return plan_macs(self.graph, plan or {}) + self.overhead

    def measure(self, model=None):
        return kprune.profile(model or self.model).macs + self.overhead


class StuckLatencyModel(FakeLatencyModel):
    def measure(self, model=None):  # the runtime ignores width: nothing gets faster
        return kprune.profile(self.model).macs + self.overhead


def test_latency_budget_with_a_fake_latency_model(model, monkeypatch):
    monkeypatch.setattr(budget_module, "_latency_model_class", lambda: FakeLatencyModel)
    FakeLatencyModel.made.clear()
    budget = kprune.search.latency(0.6, runtime="tflite", batch_size=4, threads=2)
    result = kprune.search.netadapt(model, Evaluator(), budget, step=0.1, verbose=0)
    assert result.met and result.budget <= 0.6
    fake = FakeLatencyModel.made[-1]
    assert fake.settings["runtime"] == "tflite" and fake.settings["batch_size"] == 4
    assert fake.settings["threads"] == 2 and fake.settings["verbose"] == 0
    assert (kprune.profile(result.model).macs + fake.overhead) / fake.base == \
        pytest.approx(result.budget)


def test_measured_latency_that_stays_above_the_target_warns(model, monkeypatch):
    monkeypatch.setattr(budget_module, "_latency_model_class", lambda: StuckLatencyModel)
    with pytest.warns(KprunWarning, match="the guards let no group give more"):
        result = kprune.search.netadapt(model, Evaluator(), kprune.search.latency(0.6), step=0.3,
                                        verbose=0)
    assert not result.met and not result.stopped and result.budget == pytest.approx(1.0)
    assert result.ratios  # the smallest model it reached


def test_latency_budget_with_the_real_latency_model(model, tmp_path):
    pytest.importorskip("kprune.latency")
    bound = kprune.search.latency(0.5, grid=(0.5,), cache_dir=str(tmp_path)).bind(model)
    assert bound.base > 0 and bound.estimate({}) == pytest.approx(
        bound.latency_model.predict() / bound.base)
    assert bound.measure(model) == 1.0
    assert bound.measure(kprune.prune(model, ratio=0.5)) > 0  # timed beside the original


# --------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------
def test_sensitivity_table(model):
    evaluate = Evaluator()
    sens = kprune.search.sensitivity(model, evaluate, ratios=(0.25, 0.5, 0.75),
                                     budget=kprune.search.macs(1.0), verbose=0)
    graph = kprune.DependencyGraph(model)
    gids = [graph.group_of(f"conv{i}").id for i in range(3)]
    assert sorted(sens.table) == sorted(gids) and sens.ratios == (0.25, 0.5, 0.75)
    assert all(list(row) == [0.25, 0.5, 0.75] for row in sens.table.values())
    assert sens.baseline == pytest.approx(evaluate(model))
    assert len(sens.history) == evaluate.calls - 1 == 1 + 3 * 3
    assert sens.history[0].step == "baseline" and sens.history[0].measured == 1.0
    conv2 = sens.table[gids[2]]
    assert conv2[0.5] == pytest.approx(sens.baseline - 3 * math.log(2))  # 16 -> 8 channels
    drops = sens.drops()
    limit = 1.1 * drops[gids[0]][0.5]  # conv0 (weight 1) can lose half; conv1, conv2 less
    ratios = sens.ratios_for(limit)
    assert ratios[gids[0]] == 0.5 and all(drops[g][ratios[g]] <= limit for g in ratios)
    assert all(drops[g][r] > limit for g in gids for r in sens.ratios if r > ratios.get(g, 0))
    small = kprune.prune(model, config_list=sens.config_list(limit), **sens.prune_kwargs)
    assert widths(small)["conv0"] == 4
    assert sens.ratios_for(0) == {}
    text = str(sens)
    assert "baseline" in text and "conv1" in text and "0.75" in text
    with pytest.raises(KprunError, match="max_drop"):
        sens.ratios_for(-1)
    with pytest.raises(KprunError, match="`ratios`"):
        kprune.search.sensitivity(model, evaluate, ratios=(0.5, 1.0), verbose=0)


def test_sensitivity_stops_with_short_rows(model):
    sens = kprune.search.sensitivity(model, Evaluator(interrupt_at=4), ratios=(0.25, 0.5, 0.75),
                                     verbose=0)
    assert sens.stopped and sens.reason == "interrupted" and len(sens.history) == 3
    first = sens.table[min(sens.table)]
    assert list(first) == [0.25, 0.5] and "stopped" in str(sens)


# --------------------------------------------------------------------------
# The core: units of groups sharing producers (attention heads)
# --------------------------------------------------------------------------
def attention():
    x = keras.Input((6, 16))
    h = L.Dense(16, name="embed")(x)
    y = L.MultiHeadAttention(4, 4, name="mha")(h, h)
    y = L.Add()([h, y])
    z = L.Dense(24, activation="relu", name="ff1")(y)
    y = L.Add()([y, L.Dense(16, name="ff2")(z)])
    return keras.Model(x, L.Dense(2, name="head")(L.GlobalAveragePooling1D()(y)))


def test_groups_sharing_producers_take_one_ratio():
    model = attention()
    search = Search(model, Evaluator(), kprune.search.macs(0.5), verbose=0)
    mha = [g.id for g in search.groups if [m.name for m in g.producers] == ["mha"]]
    assert len(mha) == 3 and search.units[mha[0]] == mha  # heads, key_dim, value_dim
    stream = search.graph.group_of("embed").id
    ratios = search.with_unit({stream: 0.5}, mha[0], 0.5)
    assert all(ratios[g] == 0.5 for g in mha)
    with pytest.raises(KprunError, match="take one ratio"):
        search.check_ratios({mha[0]: 0.5, mha[1]: 0.25})
    config = search.config_list(ratios)
    assert config == [{"op_names": ["embed"], "sparsity": 0.5},
                      {"op_names": ["mha"], "sparsity": 0.5}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KprunWarning)
        again = kprune.prune(model, config_list=config)
    small = search.realize(ratios)
    assert again.get_layer("mha").num_heads == small.get_layer("mha").num_heads == 2
    assert again.get_layer("embed").units == small.get_layer("embed").units == 8


def test_public_name():
    assert kprune.search.netadapt and kprune.search.sensitivity and kprune.search.Budget
