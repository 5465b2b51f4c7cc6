"""Low-rank decomposition with automatic rank selection (ENC), composable with channel pruning.

A layer's kernel, seen as a matrix, is replaced by its truncated SVD and the
layer by two plain Keras layers that compute the rank-`r` product:

* `Dense(n)` -> `Dense(r, use_bias=False)` + `Dense(n)` (bias and activation
  on the second), from the SVD of the `(Cin, n)` kernel.
* `Conv1D/2D/3D` with a `k`-sized kernel, **channel** decomposition ->
  the same convolution with `r` filters (strides, padding, dilation kept; no
  bias, no activation) + a 1x1 convolution (bias, activation), from the SVD
  of the kernel reshaped `(prod(k) * Cin, Cout)`.
* `Conv2D` `kh x kw`, **spatial** decomposition (Jaderberg et al. 2014's
  second scheme, as Tai et al. 2016 compute it) -> a `kh x 1` convolution
  with `r` filters + a `1 x kw` one, from the SVD of the kernel reshaped
  `(kh * Cin, kw * Cout)`; strides, dilation and padding split by axis.

Each factor gets the square root of the singular values, so both are
equally scaled for fine-tuning. At full rank the two layers compute what
the original computes; at rank `r` they compute the original layer with
the best rank-`r` kernel (in the Frobenius norm) of that matrix.

Rank selection follows ENC (Kim, Khan and Kyung, "Efficient Neural Network
Compression", CVPR 2019). Every layer gets an accuracy metric per rank,
`a_l(r)` in [0, 1] (about): the **energy** metric, the share of squared
singular values the rank keeps (`1 - |W - W_r|^2 / |W|^2`, comparable
between the channel and spatial matrices), or the **accuracy** metric, the
user's `evaluate(model)` with only that layer at rank `r`, divided by the
original's (measured at a few ranks, interpolated in between). The
network's metric is the product over layers (ENC's combined metric). Then:

* `uniform`: the same rank ratio `r / full` for every layer (or the same
  energy share, `uniform_by="energy"`), bisected for the MACs target.
* `enc_map`: one metric value `a` for every layer, each taking its cheapest
  decomposition with `a_l >= a` (channel or spatial, whichever costs less);
  `a` is bisected for the MACs target.
* `enc_model`: within the per-layer range ENC-Map gives for a band of
  targets around the target, a divide-and-conquer search (layers merged
  pairwise, keeping the MACs/metric Pareto front of each subset) for the
  configuration with the best product of metrics within the budget.
* `enc_inf`: the `candidates` best configurations of ENC-Model, each
  evaluated with `evaluate`; the most accurate is kept.

A decomposition is used only where it lowers the layer's MACs. MACs are
those `kprune.profile` counts, and a selection's predicted MACs are what
`kprune.profile` finds on the decomposed model.

The workflow:

    sel = kprune.lowrank.select_ranks(model, flops_target=0.5, method="enc_map")
    small = kprune.lowrank.decompose(model, sel.ranks)    # plain Keras layers
    small = kprune.lowrank.compress(model, flops_target=0.5)   # the two at once
    smaller = kprune.prune(small, flops_target=0.8)       # channels of the result prune too
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Mapping, Sequence

import keras
import numpy as np

from kprune.errors import KprunError, KprunWarning
from kprune.graph.walk import walk
from kprune.profile import layer_macs, profile
from kprune.surgeon.plan import copy_model
from kprune.surgeon.rebuild import Rebuilder, assign, clone_layer, rebuilder_of, weights_of

L = keras.layers
KINDS = ("channel", "spatial")
METHODS = ("uniform", "enc_map", "enc_model", "enc_inf")
METRICS = ("energy", "accuracy")
_DECOMPOSABLE = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D)
_FLOOR = 1e-6  # smallest metric value, so that logs stay finite


# --------------------------------------------------------------------------
# Kernels as matrices
# --------------------------------------------------------------------------
def _matrix(kernel: np.ndarray, kind: str) -> np.ndarray:
    """The matrix whose SVD gives the `kind` decomposition of `kernel`."""
    if kind == "channel":
        return kernel.reshape(-1, kernel.shape[-1])
    kh, kw, cin, cout = kernel.shape
    return kernel.transpose(0, 2, 1, 3).reshape(kh * cin, kw * cout)


def _kernel(matrix: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    """The inverse of `_matrix`: a kernel of `shape` from its matrix."""
    if kind == "channel":
        return matrix.reshape(shape)
    kh, kw, cin, cout = shape
    return matrix.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)


def _svd(kernel, kind: str):
    return np.linalg.svd(_matrix(np.asarray(kernel, dtype="float64"), kind), full_matrices=False)


def full_rank(kernel_shape: Sequence[int], kind: str = "channel") -> int:
    """The largest rank of the `kind` decomposition of a kernel of `kernel_shape`.

    Example:

    >>> full_rank((3, 3, 16, 32)), full_rank((3, 3, 16, 32), "spatial")
    (32, 48)
    """
    shape = tuple(int(d) for d in kernel_shape)
    if kind == "channel":
        return min(math.prod(shape[:-1]), shape[-1])
    kh, kw, cin, cout = shape
    return min(kh * cin, kw * cout)


class _Reconstructions:
    """Rank-r kernels of several ranks of one kernel, from one SVD per kind."""

    def __init__(self, kernel):
        self.kernel = np.asarray(kernel)
        self.svds: dict = {}

    def __call__(self, kind: str, rank: int) -> np.ndarray:
        if kind not in self.svds:
            self.svds[kind] = _svd(self.kernel, kind)
        u, s, vt = self.svds[kind]
        matrix = (u[:, :rank] * s[:rank]) @ vt[:rank]
        return _kernel(matrix, kind, self.kernel.shape).astype(self.kernel.dtype)


def reconstruct(kernel, kind: str, rank: int) -> np.ndarray:
    """The best rank-`rank` approximation of `kernel` in the `kind` matrix layout.

    Running the original layer with this kernel computes what its
    decomposition at `rank` computes.

    Example:

    >>> w = np.random.default_rng(0).normal(size=(3, 3, 4, 8))
    >>> np.allclose(reconstruct(w, "channel", 8), w)
    True
    """
    return _Reconstructions(kernel)(kind, rank)


def factors(kernel, kind: str, rank: int) -> tuple:
    """The two kernels of the rank-`rank` `kind` decomposition of `kernel`.

    Returns:
        `(first, second)`: for a Dense `(Cin, n)` kernel, `(Cin, r)` and
        `(r, n)`; for a channel decomposition of `(*k, Cin, Cout)`,
        `(*k, Cin, r)` and `(1, ..., 1, r, Cout)`; for a spatial one of
        `(kh, kw, Cin, Cout)`, `(kh, 1, Cin, r)` and `(1, kw, r, Cout)`.
        Each carries the square root of the singular values.
    """
    kernel = np.asarray(kernel)
    u, s, vt = _svd(kernel, kind)
    root = np.sqrt(s[:rank])
    left, right = u[:, :rank] * root, root[:, None] * vt[:rank]
    shape = kernel.shape
    if kind == "channel":
        first = left.reshape(shape[:-1] + (rank,))
        second = right.reshape((1,) * (len(shape) - 2) + (rank, shape[-1]))
    else:
        kh, kw, cin, cout = shape
        first = left.reshape(kh, 1, cin, rank)
        second = right.reshape(rank, kw, cout).transpose(1, 0, 2)[None]
    return first.astype(kernel.dtype), second.astype(kernel.dtype)


# --------------------------------------------------------------------------
# Which layers, and what their decompositions cost
# --------------------------------------------------------------------------
def _positions(layer, shape):
    """(spatial sizes, channels) of a tensor shape of `layer`, batch axis included."""
    if isinstance(layer, L.Dense):
        return tuple(shape[1:-1]), shape[-1]
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return tuple(shape[2:]), shape[1]
    return tuple(shape[1:-1]), shape[-1]


def _size(dims, layer) -> int:
    if any(d is None for d in dims):
        raise KprunError(f"Layer '{layer.name}': cannot count MACs on unknown sizes {dims}; "
                         "build the model with a fixed input shape.")
    return int(math.prod(int(d) for d in dims))


def why_not(layer) -> str | None:
    """Why `layer` cannot be decomposed, or None if it can."""
    if type(layer) not in _DECOMPOSABLE:
        return (f"{type(layer).__name__} layers are not decomposed (only Dense, Conv1D, Conv2D "
                "and Conv3D)")
    if int(getattr(layer, "groups", 1) or 1) != 1:
        return f"it is a grouped convolution (groups={layer.groups})"
    if getattr(layer, "lora_enabled", False):
        return "it has LoRA weights"
    if getattr(layer, "quantization_mode", None):
        return f"it is quantized ({layer.quantization_mode})"
    if len(getattr(layer, "kernel", np.zeros((0,))).shape) < 2:
        return "it is not built"
    return None


def kinds_of(layer) -> tuple:
    """The decompositions of `layer`: `("channel",)`, and `"spatial"` for a `kh x kw` Conv2D."""
    if type(layer) is L.Conv2D and all(int(k) > 1 for k in layer.kernel_size):
        return KINDS
    return ("channel",)


@dataclasses.dataclass
class LayerRanks:
    """One decomposable layer: its costs and its metric at every rank.

    Attributes:
        name: The layer's name.
        class_name: Its class.
        macs: Its MACs (all its calls, as `kprune.profile` counts them).
        params: Its parameters.
        full: `{kind: full rank}`.
        singular_values: `{kind: singular values, descending}`.
        metric: `{kind: array}`, the metric at ranks `1..full` (index `r - 1`);
            filled by `rank_metrics`.
        macs_per_rank: `{kind: MACs added by each unit of rank}`.
        params_per_rank: `{kind: params added by each unit of rank}`.
        bias: Parameters of the bias (kept on the second layer).
    """

    name: str
    class_name: str
    macs: int
    params: int
    full: dict
    singular_values: dict
    macs_per_rank: dict
    params_per_rank: dict
    bias: int
    metric: dict = dataclasses.field(default_factory=dict)
    layer: object = dataclasses.field(default=None, repr=False)

    def energy(self, kind: str, rank: int) -> float:
        """Share of the squared singular values that `rank` keeps."""
        s2 = np.square(self.singular_values[kind])
        total = float(s2.sum())
        return 1.0 if total == 0.0 else float(s2[:rank].sum() / total)

    def macs_at(self, kind: str, rank: int) -> int:
        """MACs of the decomposition at `rank` (both layers, all calls)."""
        return int(rank * self.macs_per_rank[kind])

    def params_at(self, kind: str, rank: int) -> int:
        """Parameters of the decomposition at `rank` (both layers)."""
        return int(rank * self.params_per_rank[kind] + self.bias)

    def cheaper_up_to(self, kind: str) -> int:
        """The largest rank whose decomposition costs fewer MACs than the layer (0 if none)."""
        per = self.macs_per_rank[kind]
        best = (self.macs - 1) // per if per else 0
        return int(min(best, self.full[kind]))


def _layer_ranks(layer, calls, kinds: Sequence[str]) -> LayerRanks:
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
    k = math.prod(kernel.shape[:-2])  # kernel positions (1 for Dense)
    cin, cout = kernel.shape[-2], kernel.shape[-1]
    base = 0
    macs = dict.fromkeys(("channel",) + tuple(kinds), 0)
    for call in calls:
        ins, outs = tuple(call.inputs[0].shape), tuple(call.outputs[0].shape)
        base += layer_macs(layer, [ins], [outs])
        space_in, _ = _positions(layer, ins)
        space_out, _ = _positions(layer, outs)
        n_out = _size(space_out, layer)
        # first layer: k * Cin -> r at every output position; second: r -> Cout
        macs["channel"] += (k * cin + cout) * n_out
        if "spatial" in kinds:
            # kh x 1 at (output height, input width), then 1 x kw at the output positions
            mid = _size((space_out[0], space_in[1]), layer)
            macs["spatial"] += kernel.shape[0] * cin * mid + kernel.shape[1] * cout * n_out
    params = {"channel": k * cin + cout}
    if "spatial" in kinds:
        params["spatial"] = kernel.shape[0] * cin + kernel.shape[1] * cout
    svals = {kind: _svd(kernel, kind)[1] for kind in kinds}
    bias = int(np.prod(layer.bias.shape)) if getattr(layer, "use_bias", False) else 0
    return LayerRanks(layer.name, type(layer).__name__, int(base),
                      int(sum(math.prod(v.shape) for v in layer.weights)),
                      {kind: full_rank(kernel.shape, kind) for kind in kinds}, svals,
                      {kind: int(macs[kind]) for kind in kinds},
                      {kind: int(params[kind]) for kind in kinds}, bias, layer=layer)


def _calls_by_layer(flat) -> dict:
    out: dict = {}
    for call in flat.calls:
        out.setdefault(id(call.layer), []).append(call)
    return out


def _find(flat, model, name: str):
    """The one layer called `name` in the flat graph of `model`."""
    found = {id(c.layer): c.layer for c in flat.calls if c.layer.name == name}
    if not found:
        raise KprunError(f"Layer '{name}' is not a layer of model '{model.name}'.")
    if len(found) > 1:
        raise KprunError(f"Model '{model.name}' has {len(found)} different layers named "
                         f"'{name}' (nested models); rename them to decompose one.")
    return next(iter(found.values()))


def _excluded(layer, exclude) -> bool:
    return any((isinstance(e, str) and e in (layer.name, type(layer).__name__))
               or (isinstance(e, type) and isinstance(layer, e)) for e in exclude)


def _check_exclude(model, flat, exclude) -> tuple:
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    exclude = tuple(exclude or ())
    names = {c.layer.name for c in flat.calls} | {type(c.layer).__name__ for c in flat.calls}
    for entry in exclude:
        if isinstance(entry, str) and entry not in names:
            raise KprunError(f"`exclude` entry '{entry}' is neither a layer name nor a layer "
                             f"class of model '{model.name}'.")
        if not isinstance(entry, (str, type)):
            raise KprunError(f"`exclude` entries are layer names, class names or classes; "
                             f"got {entry!r}.")
    return exclude


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------
def _check_kinds(kinds) -> tuple:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise KprunError(f"Unknown decomposition kind(s) {bad or kinds!r}; valid: "
                         f"{', '.join(KINDS)}.")
    if "channel" not in kinds:
        raise KprunError("`kinds` must include 'channel' (Dense layers and 1-D/3-D "
                         "convolutions have no other decomposition).")
    return kinds


def rank_metrics(model: keras.Model, metric: str = "energy", evaluate: Callable | None = None,
                 *, kinds: Sequence[str] = KINDS, exclude=(), points: int = 6,
                 verbose: int = 1) -> dict:
    """Every decomposable layer of `model` with its metric at every rank.

    Args:
        model: A functional or Sequential model (left untouched).
        metric: `"energy"` (share of squared singular values kept) or
            `"accuracy"` (`evaluate` of a copy of the model with only that
            layer at the rank, divided by `evaluate` of the unchanged copy;
            measured at `points` ranks per layer and kind, evenly spread over
            the ranks that lower the layer's MACs, linearly interpolated in
            between and made non-decreasing).
        evaluate: `evaluate(model) -> float`, higher is better (for example
            the accuracy on held-out data); needed for `"accuracy"`.
        kinds: Decompositions to consider: `"channel"`, and `"spatial"` for
            `kh x kw` Conv2D layers.
        exclude: Layer names, class names or classes to leave out.
        points: Measured ranks per layer and kind for `"accuracy"`.
        verbose: 1 shows a progress bar, 0 is silent.

    Returns:
        `{layer name: LayerRanks}` in the model's order; `LayerRanks.metric`
        holds the metric per kind at ranks `1..full`. Only layers with some
        rank that lowers their MACs are included.

    Example:

    >>> m = rank_metrics(model, verbose=0)
    >>> m["conv1"].metric["channel"][:3]       # energy kept at ranks 1, 2, 3
    array([0.41, 0.63, 0.78])
    """
    if metric not in METRICS:
        raise KprunError(f"Unknown metric {metric!r}; valid: {', '.join(METRICS)}.")
    if metric == "accuracy" and evaluate is None:
        raise KprunError("metric='accuracy' measures the model: pass `evaluate(model) -> float`.")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise KprunError(f"`points` must be an int >= 2, got {points!r}.")
    kinds = _check_kinds(kinds)
    flat = walk(model)
    exclude = _check_exclude(model, flat, exclude)
    infos = {}
    for calls in _calls_by_layer(flat).values():
        layer = calls[0].layer
        if why_not(layer) is not None or _excluded(layer, exclude):
            continue
        if layer.name in infos:
            continue  # two layers share a name (nested models): decomposed only by hand
        info = _layer_ranks(layer, calls, [k for k in kinds_of(layer) if k in kinds])
        if any(info.cheaper_up_to(k) >= 1 for k in info.full):
            infos[layer.name] = info
    for info in infos.values():
        for kind, s in info.singular_values.items():
            s2 = np.square(s)
            total = float(s2.sum())
            info.metric[kind] = np.ones(len(s)) if total == 0.0 else np.cumsum(s2) / total
    if metric == "accuracy":
        _measure(model, infos, evaluate, points, verbose)
    return infos


def _measured_ranks(info, kind, points) -> np.ndarray:
    top = info.cheaper_up_to(kind)
    if top < 1:
        return np.zeros(0, dtype=int)
    return np.unique(np.round(np.linspace(1, top, min(points, top))).astype(int))


def _copy_for_evaluation(model):
    """A weight-identical copy of `model` and its layer for each of `model`'s layers."""
    copy = copy_model(model)
    layers = rebuilder_of(copy).layers
    return copy, (lambda layer: layers[id(layer)])


