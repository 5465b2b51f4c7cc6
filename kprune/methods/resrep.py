"""ResRep: prune channels by training compactors, then fold them away.

ResRep (Ding et al., "ResRep: Lossless CNN Pruning via Decoupling
Remembering and Forgetting", ICCV 2021) inserts a `Compactor` (a masked,
identity-initialised pointwise map) after the normalisation that follows
each prunable layer. Training pushes whole compactor channels to zero (the
Res gradient rule, `kprune.rules.ResRepRule`), a schedule masks the weakest
channels until a MACs target is met, and conversion folds every compactor
into the layer before it and removes the masked channels for real.

The workflow:

    rr = kprune.resrep.attach(model)
    kprune.resrep.compile(rr, optimizer=..., loss=..., metrics=[...])
    rr.fit(data, epochs=..., callbacks=[kprune.resrep.MaskScheduler(0.5)])
    small = kprune.resrep.convert(rr)

The dependency graph decides where compactors go, so no per-architecture
table is written by hand. Channels that must be removed together (a
residual stream joined by `Add`) get one compactor per producer; the
compactors of one stream share one mask (`compactor_sets`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import keras
import numpy as np

from kprune.errors import KprunError, KprunWarning
from kprune.graph import rules as R
from kprune.graph.dependency import DependencyGraph
from kprune.graph.norms import GroupNormRule
from kprune.graph.walk import walk
from kprune.layers.compactor import Compactor
from kprune.profile import layer_macs, profile
from kprune.surgeon.fuse import (PRODUCERS, can_mix, fold_compactors, fuse_batchnorm,
                                 is_linear, output_axis)
from kprune.surgeon.plan import apply_plan
from kprune.surgeon.rebuild import Rebuilder, weights_of

L = keras.layers
ZERO, CONST, UNKNOWN = 0, 1, 2  # what a masked channel holds on its way to consumers


# ---------------------------------------------------------------------------
# Where compactors go
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Site:
    """Where the compactor of one producer call goes.

    Attributes:
        producer: The producer's call.
        norm: The BatchNormalization call the compactor follows, or None (the
            compactor follows the producer).
        split: The producer's own activation moves after the compactor.
    """

    producer: object
    norm: object = None
    split: bool = False


def _layer_counts(flat) -> dict:
    counts: dict = {}
    for call in flat.calls:
        counts[id(call.layer)] = counts.get(id(call.layer), 0) + 1
    return counts


def _matches(layer, exclude) -> bool:
    for item in exclude:
        if isinstance(item, str) and item in (layer.name, type(layer).__name__):
            return True
        if isinstance(item, type) and isinstance(layer, item):
            return True
    return False


def _site_of(flat, call, counts, exclude):
    """The `_Site` of producer `call`, or a string saying why it gets none."""
    layer = call.layer
    if _matches(layer, exclude):
        return f"'{layer.name}' is excluded"
    if not isinstance(layer, PRODUCERS) or not can_mix(layer):
        return f"'{layer.name}' ({type(layer).__name__}) cannot absorb a compactor"
    if counts[id(layer)] > 1:
        return f"'{layer.name}' is called more than once"
    out = call.outputs[0]
    readers = flat.consumers(out)
    norm = readers[0] if len(readers) == 1 else None
    if norm is not None and not _fusable_norm(norm, layer, counts):
        norm = None
    if not is_linear(layer):
        if norm is not None:
            return (f"'{layer.name}' applies its activation before the BatchNormalization "
                    "that follows it")
        return _Site(call, None, split=True)
    return _Site(call, norm)


def _fusable_norm(call, producer, counts) -> bool:
    if not isinstance(call.layer, L.BatchNormalization) or counts[id(call.layer)] > 1:
        return False
    rank = len(call.inputs[0].shape)
    return R.norm_axis(int(call.layer.axis), rank) == output_axis(producer, rank)


def _groups_of(graph, tensor) -> np.ndarray:
    spec = graph.specs.get(id(tensor))
    if spec is None:
        return np.zeros(0, dtype=np.int64)
    return np.unique(graph.atom_group[spec.atoms])


def _zero_maps_to_zero(layer) -> bool:
    """Whether an element-wise layer maps 0 to exactly 0."""
    try:
        out = keras.ops.convert_to_numpy(layer(np.zeros((1, 1), dtype="float32")))
    except Exception:  # noqa: BLE001 - any failure means: not known to keep zeros
        return False
    return bool(np.all(out == 0))


_ELEMENTWISE = (L.ReLU, L.LeakyReLU, L.ELU, L.Activation, L.Softmax)
_CONSUMER_RULES = (R.ConvRule, R.DenseRule, R.ConvTransposeRule, R.SeparableConvRule,
                   R.RNNRule, R.CompactorRule)


def _transfer(call, states: list) -> int:
    """State of a masked channel after a per-channel layer call, given its inputs' states.

    `states` has one entry per input tensor: ZERO, CONST, UNKNOWN, or None for
    an input that does not carry the channel (broadcast).
    """
    layer = call.layer
    rule = R.get_rule(layer)
    known = [s for s in states if s is not None]
    worst = max(known) if known else UNKNOWN
    if isinstance(rule, (R.BatchNormRule, GroupNormRule, R.NormalizationRule)):
        return UNKNOWN if worst == UNKNOWN else CONST
    if isinstance(rule, R.DepthwiseRule):
        flat_kernel = math.prod(layer.kernel_size) == 1 or layer.padding == "valid"
        if worst == ZERO:
            return CONST if layer.use_bias else ZERO
        return CONST if worst == CONST and flat_kernel else UNKNOWN
    if isinstance(rule, R.MergeRule):
        if type(layer).__name__ == "Multiply":
            return ZERO if ZERO in known else (UNKNOWN if None in states else worst)
        scalars = [a for a in keras.tree.flatten(call.args) if not isinstance(a, keras.KerasTensor)]
        if None in states:
            return UNKNOWN
        return CONST if worst == ZERO and any(np.any(a) for a in scalars) else worst
    if isinstance(rule, R.SpatialRule):
        padding = isinstance(layer, (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D))
        return UNKNOWN if padding and worst != ZERO else worst
    if isinstance(rule, (R.ConcatenateRule, R.GlobalPoolRule, R.FlattenRule, R.ReshapeRule,
                         R.PReLURule)):
        return worst
    if isinstance(rule, R.PassThroughRule):
        if isinstance(layer, _ELEMENTWISE) and worst == ZERO and not _zero_maps_to_zero(layer):
            return CONST
        return worst
    return UNKNOWN


def _absorbs(layer, state: int) -> bool:
    """Whether consumer `layer` can read a masked channel holding `state` once removed."""
    if state == ZERO:
        return True
    if state != CONST:
        return False
    if isinstance(layer, L.Dense):
        return True
    conv = (L.Conv1D, L.Conv2D, L.Conv3D)
    return isinstance(layer, conv) and math.prod(layer.kernel_size) == 1 and layer.groups == 1


def _check_reach(graph, sites: dict, counts) -> dict:
    """For each group of `sites`, None if its masked channels can be removed exactly, else why.

    A masked channel is zero right after its compactors. Follow it through
    the per-channel layers to its consumers: a consumer must read zero, or a
    constant it can absorb into its bias (a Dense or 1x1 convolution).
    """
    start = {}
    for gid, group_sites in sites.items():
        for site in group_sites:
            if site.norm is not None:
                start[id(site.norm)] = (gid, ZERO)
            else:
                act = site.producer.layer.activation
                zero = not site.split or _zero_maps_to_zero(L.Activation(act))
                start[id(site.producer)] = (gid, ZERO if zero else CONST)
    state: dict = {}
    problem = {gid: None for gid in sites}
    for call in graph.flat.calls:
        in_groups = [set(_groups_of(graph, t).tolist()) for t in call.inputs]
        for gid in set().union(*in_groups) & set(sites) if in_groups else ():
            states = [state.get((id(t), gid), UNKNOWN) if gid in g else None
                      for t, g in zip(call.inputs, in_groups)]
            if isinstance(R.get_rule(call.layer), _CONSUMER_RULES):
                worst = max(s for s in states if s is not None)
                if not _absorbs(call.layer, worst) or (worst == CONST and counts[id(call.layer)] > 1):
                    problem[gid] = problem[gid] or (
                        f"removed channels would reach '{call.layer.name}' as "
                        + ("a constant it cannot absorb" if worst == CONST else "unknown values"))
                continue
            value = _transfer(call, states)
            for t in call.outputs:
                if gid in _groups_of(graph, t):
                    state[(id(t), gid)] = value
        if id(call) in start:
            gid, value = start[id(call)]
            state[(id(call.outputs[0]), gid)] = value
    return problem


def plan_sites(model: keras.Model, exclude: Sequence = ()) -> tuple:
    """Decide where `attach` puts compactors, without changing anything.

    Args:
        model: A functional or Sequential model.
        exclude: Layer names, class names or classes whose output channels get
            no compactor (their whole channel group is then left alone).

    Returns:
        `(sites, skipped)`: `sites` maps a group id of `DependencyGraph(model)`
        to the producer names of each group that gets compactors; `skipped`
        maps the producer names of every other group to the reason it was left.

    Example:

    >>> sites, skipped = plan_sites(tests.archs.preact_resnet())
    >>> list(skipped.values())[-1]
    "removed channels would reach 'conv2d_1' as a constant it cannot absorb"
    """
    graph, sites, skipped = _plan(model, exclude)
    return {gid: [s.producer.layer.name for s in group_sites]
            for gid, group_sites in sites.items()}, skipped


def _plan(model: keras.Model, exclude: Sequence) -> tuple:
    """(graph, group id -> list of `_Site`, skipped) for `plan_sites` and `attach`."""
    graph = DependencyGraph(model)
    flat = graph.flat
    counts = _layer_counts(flat)
    for call in flat.calls:
        if isinstance(call.layer, Compactor):
            raise KprunError(f"Model '{model.name}' already has compactors "
                             f"('{call.layer.name}'); attach them only once.")
    calls_of = {}
    for call in flat.calls:
        calls_of.setdefault(id(call.layer), []).append(call)
    sites, skipped = {}, {}
    for group in graph.groups:
        if not group.producers:
            continue
        names = tuple(m.name for m in group.producers)
        if not group.prunable:
            skipped[names] = group.reason
            continue
        if group.partitions:
            skipped[names] = "its channels feed a grouped convolution"
            continue
        found = []
        for member in group.producers:
            site = _site_of(flat, calls_of[id(member.layer)][0], counts, exclude)
            if isinstance(site, str):
                skipped[names] = site
                break
            found.append(site)
        else:
            sites[group.id] = found
    for gid, reason in _check_reach(graph, sites, counts).items():
        if reason is not None:
            skipped[tuple(m.name for m in graph.groups[gid].producers)] = reason
            del sites[gid]
    return graph, sites, skipped


def attach(model: keras.Model, *, exclude: Sequence = (), lam: float = 1e-4) -> keras.Model:
    """Insert a Compactor after each prunable producer (after its BatchNormalization).

    Every prunable channel group whose producers are convolutions or `Dense`
    layers gets one compactor per producer: after the BatchNormalization
    that alone reads the producer's output, or right after the producer.
    A producer's own activation (`Conv2D(..., activation="relu")`) moves to
    an `Activation` layer after the compactor. The compactors of a group with
    several producers (a residual stream) form one set that shares one mask
    (`compactor_sets`). A group is left alone when its channels could not be
    removed exactly afterwards (for example when a masked channel would reach
    a 3x3 convolution through a BatchNormalization, as in pre-activation
    ResNets); `plan_sites` says which and why.

    Compactors start as the identity, so the result computes exactly what
    `model` computes.

    Args:
        model: A functional or Sequential model (left untouched).
        exclude: Layer names, class names or classes whose channel groups get
            no compactor.
        lam: Strength of the Res rule's group-lasso term; stored on the
            result as `resrep_lambda` for `compile` and `rule`.

    Returns:
        A new functional model with Compactor layers named
        `<producer>_compactor`.

    Raises:
        KprunError: if `model` already has compactors, or no group can get one.

    Example:

    >>> model = kprune.models.cifar_resnet(20)
    >>> rr = attach(model)
    >>> len(compactor_sets(rr))
    4
    """
    _check_lambda(lam)
    graph, sites, skipped = _plan(model, exclude)
    if not sites:
        reasons = "; ".join(f"{', '.join(k)}: {v}" for k, v in list(skipped.items())[:3])
        raise KprunError(f"No layer of model '{model.name}' can take a compactor ({reasons}).")
    by_call = {}
    for group_sites in sites.values():
        for site in group_sites:
            by_call[id(site.producer)] = site
            if site.norm is not None:
                by_call[id(site.norm)] = site
    def compactor(site, tensor):
        rank = len(tensor.shape)
        axis = output_axis(site.producer.layer, rank)
        name = rebuilder.unique_name(f"{site.producer.layer.name}_compactor")
        return Compactor(axis=-1 if axis == rank - 1 else axis, name=name)(tensor)

    def make_call(call, args, kwargs):
        site = by_call.get(id(call))
        if site is None:
            return rebuilder.copy_call(call, args, kwargs)
        if site.norm is not None:
            out = rebuilder.copy_call(call, args, kwargs)
            return compactor(site, out) if call is site.norm else out
        if not site.split:
            return compactor(site, rebuilder.copy_call(call, args, kwargs))
        config = call.layer.get_config()
        activation = config["activation"]
        config["activation"] = "linear"
        out = rebuilder.call_with(call, args, kwargs, config)
        act_name = rebuilder.unique_name(f"{call.layer.name}_activation")
        return L.Activation(activation, name=act_name)(compactor(site, out))

    rebuilder = Rebuilder(graph.flat, make_call)
    attached = rebuilder.run()
    attached.resrep_lambda = float(lam)
    return attached


def _check_lambda(lam) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) \
            or lam < 0:
        raise KprunError(f"resrep: `lam` must be a finite number >= 0, got {lam!r}.")


def compactors(model: keras.Model) -> list:
    """The Compactor layers of `model`, in call order."""
    seen, found = set(), []
    for call in walk(model).calls:
        if isinstance(call.layer, Compactor) and id(call.layer) not in seen:
            seen.add(id(call.layer))
            found.append(call.layer)
    return found


def compactor_sets(model: keras.Model) -> list:
    """Names of the compactors that share one mask, one list per channel group.

    The compactors after the producers of one residual stream are joined by
    its `Add` layers, so the dependency graph of the attached model puts
    their outputs in one group.

    Args:
        model: A model returned by `attach` (or loaded from one).

    Returns:
        A list of lists of compactor names (JSON-able).

    Example:

    >>> compactor_sets(attach(kprune.models.cifar_resnet(20)))[0]
    ['stem_conv_compactor', 'stage1_block1_conv2_compactor', ...]
    """
    graph = DependencyGraph(model)
    sets = []
    for group in graph.groups:
        names = [m.name for m in group.producers if isinstance(m.layer, Compactor)]
        if names:
            sets.append(names)
    return sets


# ---------------------------------------------------------------------------
# MACs of the converted model
# ---------------------------------------------------------------------------
def _call_macs(layer, in_shapes: list, out_shapes: list) -> int:
    """Multiply-accumulates of one call (batch excluded) for the given shapes."""
    return layer_macs(layer, in_shapes, out_shapes)


class _MacCounter:
    """MACs of a model's calls as channels of its groups are dropped one by one."""

    def __init__(self, graph: DependencyGraph):
        self.graph = graph
        self.calls = [c for c in graph.flat.calls if isinstance(c.layer, keras.layers.Layer)]
        self.tensors: dict = {}  # id -> (tensor, spec)
        self.of_group: dict = {}  # gid -> list of (tensor id, channel per position)
        self.readers: dict = {}  # tensor id -> indices of calls touching it
        for i, call in enumerate(self.calls):
            for t in call.inputs + call.outputs:
                spec = graph.specs.get(id(t))
                if spec is None:
                    continue
                self.readers.setdefault(id(t), set()).add(i)
                if id(t) in self.tensors:
                    continue
                self.tensors[id(t)] = (t, spec)
                groups = graph.atom_group[spec.atoms]
                for gid in np.unique(groups):
                    channels = np.where(groups == gid, graph.atom_channel[spec.atoms], -1)
                    self.of_group.setdefault(int(gid), []).append((id(t), channels))
        self.reset()

    def reset(self) -> None:
        self.width = {tid: spec.size for tid, (_, spec) in self.tensors.items()}
        self.per_call = [self._macs(i) for i in range(len(self.calls))]
        self.total = int(sum(self.per_call))

    def _shape(self, t):
        shape = list(t.shape)
        if id(t) in self.tensors:
            shape[self.tensors[id(t)][1].axis] = self.width[id(t)]
        return tuple(shape)

    def _macs(self, i: int) -> int:
        call = self.calls[i]
        return int(_call_macs(call.layer, [self._shape(t) for t in call.inputs],
                              [self._shape(t) for t in call.outputs]))

    def drop(self, gid: int, channel: int) -> None:
        touched = set()
        for tid, channels in self.of_group.get(gid, ()):
            n = int(np.count_nonzero(channels == channel))
            if n:
                self.width[tid] -= n
                touched |= self.readers[tid]
        for i in touched:
            new = self._macs(i)
            self.total += new - self.per_call[i]
            self.per_call[i] = new


