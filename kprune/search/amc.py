"""AMC: a DDPG agent chooses each group's ratio, walking the groups in order.

He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile
Devices", ECCV 2018, on the search core (`kprune.search.core.Search`; the
core's *units*, groups with the same producer layers, are the steps).

An episode walks the units in graph order. At each unit the agent sees a
state, the unit's embedding normalised to [0, 1]: its index, the kind of its
first producer, its input and output widths, kernel size, stride and MACs
(each scaled by its range over the units), the share of the budget reduced
so far, the share still to remove to reach the target, and the previous
action. The action is the unit's ratio in [0, max_ratio], clipped from below
so that the budget stays reachable: if every later unit were pruned at the
most the guards allow, the estimate must still be within the target
(`AMC.clip`). After the last unit the model is pruned (optional
`finetune`), scored by `evaluate`, and the reward (the score, or your
`reward(score, share)`) is given to every step of the episode. After the
episodes, `refine` trials give back what the best candidate left of the
budget (`Search.refine`): untrained and noisy actions prune more than asked.

The agent (`DDPGAgent`) is written with Keras layers: an actor (state ->
ratio, a sigmoid) and a critic (state, action -> value), two small Dense
nets, with target copies updated softly (`tau`). The first `warmup`
episodes take uniform random actions; later ones the actor's action plus
truncated-normal noise (sigma 0.5, times 0.95 each episode after the
warm-up, as in the paper). Transitions go to a replay buffer; after the
warm-up, every step is followed by one update on a random batch, with a
moving-average reward baseline subtracted.

Example:

>>> result = kprune.search.amc(model, val_accuracy, kprune.search.macs(0.5), episodes=60,
...                            warmup=20, seed=0)
>>> again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.search.anneal import finish
from kprune.search.budget import Budget, check_budget
from kprune.search.core import (
    Search,
    SearchResult,
    check_number,
    check_score,
    make_search,
)

FEATURES = ("index", "kind", "in_width", "out_width", "kernel", "stride", "macs", "reduced",
            "left", "previous")
_KINDS = (("Conv", 0.0), ("Dense", 0.5), ("EinsumDense", 0.5), ("MultiHeadAttention", 1.0))


# --------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------
def truncated_normal(rng: np.random.Generator, mean: float, sigma: float, low: float = 0.0,
                     high: float = 1.0) -> float:
    """A sample of the normal law (`mean`, `sigma`) truncated to [`low`, `high`].

    Example:

    >>> 0 <= truncated_normal(np.random.default_rng(0), 0.9, 0.5) <= 1
    True
    """
    if sigma <= 0:
        return float(np.clip(mean, low, high))
    for _ in range(1000):
        x = rng.normal(mean, sigma)
        if low <= x <= high:
            return float(x)
    return float(np.clip(mean, low, high))


class DDPGAgent:
    """Deep deterministic policy gradient (Lillicrap et al., 2016) with Keras Dense nets.

    Args:
        state_size: Length of a state.
        hidden: Units of the two hidden layers of the actor and the critic.
        actor_lr, critic_lr: Adam learning rates (AMC: 1e-4 and 1e-3).
        tau: Soft update of the target nets, `target = tau * net + (1 - tau) * target`.
        discount: Discount of the next state's value (AMC: 1).
        buffer_size: Transitions the replay buffer keeps (oldest dropped first).
        batch_size: Transitions of one update.
        baseline_rate: Rate of the moving-average reward baseline.
        seed: Seed of the initial weights and the batches.

    Example:

    >>> agent = DDPGAgent(state_size=10, hidden=(64, 64), seed=0)
    >>> agent.act(np.zeros(10))
    0.5...
    """

    def __init__(self, state_size: int, hidden: tuple = (300, 300), actor_lr: float = 1e-4,
                 critic_lr: float = 1e-3, tau: float = 0.01, discount: float = 1.0,
                 buffer_size: int = 2000, batch_size: int = 64, baseline_rate: float = 0.5,
                 seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.tau, self.discount, self.batch_size = tau, discount, batch_size
        self.buffer_size, self.baseline_rate = buffer_size, baseline_rate
        self.state_size, self.hidden = state_size, tuple(hidden)
        self.actor = self._net("actor", state_size, 1, "sigmoid")
        self.critic = self._net("critic", state_size + 1, 1, None)
        self.actor_target = self._net("actor_target", state_size, 1, "sigmoid")
        self.critic_target = self._net("critic_target", state_size + 1, 1, None)
        self.actor_target.set_weights(self.actor.get_weights())
        self.critic_target.set_weights(self.critic.get_weights())
        self.actor_optimizer = keras.optimizers.Adam(actor_lr)
        self.critic_optimizer = keras.optimizers.Adam(critic_lr)
        self.buffer: list = []
        self.baseline: float | None = None

    def _init(self, k: int):
        seed = None if self.seed is None else int(self.seed) * 97 + k
        return keras.initializers.GlorotUniform(seed=seed)

    def _net(self, name: str, inputs: int, outputs: int, activation) -> keras.Model:
        x = inp = keras.Input((inputs,))
        for i, units in enumerate(self.hidden):
            x = keras.layers.Dense(units, activation="relu", kernel_initializer=self._init(i),
                                   name=f"{name}_{i}")(x)
        out = keras.layers.Dense(outputs, activation=activation,
                                 kernel_initializer=self._init(len(self.hidden)),
                                 name=f"{name}_out")(x)
        return keras.Model(inp, out, name=name)

    def act(self, state) -> float:
        """The actor's action in [0, 1] for `state`."""
        x = np.asarray(state, dtype="float32")[None]
        return float(keras.ops.convert_to_numpy(self.actor(x, training=False))[0, 0])

    def observe(self, state, action: float, reward: float, next_state, done: bool) -> None:
        """Add a transition to the replay buffer."""
        self.buffer.append((np.asarray(state, "float32"), float(action), float(reward),
                            np.asarray(next_state, "float32"), float(done)))
        if len(self.buffer) > self.buffer_size:
            self.buffer.pop(0)

    def update(self) -> tuple:
        """One DDPG update on a random batch: `(critic loss, actor loss)`.

        The critic regresses `reward - baseline + discount * (1 - done) *
        Q'(s', mu'(s'))`; the actor ascends `Q(s, mu(s))`; the targets move by `tau`.
        """
        import tensorflow as tf

        take = self.rng.choice(len(self.buffer), min(self.batch_size, len(self.buffer)),
                               replace=False)
        s, a, r, s2, d = (np.stack([self.buffer[i][k] for i in take]).astype("float32")
                          for k in range(5))
        a, r, d = a[:, None], r[:, None], d[:, None]
        mean = float(r.mean())
        self.baseline = mean if self.baseline is None else \
            self.baseline + self.baseline_rate * (mean - self.baseline)
        next_q = self.critic_target(np.concatenate(
            [s2, keras.ops.convert_to_numpy(self.actor_target(s2))], 1))
        y = (r - self.baseline) + self.discount * (1.0 - d) * keras.ops.convert_to_numpy(next_q)
        with tf.GradientTape() as tape:
            q = self.critic(np.concatenate([s, a], 1), training=True)
            critic_loss = tf.reduce_mean(tf.square(q - y))
        grads = tape.gradient(critic_loss, self.critic.trainable_variables)
        self.critic_optimizer.apply_gradients(zip(grads, self.critic.trainable_variables))
        with tf.GradientTape() as tape:
            q = self.critic(tf.concat([s, self.actor(s, training=True)], 1), training=False)
            actor_loss = -tf.reduce_mean(q)
        grads = tape.gradient(actor_loss, self.actor.trainable_variables)
        self.actor_optimizer.apply_gradients(zip(grads, self.actor.trainable_variables))
        for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            target.set_weights([self.tau * w + (1 - self.tau) * t
                                for w, t in zip(net.get_weights(), target.get_weights())])
        return float(critic_loss), float(actor_loss)