def _score(evaluate, model) -> float:
    value = evaluate(model)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise KprunError(f"`evaluate` must return a number, got {value!r}.") from None
    if not math.isfinite(value):
        raise KprunError(f"`evaluate` returned {value}.")
    return value


def _measure(model, infos, evaluate, points, verbose) -> None:
    copy, twin = _copy_for_evaluation(model)
    steps = sum(len(_measured_ranks(i, k, points)) for i in infos.values() for k in i.full)
    bar = keras.utils.Progbar(steps + 1, verbose=verbose, unit_name="evaluation")
    base = _score(evaluate, copy)
    bar.add(1)
    if not base > 0:
        raise KprunError(f"`evaluate` returned {base} on the original model; the accuracy "
                         "metric divides by it, so it must be positive.")
    for info in infos.values():
        layer = twin(info.layer)
        original = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
        low_rank = _Reconstructions(original)
        try:
            for kind in info.full:
                ranks = _measured_ranks(info, kind, points)
                values = []
                for r in ranks:
                    layer.kernel.assign(low_rank(kind, int(r)))
                    values.append(_score(evaluate, copy) / base)
                    bar.add(1)
                if len(ranks):
                    curve = np.interp(np.arange(1, info.full[kind] + 1), ranks, values)
                    info.metric[kind] = np.maximum.accumulate(np.maximum(curve, _FLOOR))
        finally:
            layer.kernel.assign(original)


