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
    def producer(self, atoms: np.ndarray) -> None:
        """This layer writes the channels `atoms` (its output filters)."""
        self._sink.records.append(Record(self.layer, "producer", atoms))

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
