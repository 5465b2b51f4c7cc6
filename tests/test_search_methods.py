"""Simulated annealing, AMC and AutoCompress (with its ADMM rule) on tiny models.

The evaluator of `test_search` (a deterministic function of the widths) keeps
the searches fast and their choices reproducible.
"""

import math

import warnings

import keras

import numpy as np
import pytest
from keras import layers as L
from test_search import Evaluator, FakeLatencyModel, macs_share, tiny, widths

import kprune
from kprune import KprunError
from kprune.search import budget as budget_module
from kprune.search.amc import AMC, DDPGAgent, truncated_normal
from kprune.search.anneal import Distribution, acceptance_probability
from kprune.search.core import Search
from kprune.train.admm import ADMMRule, ADMMUpdate

FAST = {"start_temperature": 1.0, "stop_temperature": 0.3, "cool_down_rate": 0.6}
AGENT = {"episodes": 8, "warmup": 3, "hidden": (16, 16), "batch_size": 8}


@pytest.fixture
def model():
    return tiny()


def dense_chain():
    """8 -> d0 (10) -> d1 (10) -> head (4), no biases: 80 + 100 + 40 = 220 MACs."""
    inp = keras.Input((8,))
    x = L.Dense(10, use_bias=False, name="d0")(inp)
    x = L.Dense(10, use_bias=False, name="d1")(x)
    return keras.Model(inp, L.Dense(4, use_bias=False, name="head")(x), name="chain")


# --------------------------------------------------------------------------
# Simulated annealing
# --------------------------------------------------------------------------
def test_acceptance_rule_by_hand():
    assert acceptance_probability(0.2, 5.0) == 1.0 and acceptance_probability(0.0, 5.0) == 1.0
    # candidate 0.80 against current 0.90 at T = 0.2: exp((0.80 - 0.90) / 0.2) = exp(-0.5)
    assert acceptance_probability(0.80 - 0.90, 0.2) == pytest.approx(0.6065306597)
    assert acceptance_probability(-3.0, 1.0) == pytest.approx(math.exp(-3.0))
    with pytest.raises(KprunError, match="`temperature`"):
        acceptance_probability(-1.0, 0.0)


@pytest.mark.parametrize("budget", [kprune.search.macs(0.5), kprune.search.params(0.4)])
def test_annealing_meets_the_budget(model, budget):
    evaluate = Evaluator()
    result = kprune.search.simulated_annealing(model, evaluate, budget, **FAST, seed=0,
                                               verbose=0)
    assert result.met and not result.stopped and result.budget <= budget.target + 1e-9
    cost = (macs_share(result.model, model) if budget.kind == "macs"
            else result.model.count_params() / model.count_params())
    assert cost == pytest.approx(result.budget)
    assert len(result.history) == evaluate.calls == 1 + 3  # the start, then T = 1, 0.6, 0.36
    assert all(r.measured <= budget.target + 1e-9 for r in result.history)
    assert result.history[0].accepted
    assert result.score == max(r.score for r in result.history)
    again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
    assert widths(again) == widths(result.model)


def test_annealing_distribution_favours_large_layers(model):
    search = Search(model, Evaluator(), kprune.search.macs(0.5), verbose=0)
    dist = Distribution(search)
    values = dist.sorted([0.1, 0.5, 0.3])  # conv0 has the fewest weights, conv2 the most
    by_layer = {search.label(rep): v for rep, v in zip(dist.reps, values)}
    assert by_layer == {"conv0": 0.1, "conv1": 0.3, "conv2": 0.5}
    scaled = dist.scaled(values, 0.5)
    assert search.estimate(dist.ratios(scaled)) <= 0.5
    assert np.all(np.diff(scaled[np.argsort(values)]) >= 0)  # the order is kept


