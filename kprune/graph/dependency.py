"""The channel-dependency graph of a Keras model."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.channels import AtomTable, ChannelSpec
from kprune.graph.context import RuleContext
from kprune.graph.rules import get_rule
from kprune.graph.walk import walk


@dataclasses.dataclass
class Member:
    """One layer's view of a group.

    Attributes:
        layer: The layer.
        kind: 'producer' (its output filters carry the group), 'consumer' (its
            input weights read it) or 'param' (per-channel parameters on it).
        index: One entry per position of the layer's channel axis (outputs for
            producers and params, inputs for consumers): the group channel that
            position belongs to, or -1 for a position of another group.
    """

    layer: keras.layers.Layer
    kind: str
    index: np.ndarray
    slot: str | None = None

    @property
    def name(self) -> str:
        return self.layer.name


@dataclasses.dataclass
class Group:
    """A set of channels that are removed together, position by position.

    Attributes:
        id: Index of the group in `DependencyGraph.groups`.
        size: Number of removable channels.
        prunable: Whether the group may be pruned.
        reason: Why it may not be pruned (None when it may).
        blocker: The layer (or `keras.ops` operation) whose rule blocked the
            group; None when it is prunable or blocked by the model itself
            (its inputs, its outputs, no producer).
        producers, consumers, params: The `Member`s of each kind.
        partitions: For grouped convolutions, arrays mapping each channel to a
            conv group (-1: not in that conv); removals must be even per block.
        approximate: Whether removing channels changes what the kept ones
            compute (a LayerNorm's statistics): the pruned model is then close
            to the masked one, not equal to it.
        notes: Why the group is approximate (one line per layer).
    """

    id: int
    size: int
    prunable: bool = True
    reason: str | None = None
    blocker: object = None
    producers: list = dataclasses.field(default_factory=list)
    consumers: list = dataclasses.field(default_factory=list)
    params: list = dataclasses.field(default_factory=list)
    partitions: list = dataclasses.field(default_factory=list)
    approximate: bool = False
    notes: list = dataclasses.field(default_factory=list)

    @property
    def members(self) -> list:
        return self.producers + self.params + self.consumers

    def layer_names(self) -> list:
        """Names of every layer on the group, producers first, without repeats."""
        return list(dict.fromkeys(m.name for m in self.members))

    def __repr__(self):
        state = "prunable" if self.prunable else f"blocked: {self.reason}"
        if self.prunable and self.approximate:
            state += " (approximate)"
        names = ", ".join(m.name for m in self.producers) or "-"
        return f"<Group {self.id} size={self.size} producers=[{names}] {state}>"


class _Sink:
    def __init__(self):
        self.records, self.partitions, self.blocks, self.approx = [], [], [], []
        self.inner: dict = {}


class DependencyGraph:
    """Channel groups of a functional or Sequential Keras model.

    Args:
        model: A built functional or Sequential model (nested models are inlined).
        prune_outputs: Allow pruning groups that reach a model output (default
            False: the model's output shape would change).
        approximate: Allow pruning groups whose removal changes what the kept
            channels compute, such as the residual stream of a transformer
            through its LayerNorms (default True; `Group.approximate` marks
            them). With False they are blocked and every prunable group is
            exact: the pruned model equals `kprune.surgeon.zero_plan`'s.

    Example:

    >>> g = DependencyGraph(keras.applications.ResNet50(weights=None))
    >>> [grp for grp in g.groups if grp.prunable][:2]
    [<Group 1 size=64 producers=[conv1_conv] prunable>, ...]
    """

    def __init__(self, model: keras.Model, prune_outputs: bool = False,
                 approximate: bool = True):
        self.model = model
        self.allow_approximate = approximate
        self.flat = walk(model)
        self.table = AtomTable()
        self.specs: dict = {}
        sink = _Sink()
        self._add_inputs(sink)
        for call in self.flat.calls:
            self._propagate(call, sink)
        if not prune_outputs:
            for t in self.flat.outputs:
                spec = self.specs.get(id(t))
                if spec is not None:
                    producer = self.flat.producer(t)
                    name = producer.layer.name if producer else "input"
                    sink.blocks.append((spec.atoms, f"reaches model output '{name}'", None))
        self._finalize(sink)

    # Building -------------------------------------------------------------------
    def _add_inputs(self, sink):
        for t in self.flat.inputs:
            shape = tuple(t.shape)
            if len(shape) < 2 or shape[-1] is None:
                continue
            axis = self._input_axis(t, len(shape))
            if shape[axis] is None:
                continue
            atoms = self.table.new(int(shape[axis]))
            sink.blocks.append((atoms, "model input channels", None))
            self.specs[id(t)] = ChannelSpec(axis, atoms)

    def _input_axis(self, tensor, rank: int) -> int:
        for call in self.flat.consumers(tensor):
            if getattr(call.layer, "data_format", None) == "channels_first":
                return 1
        return rank - 1

    def _propagate(self, call, sink):
        inputs = [self.specs.get(id(t)) for t in call.inputs]
        ctx = RuleContext(call, inputs, self.table, sink)
        outputs = get_rule(call.layer).propagate(ctx)
        for t, spec in zip(call.outputs, outputs):
            if spec is not None:
                self.specs[id(t)] = spec

    def _finalize(self, sink):
        n = len(self.table.channels._parent)
        cls = np.array([self.table.channels.find(i) for i in range(n)], dtype=np.int64)
        grp = np.array([self.table.groups.find(i) for i in range(n)], dtype=np.int64)
        group_ids, channel_of_class = {}, {}
        sizes = []
        for atom in range(n):  # atoms in creation order: channel order is stable
            g, c = grp[atom], cls[atom]
            if g not in group_ids:
                group_ids[g] = len(group_ids)
                sizes.append(0)
            gid = group_ids[g]
            if c not in channel_of_class:
                channel_of_class[c] = sizes[gid]
                sizes[gid] += 1
        self.atom_group = np.array([group_ids[grp[a]] for a in range(n)], dtype=np.int64)
        self.atom_channel = np.array([channel_of_class[cls[a]] for a in range(n)], dtype=np.int64)
        self.groups = [Group(id=i, size=s) for i, s in enumerate(sizes)]
        for atoms, note in sink.approx:
            for gid in np.unique(self.atom_group[atoms]):
                group = self.groups[gid]
                group.approximate = True
                if note not in group.notes:
                    group.notes.append(note)
                if not self.allow_approximate:
                    sink.blocks.append((atoms, f"{note} (approximate=False)", None))
        for atoms, reason, layer in sink.blocks:
            for gid in np.unique(self.atom_group[atoms]):
                group = self.groups[gid]
                if group.prunable:
                    group.prunable, group.reason, group.blocker = False, reason, layer
        for rec in sink.records:
            for gid, index in self._split(rec.atoms):
                getattr(self.groups[gid], rec.kind + "s").append(
                    Member(rec.layer, rec.kind, index, rec.slot))
        for atoms, parts, _ in sink.partitions:
            for gid, index in self._split(atoms):
                part = np.full(self.groups[gid].size, -1, dtype=np.int64)
                part[index[index >= 0]] = parts[index >= 0]
                self.groups[gid].partitions.append(part)
        self.inner = sink.inner
        for group in self.groups:
            if group.prunable and not group.producers:
                group.prunable, group.reason = False, "no layer produces these channels"

    def _split(self, atoms):
        """(group id, index array) for every group present in `atoms`."""
        groups = self.atom_group[atoms]
        for gid in np.unique(groups):
            yield int(gid), np.where(groups == gid, self.atom_channel[atoms], -1)

    # Queries --------------------------------------------------------------------
    def prunable_groups(self) -> list:
        """The groups that may be pruned."""
        return [g for g in self.groups if g.prunable]

    def group_of(self, layer) -> Group:
        """The group of the output channels of producer `layer` (a name or a layer).

        Raises:
            KprunError: if the layer is not in the model or produces no group.
        """
        name = layer if isinstance(layer, str) else layer.name
        for group in self.groups:
            if any(m.name == name for m in group.producers):
                return group
        for call in self.flat.calls:
            if call.layer.name == name:
                spec = self.specs.get(id(call.outputs[0]))
                if spec is not None:
                    return self.groups[int(self.atom_group[spec.atoms[0]])]
        raise KprunError(f"Layer '{name}' is not a layer of model '{self.model.name}'.")

    def output_channels(self, layer) -> tuple:
        """(group, channel index array) of each output position of `layer`'s first call."""
        name = layer if isinstance(layer, str) else layer.name
        for call in self.flat.calls:
            if call.layer.name == name:
                spec = self.specs.get(id(call.outputs[0]))
                if spec is None:
                    break
                gids = np.unique(self.atom_group[spec.atoms])
                if len(gids) != 1:
                    break
                return self.groups[int(gids[0])], self.atom_channel[spec.atoms]
        raise KprunError(f"Layer '{name}' has no prunable output channels in model "
                         f"'{self.model.name}'.")

    def keep_mask(self, tensor, drop: dict) -> np.ndarray | None:
        """Boolean mask of the kept positions on `tensor`'s channel axis, or None.

        Args:
            tensor: A tensor of the flat graph.
            drop: Group id -> boolean array (True = the channel is removed).
        """
        spec = self.specs.get(id(tensor))
        if spec is None:
            return None
        keep = np.ones(spec.size, dtype=bool)
        groups, channels = self.atom_group[spec.atoms], self.atom_channel[spec.atoms]
        for gid in np.unique(groups):
            if int(gid) in drop:
                sel = groups == gid
                keep[sel] = ~drop[int(gid)][channels[sel]]
        return keep

    def inner_keep(self, layer, drop: dict) -> dict:
        """`{slot: kept mask}` of the channels inside `layer` (see `RuleContext.inner`).

        Only slots that lose channels under `drop` are listed.
        """
        out = {}
        for (lid, slot), atoms in self.inner.items():
            if lid != id(layer):
                continue
            gid = int(self.atom_group[atoms[0]])
            if gid in drop:
                keep = ~drop[gid][self.atom_channel[atoms]]
                if not keep.all():
                    out[slot] = keep
        return out

    def summary(self) -> str:
        """One line per group: id, size, producers, prunable or why not."""
        return "\n".join(repr(g) for g in self.groups)

    def blockers(self) -> dict:
        """Class name -> number of groups with producers that a layer of that class blocks.

        Groups blocked by the model itself (its inputs and outputs) are not
        counted. Most frequent first.

        Example:

        >>> DependencyGraph(model).blockers()
        {'MultiHeadAttention': 4, 'ViTPatchingAndEmbedding': 1}
        """
        counts: dict = {}
        for group in self.groups:
            if group.blocker is not None and group.producers:
                name = type(group.blocker).__name__
                counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def describe_blockers(self) -> str:
        """`blockers()` in words, e.g. "MultiHeadAttention (4 groups), Mean (1 group)"."""
        return ", ".join(f"{name} ({n} group{'s' if n > 1 else ''})"
                         for name, n in self.blockers().items())