def network_metric(infos: Mapping, ranks: Mapping) -> float:
    """ENC's combined metric: the product over layers of each layer's metric at its rank.

    Args:
        infos: `rank_metrics(...)`.
        ranks: `{layer name: (kind, rank)}`; layers not named count 1.
    """
    total = 0.0
    for name, (kind, rank) in _normalise_ranks(ranks).items():
        if name not in infos or kind not in infos[name].metric:
            raise KprunError(f"Layer '{name}' has no {kind} metric among the layers given.")
        total += math.log(max(float(infos[name].metric[kind][rank - 1]), _FLOOR))
    return math.exp(total)


# --------------------------------------------------------------------------
# Curves: for each layer, its options from cheapest to dearest, metric rising
# --------------------------------------------------------------------------
@dataclasses.dataclass
class _Curve:
    """A layer's Pareto-efficient options: `options[i]` costs `macs[i]`, scores `logm[i]`.

    An option is `(kind, rank)`, or None for the layer left as it is (its own
    MACs, metric 1). `macs` rises and `logm` rises strictly.
    """

    name: str
    macs: np.ndarray
    logm: np.ndarray
    options: list

    def at(self, threshold: float) -> int:
        """The cheapest option with log-metric >= `threshold`."""
        i = int(np.searchsorted(self.logm, threshold - 1e-12, side="left"))
        return min(i, len(self.options) - 1)