def test_annealing_scaling_resolves_the_factor_when_a_unit_stays_whole():
    # d0 takes 0.5, d1 0 (whole). With d1 at 10, d0 at width a costs 8a + 10a + 40 MACs: the
    # most kept within 0.5 of 220 is a = 3 (94 MACs, 0.427); a = 2 (76, 0.345) is one channel
    # too many. The unit at zero must not set the bisection's range (it never reaches a cap).
    search = Search(dense_chain(), Evaluator(), kprune.search.macs(0.5), verbose=0)
    dist = Distribution(search)
    values = np.array([0.5 if search.label(rep) == "d0" else 0.0 for rep in dist.reps])
    scaled = dist.scaled(values, 0.5)
    assert search.estimate(dist.ratios(scaled)) == pytest.approx(94 / 220)
    assert scaled[[search.label(rep) for rep in dist.reps].index("d1")] == 0.0


def test_annealing_is_repeatable_with_a_seed(model):
    runs = [kprune.search.simulated_annealing(model, Evaluator(), kprune.search.macs(0.5),
                                              **FAST, seed=seed, verbose=0)
            for seed in (3, 3, 4)]
    assert runs[0].config_list == runs[1].config_list
    assert [r.ratios for r in runs[0].history] == [r.ratios for r in runs[1].history]
    assert [r.ratios for r in runs[0].history] != [r.ratios for r in runs[2].history]


@pytest.mark.parametrize("name, value, shown", [
    ("cool_down_rate", 1.0, r"`cool_down_rate` must be a number in \(0, 1\)"),
    ("start_temperature", -1, r"`start_temperature` must be a number > 0"),
    ("stop_temperature", 5.0, r"`stop_temperature` must be a number in \(0, 1\)"),
    ("perturbation_magnitude", 0, r"`perturbation_magnitude` must be a number in \(0, 1\]"),
    ("seed", -2, "`seed` must be an int >= 0")])
def test_annealing_bad_arguments(model, name, value, shown):
    args = {**FAST, name: value}
    with pytest.raises(KprunError, match=shown):
        kprune.search.simulated_annealing(model, Evaluator(), kprune.search.macs(0.5),
                                          **{k: v for k, v in args.items() if k != "seed"},
                                          seed=args.get("seed"), verbose=0)


def test_annealing_stopped_returns_the_best_so_far(model):
    result = kprune.search.simulated_annealing(model, Evaluator(interrupt_at=3),
                                               kprune.search.macs(0.5), **FAST, seed=0,
                                               verbose=0)
    assert result.stopped and result.reason == "interrupted" and len(result.history) == 2
    assert result.score == max(r.score for r in result.history) and result.met
    with pytest.raises(KprunError, match="cannot reach 10% of the MACs"):
        kprune.search.simulated_annealing(model, Evaluator(), kprune.search.macs(0.1),
                                          max_ratio=0.5, verbose=0)
    with pytest.raises(KprunError, match=r"Unknown search option\(s\) \['step'\]"):
        kprune.search.simulated_annealing(model, Evaluator(), kprune.search.macs(0.5), step=0.1,
                                          verbose=0)


class SlowLatencyModel(FakeLatencyModel):
    """Every pruned model runs 25% slower than the tables predict."""

    def measure(self, model=None):
        factor = 1.0 if model is None or model is self.model else 1.25
        return factor * (kprune.profile(model or self.model).macs + self.overhead)


@pytest.mark.parametrize("method", ["annealing", "amc"])
def test_latency_budget_is_met_on_measurements(model, monkeypatch, method):
    monkeypatch.setattr(budget_module, "_latency_model_class", lambda: SlowLatencyModel)
    budget = kprune.search.latency(0.8)
    if method == "annealing":
        result = kprune.search.simulated_annealing(model, Evaluator(), budget, **FAST, seed=0,
                                                   verbose=0)
    else:
        result = kprune.search.amc(model, Evaluator(), budget, **AGENT, seed=0, verbose=0)
    first = result.history[0]
    assert first.measured > first.estimated  # the tables promise more than the runtime gives
    assert result.met and result.budget <= 0.8
    later = result.history[1:]
    assert all(r.measured <= 0.8 + 1e-9 for r in later)  # aimed lower after trial 0


