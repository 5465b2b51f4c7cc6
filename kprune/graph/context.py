"""What a layer rule sees and records while the graph is built."""

from __future__ import annotations

import dataclasses

import numpy as np

from kprune.graph.channels import AtomTable, ChannelSpec


@dataclasses.dataclass
class Record:
    """A layer's role on some atoms: 'producer', 'consumer' or 'param'."""

    layer: object
    kind: str
    atoms: np.ndarray
    input_index: int = 0
    slot: str | None = None


class RuleContext:
    """Handed to `LayerRule.propagate` for one call of one layer.

    Attributes:
        call: The `Call` being propagated.
        inputs: One `ChannelSpec` (or None) per input tensor of the call.
        shapes: One shape per input tensor (with the batch axis).
        out_shapes: One shape per output tensor.
    """

    def __init__(self, call, inputs, table: AtomTable, sink):
        self.call = call
        self.layer = call.layer
        self.inputs = inputs
        self.shapes = [tuple(t.shape) for t in call.inputs]
        self.out_shapes = [tuple(t.shape) for t in call.outputs]
        self._table = table
        self._sink = sink

    # Atoms -----------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        """`n` new atoms forming a new group (a producer's output channels)."""
        return self._table.new(n)

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Channels `a[i]` and `b[i]` are one channel: removed together."""
        self._table.tie(a, b)

    def tie_groups(self, a: np.ndarray, b: np.ndarray) -> None:
        """Rank the channels of `a` and `b` together without tying them."""
        self._table.tie_groups(a, b)

    # Roles -----------------------------------------------------------------
    def producer(self, atoms: np.ndarray, slot: str | None = None) -> None:
        """This layer writes the channels `atoms` (its output filters).

        Args:
            atoms: The channels.
            slot: For a layer with several kinds of filters (an attention
                layer's heads, its output projection), which ones; the rule's
                `rows(layer, slot, weights)` reads them for weight criteria.
        """
        self._sink.records.append(Record(self.layer, "producer", atoms, slot=slot))

    def inner(self, slot: str, n: int) -> np.ndarray:
        """`n` channels inside the layer (attention heads, per-head widths).

        They live on no tensor of the graph: the layer produces them and reads
        them itself, and its rule slices them from the `keep_inner[slot]` mask
        the surgeon passes. A layer called several times gets the same atoms
        at every call.
        """
        key = (id(self.layer), slot)
        if key not in self._sink.inner:
            atoms = self.fresh(n)
            self._sink.inner[key] = atoms
            self.producer(atoms, slot=slot)
        return self._sink.inner[key]

    def approximate(self, atoms: np.ndarray, note: str) -> None:
        """Removing channels of `atoms` changes what the kept ones compute.

        A normalisation that takes statistics over the channels (LayerNorm,
        RMSNorm) computes them over the kept channels once some are removed:
        the pruned model is not the masked one, only close to it. The group is
        marked `approximate` with `note`.
        """
        if len(atoms):
            self._sink.approx.append((atoms, note))

    def consumer(self, atoms: np.ndarray, input_index: int = 0) -> None:
        """This layer reads the channels `atoms` through input weights."""
        self._sink.records.append(Record(self.layer, "consumer", atoms, input_index))

    def param(self, atoms: np.ndarray) -> None:
        """This layer holds one parameter set per channel of `atoms`."""
        self._sink.records.append(Record(self.layer, "param", atoms))

    def partition(self, atoms: np.ndarray, parts: int) -> None:
        """Removals from `atoms` must be spread evenly over `parts` blocks."""
        ids = np.repeat(np.arange(parts), len(atoms) // parts)
        self._sink.partitions.append((atoms, ids, self.layer.name))

    def block(self, atoms: np.ndarray, reason: str) -> None:
        """The group holding `atoms` may not be pruned, for `reason`."""
        if len(atoms):
            self._sink.blocks.append((atoms, reason, self.layer))

    def block_all(self, reason: str) -> None:
        for spec in self.inputs:
            if spec is not None:
                self.block(spec.atoms, reason)

    def unknown_outputs(self, reason: str) -> list:
        """Fresh, blocked channel specs for every output of this call."""
        specs = []
        for shape in self.out_shapes:
            if len(shape) < 2 or shape[-1] is None:
                specs.append(None)
                continue
            atoms = self.fresh(int(shape[-1]))
            self.block(atoms, reason)
            specs.append(ChannelSpec(len(shape) - 1, atoms))
        return specs