def _curve(info: LayerRanks) -> _Curve:
    macs, logm, options = [info.macs], [0.0], [None]
    for kind in info.full:
        top = info.cheaper_up_to(kind)
        ranks = np.arange(1, top + 1)
        macs.extend((ranks * info.macs_per_rank[kind]).tolist())
        logm.extend(np.log(np.maximum(info.metric[kind][:top], _FLOOR)).tolist())
        options.extend((kind, int(r)) for r in ranks)
    macs, logm = np.asarray(macs, dtype="float64"), np.asarray(logm)
    order = np.lexsort((-logm, macs))
    keep, best = [], -np.inf
    for i in order:
        if logm[i] > best + 1e-12:
            keep.append(i)
            best = logm[i]
    keep = np.asarray(keep)
    return _Curve(info.name, macs[keep], logm[keep], [options[i] for i in keep])


def _total(curves, picks, fixed) -> float:
    return fixed + sum(c.macs[i] for c, i in zip(curves, picks))


def _bisect_largest(values: np.ndarray, cost: Callable, budget: float):
    """Index of the largest of the ascending `values` with `cost(v) <= budget`, or None."""
    if cost(values[0]) > budget:
        return None
    lo, hi = 0, len(values) - 1
    if cost(values[hi]) <= budget:
        return hi
    while hi - lo > 1:  # cost(values[lo]) <= budget < cost(values[hi])
        mid = (lo + hi) // 2
        if cost(values[mid]) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _enc_map(curves, fixed, budget):
    """Per-layer option indices at the one threshold that best fills `budget`, or None."""
    thresholds = np.unique(np.concatenate([c.logm for c in curves])) if curves else np.zeros(1)

    def picks(t):
        return [c.at(t) for c in curves]

    i = _bisect_largest(thresholds, lambda t: _total(curves, picks(t), fixed), budget)
    return None if i is None else picks(thresholds[i])