class _Layout:
    """How the compactors of an attached model map onto its converted form.

    Attributes:
        plain: The model with BatchNormalization fused and compactors folded
            (all channels kept): the converted model before surgery.
        graph: Its dependency graph.
        sets: One `(group id, [(compactor, channel per position), ...])` per
            compactor set; channels are the group's.
    """

    def __init__(self, model: keras.Model):
        flat = walk(model)
        found = [c for c in flat.calls if isinstance(c.layer, Compactor)]
        if not found:
            raise KprunError(f"Model '{model.name}' has no Compactor layers; "
                             "call kprune.resrep.attach first.")
        self.plain = fold_compactors(fuse_batchnorm(model))
        self.graph = DependencyGraph(self.plain)
        by_group: dict = {}
        for call in found:
            producer = _producer_name(flat, call)
            group, channels = self.graph.output_channels(producer)
            by_group.setdefault(group.id, []).append((call.layer, channels, producer))
        self.sets = []
        for gid, members in by_group.items():
            group = self.graph.groups[gid]
            owned = {producer for _, _, producer in members}
            others = [m.name for m in group.producers if m.name not in owned]
            if others or not group.prunable:
                why = group.reason if not group.prunable else \
                    f"'{others[0]}' writes the same channels without a compactor"
                names = ", ".join(m[0].name for m in members)
                raise KprunError(f"Compactor(s) {names}: their channels cannot be removed: {why}.")
            self.sets.append((gid, [(layer, channels) for layer, channels, _ in members]))

    def masks(self) -> dict:
        """Group id -> boolean array of the channels every compactor of the set masks."""
        drop = {}
        for gid, members in self.sets:
            masked = np.ones(self.graph.groups[gid].size, dtype=bool)
            for layer, channels in members:
                mask = keras.ops.convert_to_numpy(layer.mask)
                masked[channels[mask != 0]] = False
            drop[gid] = masked
        return drop

    def scores(self) -> dict:
        """Group id -> per-channel root mean square of the set's kernel columns' norms.

        A channel read by k compactors (a residual stream) is scored by
        `sqrt(sum_c ||K_c[:, j]||^2 / k)`, so fresh identity compactors score
        1 whatever k is: summing the squares instead would rank a stream
        channel sqrt(k) times stronger than an inner one and leave the stream
        whole.
        """
        out = {}
        for gid, members in self.sets:
            total = np.zeros(self.graph.groups[gid].size)
            count = np.zeros_like(total)
            for layer, channels in members:
                kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype="float64")
                np.add.at(total, channels, np.sum(kernel ** 2, axis=0))
                np.add.at(count, channels, 1.0)
            out[gid] = np.sqrt(total / np.maximum(count, 1.0))
        return out

    def write(self, drop: dict) -> None:
        """Set every compactor's mask from group id -> channels to mask."""
        for gid, members in self.sets:
            for layer, channels in members:
                layer.mask.assign((~drop[gid][channels]).astype(layer.mask.dtype))