# --------------------------------------------------------------------------
# The environment: states, clipped actions
# --------------------------------------------------------------------------
def _first(layer, name: str, default: float) -> float:
    value = getattr(layer, name, None)
    if value is None:
        return default
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return float(np.prod(value)) if name == "kernel_size" else float(value[0])


def _in_width(layer) -> float:
    kernel = getattr(layer, "kernel", None)
    if kernel is not None and len(kernel.shape) >= 2:
        return float(kernel.shape[-2])
    try:
        return float(layer.input.shape[-1])
    except (AttributeError, TypeError, ValueError):
        return 0.0


def _kind(layer) -> float:
    name = type(layer).__name__
    return next((code for key, code in _KINDS if key in name), 0.25)


class AMC:
    """The walk over a search's units: static embeddings, states and the budget wall.

    Args:
        search: The `Search` (with a budget).

    Example:

    >>> env = AMC(Search(model, evaluate, kprune.search.macs(0.3), verbose=0))
    >>> first = env.clip(0, {}, 0.0)  # the least the first unit must give
    >>> env.state(1, {env.reps[0]: first}, first).shape
    (10,)
    """

    def __init__(self, search: Search):
        from kprune.profile import profile

        self.search = search
        self.reps = list(search.units)
        self.max = search.max_ratios()
        self.guard = search.guards["max_ratio"]
        self.goal = search.bound.target
        macs = {row.name: row.macs for row in profile(search.model).layers}
        rows = []
        for i, rep in enumerate(self.reps):
            layers = {m.name: m.layer for gid in search.units[rep]
                      for m in search.graph.groups[gid].producers}
            first = next(iter(layers.values()))
            rows.append([i, _kind(first), _in_width(first), search.graph.groups[rep].size,
                         _first(first, "kernel_size", 1.0), _first(first, "strides", 1.0),
                         sum(macs.get(name, 0) for name in layers)])
        table = np.asarray(rows, dtype=float)
        span = table.max(0) - table.min(0)
        self.static = np.where(span > 0, (table - table.min(0)) / np.where(span > 0, span, 1), 0.0)

    def cap(self, rep: int) -> float:
        """The largest ratio of unit `rep` (the guards then cap its count)."""
        return min(self.guard, self.max[rep])

    def state(self, i: int, ratios: dict, previous: float) -> np.ndarray:
        """The state at unit `i` after `ratios` (the earlier units' choices)."""
        share = self.search.estimate(ratios)
        left = max(0.0, share - self.goal)
        return np.concatenate([self.static[i], [1.0 - share, left, previous]]).astype("float32")

    def clip(self, i: int, ratios: dict, ratio: float) -> float:
        """`ratio` for unit `i`, raised so that the budget stays reachable.

        The smallest ratio (at which the unit's width changes) such that the
        estimate of `ratios` (earlier units), unit `i` at it and every later
        unit at its most is within the goal; `ratio` when that is smaller.
        When even the unit's most cannot reach the goal, its most.
        """
        s, rep = self.search, self.reps[i]
        later = {}
        for other in self.reps[i + 1:]:
            later = s.with_unit(later, other, self.max[other])

        def est(r):
            return s.estimate(s.with_unit({**ratios, **later}, rep, r))

        cap = self.cap(rep)
        points = [0.0] + [p for p in s.points(rep) if p <= cap]
        lo, hi = -1, len(points) - 1
        if est(points[hi]) > self.goal + 1e-12:
            return cap
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if est(points[mid]) <= self.goal + 1e-12:
                hi = mid
            else:
                lo = mid
        return float(min(cap, max(ratio, points[hi])))