def _uniform_rank(infos, fixed, budget):
    """Each layer's option (`("channel", r)` or None) at the largest ratio within `budget`."""
    ratios = np.unique(np.concatenate([np.arange(1, i.full["channel"] + 1) / i.full["channel"]
                                       for i in infos]))

    def picks(ratio):
        out = []
        for info in infos:
            rank = max(1, int(math.ceil(ratio * info.full["channel"] - 1e-9)))
            option = ("channel", rank) if rank <= info.cheaper_up_to("channel") else None
            out.append(option)
        return out

    def cost(ratio):
        return fixed + sum(info.macs if o is None else info.macs_at(*o)
                           for info, o in zip(infos, picks(ratio)))

    i = _bisect_largest(ratios, cost, budget)
    return None if i is None else picks(ratios[i])


@dataclasses.dataclass
class _Front:
    """Configurations of a run of layers: total MACs, log-metric, option index per layer."""

    macs: np.ndarray
    logm: np.ndarray
    picks: np.ndarray  # (configurations, layers)


def _pareto(macs, logm) -> np.ndarray:
    order = np.lexsort((-logm, macs))
    best = np.maximum.accumulate(logm[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = logm[order][1:] > best[:-1] + 1e-12
    return order[keep]


def _thin(index: np.ndarray, size: int) -> np.ndarray:
    if len(index) <= size:
        return index
    return index[np.unique(np.round(np.linspace(0, len(index) - 1, size)).astype(int))]


def _merge(a: _Front, b: _Front, slack: float, max_front: int, top: int | None = None):
    macs = (a.macs[:, None] + b.macs[None, :]).ravel()
    logm = (a.logm[:, None] + b.logm[None, :]).ravel()
    ia, ib = np.divmod(np.arange(macs.size), b.macs.size)
    ok = np.flatnonzero(macs <= slack + 1e-6)
    if top is not None:  # the root: the `top` best configurations, dominated ones included
        chosen = ok[np.argsort(-logm[ok], kind="stable")[:top]]
    else:
        chosen = _thin(ok[_pareto(macs[ok], logm[ok])], max_front)
    picks = np.concatenate([a.picks[ia[chosen]], b.picks[ib[chosen]]], axis=1)
    return _Front(macs[chosen], logm[chosen], picks)


def _enc_model(curves, fixed, budget, lo_picks, hi_picks, map_picks, steps, max_front, top):
    """The `top` configurations with the best log-metric within `budget`, best first.

    Each layer's options are restricted to the range between its ENC-Map
    options at the low and high ends of the band (`steps` of them, evenly
    spread, ENC-Map's own option always among them). The layers are then
    merged pairwise, in model order, keeping the Pareto front of each
    subset (MACs against metric) among configurations that still fit the
    budget; the last merge keeps the `top` best within the budget.
    """
    fronts = []
    for c, lo, hi, mid in zip(curves, lo_picks, hi_picks, map_picks):
        index = np.unique(np.concatenate([np.round(np.linspace(lo, hi, steps)).astype(int),
                                          [lo, hi, mid]]))
        fronts.append(_Front(c.macs[index], c.logm[index], index[:, None]))
    cheapest = np.array([f.macs.min() for f in fronts])
    spans = [(i, i + 1) for i in range(len(fronts))]
    while len(fronts) > 1:
        merged, merged_spans = [], []
        last = len(fronts) == 2
        for j in range(0, len(fronts) - 1, 2):
            (s0, _), (_, s1) = spans[j], spans[j + 1]
            rest = cheapest.sum() - cheapest[s0:s1].sum()
            merged.append(_merge(fronts[j], fronts[j + 1], budget - fixed - rest, max_front,
                                 top if last else None))
            merged_spans.append((s0, s1))
        if len(fronts) % 2:
            merged.append(fronts[-1])
            merged_spans.append(spans[-1])
        fronts, spans = merged, merged_spans
    root = fronts[0]
    if root.picks.shape[0] and len(curves) == 1:
        ok = np.flatnonzero(root.macs <= budget - fixed + 1e-6)
        chosen = ok[np.argsort(-root.logm[ok], kind="stable")[:top]]
        root = _Front(root.macs[chosen], root.logm[chosen], root.picks[chosen])
    configs = [list(map(int, p)) for p in root.picks]
    map_logm = sum(c.logm[i] for c, i in zip(curves, map_picks))
    if not configs or map_logm > root.logm[0] + 1e-12:  # thinning lost ENC-Map's choice
        configs = [list(map_picks)] + configs[:max(top - 1, 0)]
    return configs


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Selection:
    """The ranks a selection method chose.

    Attributes:
        ranks: `{layer name: (kind, rank)}` for every decomposed layer; pass
            it to `decompose`.
        method: The method (`uniform`, `enc_map`, `enc_model`, `enc_inf`).
        metric: The per-layer metric (`energy` or `accuracy`).
        macs: MACs of the decomposed model (as `kprune.profile` counts).
        base_macs: MACs of the original model.
        params: Parameters of the decomposed model.
        score: The network metric (product over layers) of `ranks`.
        accuracy: `evaluate` of the chosen configuration (`enc_inf`), or None.
        candidates: For `enc_inf`, `(ranks, macs, score, accuracy)` of every
            configuration evaluated.
        layers: `{layer name: LayerRanks}`, the metrics the selection used.
        seconds: Time the selection took (metrics and search).
    """

    ranks: dict
    method: str
    metric: str
    macs: int
    base_macs: int
    params: int
    score: float
    accuracy: float | None = None
    candidates: list = dataclasses.field(default_factory=list)
    layers: dict = dataclasses.field(default_factory=dict, repr=False)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Share of the original MACs the decomposed model keeps."""
        return self.macs / self.base_macs if self.base_macs else 1.0

    def __str__(self) -> str:
        head = (f"kprune.lowrank: {self.method} ({self.metric} metric) keeps {self.ratio:.1%} of "
                f"the MACs, {len(self.ranks)} of {len(self.layers)} layers decomposed, "
                f"metric {self.score:.4f}"
                + (f", evaluate {self.accuracy:.4f}" if self.accuracy is not None else "")
                + f", {self.seconds:.1f} s")
        lines = [head, f"{'layer':<28}{'type':<8}{'kind':<9}{'rank':>6}{'full':>6}{'metric':>9}"
                       f"{'MACs':>12}{'-> MACs':>12}"]
        for name, info in self.layers.items():
            kind, rank = self.ranks.get(name, (None, None))
            if kind is None:
                lines.append(f"{name[:27]:<28}{info.class_name[:7]:<8}{'-':<9}{'-':>6}{'-':>6}"
                             f"{1.0:>9.4f}{info.macs:>12,}{info.macs:>12,}")
                continue
            lines.append(f"{name[:27]:<28}{info.class_name[:7]:<8}{kind:<9}{rank:>6}"
                         f"{info.full[kind]:>6}{info.metric[kind][rank - 1]:>9.4f}"
                         f"{info.macs:>12,}{info.macs_at(kind, rank):>12,}")
        return "\n".join(lines)


def _check_target(flops_target) -> float:
    if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float, np.number)) \
            or not 0.0 < float(flops_target) <= 1.0:
        raise KprunError(f"`flops_target` is the share of the original MACs to keep, in (0, 1]; "
                         f"got {flops_target!r}.")
    return float(flops_target)


def _positive_int(name, value, least=1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise KprunError(f"`{name}` must be an int >= {least}, got {value!r}.")
    return int(value)


def select_ranks(model: keras.Model, flops_target: float = 0.5, method: str = "enc_map", *,
                 metric: str = "energy", evaluate: Callable | None = None,
                 kinds: Sequence[str] = KINDS, exclude=(), uniform_by: str = "rank",
                 points: int = 6, steps: int = 8, margin: float = 0.1, candidates: int = 8,
                 max_front: int = 256, verbose: int = 1) -> Selection:
    """Choose a rank for every decomposable layer so the model keeps `flops_target` of its MACs.

    Args:
        model: A functional or Sequential model (left untouched).
        flops_target: Share of the original MACs (`kprune.profile`) the
            decomposed model may keep, in (0, 1].
        method: `"uniform"`, `"enc_map"`, `"enc_model"` or `"enc_inf"` (see
            the module docstring).
        metric: Per-layer metric, `"energy"` or `"accuracy"` (needs `evaluate`).
        evaluate: `evaluate(model) -> float`, higher is better; needed by
            `metric="accuracy"` and `method="enc_inf"`. It is called on a
            copy of the model whose kernels are replaced by their low-rank
            approximations (which computes what the decomposed model does).
        kinds: Decompositions to consider (`"channel"`, `"spatial"`).
        exclude: Layer names, class names or classes to leave whole.
        uniform_by: For `"uniform"`: `"rank"` (same rank ratio, channel
            decompositions) or `"energy"` (same energy share: ENC-Map on the
            energy metric).
        points: Measured ranks per layer and kind for `metric="accuracy"`.
        steps: Candidate options per layer in ENC-Model's search.
        margin: Half-width of ENC-Model's band of targets around
            `flops_target`, as a share of it (0.1: from 90% to 110% of it).
        candidates: Configurations ENC-Inf evaluates.
        max_front: Most configurations kept per subset in ENC-Model's merges.
        verbose: 1 shows progress bars and prints the chosen ranks; 0 is silent.

    Returns:
        A `Selection`; `selection.ranks` goes to `decompose`.

    Raises:
        KprunError: for an invalid argument, or a target no ranks reach (the
            message gives the smallest share reachable).

    Example:

    >>> sel = select_ranks(model, flops_target=0.5, method="enc_model", verbose=0)
    >>> small = decompose(model, sel.ranks)
    """
    start = time.perf_counter()
    target = _check_target(flops_target)
    if method not in METHODS:
        raise KprunError(f"Unknown method {method!r}; valid: {', '.join(METHODS)}.")
    if method == "enc_inf" and evaluate is None:
        raise KprunError("method='enc_inf' evaluates its candidates: pass "
                         "`evaluate(model) -> float`.")
    if uniform_by not in ("rank", "energy"):
        raise KprunError(f"`uniform_by` is 'rank' or 'energy', got {uniform_by!r}.")
    if method == "uniform" and uniform_by == "energy" and metric != "energy":
        raise KprunError("uniform_by='energy' gives every layer the same energy share; it "
                         f"takes metric='energy', got metric={metric!r}.")
    steps = _positive_int("steps", steps, 2)
    candidates = _positive_int("candidates", candidates)
    max_front = _positive_int("max_front", max_front, 2)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise KprunError(f"`margin` must be a number in [0, 1), got {margin!r}.")
    prof = profile(model)
    base = int(prof.macs)
    infos = rank_metrics(model, metric, evaluate, kinds=kinds, exclude=exclude, points=points,
                         verbose=verbose)
    layers = list(infos.values())
    curves = [_curve(i) for i in layers]
    fixed = base - sum(i.macs for i in layers)
    budget = target * base
    if not layers and base > budget:
        raise KprunError(f"Model '{model.name}' has no layer whose decomposition lowers its "
                         "MACs (Dense, Conv1D, Conv2D or Conv3D, not excluded); it cannot reach "
                         f"{target:.1%} of its MACs by low-rank decomposition.")

    def reach(picks):
        if picks is None:
            smallest = fixed + sum(c.macs[0] for c in curves)
            raise KprunError(
                f"Model '{model.name}' cannot reach {target:.1%} of its MACs by low-rank "
                f"decomposition ({method}): with every one of its {len(layers)} decomposable "
                f"layers at its cheapest rank it keeps {smallest / max(base, 1):.1%} "
                f"({fixed / max(base, 1):.1%} is in layers that are not decomposed).")
        return picks

    accuracy, evaluated = None, []
    if not layers:
        options = []
    elif method == "uniform" and uniform_by == "rank":
        options = reach(_uniform_rank(layers, fixed, budget))
    else:
        picks = reach(_enc_map(curves, fixed, budget))
        if method in ("enc_model", "enc_inf"):
            lo = _enc_map(curves, fixed, max(target * (1 - margin), 0.0) * base)
            lo = lo if lo is not None else [0] * len(curves)
            hi = _enc_map(curves, fixed, min(target * (1 + margin), 1.0) * base)
            top = candidates if method == "enc_inf" else 1
            configs = _enc_model(curves, fixed, budget, lo, hi, picks, steps, max_front, top)
            picks = configs[0]
            if method == "enc_inf":
                picks, accuracy, evaluated = _enc_inf(model, infos, curves, configs, evaluate,
                                                      fixed, verbose)
        options = [c.options[i] for c, i in zip(curves, picks)]
    ranks = {info.name: o for info, o in zip(layers, options) if o is not None}
    macs = fixed + sum(i.macs if o is None else i.macs_at(*o) for i, o in zip(layers, options))
    params = int(prof.params) - sum(
        i.params - i.params_at(*o) for i, o in zip(layers, options) if o is not None)
    selection = Selection(ranks, method, metric, int(macs), base, int(params),
                          network_metric(infos, ranks), accuracy, evaluated, infos,
                          time.perf_counter() - start)
    if verbose:
        print(selection)
    return selection


def _enc_inf(model, infos, curves, configs, evaluate, fixed, verbose):
    """Evaluate every configuration; the best one, its value, and what was evaluated."""
    copy, twin = _copy_for_evaluation(model)
    names = [c.name for c in curves]
    originals = {n: np.asarray(keras.ops.convert_to_numpy(twin(infos[n].layer).kernel))
                 for n in names}
    low_rank = {n: _Reconstructions(k) for n, k in originals.items()}
    bar = keras.utils.Progbar(len(configs), verbose=verbose, unit_name="candidate")
    evaluated, best = [], None
    try:
        for picks in configs:
            options = [c.options[i] for c, i in zip(curves, picks)]
            for name, option in zip(names, options):
                kernel = originals[name] if option is None else low_rank[name](*option)
                twin(infos[name].layer).kernel.assign(kernel)
            value = _score(evaluate, copy)
            ranks = {n: o for n, o in zip(names, options) if o is not None}
            macs = fixed + sum(c.macs[i] for c, i in zip(curves, picks))
            score = network_metric(infos, ranks)
            evaluated.append((ranks, int(macs), score, value))
            if best is None or (value, score) > best[0]:
                best = ((value, score), picks)
            bar.add(1)
    finally:
        for name in names:
            twin(infos[name].layer).kernel.assign(originals[name])
    return best[1], best[0][0], evaluated


# --------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------
def _normalise_ranks(ranks) -> dict:
    if isinstance(ranks, Selection):
        ranks = ranks.ranks
    if not isinstance(ranks, Mapping):
        raise KprunError(f"`ranks` maps layer names to ranks (an int or (kind, int)); got "
                         f"{type(ranks).__name__}.")
    out = {}
    for name, value in ranks.items():
        if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str):
            kind, rank = value
        else:
            kind, rank = "channel", value
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise KprunError(f"Layer '{name}': a rank is a positive int or (kind, int), got "
                             f"{value!r}.")
        out[name] = (kind, int(rank))
    return out


def _check_rank(layer, kind, rank) -> None:
    why = why_not(layer)
    if why is not None:
        raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}) cannot be decomposed: "
                         f"{why}.")
    if kind not in kinds_of(layer):
        raise KprunError(f"Layer '{layer.name}' ({type(layer).__name__}) has no {kind!r} "
                         f"decomposition; it has {', '.join(kinds_of(layer))}"
                         + ("" if kind in KINDS else f" (kinds: {', '.join(KINDS)})") + ".")
    full = full_rank(layer.kernel.shape, kind)
    if not 1 <= rank <= full:
        raise KprunError(f"Layer '{layer.name}': rank {rank} is outside 1..{full}, the ranks of "
                         f"its {kind} decomposition.")


def _configs(layer, kind: str, rank: int) -> tuple:
    """Configs of the first and second layers of `layer`'s decomposition."""
    config = layer.get_config()
    name = layer.name
    first = {**config, "name": f"{name}_lowrank", "use_bias": False, "activation": None}
    if "activity_regularizer" in first:  # it regularises the layer's output: the second's
        first["activity_regularizer"] = None
    second = dict(config)
    if isinstance(layer, L.Dense):
        first["units"] = rank
        return first, second
    first["filters"] = rank
    n = len(layer.kernel_size)
    ones = (1,) * n
    if kind == "channel":
        second.update(kernel_size=ones, strides=ones, dilation_rate=ones, padding="valid")
    else:
        (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
        dh, dw = layer.dilation_rate
        first.update(kernel_size=(kh, 1), strides=(sh, 1), dilation_rate=(dh, 1))
        second.update(kernel_size=(1, kw), strides=(1, sw), dilation_rate=(1, dw))
    return first, second


def decompose(model: keras.Model, ranks, *, only_cheaper: bool = True) -> keras.Model:
    """Replace layers by their rank-`r` decompositions; return a new model of plain Keras layers.

    Args:
        model: A functional or Sequential model (left untouched).
        ranks: `{layer name: rank}` (a channel decomposition) or
            `{layer name: (kind, rank)}` with kind `"channel"` or `"spatial"`
            (Conv2D with a `kh x kw` kernel, both above 1); or a `Selection`.
        only_cheaper: Leave a layer as it is (with a `KprunWarning`) where its
            decomposition would not lower its MACs. With False every given
            rank is applied (full ranks reproduce the layer exactly).

    Returns:
        A new model with the original's input and output structure. The
        first layer of a decomposition is named `{name}_lowrank`, the second
        keeps the layer's name (and its bias and activation).

    Raises:
        KprunError: naming the layer, for an unknown layer name, a layer that
            cannot be decomposed (DepthwiseConv2D, a grouped convolution...),
            an unknown kind, or a rank outside `1..full`.

    Example:

    >>> small = decompose(model, {"conv2": 4, "conv3": ("spatial", 6), "fc": 8})
    """
    flat = walk(model)
    plan = {}
    left = []
    for name, (kind, rank) in _normalise_ranks(ranks).items():
        layer = _find(flat, model, name)
        _check_rank(layer, kind, rank)
        if only_cheaper:
            calls = [c for c in flat.calls if c.layer is layer]
            info = _layer_ranks(layer, calls, [kind])
            if info.macs_at(kind, rank) >= info.macs:
                left.append(f"{name} ({kind} rank {rank}: {info.macs_at(kind, rank):,} MACs, "
                            f"the layer {info.macs:,})")
                continue
        plan[id(layer)] = (kind, rank)
    if left:
        warnings.warn("kprune.lowrank: left whole, their decompositions would not lower "
                      "their MACs: " + "; ".join(left) + ".", KprunWarning, stacklevel=2)
    firsts: dict = {}

    def make_call(call, args, kwargs):
        spec = plan.get(id(call.layer))
        if spec is None:
            return rebuilder.copy_call(call, args, kwargs)
        layer, (kind, rank) = call.layer, spec
        tensors = [x for x in keras.tree.flatten(args) if isinstance(x, keras.KerasTensor)]
        first_config, second_config = _configs(layer, kind, rank)
        weights = dict(weights_of(layer))
        k1, k2 = factors(weights["kernel"], kind, rank)
        fresh = id(layer) not in firsts
        if fresh:
            first_config["name"] = rebuilder.unique_name(first_config["name"])
            firsts[id(layer)] = clone_layer(layer, first_config)
        first = firsts[id(layer)]
        middle = first(tensors[0])
        if fresh:
            assign(first, {"kernel": k1})
        second = {"kernel": k2, **({"bias": weights["bias"]} if "bias" in weights else {})}
        return rebuilder.call_with(call, (middle,), kwargs, config=second_config, weights=second)

    rebuilder = Rebuilder(flat, make_call)
    return rebuilder.run()


def compress(model: keras.Model, flops_target: float = 0.5, method: str = "enc_map",
             evaluate: Callable | None = None, **kwargs) -> keras.Model:
    """Select ranks for `flops_target` and decompose: `decompose(model, select_ranks(...).ranks)`.

    Args:
        model: A functional or Sequential model (left untouched).
        flops_target: Share of the original MACs to keep, in (0, 1].
        method: `"uniform"`, `"enc_map"`, `"enc_model"` or `"enc_inf"`.
        evaluate: `evaluate(model) -> float` for `metric="accuracy"` and
            `method="enc_inf"`.
        **kwargs: Further arguments of `select_ranks` (`metric`, `kinds`,
            `exclude`, `verbose`, ...).

    Returns:
        A new model of plain Keras layers keeping at most `flops_target` of
        the MACs (`kprune.profile`).

    Example:

    >>> small = compress(model, flops_target=0.5, method="enc_model", verbose=0)
    """
    selection = select_ranks(model, flops_target, method, evaluate=evaluate, **kwargs)
    small = decompose(model, selection.ranks)
    macs = profile(small).macs
    if macs != selection.macs:
        raise KprunError(f"kprune.lowrank: the decomposed model of '{model.name}' has {macs:,} "
                         f"MACs where the selection predicted {selection.macs:,}; please report.")
    return small


__all__ = ["KINDS", "METHODS", "METRICS", "LayerRanks", "Selection", "compress", "decompose",
           "factors", "full_rank", "kinds_of", "network_metric", "rank_metrics", "reconstruct",
           "select_ranks", "why_not"]