def _producer_name(flat, call) -> str:
    before = flat.producer(call.inputs[0])
    if before is not None and isinstance(before.layer, L.BatchNormalization):
        before = flat.producer(before.inputs[0])
    if before is None:
        raise KprunError(f"Compactor '{call.layer.name}' reads a model input.")
    return before.layer.name


def original_macs(model: keras.Model) -> int:
    """MACs of `model` without its compactors (the model before `attach`).

    Args:
        model: A model with compactors.

    Returns:
        The multiply-accumulates of one sample.
    """
    flat = walk(model)
    return int(sum(_call_macs(c.layer, [tuple(t.shape) for t in c.inputs],
                              [tuple(t.shape) for t in c.outputs])
                   for c in flat.calls if isinstance(c.layer, keras.layers.Layer)
                   and not isinstance(c.layer, Compactor)))


def converted_macs(model: keras.Model) -> int:
    """MACs the converted model (`convert(model)`) has with the current masks.

    Args:
        model: A model with compactors.

    Returns:
        The multiply-accumulates of one sample, as `kprune.profile` counts them.
    """
    layout = _Layout(model)
    counter = _MacCounter(layout.graph)
    for gid, masked in layout.masks().items():
        for channel in np.flatnonzero(masked):
            counter.drop(gid, int(channel))
    return counter.total