def test_refine_gives_back_the_unused_budget_by_hand():
    # 0.5 of 220 MACs, aimed at 0.49 (slack 0.02): 8 k0 + k0 k1 + 4 k1 with k0 = k1 = k is
    # 108 MACs (0.491) at k = 6, over the aim, and 85 (0.386) at k = 5.
    search = Search(dense_chain(), lambda m: float(m.count_params()), kprune.search.macs(0.5),
                    verbose=0)
    d0, d1 = list(search.units)
    first = search.trial({d0: 0.8, d1: 0.8})  # k = 2: 28 MACs
    assert first[0].measured == pytest.approx(28 / 220)
    record, small = search.refine(first)
    assert [r.step for r in search.history] == [None, "refine"]  # round 2: nothing to give
    assert record.step == "refine" and record.measured == pytest.approx(85 / 220)
    assert {layer.name: layer.units for layer in small.layers[1:3]} == {"d0": 5, "d1": 5}
    assert search.refine(first, rounds=0) is first
    close = search.trial({d0: 0.5, d1: 0.5})  # 0.386: within a slack of 0.2 of the target
    assert search.refine(close, slack=0.2) is close
    # An evaluator that scores both alike: the wider candidate wins the tie (not the one
    # that prunes more, as `best` would choose), so the budget is used.
    flat = Search(dense_chain(), lambda m: 0.9, kprune.search.macs(0.5), verbose=0)
    record, _ = flat.refine(flat.trial({d0: 0.8, d1: 0.8}))
    assert record.step == "refine" and record.measured == pytest.approx(85 / 220)
    worse = Search(dense_chain(), lambda m: -float(m.count_params()), kprune.search.macs(0.5),
                   verbose=0)
    first = worse.trial({d0: 0.8, d1: 0.8})
    assert worse.refine(first) is first  # the candidate scores lower: the best stays
    with pytest.raises(KprunError, match="`refine` must be an int >= 0"):
        kprune.search.amc(dense_chain(), Evaluator(), kprune.search.macs(0.5), refine=-1)
    with pytest.raises(KprunError, match="`refine` must be an int >= 0"):
        kprune.search.simulated_annealing(dense_chain(), Evaluator(), kprune.search.macs(0.5),
                                          refine=1.5)


# --------------------------------------------------------------------------
# AMC
# --------------------------------------------------------------------------
def test_amc_clipping_keeps_the_budget_reachable():
    search = Search(dense_chain(), Evaluator(), kprune.search.macs(0.3), verbose=0)
    env = AMC(search)
    d0, d1 = env.reps  # goal 0.3 * 220 = 66 MACs; the guards let a group keep 1 channel
    # d0 first, d1 at its most (1 channel): 8 k0 + k0 + 4 <= 66 -> k0 <= 6: drop 4 of 10
    assert env.clip(0, {}, 0.0) == pytest.approx(0.4)
    assert env.clip(0, {}, 0.7) == pytest.approx(0.7)  # already enough
    assert env.clip(0, {}, 0.99) == pytest.approx(0.9)  # max_ratio
    # d0 keeps 6: 48 + 6 k1 + 4 k1 <= 66 -> k1 = 1; d0 keeps 3: 24 + 7 k1 <= 66 -> k1 <= 6
    assert env.clip(1, {d0: 0.4}, 0.0) == pytest.approx(0.9)
    assert env.clip(1, {d0: 0.7}, 0.1) == pytest.approx(0.4)
    for r0 in (0.0, 0.25, 0.5, 0.8):
        first = env.clip(0, {}, r0)
        ratios = {d0: first, d1: env.clip(1, {d0: first}, 0.0)}
        assert search.estimate(ratios) <= 0.3 + 1e-9
    state = env.state(1, {d0: 0.4}, 0.4 / 0.9)
    assert state.shape == (10,) and np.all((state >= 0) & (state <= 1))