class _Search:
    def __init__(self, search: Search, episodes, warmup, sigma, sigma_decay, reward, agent_args,
                 long_finetune, rng, refine=2):
        self.search, self.env, self.refine = search, AMC(search), refine
        self.episodes, self.warmup = episodes, warmup
        self.sigma, self.sigma_decay = sigma, sigma_decay
        self.reward_fn, self.long_finetune, self.rng = reward, long_finetune, rng
        self.agent = DDPGAgent(len(FEATURES), **agent_args)
        self.best = None
        self.rewards: list = []

    def reward(self, record) -> float:
        if self.reward_fn is None:
            return record.score
        return check_score(self.reward_fn(record.score, record.measured), "reward")

    def episode(self, k: int) -> None:
        s, env, agent = self.search, self.env, self.agent
        ratios, previous, steps = {}, 0.0, []
        for i, rep in enumerate(env.reps):
            state = env.state(i, ratios, previous)
            cap = env.cap(rep)
            if k < self.warmup:
                action = self.rng.uniform(0.0, 1.0)
            else:
                action = truncated_normal(self.rng, agent.act(state), self.sigma)
            ratio = env.clip(i, ratios, round(action * cap, 6))
            ratios = s.with_unit(ratios, rep, ratio) if ratio > 0 else ratios
            previous = ratio / cap if cap > 0 else 0.0
            steps.append((state, previous))
        record, model = s.trial(ratios, step=k)
        env.goal = s.calibrated()
        self.best = s.best([p for p in (self.best, (record, model)) if p is not None])
        reward = self.reward(record)
        self.rewards.append(reward)
        for j, (state, action) in enumerate(steps):
            last = j == len(steps) - 1
            nxt = state if last else steps[j + 1][0]
            agent.observe(state, action, reward, nxt, last)
            if k >= self.warmup:
                agent.update()
        if k >= self.warmup:
            self.sigma *= self.sigma_decay
        if s.verbose == 2:
            print(f"amc: episode {k}{' (warm-up)' if k < self.warmup else ''}: score "
                  f"{record.score:.4f}, reward {reward:.4f}, budget {record.measured:.3f}")

    def run(self) -> SearchResult:
        s = self.search
        s.progress(self.episodes + self.refine + (self.long_finetune is not None))
        with s.running():
            for k in range(self.episodes):
                self.episode(k)
            self.best = s.refine(self.best, self.refine)
            if self.long_finetune is not None and s.bound.met(self.best[0].measured):
                self.best = s.long_finetune(*self.best, self.long_finetune)
        if self.best is not None:
            self.best[0].accepted = True
        return finish(s, self.best, "amc")