# ---------------------------------------------------------------------------
# Mask schedule
# ---------------------------------------------------------------------------
class MaskScheduler(keras.callbacks.Callback):
    """Mask the weakest compactor channels until a MACs target is met.

    After `warmup_steps` training steps, and every `interval` steps after
    that, all compactor channels of the model are ranked together by the
    L2 norm of their kernel column (`||K[:, j]||`; for a set of compactors
    sharing one mask, the root mean square over the set, so shared and single
    channels start on the same scale). Masks are rebuilt
    from the weakest channel up until the converted model's MACs reach
    `flops_target` times the original's, masking at most `granularity`
    channels more than before, and leaving at least `min_channels` channels
    in every group. Nothing is masked during warm-up.

    The step count is the optimizer's `iterations`, so a model saved and
    reloaded mid-training resumes the schedule where it was; the callback
    also binds a reloaded `RuleOptimizer`'s rules to the model (as
    `kprune.train.bind` does) when training begins.

    Args:
        flops_target: Share of the original MACs to reach, in (0, 1].
        warmup_steps: Training steps before the first mask update.
        interval: Steps between mask updates.
        granularity: Most channels added to the masks per update.
        min_channels: Channels every group keeps.
        scope: `"global"` (the paper's): every channel ranked by its norm
            against all others; `"local"`: each group's channels ranked
            within the group, so every group loses the same share (measured
            on MNIST-1D at 25% of the MACs with a short schedule, local kept
            95.0 / 95.6% over two seeds where global kept 95.3 / 93.5%: the
            global ranking cut some layers to a fifth).
        verbose: 1 prints one line per update.

    Attributes:
        macs_ratio: Converted MACs over original MACs after the last update.
        history: One `(step, macs_ratio, masked channels)` tuple per update
            (`kprune.plot.mask_schedule` draws it).

    Example:

    >>> rr = kprune.resrep.attach(model)
    >>> kprune.resrep.compile(rr, optimizer="sgd", loss="mse")
    >>> rr.fit(x, y, callbacks=[MaskScheduler(0.5, warmup_steps=100, interval=20)])
    """

    def __init__(self, flops_target: float = 0.5, warmup_steps: int = 1000,
                 interval: int = 200, granularity: int = 4, min_channels: int = 1,
                 scope: str = "global", verbose: int = 0):
        super().__init__()
        if scope not in ("global", "local"):
            raise KprunError(f"MaskScheduler: `scope` must be 'global' or 'local', got {scope!r}.")
        self.scope = scope
        if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float)) \
                or not 0 < flops_target <= 1:
            raise KprunError(f"MaskScheduler: `flops_target` must be in (0, 1], got {flops_target!r}.")
        for name, value, low in (("warmup_steps", warmup_steps, 0), ("interval", interval, 1),
                                 ("granularity", granularity, 1), ("min_channels", min_channels, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise KprunError(f"MaskScheduler: `{name}` must be an int >= {low}, got {value!r}.")
        self.flops_target = float(flops_target)
        self.warmup_steps = int(warmup_steps)
        self.interval = int(interval)
        self.granularity = int(granularity)
        self.min_channels = int(min_channels)
        self.verbose = verbose
        self.macs_ratio = None
        self.history = []
        self.original = None
        self._layout = None
        self._counter = None
        self._steps = 0

    def set_model(self, model) -> None:
        if model is not getattr(self, "_model", None):
            self._layout = None
        super().set_model(model)

    def _ensure_layout(self) -> None:
        if self._layout is None:
            self._layout = _Layout(self.model)
            self._counter = _MacCounter(self._layout.graph)
            self.original = original_macs(self.model)

    def step(self) -> int:
        """Training steps done so far (the optimizer's `iterations` when there is one)."""
        optimizer = getattr(self.model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        if iterations is None:
            return self._steps
        return int(keras.ops.convert_to_numpy(iterations))

    def on_train_begin(self, logs=None) -> None:
        # A model loaded from `.keras` mid-training holds a RuleOptimizer whose
        # Res rule knows its variables by path only: bind it before the first step.
        from kprune.train.optimizer import rule_optimizer

        optimizer = rule_optimizer(self.model)
        if optimizer is not None and not all(r.bound for r in optimizer.rules):
            optimizer.bind(self.model)

    def on_train_end(self, logs=None) -> None:
        """Warn when training stops before the masks reach `flops_target`."""
        self._ensure_layout()
        ratio = self.macs_ratio if self.macs_ratio is not None else \
            converted_macs(self.model) / self.original
        if ratio <= self.flops_target + 1e-9:
            return
        step = self.step()
        if step < self.warmup_steps:
            why = (f"training ended at step {step}, inside the warm-up ({self.warmup_steps} "
                   "steps): nothing was masked")
        else:
            updates = (step - self.warmup_steps) // self.interval + 1
            why = (f"{updates} mask update(s) by step {step} masked at most "
                   f"{self.granularity} channels each")
        warnings.warn(
            f"MaskScheduler: the masks reach {ratio:.1%} of the original MACs, not the target "
            f"{self.flops_target:.1%}; {why}. Train more steps, raise `granularity` (now "
            f"{self.granularity}), shorten `interval` (now {self.interval}) or `warmup_steps` "
            f"(now {self.warmup_steps}); `kprune.resrep.convert` removes only masked channels.",
            KprunWarning, stacklevel=2)

    def on_train_batch_end(self, batch, logs=None) -> None:
        self._steps += 1
        step = self.step()
        if step >= self.warmup_steps and (step - self.warmup_steps) % self.interval == 0:
            self.update()

    def _keys(self, score: np.ndarray) -> list:
        """Sort keys of one group's channels: the norm (global), or the share of the group
        ranked below it, the norm breaking ties (local)."""
        if self.scope == "global":
            return [float(v) for v in score]
        ranks = np.empty(len(score))
        ranks[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
        return [(float(r) / len(score), float(v)) for r, v in zip(ranks, score)]

    def update(self) -> dict:
        """Recompute the masks now and write them into the compactors.

        Returns:
            Group id (of the converted model's graph) -> boolean array of the
            masked channels.
        """
        self._ensure_layout()
        layout, counter = self._layout, self._counter
        before = sum(int(m.sum()) for m in layout.masks().values())
        limit = before + self.granularity
        target = self.flops_target * self.original
        scores = layout.scores()
        order = sorted((key, gid, int(c)) for gid, v in scores.items()
                       for c, key in enumerate(self._keys(v)))
        drop = {gid: np.zeros(len(v), dtype=bool) for gid, v in scores.items()}
        left = {gid: len(v) for gid, v in scores.items()}
        counter.reset()
        masked = 0
        for _, gid, channel in order:
            if counter.total <= target or masked >= limit:
                break
            if left[gid] <= self.min_channels:
                continue
            drop[gid][channel] = True
            left[gid] -= 1
            counter.drop(gid, channel)
            masked += 1
        layout.write(drop)
        self.macs_ratio = counter.total / self.original
        self.history.append((self.step(), float(self.macs_ratio), int(masked)))
        if self.verbose:
            print(f"MaskScheduler step {self.step()}: {masked} channels masked, "
                  f"MACs {counter.total:,} ({self.macs_ratio:.1%} of {self.original:,})")
        return drop


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------
def _probe_input(tensor) -> np.ndarray:
    shape = [1] + [16 if d is None else int(d) for d in tensor.shape[1:]]
    return np.zeros(shape, dtype=tensor.dtype or "float32")


def _absorb_constants(plain: keras.Model, graph: DependencyGraph, drop: dict) -> keras.Model:
    """Fold the constant a removed channel carries into its consumers' biases.

    After a BatchNormalization, a masked (zero) channel holds a constant.
    A Dense or 1x1 convolution reading it adds `constant * weights` to every
    output: that sum moves into the bias, so the channel can go.
    """
    flat = graph.flat
    wanted = []
    for call in flat.calls:
        if not isinstance(R.get_rule(call.layer), _CONSUMER_RULES) or not call.inputs:
            continue
        keep = graph.keep_mask(call.inputs[0], drop)
        if keep is not None and not keep.all():
            wanted.append((call, ~keep))
    if not wanted:
        return plain
    tensors = list({id(c.inputs[0]): c.inputs[0] for c, _ in wanted}.values())
    probe = keras.Model(flat.inputs, tensors)
    values = keras.tree.flatten(probe([_probe_input(t) for t in flat.inputs], training=False))
    value_of = {id(t): v for t, v in zip(tensors, values)}
    shifts = {}
    for call, dropped in wanted:
        value = value_of[id(call.inputs[0])]
        value = np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")
        axis = graph.specs[id(call.inputs[0])].axis
        value = np.moveaxis(value, axis, -1)
        sample = value.reshape(-1, value.shape[-1])[:, dropped]
        if not np.allclose(sample, sample[:1], rtol=1e-6, atol=1e-6):
            raise KprunError(f"Removed channels reach '{call.layer.name}' with values that vary; "
                             "they cannot be folded away.")
        constant = sample[0]
        if not np.any(constant):
            continue
        if not _absorbs(call.layer, CONST):
            raise KprunError(f"Removed channels reach '{call.layer.name}' as a non-zero constant "
                             f"that a {type(call.layer).__name__} cannot absorb.")
        kernel = np.asarray(dict(weights_of(call.layer))["kernel"], dtype="float64")
        rows = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])[0] \
            if kernel.ndim > 2 else kernel
        shifts[id(call)] = constant @ rows[dropped]

    def make_call(call, args, kwargs):
        if id(call) not in shifts:
            return rebuilder.copy_call(call, args, kwargs)
        weights = dict(weights_of(call.layer))
        bias = np.asarray(weights.get("bias", 0.0), dtype="float64") + shifts[id(call)]
        weights["bias"] = bias.astype(weights["kernel"].dtype)
        config = call.layer.get_config()
        config["use_bias"] = True
        return rebuilder.call_with(call, args, kwargs, config, weights)

    rebuilder = Rebuilder(flat, make_call)
    return rebuilder.run()


def convert(model: keras.Model, verbose: int = 1) -> keras.Model:
    """Turn a trained ResRep model into a smaller plain-Keras model.

    Fuses BatchNormalization into the layers before it, folds every
    compactor (with its mask) into its producer, moves the constants that
    masked channels carry into their consumers' biases, and removes the
    masked channels with the surgeon. In inference mode the result computes
    what `model` computes.

    Args:
        model: A model with compactors (left untouched).
        verbose: 1 prints the MACs the converted model keeps, as a share of
            the model before `attach`.

    Returns:
        A new model with no Compactor layer.

    Example:

    >>> small = convert(rr)
    >>> kprune.profile(small).macs <= 0.5 * kprune.profile(model).macs
    True
    """
    layout = _Layout(model)
    drop = {gid: m for gid, m in layout.masks().items() if m.any()}
    plain = _absorb_constants(layout.plain, layout.graph, drop)
    if drop:
        for gid, masked in drop.items():
            if masked.all():
                raise KprunError(f"Every channel of the set of compactors "
                                 f"{[m[0].name for g, ms in layout.sets if g == gid for m in ms]} "
                                 "is masked; at least one must stay.")
        plan = {gid: np.flatnonzero(m).tolist() for gid, m in drop.items()}
        plain = apply_plan(plain, plan, DependencyGraph(plain))
    if verbose:
        before, after = original_macs(model), profile(plain).macs
        print(f"kprune.resrep.convert: {after:,} MACs, {after / max(before, 1):.1%} of the "
              f"original {before:,}" + ("" if drop else " (no channel was masked)"))
    return plain


# ---------------------------------------------------------------------------
# Training: the Res rule and its optimizers
# ---------------------------------------------------------------------------
def rule(model: keras.Model, lam: float | None = None):
    """The Res rule for every compactor of `model` (`kprune.rules.ResRepRule`).

    Args:
        model: A model with compactors (from `attach`, or loaded from one).
        lam: Strength of the group-lasso term; by default the `lam` given
            to `attach` (1e-4 for a loaded model).

    Returns:
        A bound `kprune.rules.ResRepRule`.

    Example:

    >>> kprune.Trainer(rr, "sgd", "mse", rules=[kprune.resrep.rule(rr)]).fit(x, y)
    """
    from kprune.train.rules import ResRepRule

    lam = getattr(model, "resrep_lambda", 1e-4) if lam is None else lam
    _check_lambda(lam)
    return ResRepRule.from_model(model, lam=lam)


def compactor_optimizer(optimizer) -> keras.optimizers.Optimizer:
    """ResRep's optimizer for compactor kernels: SGD with momentum 0.99, no weight decay.

    Args:
        optimizer: The model's optimizer (an instance or a name); its
            learning rate (or schedule) is reused.

    Returns:
        A new `keras.optimizers.SGD`.
    """
    learning_rate = keras.optimizers.get(optimizer).get_config()["learning_rate"]
    return keras.optimizers.SGD.from_config({"learning_rate": learning_rate, "momentum": 0.99})


def compile(model: keras.Model, optimizer="sgd", loss=None, metrics=None, *,
            lam: float | None = None, compactors=None, **kwargs) -> keras.Model:
    """`model.compile` with the Res rule and ResRep's compactor optimizer.

    The optimizer becomes a `kprune.train.RuleOptimizer` that applies the Res
    rule to every compactor kernel and updates those kernels with their own
    optimizer (`compactor_optimizer` by default), while every other variable
    keeps `optimizer`.

    Args:
        model: A model with compactors (compiled in place).
        optimizer: The optimizer for every other variable.
        loss: As in `model.compile`.
        metrics: As in `model.compile`.
        lam: Strength of the Res rule's group-lasso term (see `rule`).
        compactors: The compactor kernels' optimizer; by default SGD with
            `optimizer`'s learning rate, momentum 0.99, no weight decay.
        **kwargs: Passed on to `model.compile`.

    Returns:
        `model`.

    Example:

    >>> rr = kprune.resrep.compile(kprune.resrep.attach(model), keras.optimizers.SGD(0.01),
    ...                            "sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> rr.fit(x, y, callbacks=[MaskScheduler(0.5)])
    """
    from kprune.train import RuleOptimizer

    res = rule(model, lam)
    optimizer = keras.optimizers.get(optimizer)
    extra = compactors if compactors is not None else compactor_optimizer(optimizer)
    model.compile(optimizer=RuleOptimizer(optimizer, [res], extra_optimizers=[(res, extra)]),
                  loss=loss, metrics=metrics, **kwargs)
    return model


__all__ = ["attach", "plan_sites", "compactors", "compactor_sets", "MaskScheduler", "convert",
           "rule", "compile", "compactor_optimizer",
           "converted_macs", "original_macs"]