def test_amc_meets_the_budget_every_episode(model):
    evaluate = Evaluator()
    result = kprune.search.amc(model, evaluate, kprune.search.macs(0.5), **AGENT, seed=0,
                               verbose=0)
    episodes = [r for r in result.history if r.step != "refine"]
    assert [r.step for r in episodes] == list(range(AGENT["episodes"]))
    assert result.met and len(result.history) == evaluate.calls <= AGENT["episodes"] + 2
    assert all(r.measured <= 0.5 + 1e-9 for r in result.history)
    assert result.budget >= max(r.measured for r in episodes if r.score == max(
        e.score for e in episodes))  # refining never keeps less than the best episode
    assert macs_share(result.model, model) == pytest.approx(result.budget)
    assert result.score == max(r.score for r in result.history)
    again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
    assert widths(again) == widths(result.model)


def test_amc_is_repeatable_with_a_seed(model):
    runs = [kprune.search.amc(model, Evaluator(), kprune.search.macs(0.5), **AGENT, seed=s,
                              verbose=0) for s in (1, 1)]
    assert runs[0].config_list == runs[1].config_list
    assert [r.ratios for r in runs[0].history] == [r.ratios for r in runs[1].history]


def test_amc_reward_and_bad_arguments(model):
    seen = []

    def reward(score, share):
        seen.append(share)
        return score - math.log(share)

    kprune.search.amc(model, Evaluator(), kprune.search.macs(0.6), **AGENT, reward=reward,
                      seed=0, verbose=0)
    assert len(seen) == AGENT["episodes"] and all(0 < s <= 0.6 + 1e-9 for s in seen)
    for bad, shown in (({"warmup": 9}, r"`warmup` must be an int in \[0, 8\]"),
                       ({"sigma_decay": 1.5}, r"`sigma_decay` must be a number in \(0, 1\]"),
                       ({"tau": 0}, r"`tau` must be a number in \(0, 1\]"),
                       ({"hidden": (0,)}, "`hidden` must be an int >= 1")):
        with pytest.raises(KprunError, match=shown):
            kprune.search.amc(model, Evaluator(), kprune.search.macs(0.5), **{**AGENT, **bad},
                              verbose=0)