def amc(model: keras.Model, evaluate: Callable, budget: Budget,
        finetune: Callable | None = None, *, episodes: int = 100, warmup: int = 25,
        sigma: float = 0.5, sigma_decay: float = 0.95, reward: Callable | None = None,
        hidden: tuple = (300, 300), actor_lr: float = 1e-4, critic_lr: float = 1e-3,
        tau: float = 0.01, discount: float = 1.0, buffer_size: int = 2000,
        batch_size: int = 64, long_finetune: Callable | None = None, refine: int = 2,
        seed: int | None = None, verbose: int = 1, **options) -> SearchResult:
    """Per-group ratios for `budget`, chosen by AMC's DDPG agent.

    Args:
        model: A functional or Sequential Keras model (left untouched).
        evaluate: `evaluate(model) -> float`, higher is better.
        budget: `kprune.search.macs(t)`, `params(t)` or `latency(t, ...)`.
        finetune: Optional fine-tune of every episode's model (AMC: none).
        episodes: Episodes in all, warm-up included, an int >= 1 (AMC: 400).
        warmup: Episodes of random actions first, in [0, episodes] (AMC: 100).
        sigma: Initial sigma of the exploration noise, > 0.
        sigma_decay: Sigma is multiplied by it after every episode past the
            warm-up, in (0, 1].
        reward: Optional `reward(score, share) -> float` (share: the budget
            share measured on the episode's model); default: the score. AMC's
            resource-aware reward is of the kind `lambda acc, share: -(1 - acc)
            * math.log(share)`.
        hidden: Hidden units of the actor and critic (AMC: 300, 300).
        actor_lr, critic_lr, tau, discount, buffer_size, batch_size: DDPG
            settings (see `DDPGAgent`).
        long_finetune: Optional fine-tune of the best model at the end.
        refine: Most trials spent after the episodes giving back what the best
            candidate left of the budget (`Search.refine`; 0: none).
        seed: Seed of the agent's weights, actions and batches; the same seed
            gives the same search.
        verbose: 1 a progress bar, 2 a line per episode, 0 silent.
        **options: Other keywords of `kprune.search.core.Search` (criterion,
            exclude, max_ratio, min_channels, round_to, data, loss, reduce,
            batch_size of criteria is `score_batch_size` here, max_trials,
            time_limit, approximate).

    Returns:
        A `SearchResult`: the best episode within the budget. Ctrl-C,
        `max_trials` and `time_limit` return the best so far with `stopped=True`.

    Raises:
        KprunError: for an argument out of range (named with its range), and
            for a MACs or params budget the guards cannot reach.

    Example:

    >>> result = amc(model, evaluate, kprune.search.macs(0.5), episodes=30, warmup=10, seed=0)
    >>> result.budget <= 0.5
    True
    """
    check_budget(budget)
    episodes = check_number("episodes", episodes, 1, None, integer=True)
    warmup = check_number("warmup", warmup, 0, episodes, integer=True,
                          what="warm-up episodes, at most `episodes`")
    check_number("sigma", sigma, 0, None, low_open=True)
    check_number("sigma_decay", sigma_decay, 0, 1, low_open=True)
    check_number("tau", tau, 0, 1, low_open=True)
    check_number("discount", discount, 0, 1)
    for name, value in (("actor_lr", actor_lr), ("critic_lr", critic_lr)):
        check_number(name, value, 0, None, low_open=True)
    for name, value in (("buffer_size", buffer_size), ("batch_size", batch_size)):
        check_number(name, value, 1, None, integer=True)
    if isinstance(hidden, (int, np.integer)):
        hidden = (hidden,)
    try:
        hidden = tuple(check_number("hidden", h, 1, None, integer=True) for h in hidden)
    except TypeError:
        raise KprunError(f"`hidden` must be a tuple of ints >= 1, got {hidden!r}.") from None
    if reward is not None and not callable(reward):
        raise KprunError(f"`reward` must be a function (score, share) -> float, or None; "
                         f"got {reward!r}.")
    refine = check_number("refine", refine, 0, None, integer=True)
    if "score_batch_size" in options:
        options["batch_size"] = options.pop("score_batch_size")
    search = make_search(model, evaluate, budget, finetune, long_finetune, seed, verbose, options)
    agent_args = {"hidden": hidden, "actor_lr": actor_lr, "critic_lr": critic_lr, "tau": tau,
                  "discount": discount, "buffer_size": buffer_size, "batch_size": batch_size,
                  "seed": seed}
    return _Search(search, episodes, warmup, sigma, sigma_decay, reward, agent_args,
                   long_finetune, np.random.default_rng(None if seed is None else seed + 1),
                   refine).run()


__all__ = ["AMC", "FEATURES", "DDPGAgent", "amc", "truncated_normal"]