def test_ddpg_agent_soft_update_and_noise():
    agent = DDPGAgent(4, hidden=(8,), tau=0.25, batch_size=4, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(6):
        agent.observe(rng.uniform(size=4), rng.uniform(), rng.uniform(), rng.uniform(size=4),
                      False)
    before = agent.actor_target.get_weights()
    agent.update()
    after, net = agent.actor_target.get_weights(), agent.actor.get_weights()
    for b, a, n in zip(before, after, net):
        np.testing.assert_allclose(a, 0.25 * n + 0.75 * b, rtol=1e-5, atol=1e-7)
    assert agent.baseline is not None and 0 <= agent.act(np.zeros(4)) <= 1
    samples = [truncated_normal(rng, 0.9, 0.5) for _ in range(200)]
    assert min(samples) >= 0 and max(samples) <= 1


# --------------------------------------------------------------------------
# ADMM and AutoCompress
# --------------------------------------------------------------------------
def one_dense():
    inp = keras.Input((3,))
    x = L.Dense(4, use_bias=False, name="d")(inp)
    return keras.Model(inp, L.Dense(2, name="head")(x))


def test_admm_projection_and_gradient_by_hand():
    model = one_dense()
    kernel = model.get_layer("d").kernel
    w = np.array([[1.0, 0.0, 2.0, 0.1], [0.0, 1.0, 0.0, 0.1], [1.0, 0.0, 0.0, 0.1]], "float32")
    kernel.assign(w)
    gid = kprune.DependencyGraph(model).group_of("d").id
    rule = ADMMRule.from_plan(model, {gid: 2}, rho=0.5)
    # column norms sqrt(2), 1, 2, 0.17: keep columns 0 and 2
    z = w * np.array([1, 0, 1, 0], "float32")
    np.testing.assert_array_equal(rule.z(kernel), z)
    np.testing.assert_array_equal(rule.u(kernel), np.zeros_like(w))
    g = np.full_like(w, 0.3)
    got = keras.ops.convert_to_numpy(rule([g, None], [kernel, model.get_layer("head").kernel])[0])
    np.testing.assert_allclose(got, g + 0.5 * (w - z), rtol=1e-6)
    # a step of training moved W; the dual step: Z = proj(W + U), U += W - Z
    w2 = w + np.array([[0, 3.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], "float32")
    kernel.assign(w2)
    rule.update()
    z2 = w2 * np.array([0, 1, 1, 0], "float32")  # norms sqrt(2), sqrt(10), 2, 0.17
    np.testing.assert_allclose(rule.z(kernel), z2)
    np.testing.assert_allclose(rule.u(kernel), w2 - z2)
    got = keras.ops.convert_to_numpy(rule([g], [kernel])[0])
    np.testing.assert_allclose(got, g + 0.5 * (w2 - z2 + (w2 - z2)), rtol=1e-6)
    assert rule.plan() == {gid: [0, 3]}
    with pytest.raises(KprunError, match=r"`keep` must be an int in \[1, 4\]"):
        ADMMRule.from_plan(model, {gid: 5})
    with pytest.raises(KprunError, match="`rho`"):
        ADMMRule.from_plan(model, {gid: 2}, rho=-1)


def test_admm_trains_in_fit_and_pulls_channels_to_zero():
    model = one_dense()
    gid = kprune.DependencyGraph(model).group_of("d").id
    rule = ADMMRule.from_plan(model, {gid: 2}, rho=5.0)
    dropped = rule.plan()[gid]
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(32, 2)).astype("float32")
    kernel = model.get_layer("d").kernel
    before = np.linalg.norm(keras.ops.convert_to_numpy(kernel)[:, dropped])
    model.compile(kprune.train.RuleOptimizer(keras.optimizers.SGD(0.05), [rule]), loss="mse")
    callback = ADMMUpdate(rule, every=2)
    model.fit(x, y, epochs=6, batch_size=16, verbose=0, callbacks=[callback])
    assert callback.updates == 3
    after = np.linalg.norm(keras.ops.convert_to_numpy(kernel)[:, dropped])
    assert after < 0.5 * before


def test_autocompress_meets_the_budget(model):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    args = {"loss": loss, "num_iterations": 2, "admm_num_iterations": 2,
            "admm_training_epochs": 1, "start_temperature": 1.0, "stop_temperature": 0.5,
            "cool_down_rate": 0.5, "verbose": 0}
    result = kprune.autocompress(model, Evaluator(), kprune.search.macs(0.4), (x, y), **args,
                                 seed=0)
    assert result.met and result.budget <= 0.4 and not result.stopped
    assert macs_share(result.model, model) == pytest.approx(result.budget)
    steps = [r.step for r in result.history]
    assert "admm 0" in steps and steps[-1] == "admm 1"
    assert all(r.measured <= 0.4 ** 0.5 + 1e-9 for r in result.history if r.step[0] == 0)
    again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
    assert widths(again) == widths(result.model)
    with pytest.raises(KprunError, match="`num_iterations` must be an int >= 1"):
        kprune.autocompress(model, Evaluator(), kprune.search.macs(0.4), (x, y),
                            **{**args, "num_iterations": 0})
    with pytest.raises(KprunError, match="`admm_training_epochs`"):
        kprune.autocompress(model, Evaluator(), kprune.search.macs(0.4), (x, y),
                            **{**args, "admm_training_epochs": 0})


def test_autocompress_keeps_max_ratio_over_all_iterations(model):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kprune.KprunWarning)  # the config list reproduces it
        result = kprune.autocompress(
            model, Evaluator(), kprune.search.macs(0.3), (x, y), loss=loss, num_iterations=3,
            admm_num_iterations=1, admm_training_epochs=1, start_temperature=1.0,
            stop_temperature=0.5, cool_down_rate=0.5, max_ratio=0.6, seed=0, verbose=0)
        again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
    assert result.ratios and max(result.ratios.values()) <= 0.6 + 1e-9
    assert widths(again) == widths(result.model)


def test_public_names():
    assert kprune.search.simulated_annealing and kprune.search.amc and kprune.autocompress
    assert kprune.admm.ADMMRule is ADMMRule
